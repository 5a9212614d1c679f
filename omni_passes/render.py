"""Pictures of rewritten graph fragments a person can open (SVG via matplotlib, no graphviz).

For each inserted omni op, the fragment is its neighbourhood in the data-flow graph (a few
hops up and down), laid out left to right in topological order.
"""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import torch.fx as fx

from omni_passes.fx.moe_matcher import is_attention, is_expert_compute
from omni_passes.fx.utils import is_op, target_name, to_networkx

COLOURS = {"omni": "#f28e2b", "topk": "#4e79a7", "experts": "#59a14f", "attention": "#b07aa1", "other": "#d3d3d3"}


def _kind(node: fx.Node) -> str:
    if node.op == "call_function" and target_name(node).startswith("omni."):
        return "omni"
    if is_op(node, "aten.topk"):
        return "topk"
    if is_expert_compute(node):
        return "experts"
    if is_attention(node):
        return "attention"
    return "other"


def fragment(graph: fx.Graph, centre: fx.Node, hops: int = 4, limit: int = 48) -> nx.DiGraph:
    dag = to_networkx(graph)
    near = set(nx.single_source_shortest_path_length(dag, centre, cutoff=hops))
    near |= set(nx.single_source_shortest_path_length(dag.reverse(copy=False), centre, cutoff=hops))
    order = {n: i for i, n in enumerate(graph.nodes)}
    keep = sorted(near, key=lambda n: abs(order[n] - order[centre]))[:limit]
    return dag.subgraph(keep).copy()


def render_svg(sub: nx.DiGraph, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for depth, layer in enumerate(nx.topological_generations(sub)):
        for node in layer:
            sub.nodes[node]["depth"] = depth
    pos = nx.multipartite_layout(sub, subset_key="depth")
    width = 2.2 * (max(d["depth"] for _, d in sub.nodes(data=True)) + 1)
    fig, ax = plt.subplots(figsize=(max(8, width), 7))
    colours = [COLOURS[_kind(n)] for n in sub.nodes]
    nx.draw_networkx_edges(sub, pos, ax=ax, arrows=True, arrowsize=8, edge_color="#888888")
    nx.draw_networkx_nodes(sub, pos, ax=ax, node_color=colours, node_size=260)
    labels = {n: f"{n.name}\n{target_name(n).replace('aten.', '').replace('.default', '')}"[:40] for n in sub.nodes}
    nx.draw_networkx_labels(sub, pos, labels=labels, ax=ax, font_size=6)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=k) for k, c in COLOURS.items()]
    ax.legend(handles=handles, loc="lower right", fontsize=7)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, format="svg")
    plt.close(fig)


def render_rewrites(graph: fx.Graph, out_dir: Path, prefix: str = "") -> list[str]:
    """One SVG per inserted ``omni.expert_dispatch`` / ``omni.sparse_attention*`` node."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for node in graph.nodes:
        name = target_name(node) if node.op == "call_function" else ""
        if not (name.startswith("omni.expert_dispatch") or name.startswith("omni.sparse_attention")):
            continue
        op = name.split(".")[1]
        layer = node.args[2] if op == "expert_dispatch" else node.meta.get("omni_layer", node.name)
        title = f"{op} ({'MoE layer #' if op == 'expert_dispatch' else 'layer '}{layer}) after the omni passes"
        path = out_dir / f"{prefix}{op}_{layer}.svg"
        render_svg(fragment(graph, node), title, path)
        written.append(str(path))
    return written
