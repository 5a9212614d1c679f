"""`omni::expert_dispatch`: logical top-k expert ids → physical slot ids.

A logical expert may have several replicas (slots). Each token-choice picks one of them
deterministically: the j-th occurrence of expert e in the flattened batch (in token order)
takes replica ``j mod count[e]``. That splits an expert's tokens over its replicas evenly to
within one token, which is the model the placement planner optimises for, and makes the
result independent of thread scheduling (no randomness, no atomics).

Tables (built by ``omni_passes.placement.runtime.dispatch_tables``, persistent, updated in
place while serving; the op reaches them through ``state``, see ``kernels.state``):
    replica_slots  int64 [L, E, M]  the slots of each expert's replicas
    replica_count  int64 [L, E]     how many of the M entries are used (>= 1)
"""

from __future__ import annotations

import torch

from kernels.common import check_layer
from kernels.state import lookup


def expert_dispatch_reference(
    topk_ids: torch.Tensor, replica_slots: torch.Tensor, replica_count: torch.Tensor, layer: int
) -> torch.Tensor:
    """PyTorch reference, any device. ``topk_ids [..., K]`` → slot ids of the same shape and dtype."""
    check_layer("expert_dispatch", replica_slots, replica_count, layer)
    flat = topk_ids.reshape(-1).long()
    n = flat.numel()
    # Occurrence index of each entry within its expert: a stable sort groups equal ids in
    # token order; an entry's index in its group is its position minus the group's start
    # (the running max of the positions where the id changes).
    sorted_ids, order = torch.sort(flat, stable=True)
    position = torch.arange(n, device=flat.device)
    starts_here = torch.ones_like(sorted_ids, dtype=torch.bool)
    starts_here[1:] = sorted_ids[1:] != sorted_ids[:-1]
    group_start = torch.where(starts_here, position, 0).cummax(0).values
    occurrence_sorted = position - group_start
    occurrence = torch.empty_like(occurrence_sorted).scatter_(0, order, occurrence_sorted)
    replica = occurrence % replica_count[layer].index_select(0, flat)
    slots = replica_slots[layer][flat, replica]
    return slots.to(topk_ids.dtype).reshape(topk_ids.shape)


@torch.library.custom_op("omni::expert_dispatch", mutates_args=())
def expert_dispatch(topk_ids: torch.Tensor, state: int, layer: int) -> torch.Tensor:
    """Map logical expert ids to physical slots through MoE layer ``layer``'s replica table."""
    return expert_dispatch_reference(topk_ids, lookup(state, "replica_slots"), lookup(state, "replica_count"), layer)


@expert_dispatch.register_fake
def _(topk_ids, state, layer):
    return torch.empty_like(topk_ids)
