"""Triton: logical expert ids -> storage rows, and both load counts, in one kernel per MoE layer call.

What ``kernels.vllm_slot_moe.dispatch_and_count`` does in PyTorch (``expert_dispatch_reference``
plus two ``index_add_`` and the mask arithmetic: about ten small kernels per layer and step,
microseconds each inside a CUDA graph), as one launch::

    ids [T, K] (flattened to N = T*K entries, token-major)
      occurrence[i] = #{ j < i : ids[j] == ids[i] }              (pairwise, j-tiles of BLOCK_J)
      row[i]        = replica_slots[ids[i], occurrence[i] mod replica_count[ids[i]]]
      add[i]        = gate * token_mask[i // K]                  (0 for padding rows, or gate closed)
      expert_load[ids[i]] += add[i];  row_load[row[i]] += add[i]  (integer atomics: exact, any order)
    -> rows [T, K], ids' dtype

The tables and counters are one MoE layer's rows (``replica_slots[layer]`` etc.: views, the
caller picks the layer), so the kernel never sees a layer index and one compiled kernel serves
every layer. Everything it reads is on the device (tables, gate, mask), nothing syncs, and the
grid depends on N only: a CUDA graph captures it and replays it against live tables.

Programs: one per BLOCK_I entries; program p compares its entries with every entry before its
block's end, so the work is N^2/2 comparisons spread over N/BLOCK_I programs (one program up
to 64 entries: decode batches of 10 tokens at top-6). That stays small for decode and for
prefill chunks up to ``PAIRWISE_LIMIT`` entries; above it ``dispatch_and_count`` keeps the
PyTorch path (one-hot running count, or a stable sort), whose cost grows linearly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["PAIRWISE_LIMIT", "slot_dispatch_count"]

# Entries (T*K) up to which the pairwise kernel is used; above it the PyTorch path is used. At
# 16384 entries (2730 tokens at top-6) the pairwise work is 1.3e8 comparisons over 256 programs:
# tens of microseconds on an H100, about what the PyTorch path costs there. The GPU op check
# (omni_passes.testing.vllm_cuda_dump) times both paths at several sizes.
PAIRWISE_LIMIT = 16384
BLOCK_I = 64
BLOCK_J = 64


# N (entries) varies with the batch: not specialised, so a new batch size (a CUDA-graph capture
# size, a prefill chunk) reuses the compiled kernel instead of compiling another variant.
@triton.jit(do_not_specialize=["N"])
def _slot_dispatch_count_kernel(
    IDS, SLOTS, COUNT, EXPERT_LOAD, ROW_LOAD, GATE, MASK, ROWS,
    N, K, M,
    HAS_MASK: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_i = pid * BLOCK_I + tl.arange(0, BLOCK_I)
    valid = offs_i < N
    ids_i = tl.load(IDS + offs_i, mask=valid, other=-1).to(tl.int64)
    # occurrence: equal ids strictly before each entry (token order), over j-tiles up to the block's end
    occurrence = tl.zeros([BLOCK_I], dtype=tl.int32)
    for start in range(0, pid * BLOCK_I + BLOCK_I, BLOCK_J):
        offs_j = start + tl.arange(0, BLOCK_J)
        ids_j = tl.load(IDS + offs_j, mask=offs_j < N, other=-2).to(tl.int64)
        same = (ids_j[None, :] == ids_i[:, None]) & (offs_j[None, :] < offs_i[:, None])
        occurrence += tl.sum(same.to(tl.int32), axis=1)
    safe_ids = tl.where(valid, ids_i, 0)
    count = tl.load(COUNT + safe_ids, mask=valid, other=1)
    replica = occurrence.to(tl.int64) % count
    row = tl.load(SLOTS + safe_ids * M + replica, mask=valid, other=0)
    tl.store(ROWS + offs_i, row.to(ROWS.dtype.element_ty), mask=valid)
    gate = tl.load(GATE).to(tl.int64)
    if HAS_MASK:
        real = tl.load(MASK + offs_i // K, mask=valid, other=0) != 0
        add = tl.where(real, gate, 0)
    else:
        add = tl.zeros([BLOCK_I], dtype=tl.int64) + gate
    counted = valid & (add != 0)
    tl.atomic_add(EXPERT_LOAD + safe_ids, add, mask=counted, sem="relaxed")
    tl.atomic_add(ROW_LOAD + row, add, mask=counted, sem="relaxed")


def slot_dispatch_count(ids: torch.Tensor, replica_slots: torch.Tensor, replica_count: torch.Tensor,
                        expert_load: torch.Tensor, row_load: torch.Tensor, gate: torch.Tensor,
                        token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """One MoE layer's dispatch and counts (module docstring), in place on the counters.

    Args:
        ids: ``[T, K]`` int32/int64 logical expert ids (the router's output).
        replica_slots: int64 ``[E, M]``, this layer's storage row of each expert's replicas.
        replica_count: int64 ``[E]``, replicas in use per expert (>= 1).
        expert_load: int64 ``[E]`` and row_load: int64 ``[P]``, this layer's counters.
        gate: int64 ``[1]``, multiplies every count (0: count nothing).
        token_mask: optional bool ``[>= T]``, True for real tokens (padding rows are not counted;
            they are still dispatched).

    Returns ``[T, K]`` storage rows, ``ids``' dtype. CUDA tensors, or CPU ones under
    ``TRITON_INTERPRET=1``.
    """
    if ids.dim() != 2:
        raise ValueError(f"slot_dispatch_count: ids must be [T, K], got shape {tuple(ids.shape)}")
    experts, width = replica_slots.shape
    for name, tensor, shape in (("replica_count", replica_count, (experts,)), ("expert_load", expert_load, (experts,))):
        if tuple(tensor.shape) != shape:
            raise ValueError(f"slot_dispatch_count: {name} must have shape {shape}, got {tuple(tensor.shape)}")
    for name, tensor in (("replica_slots", replica_slots), ("replica_count", replica_count),
                         ("expert_load", expert_load), ("row_load", row_load), ("gate", gate)):
        if tensor.dtype != torch.int64 or not tensor.is_contiguous():
            raise ValueError(f"slot_dispatch_count: {name} must be a contiguous int64 tensor, got {tensor.dtype}")
    if token_mask is not None and token_mask.numel() < ids.shape[0]:
        raise ValueError(f"slot_dispatch_count: token_mask has {token_mask.numel()} rows for {ids.shape[0]} tokens")
    flat = ids.contiguous()
    rows = torch.empty_like(flat)
    n = flat.numel()
    if n == 0:
        return rows
    mask = token_mask.view(torch.uint8) if token_mask is not None else gate  # any pointer when there is no mask
    grid = (triton.cdiv(n, BLOCK_I),)
    _slot_dispatch_count_kernel[grid](
        flat, replica_slots, replica_count, expert_load, row_load, gate, mask, rows,
        n, ids.shape[1], width,
        HAS_MASK=token_mask is not None, BLOCK_I=BLOCK_I, BLOCK_J=BLOCK_J,
    )
    return rows
