"""Find MoE routing in aten-level graphs: the top-k whose indices select the experts.

DeepSeek routing computes three top-k per MoE layer (top-2 per group for group scores, the
top groups, the top experts); only the last one's indices choose experts. The matcher
recognises it by data flow, not by model names:

    scores ──► topk ──► getitem[1] (ids) ──► ...reshape/sort/histc/cast... ──► EXPERT COMPUTE
                              └──► gather(scores, ids)  (routing weights: logical ids, kept)

A top-k is the *expert-selection* top-k of a MoE layer when its indices reach an expert
compute node without passing through another top-k (the group top-k's indices only reach
the experts through the expert top-k, so they are not it), and it is the closest such top-k
to that expert compute (a layer's ids also reach every later layer, through the hidden
states). Expert compute nodes are grouped
GEMMs (``aten._grouped_mm``, ``transformers.grouped_mm_fallback``) and fused-MoE kernels
(``auto_functionalized(*fused_moe*)``, e.g. vLLM's ``_C.cpu_fused_moe``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import torch.fx as fx

from omni_passes.fx.utils import functionalized_op, getitem_of, is_op, layer_index, target_name, to_networkx

GROUPED_GEMM_OPS = ("aten._grouped_mm", "transformers.grouped_mm_fallback")
FUSED_MOE_MARKERS = ("fused_moe", "moe_forward", "fused_experts")
# Top-k ids reach their experts within a few ops (reshape, sort, histc, cumsum, casts).
MAX_HOPS = 48


def is_expert_compute(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if is_op(node, *GROUPED_GEMM_OPS):
        return True
    inner = functionalized_op(node)
    name = inner if inner is not None else target_name(node)
    return any(marker in name for marker in FUSED_MOE_MARKERS)


def is_attention(node: fx.Node) -> bool:
    """Attention ops: SDPA variants (transformers) and vLLM's unified attention ops."""
    if node.op != "call_function":
        return False
    name = functionalized_op(node) or target_name(node)
    return "scaled_dot_product" in name or "unified_mla_attention" in name or "unified_attention" in name


@dataclass
class MoERoute:
    """One MoE layer's routing as seen in the graph."""

    topk: fx.Node
    ids: fx.Node                      # getitem(topk, 1): logical expert ids [tokens, K]
    experts: list[fx.Node]            # expert compute nodes reached from ids
    layer: int | None                 # decoder-layer index (model.layers.N)
    weight_lookups: list[fx.Node] = field(default_factory=list)  # gather(scores, 1, ids)

    @property
    def num_logical_experts(self) -> int | None:
        value = self.topk.args[0].meta.get("val") if isinstance(self.topk.args[0], fx.Node) else None
        return int(value.shape[-1]) if value is not None else None


@dataclass
class MatchResult:
    routes: list[MoERoute]
    rejected: list[tuple[int | None, str]]  # (layer, reason) for top-k that looked like routing but are not usable


def find_moe_routes(graph: fx.Graph, max_hops: int = MAX_HOPS) -> MatchResult:
    topks = [n for n in graph.nodes if is_op(n, "aten.topk")]
    experts = [n for n in graph.nodes if is_expert_compute(n)]
    rejected: list[tuple[int | None, str]] = []
    if not topks or not experts:
        return MatchResult([], rejected)
    attention_order = _attention_layer_numbers(graph)
    # Data flow with every top-k removed: a path from ids to the experts then cannot run
    # through a later top-k, which is what separates the expert top-k from the group top-k.
    dag = to_networkx(graph, exclude=topks)
    expert_set = set(experts)
    # Each expert compute node belongs to the top-k whose ids reach it in the fewest hops:
    # ids of layer i also reach layer i+1's experts, but only through the whole layer.
    owner: dict[fx.Node, tuple[int, fx.Node]] = {}
    for topk in topks:
        ids = getitem_of(topk, 1)
        if ids is None or ids not in dag:
            continue
        hops = nx.single_source_shortest_path_length(dag, ids, cutoff=max_hops)
        for node, distance in hops.items():
            if node in expert_set and (node not in owner or distance < owner[node][0]):
                owner[node] = (distance, topk)
    routes: list[MoERoute] = []
    for topk in topks:
        owned = [n for n in experts if n in owner and owner[n][1] is topk]
        if not owned:
            continue
        ids = getitem_of(topk, 1)
        layer = layer_index(topk)
        if layer is None:
            layer = attention_order.get(topk)
        lookups = [u for u in ids.users if is_op(u, "aten.gather") and len(u.args) > 2 and u.args[2] is ids]
        routes.append(MoERoute(topk=topk, ids=ids, experts=owned, layer=layer, weight_lookups=lookups))
    return MatchResult(routes, rejected)


def _attention_layer_numbers(graph: fx.Graph) -> dict[fx.Node, int]:
    """Fallback layer numbering for graphs without module names: the decoder layer of a
    top-k is the number of attention ops that precede it, minus one (each decoder layer is
    attention then MLP/MoE)."""
    numbers: dict[fx.Node, int] = {}
    seen = 0
    for node in graph.nodes:
        if is_attention(node):
            seen += 1
        elif is_op(node, "aten.topk") and seen > 0:
            numbers[node] = seen - 1
    return numbers
