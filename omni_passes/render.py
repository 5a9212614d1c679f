"""Pictures of rewritten graph blocks, laid out by Graphviz ``dot`` (SVG and PNG).

One picture per block a pass rewrote, drawn from the graph *after* the passes:

- dispatch (``omni.expert_dispatch``): the router scores, the expert-selection top-k and its
  ids, the routing-weight lookups, ``omni.record_expert_load``, the dispatch, and every node
  on the way from the slots to the expert compute (sort, histc, cumsum, grouped GEMMs or the
  fused-MoE op, bias lookups, activation), plus the inputs those nodes read;
- sparse attention (``omni.sparse_attention*``): two hops of data flow either side.

Each node shows its full op name, its node name and its output (dtype and shape), coloured by
kind; edges the pass rewired to read physical slots are drawn bold. The legend lists only the
kinds drawn. ``dot`` comes from the Graphviz system package (``apt-get install graphviz``;
``make install`` installs it); without it the ``.dot`` source is written and the reason given.
"""

from __future__ import annotations

import html
import logging
import shutil
import subprocess
from pathlib import Path

import networkx as nx
import torch
import torch.fx as fx

from omni_passes.fx.moe_matcher import find_moe_routes, is_attention, is_expert_compute
from omni_passes.fx.utils import is_op, layer_index, target_name, to_networkx

log = logging.getLogger("omni_passes")

# kind → (fill colour, legend text); drawn in this order in the legend.
KINDS = {
    "inserted": ("#f6a04d", "inserted by the pass (omni.*)"),
    "routing": ("#9ecae9", "routing: scores, top-k, routing weights"),
    "experts": ("#8fd694", "expert compute (grouped GEMM / fused MoE)"),
    "attention": ("#c9a6e0", "attention"),
    "input": ("#ffffff", "graph input (weights, activations)"),
    "other": ("#e8e8e8", "other aten op"),
}
REWIRED = "#d9480f"
MAX_NODES = 60


def kind_of(node: fx.Node) -> str:
    if node.op == "placeholder" or node.op == "get_attr":
        return "input"
    if node.op == "call_function" and target_name(node).startswith(("omni.", "omni_vllm.")):
        return "inserted"
    if is_expert_compute(node):
        return "experts"
    if is_attention(node):
        return "attention"
    if is_op(node, "aten.topk"):
        return "routing"
    return "other"


def _op_label(node: fx.Node) -> str:
    if node.op == "placeholder":
        return "input"
    if node.op == "get_attr":
        return "attribute"
    name = target_name(node)
    if name in ("getitem", "<built-in function getitem>"):
        return f"getitem [{node.args[1]}]"
    return name.removesuffix(".default")


def _value_label(node: fx.Node) -> str:
    value = node.meta.get("val")
    values = value if isinstance(value, (tuple, list)) else [value]
    parts = [f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}" for v in values if isinstance(v, torch.Tensor)]
    return ", ".join(parts[:3]) + (" ..." if len(parts) > 3 else "")


def dispatch_block(graph: fx.Graph, dispatch: fx.Node, routes=None) -> tuple[set[fx.Node], set[fx.Node], set[fx.Node]]:
    """(core, context, routing) nodes of one dispatch rewrite. Core: the router scores, top-k,
    ids and their users, and everything between the slots and what reads the expert compute
    (bias lookups by slot included); context: what core nodes read from outside it; routing:
    the scores, the top-k and the routing-weight lookups. ``routes``: the matcher's routes
    of this graph (found here when not given)."""
    ids = dispatch.args[0]
    routes = find_moe_routes(graph).routes if routes is None else routes
    route = next((r for r in routes if r.ids is ids), None)
    dag = to_networkx(graph)
    after = nx.descendants(dag, dispatch)
    core = {dispatch, ids, *ids.users}
    routing = {ids}
    if route is not None:
        scores = [a for a in route.topk.args if isinstance(a, fx.Node)]
        routing |= {route.topk, *route.topk.users, *scores, *route.weight_lookups}
        core |= routing | set(route.topk.users)
        ends = {u for e in route.experts for u in e.users} | set(route.experts)
        for end in ends:
            core |= (nx.ancestors(dag, end) & after) | {end}
    context = {a for n in core for a in n.all_input_nodes} - core
    return core, context, routing


def neighbourhood(graph: fx.Graph, centre: fx.Node, hops: int = 2) -> tuple[set[fx.Node], set[fx.Node], set[fx.Node]]:
    dag = to_networkx(graph)
    core = set(nx.single_source_shortest_path_length(dag, centre, cutoff=hops))
    core |= set(nx.single_source_shortest_path_length(dag.reverse(copy=False), centre, cutoff=hops))
    context = {a for n in core for a in n.all_input_nodes} - core
    return core, context, set()


