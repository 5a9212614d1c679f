"""The vLLM CUDA form of the dispatch rewrite: swap vLLM's opaque MoE op for the omni one.

On vLLM 0.26's CUDA build each MoE layer is one custom op in the post-grad graph; the gate,
the grouped top-k, the fused experts and the shared experts all run inside it. There is no
routing to match, so the pass swaps the op itself.

Before (DeepSeek: shared experts, the gate inside the runner, so the router-logits argument is
the hidden state itself; ``layer_name`` is a graph input holding vLLM's ``LayerName``)::

    h ─► vllm.moe_forward_shared(h, h, h, None, layer_name, 0) ─┬─► getitem 0 ─► shared ──────────┐
                                                                 └─► getitem 1 ─► mul(routed, 2.5) ─► add ─►

After (same arguments plus ``state=HANDLE``; the users are untouched)::

    h ─► omni.vllm_slot_moe_forward_shared(h, h, h, None, layer_name, 0, state=HANDLE) ─┬─► getitem 0 ...
                                                                                         └─► getitem 1 ...

``vllm.moe_forward`` (no shared experts) mutates its input, so it arrives wrapped as
``auto_functionalized[_v2](vllm.moe_forward, ...)``; the wrapper keeps its kwargs and gets the
omni op instead. The omni ops (``kernels.vllm_slot_moe``) find their layer from ``layer_name``
at run time, as vLLM's op does: vLLM compiles one artifact for all isomorphic pieces and runs
it for every MoE layer, so nothing layer-specific may be baked into the graph, and the pass
sees only the first piece of each kind. ``HANDLE`` is the host's stable ``kernels.state``
handle (the same in every process for one configuration), so the rewritten graph is safe to load
from vLLM's compile cache. Decoder-layer numbers in the report come from the ``layer_name``
placeholder's example value where the graph carries it.

The pass knows graphs, not hosts: the host gives it the ops to insert (``SlotMoeOps``), and
the ops it replaces are looked up by name in the op registry (``vllm_sources``), never by
importing vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from omni_passes.fx.utils import PassReport, eager_input_vals, replace_functionalized
from omni_passes.layer_names import decoder_layer_index

SHARED = "vllm::moe_forward_shared"
PLAIN = "vllm::moe_forward"
FUNCTIONALIZE = ("auto_functionalized", "auto_functionalized_v2")


@dataclass(frozen=True)
class SlotMoeOps:
    """What a host binds the rewrite to.

    Attributes:
        shared: the op that replaces ``vllm::moe_forward_shared`` (its arguments plus ``state``).
        plain: the op that replaces ``vllm::moe_forward``; None leaves those nodes alone.
        state: the value of the ``state`` argument (the host's stable ``kernels.state`` handle).
    """

    shared: Any
    plain: Any = None
    state: int = 0


def registered_op(qualified: str, overload: str = "default") -> Any:
    """``torch.ops.<ns>.<op>.<overload>`` if this process has it registered, else None."""
    namespace, name = qualified.split("::", 1)
    try:
        torch._C._get_schema(qualified, "" if overload == "default" else overload)
    except RuntimeError:
        return None
    return getattr(getattr(getattr(torch.ops, namespace), name), overload)


def vllm_sources() -> dict[str, Any]:
    """``{"shared": op, "plain": op}`` for vLLM's MoE ops registered in this process (either may
    be None: vLLM not imported, or another vLLM version)."""
    return {"shared": registered_op(SHARED), "plain": registered_op(PLAIN)}


def layer_from_name(value: Any) -> int | None:
    """Decoder layer of a ``layer_name`` argument: a string, vLLM's ``LayerName`` (``.value``), or
    the fake object tracing holds for it (``.real_obj``); None when unknown."""
    real = getattr(value, "real_obj", value)
    text = real if isinstance(real, str) else getattr(real, "value", None)
    return decoder_layer_index(text) if isinstance(text, str) else None


def node_layer(node: fx.Node, arg: Any) -> int | None:
    """The default ``layer_of``: the layer name's example value (graph input) or literal."""
    return layer_from_name(arg.meta.get("val") if isinstance(arg, fx.Node) else arg)


def _argument_names(op: Any) -> list[str]:
    return [a.name for a in op._schema.arguments]


