"""PlacementController: the one owner of "the slot weights match the dispatch tables".

On one device every host (``omni_passes.compile``, vLLM, the online rebalancer) holds a
placement through this class and changes it only through ``apply``. It keeps

* the row layout (``omni_passes.placement.layout.compact_layout``): placement slot → storage
  row, rows ``0..E-1`` the logical experts, rows ``E..P-1`` the extra replicas;
* the expert storage rows (``ExpertRows``, when the placement has redundant slots);
* the dispatch tables and counters the ops read (``ExpertPlacementState``, tables in rows).

``apply`` computes the new layout (extra rows keep their expert where they can), copies the
rows whose expert changes, then writes the tables: between two forward passes the weights
and the tables always agree, and any placement that keeps the shape is exact. A placement
with redundant slots on a host that cannot extend the expert tensors is refused here, with
the reason.

Expert parallelism (``omni_passes.ep``) differs: a slot is real storage on its rank, so EP
keeps slot-space tables (``ExpertPlacementState`` with its default layout) and its
``ExpertParallelMoE.apply`` rewrites the rank's slot weights before the tables.
"""

from __future__ import annotations

from typing import Callable

import torch

from kernels.state import add_tensors
from omni_passes.placement.layout import RowLayout, compact_layout
from omni_passes.placement.materialize import ExpertRows
from omni_passes.placement.placement import Placement, PlacementError
from omni_passes.placement.runtime import ExpertPlacementState

RowsFactory = Callable[[RowLayout], ExpertRows]


class PlacementController:
    """Placement, storage rows and tables of one model on one device.

    Args:
        placement: the starting placement (checked against the model by the caller).
        device: where the tables and counters live (the model's device).
        rows: builds the ``[P, ...]`` expert storage for a layout; needed iff R > 0.
        cannot_extend: why the host has no ``rows`` (named in the refusal).
    """

    def __init__(self, placement: Placement, device: torch.device | str = "cpu", rows: RowsFactory | None = None,
                 cannot_extend: str = "this host cannot extend the expert weights to E + R rows"):
        layout = compact_layout(placement.phy2log, placement.num_logical_experts)
        self.weights: ExpertRows | None = None
        if placement.num_redundant > 0:
            if rows is None:
                raise PlacementError(f"placement with {placement.num_redundant} redundant slots per MoE layer refused: {cannot_extend}")
            self.weights = rows(layout)
        self.state = ExpertPlacementState(placement, device=device, layout=layout)
        if self.weights is not None:  # ops that run on the rows find them by name (kernels.slot_fused_moe)
            add_tensors(self.state.handle, {f"rows{layer}.{name}": tensor for layer, tensors in enumerate(self.weights.storage)
                                            for name, tensor in tensors.items()})
        self.rows_copied = 0

    # ---- the invariant -----------------------------------------------------------------------
    def apply(self, placement: Placement) -> int:
        """Switch to ``placement`` in place (rows whose expert changes, then tables); returns
        the number of rows copied. Call between forward passes; no recompile."""
        current = self.state.placement
        placement.check_fits(current.num_layers, current.num_logical_experts, source="new placement")
        if placement.num_slots != current.num_slots:
            raise PlacementError(
                f"new placement has {placement.num_slots} slots per MoE layer, the running one {current.num_slots}: "
                "the storage rows and tables are sized for the running one"
            )
        layout = compact_layout(placement.phy2log, placement.num_logical_experts, previous=self.state.layout)
        copied = self.weights.apply(layout) if self.weights is not None else 0
        self.state.apply(placement, layout)
        self.rows_copied += copied
        return copied

    # ---- what hosts and the rebalancer read --------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self.state.placement

    @property
    def layout(self) -> RowLayout:
        return self.state.layout

    @property
    def handle(self) -> int:
        return self.state.handle

    @property
    def device(self) -> torch.device:
        return self.state.device

    @property
    def num_layers(self) -> int:
        return self.state.num_layers

    @property
    def updates(self) -> int:
        return self.state.updates

    @property
    def expert_load(self) -> torch.Tensor:
        return self.state.expert_load

    @property
    def row_load(self) -> torch.Tensor:
        return self.state.row_load

    @property
    def gate(self) -> torch.Tensor:
        return self.state.gate

    @property
    def replica_slots(self) -> torch.Tensor:
        return self.state.replica_slots

    @property
    def replica_count(self) -> torch.Tensor:
        return self.state.replica_count

    def take_load(self) -> torch.Tensor:
        """``[L, E]`` tokens per logical expert since the last call (CPU); resets the counters."""
        return self.state.take_load()

    def total_expert_load(self) -> torch.Tensor:
        return self.state.total_expert_load()

    def total_slot_load(self) -> torch.Tensor:
        return self.state.total_slot_load()

    def close(self) -> None:
        self.state.close()
