"""Run-time placement state: the persistent tensors the omni ops read while serving.

Compiled graphs hold references to these tensors, never copies of their values, so a new
placement is applied by writing into them in place (``ExpertPlacementState.apply``) and no
graph is recompiled. Their shapes are fixed at creation for the same reason: the replica
table is as wide as the most replicas any expert could have (``num_slots - E + 1``).

The tables name *storage rows*: with the default ``slot_layout`` a row is a placement slot
(expert parallelism: each rank stores its slots); single-device hosts use the compact layout
of ``omni_passes.placement.layout`` through ``PlacementController``, which also owns the
weights in those rows. Counting is tensor-side (``gate`` multiplies every count), so it is
right under CUDA-graph replay too.
"""

from __future__ import annotations

import torch

from kernels.state import register_state, unregister_state
from omni_passes.placement.layout import RowLayout, slot_layout
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


class ExpertPlacementState:
    """Persistent dispatch tables and load counters for one model's MoE layers.

    Attributes:
        replica_slots: int64 ``[L, E, M]``; ``replica_count``: int64 ``[L, E]``;
        expert_load: int64 ``[L, E]`` tokens routed to each logical expert since ``take_load``;
        row_load: int64 ``[L, P]`` tokens each storage row served since ``take_load``;
        gate: int64 ``[1]``, multiplies every count (0 while a host runs warm-up batches).
        layout: the slot → row map the tables use.
    """

    def __init__(self, placement: Placement, device: torch.device | str = "cpu", local_rank: int | None = None,
                 layout: RowLayout | None = None):
        self.placement = placement
        self.local_rank = local_rank
        self.layout = layout if layout is not None else slot_layout(placement.phy2log)
        self.width = placement.num_slots - placement.num_logical_experts + 1
        slots, counts = dispatch_tables(placement, local_rank, self.width, self.layout.slot_row)
        self.replica_slots = slots.to(device)
        self.replica_count = counts.to(device)
        self.expert_load = torch.zeros(placement.num_layers, placement.num_logical_experts, dtype=torch.int64, device=device)
        self.row_load = torch.zeros(placement.num_layers, placement.num_slots, dtype=torch.int64, device=device)
        self.gate = torch.ones(1, dtype=torch.int64, device=device)
        # cumulative totals of what take_load / apply folded out of the live counters (CPU)
        self._expert_total = torch.zeros(placement.num_layers, placement.num_logical_experts, dtype=torch.int64)
        self._slot_total = torch.zeros(placement.num_layers, placement.num_slots, dtype=torch.int64)
        self.updates = 0
        # The handle compiled graphs pass to omni ops to reach these tensors (kernels.state).
        self.handle = register_state({
            "replica_slots": self.replica_slots, "replica_count": self.replica_count,
            "expert_load": self.expert_load, "row_load": self.row_load, "gate": self.gate,
        })

    @property
    def num_layers(self) -> int:
        return self.placement.num_layers

    def apply(self, placement: Placement, layout: RowLayout | None = None) -> None:
        """Switch the tables to ``placement`` in place: same tensors, new contents, no recompile.
        Weights are not touched here: with the compact layout use ``PlacementController.apply``."""
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
        layout = layout if layout is not None else slot_layout(placement.phy2log)
        slots, counts = dispatch_tables(placement, self.local_rank, self.width, layout.slot_row)
        self._fold_rows()  # row counts so far belong to the old slot → row map
        self.replica_slots.copy_(slots)
        self.replica_count.copy_(counts)
        self.placement = placement
        self.layout = layout
        self.updates += 1

    def take_load(self) -> torch.Tensor:
        """Loads recorded since the last call (``[L, E]`` int64, on CPU); resets the counters
        (the cumulative totals keep them)."""
        snapshot = self.expert_load.cpu().clone()
        self.expert_load.zero_()
        self._expert_total += snapshot
        self._fold_rows()
        return snapshot

    def total_expert_load(self) -> torch.Tensor:
        """``[L, E]`` int64 (CPU): every token counted since creation, per logical expert."""
        return self._expert_total + self.expert_load.cpu()

    def total_slot_load(self) -> torch.Tensor:
        """``[L, P]`` int64 (CPU): every token counted since creation, per placement slot (a
        slot's count follows the slot, whichever expert it held at the time)."""
        return self._slot_total + self.row_load.cpu().gather(1, self.layout.slot_row)

    def _fold_rows(self) -> None:
        self._slot_total += self.row_load.cpu().gather(1, self.layout.slot_row)
        self.row_load.zero_()

    def close(self) -> None:
        """Unregister the tensors (graphs compiled against this state stop working)."""
        unregister_state(self.handle)

    @property
    def device(self) -> torch.device:
        return self.replica_slots.device
