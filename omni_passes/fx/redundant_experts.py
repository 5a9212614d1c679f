"""RedundantExpertDispatchPass: route MoE top-k ids through the placement's storage rows.

Before (one MoE layer; ids are logical experts in [0, E))::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights
                 └─► view/sort/histc/... ─► expert compute (grouped GEMM)

After (rows are storage rows in [0, E + R); rows < E are the experts themselves, rows >= E
copies of replicated ones, see ``omni_passes.placement.layout``)::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights          (unchanged)
                 ├─► omni.record_expert_load(ids, state, moe_layer)   (adds to expert_load)
                 └─► omni.expert_dispatch(ids, state, moe_layer)      (adds to row_load)
                        ─► rows ─► view/sort/histc/... ─► expert compute

vLLM's CPU graphs compute experts with ``auto_functionalized(_C.cpu_fused_moe, ...)``; that
node is swapped for ``omni.slot_fused_moe`` instead (``omni_passes.fx.fused_moe_slots``),
which counts, dispatches and runs vLLM's kernel on the rows in one call.

The tables and counters are persistent tensors of the placement controller, reached by
its integer handle ``state`` (``kernels.state``), so a new placement is applied in place
without a recompile. A layer this pass does not rewrite still computes the same thing:
its logical id e reads row e, which holds expert e in every placement. The report names each
such layer and why (its tokens then use no replicas and are not counted).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import kernels  # noqa: F401  (registers omni::*)
from omni_passes.fx import fused_moe_slots
from omni_passes.fx.moe_matcher import MoERoute, find_moe_routes
from omni_passes.fx.utils import PassReport, fake_like, is_op


class PassMatchError(RuntimeError):
    """The graph cannot be bound to the placement state (e.g. tables on another device)."""


class RedundantExpertDispatchPass:
    name = "redundant_experts"

    def __init__(self, state, moe_layer_ids: list[int] | None = None, record_load: bool = True):
        """
        Args:
            state: the placement controller; row i of its
                tables belongs to the i-th MoE layer of the model.
            moe_layer_ids: decoder-layer index of each MoE layer (row i ↔ moe_layer_ids[i]),
                for the whole model, whichever graph piece a layer is in; default: the
                matched layers in graph order (one-graph models only).
            record_load: insert ``omni.record_expert_load``.
        """
        self.state = state
        self.moe_layer_ids = list(moe_layer_ids) if moe_layer_ids is not None else None
        self.record_load = record_load

    def __call__(self, graph: fx.Graph) -> PassReport:
        report = PassReport(self.name)
        match = find_moe_routes(graph)
        for layer, reason in match.rejected:
            report.skip(layer, reason)
        if not match.routes:
            report.skip(None, "no MoE routing found: no top-k whose indices reach a grouped-GEMM or fused-MoE node")
            return report
        device = _graph_device(match.routes[0].ids)
        if self.state.device != device:
            raise PassMatchError(f"placement tables are on {self.state.device} but the graph runs on {device}")
        placement = self.state.placement
        for ordinal, route in enumerate(match.routes):
            row = self._table_row(route.layer, ordinal, report)
            if row is None:
                continue
            experts = route.num_logical_experts
            if experts is not None and experts != placement.num_logical_experts:
                report.skip(route.layer, f"top-k over {experts} experts, placement has {placement.num_logical_experts}")
                continue
            layer = route.layer if route.layer is not None else ordinal
            if all(fused_moe_slots.is_cpu_fused_moe(n) for n in route.experts):
                reasons = [r for n in route.experts if (r := fused_moe_slots.unswappable_reason(n, route.ids))]
                if reasons:
                    report.skip(layer, "; ".join(reasons))
                    continue
                for node in route.experts:
                    fused_moe_slots.swap(graph, node, self.state.handle, row)
                report.notes.append(f"layer {layer}: vLLM fused MoE runs on the storage rows (omni.slot_fused_moe)")
                report.rewritten_nodes += len(route.experts)
            else:
                reason = self._reads_logical_rows(route)
                if reason:
                    report.skip(layer, reason)
                    continue
                self._rewrite(graph, route, row)
                report.rewritten_nodes += 2 if self.record_load else 1
            report.matched_layers.append(layer)
        graph.lint()
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

    def _reads_logical_rows(self, route: MoERoute) -> str | None:
        """With redundant slots, rows >= E must exist in the weights the experts read; a
        grouped GEMM over ``[E, ...]`` weights (not extended) keeps logical ids."""
        placement = self.state.placement
        if placement.num_redundant == 0:
            return None
        for node in route.experts:
            if fused_moe_slots.is_cpu_fused_moe(node) or not is_op(node, "aten._grouped_mm", "transformers.grouped_mm_fallback"):
                return (f"{node.target}: expert compute that cannot read the {placement.num_slots} storage rows; "
                        "the layer keeps logical ids (exact, no replicas)")
            weight = node.args[1].meta.get("val") if len(node.args) > 1 and isinstance(node.args[1], fx.Node) else None
            if weight is None or weight.shape[0] != placement.num_slots:
                rows = "unknown" if weight is None else weight.shape[0]
                return (f"grouped GEMM over {rows} expert rows, not the placement's {placement.num_slots}; "
                        "the layer keeps logical ids (exact, no replicas)")
        return None

    def _rewrite(self, graph: fx.Graph, route: MoERoute, row: int) -> None:
        ids = route.ids
        keep = set(route.weight_lookups)
        users = [u for u in ids.users if u not in keep]
        with graph.inserting_after(ids):
            rows = graph.call_function(torch.ops.omni.expert_dispatch.default, (ids, self.state.handle, row))
        rows.meta["val"] = fake_like(ids.meta.get("val"))
        if "nn_module_stack" in ids.meta:
            rows.meta["nn_module_stack"] = ids.meta["nn_module_stack"]
        for user in users:
            user.replace_input_with(ids, rows)
        if self.record_load:
            with graph.inserting_after(rows):
                record = graph.call_function(torch.ops.omni.record_expert_load.default, (ids, self.state.handle, row))
            record.meta["val"] = None


def _graph_device(node: fx.Node) -> torch.device:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")
