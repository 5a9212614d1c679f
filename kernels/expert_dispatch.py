"""`omni::expert_dispatch`: logical top-k expert ids → storage rows of their replicas.

A logical expert may have several replicas. Each token-choice picks one of them
deterministically: the j-th occurrence of expert e in the flattened batch (in token order)
takes replica ``j mod count[e]``. That splits an expert's tokens over its replicas evenly to
within one token, which is the model the placement planner optimises for, and makes the
result independent of thread scheduling (no randomness, no atomics).

Tables (built by ``omni_passes.placement.tables.dispatch_tables``, persistent, updated in
place while serving; the op reaches them through ``state``, see ``kernels.state``):
    replica_slots  int64 [L, E, M]  the storage row of each expert's replicas
    replica_count  int64 [L, E]     how many of the M entries are used (>= 1)
The op also adds each chosen row to ``row_load[layer]`` (times the ``gate`` tensor): the
per-slot loads a host exports.

Two implementations, same integers: the eager kernel below (a custom-op call per MoE layer),
and an Inductor lowering (``kernels.inductor_lowerings``) that writes the same arithmetic
into the compiled graph, where it fuses with its neighbours.
"""

from __future__ import annotations

import torch

from kernels.common import check_layer
from kernels.state import lookup, run_step_hooks

# The occurrence index comes from a running count over a [N, E] one-hot (one cumsum, no
# host sync); beyond this many entries a stable sort needs less memory.
ONE_HOT_LIMIT = 1 << 21


def occurrence_index(flat: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``flat [N]`` int64 expert ids → int64 ``[N]``: how many earlier entries hold the same id."""
    n = flat.numel()
    if n * num_experts <= ONE_HOT_LIMIT:
        onehot = flat.unsqueeze(1) == torch.arange(num_experts, device=flat.device)
        running = onehot.cumsum(0, dtype=torch.int32)
        return running.gather(1, flat.unsqueeze(1)).squeeze(1).long() - 1
    # A stable sort groups equal ids in token order; an entry's index in its group is its
    # position minus the group's start (the running max of the positions where the id changes).
    sorted_ids, order = torch.sort(flat, stable=True)
    position = torch.arange(n, device=flat.device)
    starts_here = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts_here[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.where(starts_here, position, 0).cummax(0).values
    return torch.empty_like(position).scatter_(0, order, position - group_start)


def expert_dispatch_reference(
    topk_ids: torch.Tensor, replica_slots: torch.Tensor, replica_count: torch.Tensor, layer: int
) -> torch.Tensor:
    """PyTorch reference, any device. ``topk_ids [..., K]`` → rows of the same shape and dtype."""
    check_layer("expert_dispatch", replica_slots, replica_count, layer)
    flat = topk_ids.reshape(-1).long()
    replica = occurrence_index(flat, replica_count.shape[1]) % replica_count[layer].index_select(0, flat)
    rows = replica_slots[layer][flat, replica]
    return rows.to(topk_ids.dtype).reshape(topk_ids.shape)


def count_rows(row_load: torch.Tensor, gate: torch.Tensor, rows: torch.Tensor, layer: int) -> None:
    """``row_load[layer] += gate * bincount(rows)`` in place."""
    flat = rows.reshape(-1).long()
    row_load[layer].index_add_(0, flat, gate.expand(flat.numel()))


@torch.library.custom_op("omni::expert_dispatch", mutates_args=())
def expert_dispatch(topk_ids: torch.Tensor, state: int, layer: int) -> torch.Tensor:
    """Map logical expert ids to storage rows through MoE layer ``layer``'s replica table."""
    if layer == 0:
        # The first omni op of a forward (this eager kernel runs where no Inductor lowering
        # does, e.g. vllm-ascend): the host closes the previous step and opens this one here,
        # before any count or table read (kernels.state, "next").
        run_step_hooks(state, "next")
    rows = expert_dispatch_reference(topk_ids, lookup(state, "replica_slots"), lookup(state, "replica_count"), layer)
    count_rows(lookup(state, "row_load"), lookup(state, "gate"), rows, layer)
    return rows


@expert_dispatch.register_fake
def _(topk_ids, state, layer):
    return torch.empty_like(topk_ids)
