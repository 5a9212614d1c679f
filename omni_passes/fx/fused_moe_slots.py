"""The vLLM (CPU) form of the dispatch rewrite: swap the fused-MoE op, not its ids.

Before (vLLM's MoE layer, ids are logical experts in [0, E); w13/w2 are ``[E, ...]``)::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights
                 └─► convert(int32) ─► auto_functionalized(_C.cpu_fused_moe,
                                           output, input, w13, w2, ..., topk_weights, topk_id, ...)

After (same inputs; the op reads the layer's ``[E + R, ...]`` storage rows from the state)::

    topk ─► ids ─┬─► gather(scores, 1, ids) ─► routing weights          (unchanged)
                 └─► convert(int32) ─► auto_functionalized(omni.slot_fused_moe,
                                           ...same arguments..., state, layer)

``omni::slot_fused_moe`` counts, dispatches to rows and runs vLLM's kernel in one call
(``kernels.slot_fused_moe``). The expert weights stay graph inputs of shape ``[E, ...]``:
with redundant slots they are views of the first E storage rows (``omni_passes.hosts.vllm.model``).
"""

from __future__ import annotations

import torch
import torch.fx as fx

import kernels  # noqa: F401  (registers omni::slot_fused_moe)
from omni_passes.fx.utils import functionalized_op, is_op, replace_functionalized

CPU_FUSED_MOE = "_C.cpu_fused_moe.default"
CASTS = ("prims.convert_element_type", "aten._to_copy", "aten.to")


def is_cpu_fused_moe(node: fx.Node) -> bool:
    return functionalized_op(node) == CPU_FUSED_MOE and node.target is torch.ops.higher_order.auto_functionalized


def unswappable_reason(node: fx.Node, ids: fx.Node) -> str | None:
    """Why ``node`` cannot be swapped for this route's ids (None: it can)."""
    if not is_cpu_fused_moe(node):
        return f"{functionalized_op(node) or node.target}: not auto_functionalized({CPU_FUSED_MOE})"
    source = node.kwargs.get("topk_id")
    while isinstance(source, fx.Node) and source is not ids and is_op(source, *CASTS):
        source = source.args[0]
    if source is not ids:
        return "the fused-MoE op's topk_id is not the expert-selection top-k ids (up to a cast)"
    return None


def swap(graph: fx.Graph, node: fx.Node, state: int, layer: int) -> fx.Node:
    """Replace the ``_C.cpu_fused_moe`` node by ``omni.slot_fused_moe`` for MoE row ``layer``."""
    kwargs = {**node.kwargs, "state": state, "layer": layer}
    return replace_functionalized(graph, node, torch.ops.omni.slot_fused_moe.default, kwargs)
