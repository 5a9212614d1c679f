"""LatentAttentionPass: MLA decode attention on the cached latent (W_UK / W_UV absorbed).

transformers' DeepSeek-V2/V3 cache the MLA latent ``c`` (R = kv_lora_rank) and the rope key
``k_pe`` (Dr) per token, then on every decode step expand *every* cached position through
``kv_b_proj`` and assemble full keys: the step pays a GEMM and a copy over the whole cache.

Before (one decode layer over a static cache of Sk slots, H heads)::

    c [B,1,Sk,R] ─► reshape [B·Sk,R] ─► mm(·, W_kv_bᵀ) ─► reshape [B,Sk,H,dn+dv] ─► permute
        ─► split ─┬─► k_nope [B,H,Sk,dn] ──┐
                  └─► v [B,H,Sk,dv] ──────┐│
    k_pe [B,1,Sk,Dr] ─► expand ───────────┼┴─► K = slice_scatter(empty, k_nope | k_pe)  (or cat)
    q = cat(q_nope [B,H,Sq,dn], q_pe [B,H,Sq,Dr])
    q, K, v, mask ─► SDPA | softmax(q·Kᵀ)·v | omni.sparse_attention ─► out [B,H,Sq,dv]

After::

    W_kv_b ─► view [H,dn+dv,R] ─► W_UK = [:, :dn],  W_UV = [:, dn:]
    q_lat = cat(bmm_h(q_nope, W_UK) [B,H,Sq,R], q_pe)
    mask ─► omni.mask_positions ─► q_pos           (a sparse site brings its own q_pos)
    omni.latent_attention(q_lat, c[B,Sk,R], k_pe[B,Sk,Dr], q_pos, scale, sink, recent) ─► o [B,H,Sq,R]
    bmm_h(o, W_UVᵀ) ─► out [B,H,Sq,dv]

The expansion GEMM, the key assembly and the dense attention become dead code: a step reads
each latent row once (``omni::latent_attention``, Triton on CUDA). Scores are unchanged in exact
arithmetic: ``q_nope·(W_UK c) = (W_UKᵀ q_nope)·c`` and ``p·(W_UV c) = W_UV (p·c)``.

Sparse layers (selection at the cache read): ``sparse_attention`` must run first. It turns a
pattern layer's attention into ``omni.sparse_attention(q, K, v, q_pos, sink, recent)``; this pass
then rewrites that node too, carrying sink and recent into ``omni::latent_attention``, so the
layer reads only its sink + recent latent rows instead of expanding the whole cache.

Scope: graphs with at most ``max_queries`` queries per sequence (decode). Prefill is left as
it is: there absorbed attention multiplies the attention FLOPs by (2R + Dr) / (dn + Dr + dv)
(3.4x for DeepSeek) against one expansion of the prompt. vLLM graphs are left alone with that
reason: vLLM's MLA already attends on the latent. Any other site is left untouched with the
reason in the report (no expansion found, a bias on kv_b_proj, a float attention bias, ...).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

import kernels.latent_attention  # noqa: F401  (registers omni::latent_attention)
from kernels.latent_attention import DENSE
from omni_passes.fx.attention import (
    DenseAttention,
    Emitter,
    QueryPositions,
    find_attention,
    is_pure_mask,
    permutation,
    shape_of,
    sym_dim,
)
from omni_passes.fx.utils import PassReport, is_op, layer_index

aten = torch.ops.aten
# Ops that keep element order (a reshape never permutes) or only copy values.
_ORDER_KEEPING = ("aten.reshape", "aten.view", "aten._unsafe_view", "aten.clone", "aten.contiguous")
_VALUE_COPIES = ("aten.clone", "aten.contiguous")


@dataclass
class _Site:
    """One attention to rewrite: its 4-D q/k/v nodes, and how its output is consumed."""

    layer: int | None
    anchor: fx.Node            # insertion point / module stack
    output: fx.Node            # its uses get the new output
    output_is_3d: bool         # math form: the second bmm's [B*H, Sq, Dv]
    q: fx.Node
    k: fx.Node
    v: fx.Node
    scale: float
    dense: DenseAttention | None = None      # q_pos from its mask
    q_pos: fx.Node | None = None             # a sparse site's own positions
    window: tuple[int, int] = DENSE          # (sink, recent)


@dataclass
class _Latent:
    """The MLA expansion behind one site's keys and values."""

    latent: fx.Node            # c [B, 1, Sk, R] or [B, Sk, R]
    rope: fx.Node              # k_pe [B, 1, Sk, Dr] or [B, Sk, Dr]
    weight: fx.Node            # kv_b_proj.weight [H * (dn + dv), R]
    q_nope: fx.Node            # [B, H, Sq, dn]
    q_pe: fx.Node              # [B, H, Sq, Dr]
    heads: int
    dn: int
    dv: int
    rank: int


