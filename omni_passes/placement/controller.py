"""PlacementController: the one owner of a running placement, and of "the weights match the tables".

Every host holds its placement through this class and changes it only through ``apply``:
``omni_passes.compile``, torchair and vLLM on one device, and each rank of expert parallelism
(``omni_passes.ep``). It owns

* the placement and its row layout (``omni_passes.placement.layout``): slot → storage row;
* the expert weights in those rows (``weights``), where the host has weights to move;
* the persistent tensors the omni ops read through ``handle`` (``kernels.state``): the
  dispatch tables ``replica_slots [L, E, M]`` and ``replica_count [L, E]`` in storage rows
  (``omni_passes.placement.tables.dispatch_tables``), the counters ``expert_load [L, E]`` and
  ``row_load [L, P]``, and ``gate [1]``, which multiplies every count (0 while a host runs
  warm-up batches); counting is tensor-side, so it is right under CUDA-graph replay too;
* the cumulative totals that ``take_load`` folds the counters into.

Two layouts, one apply path:

* ``"compact"`` (one device): rows ``0..E-1`` hold the logical experts, rows ``E..P-1`` the
  extra replicas (``compact_layout``). A placement with redundant slots needs ``rows`` (the
  host's expert tensors extended to P rows, ``ExpertRows``) and is refused, with the reason,
  where the host cannot extend them.
* ``"slot"`` (expert parallelism): slot ``j`` is its own storage row, on rank ``j // S``.
  ``rows`` builds this rank's slot weights; ``local_rank`` makes the tables name a local
  replica where the expert has one. Without ``rows`` the controller holds tables and counters
  only, for slot-indexed weights its caller keeps (op tests, emulated ranks).

``apply`` computes the new layout (in the compact layout extra rows keep their expert where
they can), rewrites the rows whose expert changes, then writes the tables: between two forward
passes the weights and the tables agree. Tensors keep their identity and shape, so a compiled
graph reads the new placement with no recompile. ``rebalance_step`` feeds the counted loads to
an online ``RebalanceLoop`` (``omni_passes.placement.rebalance``) and applies what it decides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

import torch

from kernels.state import add_tensors, register_state, unregister_state
from omni_passes.placement.layout import RowLayout, compact_layout, slot_layout
from omni_passes.placement.materialize import ExpertRows
from omni_passes.placement.placement import Placement, PlacementError
from omni_passes.placement.tables import dispatch_tables

if TYPE_CHECKING:
    from omni_passes.placement.rebalance import RebalanceEvent, RebalanceLoop

LAYOUTS = ("compact", "slot")


class Weights(Protocol):
    """Expert weights in storage rows: ``apply(layout)`` rewrites in place the rows whose
    expert differs from the layout they hold, and returns how many it wrote."""

    def apply(self, layout: RowLayout) -> int: ...


RowsFactory = Callable[[RowLayout], Weights]


class PlacementController:
    """Placement, layout, weights, dispatch tables and counters of one model's MoE layers.

    Args:
        placement: the starting placement (checked against the model by the caller).
        device: where the tables and counters live (the model's device).
        rows: builds the weights for a layout; in the compact layout needed iff R > 0.
        layout: ``"compact"`` (one device) or ``"slot"`` (a slot is storage; module doc).
        local_rank: with the slot layout, the rank whose local replicas the tables prefer.
        cannot_extend: why the host has no ``rows`` (named in the refusal).
        handle: register the tensors under this ``kernels.state.stable_handle`` (a host whose
            compiled graphs may come from a cache built by another process); default: a new one.

    Attributes:
        replica_slots: int64 ``[L, E, M]`` (M = P - E + 1); ``replica_count``: int64 ``[L, E]``;
        expert_load: int64 ``[L, E]`` tokens per logical expert since ``take_load``;
        row_load: int64 ``[L, P]`` tokens per storage row since ``take_load``;
        gate: int64 ``[1]``; handle: what graphs pass to the omni ops;
        updates: placements applied; rows_copied: weight rows rewritten by them.
    """

    def __init__(self, placement: Placement, device: torch.device | str = "cpu", rows: RowsFactory | None = None,
                 *, layout: str = "compact", local_rank: int | None = None,
                 cannot_extend: str = "this host cannot extend the expert weights to E + R rows",
                 handle: int | None = None):
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
        if local_rank is not None and layout != "slot":
            raise ValueError("local_rank needs the slot layout (on one device every replica is local)")
        self.slot_storage = layout == "slot"
        self.local_rank = local_rank
        self.placement = placement
        self.layout = self._layout_for(placement)
        self.weights: Weights | None = None
        if rows is not None and (self.slot_storage or placement.num_redundant > 0):
            self.weights = rows(self.layout)
            if not callable(getattr(self.weights, "apply", None)):
                raise TypeError(f"rows must build weights with an apply(layout) method, got {type(self.weights).__name__}")
        elif placement.num_redundant > 0 and not self.slot_storage:
            raise PlacementError(f"placement with {placement.num_redundant} redundant slots per MoE layer refused: {cannot_extend}")
        self.width = placement.num_slots - placement.num_logical_experts + 1
        slots, counts = dispatch_tables(placement, local_rank, self.width, self.layout.slot_row)
        L, E, P = placement.num_layers, placement.num_logical_experts, placement.num_slots
        self.replica_slots = slots.to(device)
        self.replica_count = counts.to(device)
        self.expert_load = torch.zeros(L, E, dtype=torch.int64, device=device)
        self.row_load = torch.zeros(L, P, dtype=torch.int64, device=device)
        self.gate = torch.ones(1, dtype=torch.int64, device=device)
        # cumulative totals of what take_load / apply folded out of the live counters (CPU)
        self._expert_total = torch.zeros(L, E, dtype=torch.int64)
        self._slot_total = torch.zeros(L, P, dtype=torch.int64)
        self.updates = 0
        self.rows_copied = 0
        self.handle = register_state({
            "replica_slots": self.replica_slots, "replica_count": self.replica_count,
            "expert_load": self.expert_load, "row_load": self.row_load, "gate": self.gate,
        }, handle=handle)
        if isinstance(self.weights, ExpertRows):  # ops that run on the rows find them by name (kernels.slot_fused_moe)
            add_tensors(self.handle, {f"rows{layer}.{name}": tensor for layer, tensors in enumerate(self.weights.storage)
                                      for name, tensor in tensors.items()})

    @property
    def num_layers(self) -> int:
        return self.placement.num_layers

    @property
    def device(self) -> torch.device:
        return self.replica_slots.device

    # ---- the invariant -----------------------------------------------------------------------
    def apply(self, placement: Placement) -> int:
        """Switch to ``placement`` in place (rows whose expert changes, then tables); returns the
        number of rows rewritten. Call between forward passes (with expert parallelism: every
        rank, the same placement, between the same two forwards); no recompile."""
        self._check_shape(placement)
        layout = self._layout_for(placement, previous=self.layout)
        copied = self.weights.apply(layout) if self.weights is not None else 0
        self._write_tables(placement, layout)
        self.rows_copied += copied
        return copied

    def _check_shape(self, placement: Placement) -> None:
        current = self.placement
        placement.check_fits(current.num_layers, current.num_logical_experts, source="new placement")
        if self.slot_storage and (placement.num_ranks, placement.slots_per_rank) != (current.num_ranks, current.slots_per_rank):
            raise PlacementError(
                f"new placement has {placement.num_ranks} ranks x {placement.slots_per_rank} slots, "
                f"the running one {current.num_ranks} x {current.slots_per_rank}"
            )
        if placement.num_slots != current.num_slots:
            raise PlacementError(
                f"new placement has {placement.num_slots} slots per MoE layer, the running one {current.num_slots}: "
                "the storage rows and tables are sized for the running one"
            )

    def _layout_for(self, placement: Placement, previous: RowLayout | None = None) -> RowLayout:
        if self.slot_storage:
            return slot_layout(placement.phy2log)
        return compact_layout(placement.phy2log, placement.num_logical_experts, previous=previous)

    def _write_tables(self, placement: Placement, layout: RowLayout) -> None:
        """The tables' half of ``apply``, rows untouched. Only ``apply`` calls it; a test that
        must corrupt the tables on purpose (to show a check catches it) may too."""
        slots, counts = dispatch_tables(placement, self.local_rank, self.width, layout.slot_row)
        self._fold_rows()  # row counts so far belong to the old slot → row map
        self.replica_slots.copy_(slots)
        self.replica_count.copy_(counts)
        self.placement = placement
        self.layout = layout
        self.updates += 1

    # ---- online rebalancing ------------------------------------------------------------------
    def rebalance_step(self, loop: "RebalanceLoop", loads: torch.Tensor | None = None) -> "RebalanceEvent | None":
        """One step of online rebalancing: the step's loads (default: ``take_load()``) into the
        loop's window; on the loop's re-plan steps, apply what it decides. Returns the event of
        a re-plan step, else None."""
        decision = loop.step(self.take_load() if loads is None else loads, self.placement)
        if decision is None:
            return None
        if decision.placement is not None:
            self.apply(decision.placement)
        return loop.events[-1]

    # ---- counters ----------------------------------------------------------------------------
    def take_load(self) -> torch.Tensor:
        """``[L, E]`` int64 (CPU): tokens per logical expert since the last call; resets the
        counters (the cumulative totals keep them)."""
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
        """Unregister the tensors (graphs compiled against them stop working)."""
        unregister_state(self.handle)
