"""Building nodes for the attention passes: an emitter that inserts call_function nodes with
fake values and the replaced site's module stack, and the 4-D operands a match describes."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from omni_passes.fx.attention.operands import Operand, shape_of


class Emitter:
    """Inserts call_function nodes with fake values (``meta["val"]``) computed on the spot and
    the module stack of the site they replace (so drawings and layer numbering keep working)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node):
        from torch._guards import detect_fake_mode

        self.graph = graph
        self.anchor = anchor
        vals = [n.meta.get("val") for n in anchor.all_input_nodes]
        self.mode = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])

    def __call__(self, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
        kwargs = kwargs or {}
        node = self.graph.call_function(target, args, kwargs)
        for key in ("nn_module_stack", "stack_trace"):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        node.meta["val"] = _fake_run(target, args, kwargs, self.mode)
        return node


def _fake_run(target: Any, args: tuple, kwargs: dict, mode: Any) -> Any:
    """The op on the arguments' fake values, in the graph's fake mode."""
    values = torch.utils._pytree.tree_map(lambda a: a.meta.get("val") if isinstance(a, fx.Node) else a, (args, kwargs))
    if mode is None:
        return None
    with mode:
        return target(*values[0], **values[1])


def operand_node(emit: Emitter, operand: Operand) -> fx.Node:
    """The 4-D [B, H, S, D] tensor an ``Operand`` describes, built before the emitter's anchor."""
    node = operand.node
    shape = tuple(operand.shape)
    if len(shape_of(node)) == 3:  # a [B*H, S, D] bmm operand: split B*H back
        sizes = [-1, shape[1]] + [sym_dim(emit, node, i, shape[i + 1]) for i in (1, 2)]
        if operand.transpose:  # the operand is [B*H, D, S]
            sizes = [-1, shape[1]] + [sym_dim(emit, node, i, shape[4 - i]) for i in (1, 2)]
        node = emit(torch.ops.aten.reshape.default, (node, sizes))
    if operand.transpose:
        node = emit(torch.ops.aten.permute.default, (node, [0, 1, 3, 2]))
    return node


def sym_dim(emit: Emitter, node: fx.Node, dim: int, size: Any) -> Any:
    """A size for an op argument: the int, or a sym_size node when it is symbolic."""
    if isinstance(size, int):
        return size
    return emit(torch.ops.aten.sym_size.int, (node, dim))


def node_device(node: fx.Node) -> torch.device:
    value = node.meta.get("val")
    return value.device if isinstance(value, torch.Tensor) else torch.device("cpu")


def comes_before(graph: fx.Graph, a: fx.Node, b: fx.Node) -> bool:
    """``a`` comes before ``b`` in graph order (so ``b`` may use it)."""
    for node in graph.nodes:
        if node is a:
            return True
        if node is b:
            return False
    return False