class LatentAttentionPass:
    name = "latent_attention"

    def __init__(self, window: tuple[int, int] | None = None, pattern: list[int] = (), max_queries: int = 1,
                 check_mask: bool = True):
        """
        Args:
            window, pattern: the sparse_attention settings ((sink, recent) and its layers), when
                that pass is on too. Pattern layers already rewritten by it carry their window;
                these make a pattern layer this pass sees first read sink + recent as well, so
                the result does not depend on the order the passes run in.
            max_queries: rewrite attention with at most this many queries per sequence
                (1: decode steps; the CUDA kernel serves one query).
            check_mask: assert at run time that each mask row allows exactly [0, p].
        """
        if not isinstance(max_queries, int) or max_queries < 1:
            raise ValueError(f"latent_attention: max_queries must be an integer >= 1, got {max_queries!r}")
        if window is not None:
            sink, recent = window
            if not (isinstance(sink, int) and sink >= 0 and isinstance(recent, int) and recent >= 1):
                raise ValueError(f"latent_attention: window must be (sink >= 0, recent >= 1), got {window!r}")
        self.window = tuple(window) if window is not None else None
        self.pattern = set(pattern) if window is not None else set()
        self.max_queries = max_queries
        self.check_mask = check_mask

    # ------------------------------------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> PassReport:
        report = PassReport(self.name)
        match = find_attention(graph)
        for site in match.vllm_mla:
            report.skip(site.layer, "vLLM MLA attention: vLLM already attends on the cached latent "
                                    "(absorbed weights); nothing to rewrite")
        # Attention a previous pass replaced stays in the graph, unused, until dead-code removal.
        sites: list[_Site | tuple[int | None, str]] = [_from_dense(s) for s in match.dense if s.output.users]
        sites += [_from_sparse(n) for n in graph.find_nodes(op="call_function",
                                                             target=torch.ops.omni.sparse_attention.default)
                  if n.users]
        if not sites and not match.vllm_mla:
            report.notes.append("no attention found in this graph")
        _number_layers(graph, sites, report)
        positions = QueryPositions(graph, self.name, check=self.check_mask)
        windows: set[int] = set()
        prefill: set[int] = set()
        for site in sites:
            if isinstance(site, tuple):
                report.skip(*site)
                continue
            if site.dense is not None and site.layer in self.pattern:
                site.window = self.window
            queries = shape_of(site.q)[2]
            if not isinstance(queries, int) or queries > self.max_queries:
                prefill.add(queries if isinstance(queries, int) else -1)
                continue
            parts = _latent_parts(site)
            if isinstance(parts, str):
                report.skip(site.layer, parts)
                continue
            problem = self._rewrite(graph, site, parts, positions)
            if problem:
                report.skip(site.layer, problem)
                continue
            report.matched_layers.append(site.layer)
            report.rewritten_nodes += 1
            if site.window != DENSE:
                windows.add(site.layer)
        if prefill:
            report.notes.append(f"attention with {sorted(prefill)} queries per sequence (> {self.max_queries}, "
                                "prefill) left as is: absorbing would multiply its attention FLOPs")
        if windows:
            report.notes.append(f"layers {sorted(windows)}: sink + recent selected at the latent cache read")
        if report.rewritten_nodes:
            graph.eliminate_dead_code()  # the expansions, key assemblies and dense attention replaced here
        graph.lint()
        return report

    # ------------------------------------------------------------------------------------
    def _rewrite(self, graph: fx.Graph, site: _Site, parts: _Latent, positions: QueryPositions) -> str | None:
        if site.dense is not None:
            mask = site.dense.mask
            if mask is None and not site.dense.is_causal:
                return "attention without a mask and not causal: query positions unknown"
            if mask is not None and not site.dense.mask_is_bool and not is_pure_mask(mask):
                return "attention mask is a float bias, not a 0/-inf mask; the latent op cannot add it"
        emit = Emitter(graph, site.anchor)
        H, dn, dv, R = parts.heads, parts.dn, parts.dv, parts.rank
        with graph.inserting_before(site.anchor):
            q_pos = site.q_pos if site.q_pos is not None else positions.get(emit, site.dense, site.q, site.layer)
            B, _, Sq, _ = shape_of(parts.q_nope)
            b, sq = sym_dim(emit, parts.q_nope, 0, B), sym_dim(emit, parts.q_nope, 2, Sq)
            w = emit(aten.reshape.default, (parts.weight, [H, dn + dv, R]))
            w_uk = emit(aten.slice.Tensor, (w, 1, 0, dn))             # [H, dn, R]
            w_uv_t = emit(aten.permute.default, (emit(aten.slice.Tensor, (w, 1, dn, dn + dv)), [0, 2, 1]))  # [H, R, dv]
            q_lat = _per_head_bmm(emit, parts.q_nope, w_uk, b, sq)    # [B, H, Sq, R]
            q_full = emit(aten.cat.default, ([q_lat, parts.q_pe], -1))
            kv_c, k_pe = _one_head(emit, parts.latent), _one_head(emit, parts.rope)
            sink, recent = site.window
            out = emit(torch.ops.omni.latent_attention.default, (q_full, kv_c, k_pe, q_pos, site.scale, sink, recent))
            out.meta["omni_layer"] = site.layer
            out = _per_head_bmm(emit, out, w_uv_t, b, sq)              # [B, H, Sq, dv]
            if site.output_is_3d:
                out = emit(aten.reshape.default, (out, [-1, sq, dv]))
        site.output.replace_all_uses_with(out)
        return None


