"""Dispatch tables: a placement → which storage rows serve each logical expert.

``omni::expert_dispatch`` reads these (persistent, written in place by the placement's owner,
``omni_passes.placement.controller``): for each MoE layer and logical expert, the storage rows
of its replicas in slot order and how many there are. The j-th token-choice of an expert takes
replica ``j mod count``.

Pure: a placement (and a slot → row map) in, new CPU tensors out.
"""

from __future__ import annotations

import torch

from omni_passes.placement.placement import Placement, PlacementError


def dispatch_tables(
    placement: Placement, local_rank: int | None = None, width: int | None = None,
    slot_row: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical expert → replica storage rows, for ``omni::expert_dispatch``.

    Args:
        placement: the placement with ``phy2log [L, num_slots]``.
        local_rank: if given, an expert with a replica on this rank lists only its local
            replicas, so tokens stay on the rank (a replica on the local rank is preferred).
        width: table width M (default: ``num_slots - E + 1``, the most any expert can have).
        slot_row: int64 ``[L, num_slots]`` storage row of each slot (default: the slot itself).

    Returns:
        replica_slots: int64 ``[L, E, M]``, the rows of each expert's replicas in slot order,
            padded with the first replica's row (never read, but always a valid index).
        replica_count: int64 ``[L, E]``, how many leading entries of ``replica_slots`` are used.
    """
    num_layers, num_slots = placement.phy2log.shape
    num_experts = placement.num_logical_experts
    width = width or (num_slots - num_experts + 1)
    phy2log = placement.phy2log
    slot_ids = torch.arange(num_slots).expand(num_layers, num_slots)
    if local_rank is not None:
        on_rank = placement.slot_rank() == local_rank
        # Push remote slots of experts that also have a local replica out of the table.
        has_local = torch.zeros(num_layers, num_experts, dtype=torch.bool)
        has_local.scatter_(1, phy2log[:, on_rank], True)
        keep = on_rank.expand(num_layers, num_slots) | ~has_local.gather(1, phy2log)
    else:
        keep = torch.ones(num_layers, num_slots, dtype=torch.bool)
    # Sort slots by (expert, not-kept, slot): each expert's kept replicas come first, in slot order.
    key = phy2log * (2 * num_slots) + (~keep).long() * num_slots + slot_ids
    order = key.argsort(dim=1)
    sorted_slots = slot_ids.gather(1, order)
    sorted_experts = phy2log.gather(1, order)
    count_all = torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(1, phy2log, torch.ones_like(phy2log))
    replica_count = torch.zeros(num_layers, num_experts, dtype=torch.int64).scatter_add_(1, phy2log, keep.long())
    if int(count_all.max()) > width:
        raise PlacementError(f"an expert has {int(count_all.max())} replicas, more than the table width {width}")
    first = torch.cumsum(count_all, dim=1) - count_all  # start of each expert's run in sorted order
    rank_in_expert = torch.arange(num_slots).expand(num_layers, num_slots) - first.gather(1, sorted_experts)
    replica_slots = torch.zeros(num_layers, num_experts, width, dtype=torch.int64)
    replica_slots.view(num_layers, -1).scatter_(1, sorted_experts * width + rank_in_expert, sorted_slots)
    # Pad unused entries with the expert's first replica.
    pad = torch.arange(width).view(1, 1, width) >= count_all.unsqueeze(-1)
    replica_slots = torch.where(pad, replica_slots[:, :, :1].expand_as(replica_slots), replica_slots)
    if slot_row is not None:
        replica_slots = slot_row.gather(1, replica_slots.view(num_layers, -1)).view_as(replica_slots)
    return replica_slots, replica_count
