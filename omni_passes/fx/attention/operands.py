"""Shape, dtype and operand helpers shared by the attention forms: read a node's fake value,
see through views and scalar scales, bind an op's arguments by schema name.

``Operand`` is how a match says where a 4-D attention operand [B, H, S, D] comes from; the
passes build it back with ``omni_passes.fx.attention.emit.operand_node``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from omni_passes.fx.utils import is_op, layer_index

# Ops that only move or copy data: followed when peeling operands back to their 4-D source.
VIEW_OPS = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.expand", "aten.clone", "aten.contiguous")


@dataclass
class Operand:
    """How to get a 4-D attention operand from the graph.

    ``node`` is taken as is when its value already has ``shape`` ([B, H, S, D]); otherwise it
    is reshaped to ``shape`` (it then holds the [B*H, S, D] bmm operand). With ``transpose``
    the last two dims are swapped after that (keys seen as K^T by the first bmm).
    """

    node: fx.Node
    shape: tuple
    transpose: bool = False


def shape_of(node: Any) -> tuple | None:
    """The shape of a node's fake value (None: not a node, or no tensor value)."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def dtype_of(node: Any) -> torch.dtype | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value.dtype if isinstance(value, torch.Tensor) else None


def permutation(node: Any) -> list[int] | None:
    """The dim order a ``permute`` / ``transpose`` / ``t`` node applies (None for other nodes):
    post-grad graphs say permute, traced ones (make_fx, torchair) may say transpose."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    rank = len(shape_of(node) or ())
    if is_op(node, "aten.permute"):
        return [d % rank for d in node.args[1]] if rank else None
    if is_op(node, "aten.transpose") and rank:
        order = list(range(rank))
        a, b = node.args[1] % rank, node.args[2] % rank
        order[a], order[b] = order[b], order[a]
        return order
    if is_op(node, "aten.t"):
        return [1, 0] if rank == 2 else [0]
    return None


def bind_args(node: fx.Node) -> dict[str, Any]:
    """Arguments of an OpOverload call by schema name, defaults filled in."""
    schema = node.target._schema
    bound: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            bound[arg.name] = None
    return bound


def scalar(value: Any) -> float | None:
    """A Python number as float (None for anything else, bools included)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def strip_views(node: fx.Node) -> fx.Node:
    """The first node up the chain that is not a view or copy (``VIEW_OPS``)."""
    while isinstance(node, fx.Node) and is_op(node, *VIEW_OPS):
        node = node.args[0]
    return node


def strip_scalar_scale(node: fx.Node) -> tuple[fx.Node, float]:
    """mul(x, c) / div(x, c) with a Python scalar c, repeatedly: (x, product of factors)."""
    factor = 1.0
    while isinstance(node, fx.Node):
        if is_op(node, "aten.mul") and scalar(node.args[1]) is not None and isinstance(node.args[0], fx.Node):
            factor *= scalar(node.args[1])
            node = node.args[0]
        elif is_op(node, "aten.mul") and scalar(node.args[0]) is not None and isinstance(node.args[1], fx.Node):
            factor *= scalar(node.args[0])
            node = node.args[1]
        elif is_op(node, "aten.div") and scalar(node.args[1]) not in (None, 0.0):
            factor /= scalar(node.args[1])
            node = node.args[0]
        else:
            break
    return node, factor


def site_layer(*nodes: fx.Node) -> int | None:
    """The decoder layer of the first node that names one (module stack)."""
    for node in nodes:
        layer = layer_index(node)
        if layer is not None:
            return layer
    return None