# --------------------------------------------------------------------------- sites
def _from_dense(site: DenseAttention) -> _Site | tuple[int | None, str]:
    nodes = []
    for operand in (site.q, site.k, site.v):
        if operand.transpose or len(shape_of(operand.node) or ()) != 4:
            return site.layer, "attention operands are not recoverable as 4-D q, k, v tensors"
        nodes.append(operand.node)
    return _Site(layer=site.layer, anchor=site.anchor, output=site.output, output_is_3d=site.output_is_3d,
                 q=nodes[0], k=nodes[1], v=nodes[2], scale=site.scale, dense=site)


def _from_sparse(node: fx.Node) -> _Site:
    q, k, v, q_pos, sink, recent, scale = node.args
    layer = node.meta.get("omni_layer", layer_index(node))
    return _Site(layer=layer, anchor=node, output=node, output_is_3d=False, q=q, k=k, v=v, scale=scale,
                 q_pos=q_pos, window=(sink, recent))


def _number_layers(graph: fx.Graph, sites: list, report: PassReport) -> None:
    """Sites in graph order; without module paths in the graph, layers numbered by that order."""
    order = {node: i for i, node in enumerate(graph.nodes)}
    found = [s for s in sites if isinstance(s, _Site)]
    found.sort(key=lambda s: order[s.anchor])
    if found and all(s.layer is None for s in found):
        for i, site in enumerate(found):
            site.layer = i
        report.notes.append("no decoder-layer names in this graph: layers numbered by attention order")
    sites[:] = found + [s for s in sites if not isinstance(s, _Site)]


