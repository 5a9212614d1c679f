"""Triton: exact sink+recent prefill attention for vLLM's MLA layers (imported lazily).

A prefill request r brings new tokens at positions [C, C + L) (C: its cached context). A query at
position p attends to the keys at positions [0, sink) ∪ (p − recent, p]. The keys come from two
places, and the kernel reads both directly, one pass, one online softmax, no merge:

    context rows   the visible cached rows, up-projected: [0, min(sink, C)) then
                   [max(sink, C + 1 − recent), C) (``kv_prefill.context_positions``), packed per
                   request (``ctx_starts``); never a freed row, since only these are gathered
    new rows       the request's own fresh k, v (rows ``starts[r]:starts[r + 1]``)

One program per (block of BLOCK_M queries of one request, head). For its queries
[C + i0, C + i0 + BLOCK_M) it walks, BLOCK_N keys at a time, three disjoint index ranges::

    context rows   all of them, or only the sink rows once i0 >= recent − 1 (no query of the
                   block then sees a cached tail row)
    new sink keys  new offsets j < min(sink − C, lo): keys below ``sink`` left of the window
    window         new offsets [lo, hi) = (i0 − recent, i0 + BLOCK_M − 1] ∩ [0, L)

and masks each score by the rule itself (key ≤ query, and key < sink or key > query − recent),
so ranges that start off block boundaries need no special case. Work per query is bounded by
sink + recent + BLOCK_M keys whatever the prompt length: a 32k-token prompt costs what a
window-sized one costs per token.

q and k are split as MLA splits them (qk_nope then qk_rope: 128 + 64 for DeepSeek; each part a
power of two for ``tl.dot``); v has its own width (128). Outputs [T, H, Dv] in q's dtype. Not a
CUDA-graph kernel (prefill runs between vLLM's graph pieces): the block plan is built on the host
from the batch's host lengths (``prefill_plan``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["BLOCK_M", "PrefillPlan", "host_to_device", "prefill_plan", "sink_recent_prefill_attention"]

_LOG2E = 1.4426950408889634
BLOCK_M = 64  # queries per program; the plan's blocks are cut at this size


@dataclass(frozen=True)
class PrefillPlan:
    """Device tensors describing one prefill batch; shared by every compressed layer of a step."""

    starts: torch.Tensor        # [P + 1] int32, new-token rows of each request
    ctx_starts: torch.Tensor    # [P + 1] int32, packed context rows of each request
    context_lens: torch.Tensor  # [P] int32, C of each request
    block_request: torch.Tensor  # [NB] int32, request of each query block
    block_first: torch.Tensor   # [NB] int32, first query offset (within its request) of each block
    num_tokens: int             # T
    num_ctx_rows: int           # rows of the packed context


def host_to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor copied to ``device`` without making the host wait: through pinned memory on
    CUDA. vLLM builds the next step's metadata while the GPU runs the current one (async
    scheduling); a copy from pageable memory would block the host until the stream drains."""
    if torch.device(device).type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def prefill_plan(starts: list[int], context_lens: list[int], context_rows: list[int],
                 device: torch.device | str) -> PrefillPlan:
    """The plan of a batch from host lists: ``starts`` [P + 1] (from 0), ``context_lens`` [P] and
    ``context_rows`` [P], how many visible cached rows each request brings (the length of
    ``kv_prefill.context_positions``; the kernel maps row j back to its position itself)."""
    if len(starts) != len(context_lens) + 1 or starts[0] != 0 or len(context_rows) != len(context_lens):
        raise ValueError(f"prefill_plan: starts must be [0, ...] with one more entry than context_lens and "
                         f"context_rows, got {len(starts)}, {len(context_lens)}, {len(context_rows)}")
    ctx = [0]
    block_request: list[int] = []
    block_first: list[int] = []
    for r, (context, rows) in enumerate(zip(context_lens, context_rows)):
        length = starts[r + 1] - starts[r]
        if length < 0 or context < 0 or not 0 <= rows <= context:
            raise ValueError(f"prefill_plan: request {r} has {length} new tokens after {context} cached ones, "
                             f"{rows} of them visible")
        ctx.append(ctx[-1] + rows)
        first = list(range(0, length, BLOCK_M))
        block_request += [r] * len(first)
        block_first += first

    def tensor(values: list[int]) -> torch.Tensor:
        return host_to_device(torch.tensor(values, dtype=torch.int32), device)

    return PrefillPlan(tensor(starts), tensor(ctx), tensor(context_lens), tensor(block_request),
                       tensor(block_first), starts[-1], ctx[-1])


