"""RedundantExpertDispatchPass: route MoE top-k ids through physical expert slots.

Before (one MoE layer; ids are logical experts in [0, E))::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights
                 └─► view/sort/histc/... ─► expert compute (grouped GEMM / fused MoE)

After (slots are physical in [0, E + R); replicas hold copies of their expert)::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights          (unchanged)
                 ├─► omni.record_expert_load(ids, state, moe_layer)   (adds to expert_load)
                 └─► omni.expert_dispatch(ids, state, moe_layer)
                        ─► slots ─► view/sort/histc/... ─► expert compute

The tables and the load counters are persistent tensors of an ``ExpertPlacementState``,
reached by its integer handle ``state`` (``kernels.state``), so a new placement is applied in place without a
recompile. With R > 0 the expert weights must already hold E + R slots (see
``omni_passes.placement.materialize``); then *every* MoE layer must be rewritten, and
``require_all`` makes a miss an error rather than a graph that computes something else.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import kernels  # noqa: F401  (registers omni::*)
from omni_passes.fx.moe_matcher import find_moe_routes
from omni_passes.fx.utils import PassReport, fake_like
from omni_passes.placement.runtime import ExpertPlacementState


class PassMatchError(RuntimeError):
    """The graph does not match what a configuration requires (e.g. R > 0 but a MoE layer unmatched)."""


class RedundantExpertDispatchPass:
    name = "redundant_experts"

    def __init__(
        self,
        state: ExpertPlacementState,
        moe_layer_ids: list[int] | None = None,
        record_load: bool = True,
        require_all: bool = False,
    ):
        """
        Args:
            state: persistent tables/counters; row i belongs to the i-th MoE layer of the model.
            moe_layer_ids: decoder-layer index of each MoE layer (row i ↔ moe_layer_ids[i]);
                default: the matched layers in graph order.
            record_load: insert ``omni.record_expert_load``.
            require_all: raise if any MoE layer of ``moe_layer_ids`` is not matched.
        """
        self.state = state
        self.moe_layer_ids = list(moe_layer_ids) if moe_layer_ids is not None else None
        self.record_load = record_load
        self.require_all = require_all

    def __call__(self, graph: fx.Graph) -> PassReport:
        report = PassReport(self.name)
        match = find_moe_routes(graph)
        for layer, reason in match.rejected:
            report.skip(layer, reason)
        if not match.routes:
            report.skip(None, "no MoE routing found: no top-k whose indices reach a grouped-GEMM or fused-MoE node")
            self._check_complete(report)
            return report
        device = _graph_device(match.routes[0].ids)
        if self.state.device != device:
            raise PassMatchError(f"placement tables are on {self.state.device} but the graph runs on {device}")
        for ordinal, route in enumerate(match.routes):
            row = self._table_row(route.layer, ordinal, report)
            if row is None:
                continue
            experts = route.num_logical_experts
            if experts is not None and experts != self.state.placement.num_logical_experts:
                report.skip(route.layer, f"top-k over {experts} experts, placement has {self.state.placement.num_logical_experts}")
                continue
            self._rewrite(graph, route, row)
            report.matched_layers.append(route.layer if route.layer is not None else ordinal)
            report.rewritten_nodes += 2 if self.record_load else 1
        graph.lint()
        self._check_complete(report)
        return report

    # -------------------------------------------------------------------------------------
    def _table_row(self, layer: int | None, ordinal: int, report: PassReport) -> int | None:
        if self.moe_layer_ids is None:
            row = ordinal
        elif layer is None:
            report.skip(None, "matched MoE routing but cannot tell its decoder layer")
            return None
        elif layer not in self.moe_layer_ids:
            report.skip(layer, f"decoder layer {layer} is not a MoE layer of this model config")
            return None
        else:
            row = self.moe_layer_ids.index(layer)
        if row >= self.state.num_layers:
            report.skip(layer, f"MoE layer #{row} but the placement has {self.state.num_layers} MoE layers")
            return None
        return row

    def _rewrite(self, graph: fx.Graph, route, row: int) -> None:
        ids = route.ids
        keep = set(route.weight_lookups)
        users = [u for u in ids.users if u not in keep]
        with graph.inserting_after(ids):
            slots = graph.call_function(
                torch.ops.omni.expert_dispatch.default,
                (ids, self.state.handle, row),
            )
        slots.meta["val"] = fake_like(ids.meta.get("val"))
        if "nn_module_stack" in ids.meta:
            slots.meta["nn_module_stack"] = ids.meta["nn_module_stack"]
        for user in users:
            user.replace_input_with(ids, slots)
        if self.record_load:
            with graph.inserting_after(slots):
                record = graph.call_function(
                    torch.ops.omni.record_expert_load.default, (ids, self.state.handle, row)
                )
            record.meta["val"] = None

    def _check_complete(self, report: PassReport) -> None:
        if not self.require_all:
            return
        expected = self.moe_layer_ids if self.moe_layer_ids is not None else []
        missing = [i for i in expected if i not in report.matched_layers]
        if missing or not report.matched_layers:
            reasons = "; ".join(f"layer {s.layer}: {s.reason}" for s in report.skipped) or "no reason recorded"
            raise PassMatchError(
                f"redundant expert slots are materialised, so every MoE layer must be rewritten, but "
                f"decoder layers {missing or expected or 'all'} were not matched ({reasons})"
            )


def _graph_device(node: fx.Node) -> torch.device:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