# --------------------------------------------------------------------------- the MLA expansion
def _latent_parts(site: _Site) -> _Latent | str:
    """Recognise q = cat(q_nope, q_pe), K = [k_nope | expand(k_pe)], v and k_nope from one
    expansion ``split(permute(reshape(mm(reshape(c), W_kv_bᵀ))))``; or say why not."""
    q_split = _cat_last(_strip(site.q, _VALUE_COPIES))
    if q_split is None:
        return "query is not cat(q_nope, q_rope) along the head dim (not MLA attention)"
    key = _key_pieces(site.k)
    if isinstance(key, str):
        return key
    (k_nope, nope_dims), (k_rope, rope_dims) = key
    q_nope, q_pe = q_split
    dn, dr = shape_of(q_nope)[-1], shape_of(q_pe)[-1]
    if nope_dims != dn or rope_dims != dr:
        return f"key parts ({nope_dims} + {rope_dims}) do not match the query's nope/rope split ({dn} + {dr})"
    rope = _strip(k_rope, ("aten.expand", *_VALUE_COPIES))
    rope_shape = shape_of(rope)
    if rope_shape is None or len(rope_shape) not in (3, 4) or (len(rope_shape) == 4 and rope_shape[1] != 1):
        return f"rope key of shape {rope_shape} is not shared by all heads ([B, 1, Sk, Dr])"
    nope_part, v_part = _last_dim_part(k_nope), _last_dim_part(_strip(site.v, _VALUE_COPIES))
    if nope_part is None or v_part is None:
        return "keys and values are not parts of a projected tensor (no kv_b_proj expansion found)"
    (n0, n1), (v0, v1) = nope_part[1:], v_part[1:]
    dv = v1 - v0
    if (n0, n1) != (0, dn) or v0 != dn:
        return f"k_nope takes dims [{n0}, {n1}) and v [{v0}, {v1}) of the expansion; expected [0, {dn}) and [{dn}, ...)"
    # Functionalized graphs may replay the view chain per use: compare what both parts expand.
    projections = [_expansion(part[0], dn + dv) for part in (nope_part, v_part)]
    for projection in projections:
        if isinstance(projection, str):
            return projection
    if projections[0][:2] != projections[1][:2]:
        return "keys and values are expanded from different tensors"
    latent, weight, heads = projections[0]
    B, Sk = shape_of(site.k)[0], shape_of(site.k)[2]
    if shape_of(latent)[0] != B or shape_of(latent)[-2] != Sk or rope_shape[0] != B or rope_shape[-2] != Sk:
        return f"latent {shape_of(latent)} / rope {rope_shape} do not hold the {Sk} keys of {B} sequences"
    if shape_of(q_nope)[1] != heads:
        return f"query has {shape_of(q_nope)[1]} heads, kv_b_proj expands {heads}"
    return _Latent(latent=latent, rope=rope, weight=weight, q_nope=q_nope, q_pe=q_pe, heads=heads,
                   dn=dn, dv=dv, rank=shape_of(latent)[-1])


def _expansion(expanded: fx.Node, width: int) -> tuple[fx.Node, fx.Node, int] | str:
    """``expanded`` [B, H, Sk, width] = permute(reshape(mm(reshape(c), W.T)), [0, 2, 1, 3]):
    (c, W, H), or the reason it is not."""
    no = "keys/values are not an expansion of a cached latent through one linear layer (kv_b_proj)"
    if permutation(expanded) != [0, 2, 1, 3]:
        return no
    B, H, Sk, _ = shape_of(expanded)
    projected = _strip(expanded.args[0], _ORDER_KEEPING)
    biased = is_op(projected, "aten.add") and any(is_op(_strip(a, _ORDER_KEEPING), "aten.mm") for a in projected.args[:2])
    if is_op(projected, "aten.addmm") or biased:
        return "kv_b_proj has a bias: absorbing it is not implemented"
    if not is_op(projected, "aten.mm"):
        return no
    rows, weight_t = projected.args
    if shape_of(projected) != (B * Sk, H * width) or tuple(shape_of(expanded.args[0]) or ()) != (B, Sk, H, width):
        return no
    if permutation(weight_t) != [1, 0]:
        return "the expansion's weight is not a plain linear weight (W.T)"
    weight = weight_t.args[0]
    latent = _strip(rows, _ORDER_KEEPING)
    shape = shape_of(latent)
    if shape is None or len(shape) not in (3, 4) or (len(shape) == 4 and shape[1] != 1) or shape[0] * shape[-2] != B * Sk:
        return f"the expanded rows come from a tensor of shape {shape}, not a latent cache [B, 1, Sk, R]"
    if shape_of(weight) != (H * width, shape[-1]):
        return f"kv_b_proj weight of shape {shape_of(weight)} does not map {shape[-1]} latent dims to {H} x {width}"
    if not (isinstance(H, int) and isinstance(width, int)):
        return "symbolic head count or head dims"
    return latent, weight, H


