"""One rank's part of a stack of expert-parallel DeepSeek MoE layers.

Each rank holds the routed experts of its placement slots only (``S = slots_per_rank`` per
layer, slot ``j`` of the placement lives on rank ``j // S``), the router and the shared expert
(replicated), and its own tokens (data-parallel attention feeds each rank its batch). A layer::

    hidden [T, H] ─► route ─► ids [T, K] (logical), weights [T, K]          ┐ compiled
      ─► omni::record_expert_load, omni::expert_dispatch ─► slots [T, K]     │ ("prepare")
      ─► sort rows by slot; counts per slot [W*S]                           ┘
      ─► all_to_all counts, then rows ─► rows for my slots                    eager (NCCL/gloo)
      ─► grouped GEMM per local slot                                          compiled ("experts")
      ─► all_to_all back                                                      eager
      ─► unsort, weight, sum over K; + shared expert on my tokens            compiled ("combine")

``omni::expert_dispatch`` is the op the redundant-experts pass inserts, reading the tables of
this rank's ``PlacementController`` (slot layout: a slot is storage on its rank), with
``local_rank`` set, so an expert with a replica on this rank is served locally and only the
others cross the network.

What is compiled and why the collectives are not: a variable-size all-to-all needs its split
sizes on the host (one sync per layer, after the counts exchange), and Dynamo cannot trace a
host value into split sizes without graph breaks or unbacked sizes; the collectives are
opaque NCCL/gloo calls anyway, so nothing is lost by leaving them eager. The three regions
between them are compiled with ``fullgraph=True``. ``prepare`` is compiled once per MoE layer
(its table row is a graph constant, as in the pass-rewritten graph); ``experts`` (dynamic in
its row count) and ``combine`` are shared by all layers, which pass their weights in.

Applying a placement (``apply``, through the controller) rewrites this rank's slot weights
that change (``RankSlots``), then the dispatch tables, in place: same tensors, so nothing
recompiles.
"""

from __future__ import annotations

import time
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import kernels  # noqa: F401  (registers omni::expert_dispatch, omni::record_expert_load)
from omni_passes.ep.comm import EPGroup, local_slot_of_rows, padded_rows
from omni_passes.ep.grouped_gemm import expert_mlp
from omni_passes.ep.routing import deepseek_topk
from omni_passes.ep.weights import MoELayerWeights, MoESpec
from omni_passes.placement.controller import PlacementController
from omni_passes.placement.layout import RowLayout
from omni_passes.placement.placement import Placement, PlacementError

PHASES = ("prepare", "dispatch", "experts", "return", "combine")


# ---- the compiled regions (pure functions of their arguments) ---------------------------------
def _route(hidden: torch.Tensor, router: torch.Tensor, bias: torch.Tensor, spec: MoESpec):
    return deepseek_topk(hidden, router, bias, spec)


def _prepare(hidden: torch.Tensor, ids: torch.Tensor, handle: int, row: int, num_slots: int, record: bool):
    """Logical ids → slots; rows sorted by slot (so by destination rank, then local slot)."""
    if record:
        torch.ops.omni.record_expert_load(ids, handle, row)
    slots = torch.ops.omni.expert_dispatch(ids, handle, row).reshape(-1)
    order = torch.argsort(slots, stable=True)
    rows = hidden[order // ids.shape[1]]
    counts = torch.zeros(num_slots, dtype=torch.int64, device=ids.device).scatter_add_(0, slots, torch.ones_like(slots))
    return rows, order, counts


def _experts(rows: torch.Tensor, slot: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor):
    """Received rows (any order, pad rows on slot S) → expert outputs in the same order."""
    num_slots = gate_up.shape[0]
    order = torch.argsort(slot, stable=True)
    counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=slot.device).scatter_add_(0, slot, torch.ones_like(slot))
    offs = counts[:num_slots].cumsum(0).to(torch.int32)
    out = expert_mlp(rows[order], gate_up, down, offs)
    return torch.empty_like(out).index_copy_(0, order, out)


def _combine(back, order, weights, hidden, shared_gate, shared_up, shared_down):
    """Rows back in (token, choice) order, weighted and summed over choices; + shared expert."""
    tokens, top_k = weights.shape
    rows = torch.empty_like(back).index_copy_(0, order, back)
    out = (rows * weights.reshape(-1, 1)).view(tokens, top_k, -1).sum(dim=1).to(hidden.dtype)
    if shared_gate is not None:
        out = out + F.linear(F.silu(F.linear(hidden, shared_gate)) * F.linear(hidden, shared_up), shared_down)
    return out


