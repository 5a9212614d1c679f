"""Helpers shared by the omni graph passes: node classification, layer numbering, reports.

Passes work on aten-level post-grad graphs (functionalized, one node per aten op). They know
graph patterns, not models; these helpers are the vocabulary for those patterns.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import torch
import torch.fx as fx
from omni_passes.layer_names import decoder_layer_index



def target_name(node: fx.Node) -> str:
    """A stable printable name for a node's target (``aten.topk.default``, ``omni.x``...)."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload | torch._ops.OpOverloadPacket):
        return str(target)
    if isinstance(target, torch._ops.HigherOrderOperator):
        return target.name()
    return getattr(target, "__name__", repr(target))


def is_op(node: fx.Node, *names: str) -> bool:
    """True when ``node`` calls one of the aten/custom op packets named (``"aten.topk"``)."""
    if node.op != "call_function":
        return False
    name = target_name(node)
    return any(name == n or name.startswith(n + ".") for n in names)


def functionalized_op(node: fx.Node) -> str | None:
    """For ``auto_functionalized(op, ...)`` / ``auto_functionalized_v2`` nodes, the op's name."""
    if node.op == "call_function" and target_name(node).startswith("auto_functionalized"):
        return str(node.args[0])
    return None


def getitem_of(node: fx.Node, index: int) -> fx.Node | None:
    """The ``operator.getitem(node, index)`` user of a multi-output node, if any."""
    for user in node.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    return None


def layer_index(node: fx.Node) -> int | None:
    """Decoder-layer index (``model.layers.N``) recorded in a node's module stack, if any."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, value in reversed(list(stack.items())):
        path = value[0] if isinstance(value, tuple) else str(value)
        for text in (path, key):
            index = decoder_layer_index(str(text))
            if index is not None:
                return index
    return None


def to_networkx(graph: fx.Graph, exclude: Iterable[fx.Node] = ()) -> nx.DiGraph:
    """The data-flow graph as a networkx DiGraph over fx.Node objects, minus ``exclude``."""
    skip = set(exclude)
    dag = nx.DiGraph()
    for node in graph.nodes:
        if node in skip:
            continue
        dag.add_node(node)
        for user in node.users:
            if user not in skip:
                dag.add_edge(node, user)
    return dag


def eager_input_vals(args: tuple, kwargs: dict) -> tuple:
    """``node.meta["eager_input_vals"]`` for a call with these arguments: each node replaced
    by its fake value (Inductor checks a custom op's arity and strides against it)."""

    def value(arg: Any) -> Any:
        return arg.meta.get("val") if isinstance(arg, fx.Node) else arg

    return fx.node.map_aggregate(args, value), fx.node.map_aggregate(kwargs, value)


def replace_functionalized(graph: fx.Graph, node: fx.Node, op: Any, kwargs: dict[str, Any],
                           outputs: int | None = None) -> fx.Node:
    """Replace ``auto_functionalized(old_op, **...)`` by ``auto_functionalized(op, **kwargs)``:
    same users, the old node's meta (module stack, stack trace), ``val`` trimmed to the new
    op's outputs, and ``eager_input_vals`` rebuilt for the new arguments (a copied one would
    describe the old op's arity)."""
    target = node.target
    with graph.inserting_before(node):
        new = graph.call_function(target, (op,), kwargs)
    new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "eager_input_vals")})
    old_val = node.meta.get("val")
    if outputs is not None and isinstance(old_val, tuple):
        old_val = old_val[:outputs]
    new.meta["val"] = old_val
    new.meta["eager_input_vals"] = eager_input_vals((op,), kwargs)
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def fake_like(value: Any) -> Any:
    """A fresh fake tensor with ``value``'s metadata (own storage, so no false aliasing)."""
    if not isinstance(value, torch.Tensor):
        return None
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([value])
    if mode is None:
        return None
    with mode:
        return torch.empty_like(value)


@dataclass
class LayerSkip:
    layer: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "reason": self.reason}


@dataclass
class PassReport:
    """What one pass did to one graph: the ``"passes"[NAME]`` entry of every report."""

    name: str
    matched_layers: list[int] = field(default_factory=list)
    skipped: list[LayerSkip] = field(default_factory=list)
    rewritten_nodes: int = 0
    notes: list[str] = field(default_factory=list)

    def skip(self, layer: int | None, reason: str) -> None:
        self.skipped.append(LayerSkip(layer, reason))

    def as_dict(self) -> dict[str, Any]:
        return {
            "matched_layers": sorted(self.matched_layers),
            "skipped": [s.as_dict() for s in self.skipped],
            "rewritten_nodes": self.rewritten_nodes,
            "notes": list(self.notes),
        }

    def merge(self, other: "PassReport") -> None:
        """Fold the report of another graph of the same model into this one."""
        self.matched_layers.extend(i for i in other.matched_layers if i not in self.matched_layers)
        self.skipped.extend(other.skipped)
        self.rewritten_nodes += other.rewritten_nodes
        self.notes.extend(n for n in other.notes if n not in self.notes)
