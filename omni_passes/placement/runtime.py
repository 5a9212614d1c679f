"""Run-time placement state: the persistent tensors the omni ops read while serving.

Compiled graphs hold references to these tensors, never copies of their values, so a new
placement is applied by writing into them in place (``ExpertPlacementState.apply``) and no
graph is recompiled. Their shapes are fixed at creation for the same reason: the replica
table is as wide as the most replicas any expert could have (``num_slots - E + 1``).
"""

from __future__ import annotations

import torch

from kernels.state import register_state
from omni_passes.placement.placement import Placement, PlacementError


def dispatch_tables(
    placement: Placement, local_rank: int | None = None, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logical expert → replica slots, for ``omni::expert_dispatch``.

    Args:
        placement: the placement with ``phy2log [L, num_slots]``.
        local_rank: if given, an expert with a replica on this rank lists only its local
            replicas, so tokens stay on the rank (a replica on the local rank is preferred).
        width: table width M (default: ``num_slots - E + 1``, the most any expert can have).

    Returns:
        replica_slots: int64 ``[L, E, M]``, the slots of each expert's replicas in slot order,
            padded with the first replica's slot (never read, but always a valid index).
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
    return replica_slots, replica_count


class ExpertPlacementState:
    """Persistent dispatch tables and load counters for one model's MoE layers.

    Attributes:
        replica_slots: int64 ``[L, E, M]``; ``replica_count``: int64 ``[L, E]``;
        expert_load: int64 ``[L, E]`` cumulative tokens routed to each logical expert.
    """

    def __init__(self, placement: Placement, device: torch.device | str = "cpu", local_rank: int | None = None):
        self.placement = placement
        self.local_rank = local_rank
        self.width = placement.num_slots - placement.num_logical_experts + 1
        slots, counts = dispatch_tables(placement, local_rank, self.width)
        self.replica_slots = slots.to(device)
        self.replica_count = counts.to(device)
        self.expert_load = torch.zeros(placement.num_layers, placement.num_logical_experts, dtype=torch.int64, device=device)
        self.updates = 0
        # The handle compiled graphs pass to omni ops to reach these tensors (kernels.state).
        self.handle = register_state(
            {"replica_slots": self.replica_slots, "replica_count": self.replica_count, "expert_load": self.expert_load}
        )

    @property
    def num_layers(self) -> int:
        return self.placement.num_layers

    def apply(self, placement: Placement) -> None:
        """Switch to ``placement`` in place: same tensors, new contents, no recompile."""
        old = self.placement
        same_shape = (
            placement.num_layers == old.num_layers
            and placement.num_logical_experts == old.num_logical_experts
            and placement.num_slots == old.num_slots
        )
        if not same_shape:
            raise PlacementError(
                f"new placement ({placement.num_layers} layers x {placement.num_logical_experts} experts, "
                f"{placement.num_slots} slots) does not match the compiled one ({old.num_layers} x "
                f"{old.num_logical_experts}, {old.num_slots} slots)"
            )
        slots, counts = dispatch_tables(placement, self.local_rank, self.width)
        self.replica_slots.copy_(slots)
        self.replica_count.copy_(counts)
        self.placement = placement
        self.updates += 1

    def take_load(self) -> torch.Tensor:
        """Loads recorded since the last call (``[L, E]`` int64, on CPU); resets the counters."""
        snapshot = self.expert_load.cpu().clone()
        self.expert_load.zero_()
        return snapshot

    @property
    def device(self) -> torch.device:
        return self.replica_slots.device