def _own_code(fn, tag: str):
    """A copy of ``fn`` with a code object of its own: Dynamo caches compiled graphs per code
    object, so per-layer constants (the table row) get one cache each instead of counting as
    recompiles of one function (and hitting the recompile limit past 8 layers)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


# ---- timing -----------------------------------------------------------------------------------
@dataclass
class PhaseTimer:
    """Per-phase time of layer forwards on this rank: CUDA events on GPU, wall clock on CPU
    (where gloo collectives block, so wall time per phase is that phase's)."""

    device: torch.device
    totals: dict[str, float] = field(default_factory=lambda: {p: 0.0 for p in PHASES})
    _marks: list = field(default_factory=list)

    def _now(self):
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def start(self) -> None:
        self._marks = [("start", self._now())]

    def lap(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def stop(self) -> None:
        """Add the laps since ``start`` to ``totals`` (syncs on GPU)."""
        if self.device.type == "cuda":
            self._marks[-1][1].synchronize()
        for (_, a), (phase, b) in zip(self._marks, self._marks[1:]):
            self.totals[phase] += a.elapsed_time(b) if self.device.type == "cuda" else (b - a) * 1e3
        self._marks = []


# ---- this rank's slot weights ------------------------------------------------------------------
class RankSlots:
    """The weights of this rank's slots, ``gate_up [S, 2I, H]`` and ``down [S, H, I]`` per MoE
    layer, filled from the logical weights: the controller's weights in the slot layout.

    Args:
        layers: the logical weights of each MoE layer.
        rank, slots_per_rank: this rank holds placement slots ``rank * S .. rank * S + S - 1``.
        gate_up, down: per layer, the slot tensors (written in place).
        layout: the slot layout to fill them for.
    """

    def __init__(self, layers: list[MoELayerWeights], rank: int, slots_per_rank: int,
                 gate_up: list[torch.Tensor], down: list[torch.Tensor], layout: RowLayout):
        self.layers, self.gate_up, self.down = layers, gate_up, down
        self.first, self.slots_per_rank = rank * slots_per_rank, slots_per_rank
        for row, weights in enumerate(layers):
            weights.experts.fill(self._held(layout, row), gate_up[row], down[row])
        self.layout = layout

    def _held(self, layout: RowLayout, row: int) -> torch.Tensor:
        return layout.row_expert[row, self.first : self.first + self.slots_per_rank]

    def apply(self, layout: RowLayout) -> int:
        """Rewrite this rank's slots whose expert changes; returns how many."""
        rewritten = 0
        for row, weights in enumerate(self.layers):
            new = self._held(layout, row)
            for slot in (new != self._held(self.layout, row)).nonzero().flatten().tolist():
                weights.experts.fill(new[slot : slot + 1], self.gate_up[row][slot : slot + 1], self.down[row][slot : slot + 1])
                rewritten += 1
        self.layout = layout
        return rewritten


# ---- the per-rank stack -----------------------------------------------------------------------
class ExpertParallelMoE:
    """This rank's slots, tables and compiled regions for ``len(layers)`` MoE layers.

    Args:
        spec: layer sizes and routing rule (all layers alike).
        layers: the logical weights of each MoE layer, in model order (row i of the placement).
        placement: from ``omni-passes plan`` (``num_ranks`` must be the group's world size).
        group: this rank in the expert-parallel group.
        dtype: compute dtype of expert and shared weights (the router computes in float32).
        compile_backend: ``"inductor"``, another torch.compile backend, or None (eager).
        prefer_local: dispatch to a replica on this rank when there is one.
        record_load: count routed tokens per expert (``controller.expert_load``) for the rebalancer.
    """

    def __init__(
        self,
        spec: MoESpec,
        layers: list[MoELayerWeights],
        placement: Placement,
        group: EPGroup,
        dtype: torch.dtype = torch.float32,
        compile_backend: str | None = "inductor",
        prefer_local: bool = True,
        record_load: bool = True,
    ):
        if placement.num_ranks != group.world_size:
            raise PlacementError(
                f"placement is for {placement.num_ranks} ranks but the expert-parallel group has {group.world_size}"
            )
        placement.check_fits(len(layers), spec.num_experts)
        self.spec, self.group, self.dtype = spec, group, dtype
        self.record_load = record_load
        device = group.device
        self.layers = [w.to(device, dtype) for w in layers]
        S, H, I = placement.slots_per_rank, spec.hidden_size, spec.moe_intermediate_size
        self.gate_up = [torch.empty(S, 2 * I, H, device=device, dtype=dtype) for _ in layers]
        self.down = [torch.empty(S, H, I, device=device, dtype=dtype) for _ in layers]
        self.controller = PlacementController(
            placement, device=device, layout="slot", local_rank=group.rank if prefer_local else None,
            rows=lambda layout: RankSlots(self.layers, group.rank, S, self.gate_up, self.down, layout),
        )
        self.compile_backend = compile_backend
        compiled = (lambda fn: torch.compile(fn, fullgraph=True, backend=compile_backend)) if compile_backend else (lambda fn: fn)
        self._route_fn = compiled(_route)
        self._prepare_fns = [compiled(_own_code(_prepare, f"moe{row}")) for row in range(len(layers))]
        self._experts_fn = compiled(_experts)
        self._combine_fn = compiled(_combine)

    # ---- placement ----------------------------------------------------------------------------
    @property
    def placement(self) -> Placement:
        return self.controller.placement

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def local_experts(self, row: int, placement: Placement | None = None) -> torch.Tensor:
        """``[S]`` logical expert held by each of this rank's slots in MoE layer ``row``."""
        p = placement or self.placement
        S = p.slots_per_rank
        return p.phy2log[row, self.group.rank * S : (self.group.rank + 1) * S]

    def apply(self, placement: Placement) -> int:
        """Switch to ``placement`` in place (slot weights that change, then tables); every rank
        must apply the same placement between the same two forwards. Returns slots rewritten here."""
        return self.controller.apply(placement)

    # ---- forward ------------------------------------------------------------------------------
    def route(self, row: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate of MoE layer ``row``: float32 weights and int64 logical ids, ``[T, K]`` each."""
        w = self.layers[row]
        return self._route_fn(hidden.reshape(-1, self.spec.hidden_size), w.router, w.bias, self.spec)

    def forward_layer(
        self,
        row: int,
        hidden: torch.Tensor,
        routing: tuple[torch.Tensor, torch.Tensor] | None = None,
        timer: PhaseTimer | None = None,
        stats: dict | None = None,
    ) -> torch.Tensor:
        """MoE layer ``row`` on this rank's tokens ``hidden [..., H]``; every rank of the group
        must call it (collectives inside).

        Args:
            routing: ``(weights float32 [T, K], ids int64 [T, K])`` to use instead of the gate
                (benchmarks drive routing from load traces).
            timer: adds this call's phase times.
            stats: if given, ``stats["recv_rows"]`` gets the rows this rank computed.
        """
        shape = hidden.shape
        hidden = hidden.reshape(-1, self.spec.hidden_size)
        w = self.layers[row]
        S = self.placement.slots_per_rank
        if timer is not None:
            timer.start()
        weights, ids = self.route(row, hidden) if routing is None else routing
        rows, order, send_counts = self._prepare_fns[row](
            hidden, ids, self.controller.handle, row, self.placement.num_slots, self.record_load
        )
        if timer is not None:
            timer.lap("prepare")
        recv_counts, splits = self.group.exchange_counts(send_counts, S)
        n = splits.num_recv
        padded = padded_rows(n)
        received = torch.empty(padded, hidden.shape[1], device=hidden.device, dtype=rows.dtype)
        self.group.all_to_all(received[:n], rows, splits.recv, splits.send)
        received[n:].zero_()
        slot = local_slot_of_rows(recv_counts, S, n, padded)
        if timer is not None:
            timer.lap("dispatch")
        if self.compile_backend:
            torch._dynamo.mark_dynamic(received, 0)
            torch._dynamo.mark_dynamic(slot, 0)
        out = self._experts_fn(received, slot, self.gate_up[row], self.down[row])
        if timer is not None:
            timer.lap("experts")
        back = torch.empty_like(rows)
        self.group.all_to_all(back, out[:n], splits.send, splits.recv)
        if timer is not None:
            timer.lap("return")
        result = self._combine_fn(back, order, weights, hidden, w.shared_gate, w.shared_up, w.shared_down)
        if timer is not None:
            timer.lap("combine")
            timer.stop()
        if stats is not None:
            stats["recv_rows"] = n
        return result.reshape(shape)
