"""GE converters for the omni MoE ops (torchair graph mode on Ascend). UNVERIFIED.

Written against torchair's documented converter API (``register_fx_node_ge_converter``,
``torchair.ge`` ops); imported only by ``omni_passes.torchair_backend`` when torch_npu and
torchair are present. Nothing here has run: there is no Ascend device in reach.

GE graphs cannot call back into Python, so the tables an omni op reaches through its state
handle are bound into the GE graph when it is built (as constants). Consequence on Ascend:
applying a new placement needs a graph rebuild there, unlike Inductor where tables are
updated in place. The load counter is likewise returned through a GE ScatterAdd onto a
constant, which GE does not write back to the host tensor: load recording is a no-op in
GE graphs (the converter says so in the log).
"""

from __future__ import annotations

import logging

import torch
from torchair import ge  # noqa: F401  (import fails without torchair: caller handles it)
from torchair._ge_concrete_graph.fx2ge_converter import register_fx_node_ge_converter

from kernels.state import lookup

log = logging.getLogger("omni_passes")


@register_fx_node_ge_converter(torch.ops.omni.expert_dispatch.default)
def convert_expert_dispatch(topk_ids, state: int, layer: int, meta_outputs=None):
    """Same algorithm as the reference: replica = (occurrence of the expert so far) mod count."""
    slots = lookup(state, "replica_slots")[layer].cpu()
    counts = lookup(state, "replica_count")[layer].cpu()
    flat = ge.Reshape(ge.Cast(topk_ids, dst_type=ge.DataType.DT_INT64), ge.Const([-1]))
    n = ge.Size(flat)
    sorted_ids, order = ge.Sort(ge.Cast(flat, dst_type=ge.DataType.DT_FLOAT), axis=0, descending=False, stable=True)
    sorted_ids = ge.Cast(sorted_ids, dst_type=ge.DataType.DT_INT64)
    position = ge.Range(ge.Const(0, dtype=ge.DataType.DT_INT64), n, ge.Const(1, dtype=ge.DataType.DT_INT64))
    previous = ge.Concat([ge.Const([-1], dtype=ge.DataType.DT_INT64), ge.Slice(sorted_ids, [0], ge.Sub(n, 1))], 0)
    starts_here = ge.NotEqual(sorted_ids, previous)
    group_start = ge.Cummax(ge.SelectV2(starts_here, position, ge.ZerosLike(position)), dim=0)
    occurrence_sorted = ge.Sub(position, group_start)
    occurrence = ge.ScatterNd(ge.Unsqueeze(order, axes=[1]), occurrence_sorted, ge.Shape(flat))
    count = ge.GatherV2(ge.Const(counts.tolist(), dtype=ge.DataType.DT_INT64), flat, 0)
    replica = ge.FloorMod(occurrence, count)
    table = ge.Const(slots.tolist(), dtype=ge.DataType.DT_INT64)
    chosen = ge.GatherNd(table, ge.Pack([flat, replica], N=2, axis=1))
    return ge.Reshape(ge.Cast(chosen, dst_type=topk_ids.dtype), ge.Shape(topk_ids))


@register_fx_node_ge_converter(torch.ops.omni.record_expert_load.default)
def convert_record_expert_load(topk_ids, state: int, layer: int, meta_outputs=None):
    log.warning("omni::record_expert_load is not recorded in GE graphs (see kernels/torchair_converters.py)")
    return None