class MoeForwardSlots:
    """Replace vLLM's ``moe_forward_shared`` / ``moe_forward`` nodes by the host's omni ops."""

    name = "redundant_experts"

    def __init__(self, ops: SlotMoeOps, sources: dict[str, Any] | None = None,
                 layer_of: Callable[[fx.Node, Any], int | None] = node_layer,
                 moe_layers: tuple[int, ...] = ()):
        """
        Args:
            ops: the omni ops to insert.
            sources: ``{"shared": op, "plain": op}`` to replace (default: ``vllm_sources()``
                at call time).
            layer_of: ``(node, layer_name argument) -> decoder layer or None``, for the report.
            moe_layers: the model's MoE layers. vLLM compiles one piece for all isomorphic MoE
                layers and runs it for each, so a rewritten node serves every one of them: the
                report lists them all (the pass itself sees only the first piece).
        """
        self.ops = ops
        self.sources = sources
        self.layer_of = layer_of
        self.moe_layers = tuple(moe_layers)

    def __call__(self, graph: fx.Graph) -> PassReport:
        report = PassReport(self.name)
        sources = self.sources if self.sources is not None else vllm_sources()
        found = 0
        for kind, replacement in (("shared", self.ops.shared), ("plain", self.ops.plain)):
            source = sources.get(kind)
            if source is None:
                continue
            for node in self._nodes(graph, source):
                found += 1
                self._swap(graph, node, source, replacement, report)
        if not found:
            known = [target_name_of(op) for op in sources.values() if op is not None]
            report.notes.append(f"no vLLM MoE op ({', '.join(known) or 'none registered in this process'}) "
                                "in this graph piece")
        elif report.rewritten_nodes:
            report.notes.append("vLLM reuses a compiled piece for every isomorphic MoE layer; the omni op finds "
                                "its layer from layer_name at run time")
            served = [layer for layer in self.moe_layers if layer not in report.matched_layers]
            report.matched_layers.extend(served)
        graph.lint()
        return report

    # ---------------------------------------------------------------------------------------
    @staticmethod
    def _nodes(graph: fx.Graph, source: Any) -> list[fx.Node]:
        """Direct calls of ``source`` and ``auto_functionalized[_v2](source, ...)``, in graph order."""
        found = set(graph.find_nodes(op="call_function", target=source))
        for hop in FUNCTIONALIZE:
            target = getattr(torch.ops.higher_order, hop, None)
            if target is not None:
                found.update(n for n in graph.find_nodes(op="call_function", target=target) if n.args and n.args[0] is source)
        return [n for n in graph.nodes if n in found]

    def _swap(self, graph: fx.Graph, node: fx.Node, source: Any, replacement: Any, report: PassReport) -> None:
        wrapped = node.target is not source
        arguments = node.kwargs if wrapped else _bind(source, node)
        layer_name = arguments.get("layer_name") if arguments is not None else None
        layer = self.layer_of(node, layer_name)
        reason = self._unsupported(source, replacement, arguments)
        if reason:
            report.skip(layer, f"{target_name_of(source)}: {reason}")
            return
        kwargs = {**node.kwargs, "state": self.ops.state}
        if wrapped:
            replace_functionalized(graph, node, replacement, kwargs)
        else:
            with graph.inserting_before(node):
                new = graph.call_function(replacement, node.args, kwargs)
            new.meta.update({k: v for k, v in node.meta.items() if k != "eager_input_vals"})
            if "eager_input_vals" in node.meta:
                new.meta["eager_input_vals"] = eager_input_vals(new.args, new.kwargs)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
        report.rewritten_nodes += 1
        if layer is not None and layer not in report.matched_layers:
            report.matched_layers.append(layer)
        elif layer is None:
            report.notes.append(f"{node.name}: layer name not known at compile time")

    @staticmethod
    def _unsupported(source: Any, replacement: Any, arguments: dict[str, Any] | None) -> str | None:
        if replacement is None:
            return "the host gave no omni op for it"
        expected = [*_argument_names(source), "state"]
        if _argument_names(replacement) != expected:
            return (f"the omni op {target_name_of(replacement)} takes ({', '.join(_argument_names(replacement))}), "
                    f"not vLLM's arguments plus state ({', '.join(expected)})")
        if arguments is None:
            return "its arguments do not match its schema"
        if arguments.get("input_ids") is not None:
            return "input_ids given (hash routing by token id, as DeepSeek-V4 does): not supported"
        unpadded = arguments.get("hidden_dim_unpadded", 0)
        if not (isinstance(unpadded, int) and unpadded == 0):
            return f"hidden_dim_unpadded={unpadded} (a padded-output expert kernel): not supported"
        return None


def _bind(op: Any, node: fx.Node) -> dict[str, Any] | None:
    """A direct call's arguments by schema name (defaults filled), None if they do not fit."""
    names = _argument_names(op)
    if len(node.args) > len(names):
        return None
    bound = dict(zip(names, node.args))
    for key, value in node.kwargs.items():
        if key not in names or key in bound:
            return None
        bound[key] = value
    for argument in op._schema.arguments:
        if argument.name not in bound:
            if not argument.has_default_value():
                return None
            bound[argument.name] = argument.default_value
    return bound


def target_name_of(op: Any) -> str:
    """``vllm::moe_forward_shared`` for an op overload (what the report names)."""
    return op._schema.name if isinstance(op, torch._ops.OpOverload) else str(op)


__all__ = ["MoeForwardSlots", "SlotMoeOps", "layer_from_name", "registered_op", "vllm_sources"]