def _key_pieces(k: fx.Node):
    """K = [k_nope | k_rope] along the last dim, from ``cat`` or from slice_scatters into an
    empty tensor (transformers' ``new_empty`` + ``copy_``): ((k_nope, dn), (k_rope, dr))."""
    node = _strip(k, _VALUE_COPIES)
    if is_op(node, "aten.cat") and _is_last_dim(node, node.args[1] if len(node.args) > 1 else 0):
        parts = list(node.args[0])
        if len(parts) == 2:
            return tuple((p, shape_of(p)[-1]) for p in parts)
    pieces: list[tuple[int, int, fx.Node]] = []
    width = (shape_of(node) or (0,))[-1]
    while is_op(node, "aten.slice_scatter"):
        base, src = node.args[0], node.args[1]
        dim, start, end = _arg(node, 2, "dim", 0), _arg(node, 3, "start", None), _arg(node, 4, "end", None)
        if not _is_last_dim(node, dim) or _arg(node, 5, "step", 1) != 1:
            return "keys are written by a strided or non-last-dim slice_scatter"
        start, end = start or 0, min(end if end is not None else width, width)
        if is_op(src, "aten.copy"):  # copy(slice(base), value): value broadcast into the slice
            src = src.args[1]
        pieces.append((start, end, src))
        node = base
    if not pieces or not is_op(node, "aten.empty", "aten.full", "aten.zeros", "aten.new_empty"):
        return "keys are not assembled from a latent expansion and a rope key (no MLA key assembly found)"
    pieces.sort(key=lambda p: p[0])
    if len(pieces) != 2 or pieces[0][0] != 0 or pieces[0][1] != pieces[1][0] or pieces[1][1] != width:
        return "the key assembly does not cover the head dim with exactly two parts"
    return (pieces[0][2], pieces[0][1]), (pieces[1][2], width - pieces[1][0])


def _last_dim_part(node: fx.Node) -> tuple[fx.Node, int, int] | None:
    """(source, start, stop) when ``node`` is dims [start, stop) of ``source``'s last dim."""
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        split, index = node.args
        width = (shape_of(split.args[0]) or (0,))[-1]
        if is_op(split, "aten.split_with_sizes") and _is_last_dim(split.args[0], _arg(split, 2, "dim", 0)):
            sizes = list(split.args[1])
            return split.args[0], sum(sizes[:index]), sum(sizes[:index + 1])
        if is_op(split, "aten.split") and _is_last_dim(split.args[0], _arg(split, 2, "dim", 0)):
            size = split.args[1]
            return split.args[0], index * size, min((index + 1) * size, width)
        return None
    if is_op(node, "aten.slice") and _is_last_dim(node, _arg(node, 1, "dim", 0)) and _arg(node, 4, "step", 1) == 1:
        width = shape_of(node.args[0])[-1]
        start, end = _arg(node, 2, "start", 0) or 0, _arg(node, 3, "end", None)
        return node.args[0], start, min(end if end is not None else width, width)
    return None


def _cat_last(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    if is_op(node, "aten.cat") and len(node.args[0]) == 2 and _is_last_dim(node, _arg(node, 1, "dim", 0)):
        a, b = node.args[0]
        if len(shape_of(a) or ()) == 4 and len(shape_of(b) or ()) == 4:
            return a, b
    return None


# --------------------------------------------------------------------------- small helpers
def _strip(node: Any, ops: tuple[str, ...]) -> Any:
    while isinstance(node, fx.Node) and is_op(node, *ops):
        node = node.args[0]
    return node


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_last_dim(node: fx.Node, dim: Any) -> bool:
    rank = len(shape_of(node) or ())
    return isinstance(dim, int) and rank > 0 and dim % rank == rank - 1


def _one_head(emit: Emitter, node: fx.Node) -> fx.Node:
    """[B, 1, Sk, D] -> [B, Sk, D] as a view (select keeps any strides); 3-D as is."""
    if len(shape_of(node)) == 4:
        return emit(aten.select.int, (node, 1, 0))
    return node


def _per_head_bmm(emit: Emitter, x: fx.Node, w: fx.Node, b: Any, sq: Any) -> fx.Node:
    """x [B, H, Sq, K] times w [H, K, N] per head -> [B, H, Sq, N] (one bmm over H)."""
    H, N = shape_of(w)[0], shape_of(w)[2]
    flat = emit(aten.reshape.default, (emit(aten.permute.default, (x, [1, 0, 2, 3])), [H, -1, shape_of(x)[3]]))
    y = emit(aten.bmm.default, (flat, w))                                   # [H, B*Sq, N]
    return emit(aten.permute.default, (emit(aten.reshape.default, (y, [H, b, sq, N])), [1, 0, 2, 3]))