def to_dot(graph: fx.Graph, core: set[fx.Node], context: set[fx.Node], routing: set[fx.Node], title: str) -> str:
    """Graphviz source for the block: core nodes filled by kind, context nodes dashed."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    nodes = sorted(core, key=order.__getitem__)
    nodes += sorted(context, key=order.__getitem__)[: max(0, MAX_NODES - len(nodes))]
    drawn = set(nodes)
    lines = [
        "digraph rewrite {",
        '  graph [rankdir=TB, fontname="DejaVu Sans", fontsize=18, labelloc=t, nodesep=0.3, ranksep=0.35,'
        f' label=<{html.escape(title)}>];',
        '  node [shape=box, style="rounded,filled", fontname="DejaVu Sans", fontsize=13, margin="0.12,0.05"];',
        '  edge [color="#666666", arrowsize=0.7, fontname="DejaVu Sans", fontsize=11];',
    ]
    kinds_drawn = []
    for node in nodes:
        kind = "routing" if node in routing else kind_of(node)
        kinds_drawn.append(kind)
        colour = KINDS[kind][0]
        op = html.escape(_op_label(node))
        detail = html.escape(" ".join(x for x in (node.name, _value_label(node)) if x))
        style = '"rounded,filled"' if node in core else '"rounded,filled,dashed"'
        width = ', penwidth=2.5, color="#a33a00"' if kind == "inserted" else ""
        lines.append(f'  "{node.name}" [label=<<b>{op}</b><br/><font point-size="11">{detail}</font>>, '
                     f'fillcolor="{colour}", style={style}{width}];')
    rewired = False
    for node in nodes:
        for user in node.users:
            if user not in drawn:
                continue
            attrs = ""
            if target_name(node).startswith("omni.expert_dispatch"):
                attrs, rewired = f' [color="{REWIRED}", penwidth=2.5, label=" slots", fontcolor="{REWIRED}"]', True
            elif kind_of(user) == "inserted":
                attrs = f' [label=" {_argument_name(user, node)}"]'
            lines.append(f'  "{node.name}" -> "{user.name}"{attrs};')
    lines.append(_legend([k for k in KINDS if k in kinds_drawn], rewired))
    lines.append("}")
    return "\n".join(lines) + "\n"


def _argument_name(user: fx.Node, node: fx.Node) -> str:
    """The schema name of the argument ``node`` fills in ``user`` (``topk_ids``, ``q``, ...)."""
    schema = getattr(user.target, "_schema", None)
    for i, arg in enumerate(user.args):
        if arg is node and schema is not None and i < len(schema.arguments):
            return schema.arguments[i].name
    return ""


def _legend(kinds: list[str], rewired: bool) -> str:
    rows = "".join(f'<tr><td bgcolor="{KINDS[k][0]}" width="28"> </td><td align="left">{html.escape(KINDS[k][1])}</td></tr>'
                   for k in kinds)
    rows += '<tr><td>- - -</td><td align="left">dashed border: read by the block, drawn for context</td></tr>'
    if rewired:
        rows += (f'<tr><td><font color="{REWIRED}"><b>──►</b></font></td>'
                 '<td align="left">rewired: reads physical slots, not logical expert ids</td></tr>')
    return (f'  legend [shape=plaintext, style="", fontsize=12, label=<<table border="0" cellborder="1" cellspacing="0" '
            f'cellpadding="4"><tr><td colspan="2"><b>legend</b></td></tr>{rows}</table>>];')


def write_picture(dot_source: str, path_stem: Path) -> list[str]:
    """Write ``STEM.dot`` and, with Graphviz installed, ``STEM.svg`` and ``STEM.png``."""
    dot_path = path_stem.with_suffix(".dot")
    dot_path.write_text(dot_source)
    written = [str(dot_path)]
    dot = shutil.which("dot")
    if dot is None:
        log.warning("Graphviz's dot is not installed (apt-get install graphviz): wrote %s only", dot_path)
        return written
    for fmt in ("svg", "png"):
        out = path_stem.with_suffix(f".{fmt}")
        extra = ["-Gdpi=110"] if fmt == "png" else []
        subprocess.run([dot, f"-T{fmt}", *extra, "-o", str(out), str(dot_path)], check=True, capture_output=True)
        written.append(str(out))
    return written


def render_rewrites(graph: fx.Graph, out_dir: Path, prefix: str = "") -> list[str]:
    """One picture per inserted ``omni.expert_dispatch`` / ``omni.sparse_attention*`` node."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    routes = None
    for node in list(graph.nodes):
        name = target_name(node) if node.op == "call_function" else ""
        layer = layer_index(node)
        if name.startswith("omni.expert_dispatch"):
            routes = find_moe_routes(graph).routes if routes is None else routes
            block = dispatch_block(graph, node, routes)
            layer = layer if layer is not None else f"moe{node.args[2]}"
            title = f"redundant_experts: the MoE block of decoder layer {layer} after the rewrite"
            stem = out_dir / f"{prefix}expert_dispatch_layer{layer}"
        elif name.startswith(("omni.sparse_attention", "omni_vllm.sparse")):
            block = neighbourhood(graph, node)
            layer = layer if layer is not None else node.meta.get("omni_layer", node.name)
            title = f"sparse_attention: decoder layer {layer} after the rewrite"
            stem = out_dir / f"{prefix}sparse_attention_layer{layer}"
        else:
            continue
        written += write_picture(to_dot(graph, *block, title), stem)
    return written