@triton.jit
def _accumulate(q1, q2, K, V, rows, key_pos, row_ok, q_pos, q_ok, sink, recent, qk_scale,
                m_i, l_i, acc, skt, skh, svt, svh, head,
                D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr, IEEE: tl.constexpr):
    """One BLOCK_N tile of keys (``rows`` of K / V, positions ``key_pos``) into the online softmax."""
    d1 = tl.arange(0, D1)
    d2 = tl.arange(0, D2)
    dv = tl.arange(0, DV)
    rows = rows.to(tl.int64)  # a 64k-token chunk at 128 heads passes 2^31 elements
    k_base = K + rows[:, None] * skt + head * skh
    k1 = tl.load(k_base + d1[None, :], mask=row_ok[:, None], other=0.0)
    k2 = tl.load(k_base + D1 + d2[None, :], mask=row_ok[:, None], other=0.0)
    if IEEE:
        s = tl.dot(q1, tl.trans(k1), input_precision="ieee") + tl.dot(q2, tl.trans(k2), input_precision="ieee")
    else:
        s = tl.dot(q1, tl.trans(k1)) + tl.dot(q2, tl.trans(k2))
    kp = key_pos[None, :]
    qp = q_pos[:, None]
    visible = row_ok[None, :] & q_ok[:, None] & (kp <= qp) & ((kp < sink) | (kp > qp - recent))
    s = tl.where(visible, s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(V + rows[:, None] * svt + head * svh + dv[None, :], mask=row_ok[:, None], other=0.0)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _sink_recent_prefill_kernel(
    Q, K, V, KC, VC, O, QS, CS, CL, BR, BQ,
    sqt, sqh, skt, skh, svt, svh, sct, sch, svct, svch, sot, soh,
    sink, recent, qk_scale,
    D1: tl.constexpr, D2: tl.constexpr, DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    r = tl.load(BR + block)
    i0 = tl.load(BQ + block)
    q_row0 = tl.load(QS + r)
    length = tl.load(QS + r + 1) - q_row0
    context = tl.load(CL + r)
    ctx_row0 = tl.load(CS + r)
    n_ctx = tl.load(CS + r + 1) - ctx_row0

    offs_m = i0 + tl.arange(0, BLOCK_M)
    q_ok = offs_m < length
    q_pos = context + offs_m
    d1 = tl.arange(0, D1)
    d2 = tl.arange(0, D2)
    dv = tl.arange(0, DV)
    q_rows = (q_row0 + offs_m).to(tl.int64)
    q_base = Q + q_rows[:, None] * sqt + head * sqh
    q1 = tl.load(q_base + d1[None, :], mask=q_ok[:, None], other=0.0)
    q2 = tl.load(q_base + D1 + d2[None, :], mask=q_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)

    # Context rows: the sink rows (positions 0..n_head-1), then the tail from tail_start.
    n_head = tl.minimum(sink, context)
    tail_start = tl.minimum(context, tl.maximum(sink, context + 1 - recent))
    ctx_end = tl.where(i0 < recent - 1, n_ctx, n_head)
    for start in range(0, ctx_end, BLOCK_N):
        j = start + n
        ok = j < ctx_end
        pos = tl.where(j < n_head, j, tail_start + j - n_head)
        m_i, l_i, acc = _accumulate(q1, q2, KC, VC, ctx_row0 + j, pos, ok, q_pos, q_ok, sink, recent, qk_scale,
                                    m_i, l_i, acc, sct, sch, svct, svch, head, D1, D2, DV, IEEE)

    # New keys: those below sink left of the window, then the window (disjoint ranges).
    lo = tl.maximum(0, i0 - recent + 1)
    hi = tl.minimum(length, i0 + BLOCK_M)
    sink_end = tl.minimum(tl.maximum(0, sink - context), lo)
    for start in range(0, sink_end, BLOCK_N):
        j = start + n
        ok = j < sink_end
        m_i, l_i, acc = _accumulate(q1, q2, K, V, q_row0 + j, context + j, ok, q_pos, q_ok, sink, recent,
                                    qk_scale, m_i, l_i, acc, skt, skh, svt, svh, head, D1, D2, DV, IEEE)
    for start in range(lo, hi, BLOCK_N):
        j = start + n
        ok = j < hi
        m_i, l_i, acc = _accumulate(q1, q2, K, V, q_row0 + j, context + j, ok, q_pos, q_ok, sink, recent,
                                    qk_scale, m_i, l_i, acc, skt, skh, svt, svh, head, D1, D2, DV, IEEE)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_ptr = O + q_rows[:, None] * sot + head * soh + dv[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=q_ok[:, None])


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def sink_recent_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_ctx: torch.Tensor,
                                  v_ctx: torch.Tensor, plan: PrefillPlan, sink: int, recent: int, scale: float,
                                  qk_nope_dim: int, block_n: int = 64, num_warps: int = 4,
                                  num_stages: int = 2) -> torch.Tensor:
    """Sink+recent attention of a prefill batch's new tokens.

    q, k [T, H, D] (D = qk_nope_dim + rope dim), v [T, H, Dv]: the new tokens, request r at rows
    ``plan.starts[r]:plan.starts[r + 1]``; k_ctx [N, H, D], v_ctx [N, H, Dv]: each request's
    visible cached rows in ``kv_prefill.context_positions`` order, packed by ``plan.ctx_starts``.
    Unit stride along the last dim everywhere. -> [T, H, Dv] in q's dtype.
    """
    T, H, D = q.shape
    DV = v.shape[-1]
    D1, D2 = qk_nope_dim, D - qk_nope_dim
    problems = []
    if not (_pow2(D1) and _pow2(D2) and _pow2(DV) and min(D1, D2, DV) >= 16):
        problems.append(f"head dims (nope {D1}, rope {D2}, v {DV}) must be powers of two >= 16")
    if tuple(k.shape) != (T, H, D) or tuple(v.shape[:2]) != (T, H):
        problems.append(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if tuple(k_ctx.shape[1:]) != (H, D) or tuple(v_ctx.shape[1:]) != (H, DV) or k_ctx.shape[0] != v_ctx.shape[0]:
        problems.append(f"k_ctx {tuple(k_ctx.shape)} / v_ctx {tuple(v_ctx.shape)} must be [N, {H}, {D}] / [N, {H}, {DV}]")
    if k_ctx.shape[0] != plan.num_ctx_rows or T != plan.num_tokens:
        problems.append(f"the plan has {plan.num_tokens} tokens and {plan.num_ctx_rows} context rows; got {T} and "
                        f"{k_ctx.shape[0]}")
    if any(t.numel() and t.stride(-1) != 1 for t in (q, k, v, k_ctx, v_ctx)):
        problems.append("every tensor needs unit stride along its last dim")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        problems.append(f"needs CUDA tensors (got {q.device}) or Triton's interpreter (TRITON_INTERPRET=1)")
    if problems:
        raise ValueError("sink_recent_prefill_attention: " + "; ".join(problems))
    out = torch.empty(T, H, DV, device=q.device, dtype=q.dtype)
    blocks = plan.block_request.shape[0]
    if T == 0 or H == 0 or blocks == 0:
        return out
    if k_ctx.shape[0] == 0:  # nothing cached: pointers that are never read
        k_ctx, v_ctx = k[:1], v[:1]
    _sink_recent_prefill_kernel[(blocks, H)](
        q, k, v, k_ctx, v_ctx, out, plan.starts, plan.ctx_starts, plan.context_lens, plan.block_request,
        plan.block_first,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_ctx.stride(0), k_ctx.stride(1), v_ctx.stride(0), v_ctx.stride(1), out.stride(0), out.stride(1),
        sink, recent, scale * _LOG2E,
        D1=D1, D2=D2, DV=DV, BLOCK_M=BLOCK_M, BLOCK_N=block_n, IEEE=q.dtype == torch.float32,
        num_warps=num_warps, num_stages=num_stages)
    return out
