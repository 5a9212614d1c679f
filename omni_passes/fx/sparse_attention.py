"""SparseAttentionPass: sink + recent attention (OmniAttn) in the layers of a pattern.

A query at position p of a pattern layer attends to keys [0, sink) ∪ (p − recent, p] only;
every other layer is left exactly as it was.

Before (one pattern layer, transformers; SDPA node or its math decomposition on CPU)::

    q, k, v ─► [bmm ─► scale ─► add(mask) ─► softmax ─► bmm]  or  _scaled_dot_product_*_attention
            ─► attention output [B, H, Sq, Dv] (or [B*H, Sq, Dv] from the second bmm)

After::

    mask ─► allowed = (mask == 0) | bool mask ─► omni.mask_positions ─► q_pos [B, Sq]  (once per mask;
            q_pos = allowed keys − 1, checked: every row allows exactly keys [0, q_pos])
    q, k, v, q_pos ─► omni.sparse_attention(q, k, v, q_pos, sink, recent, scale) ─► output

Query positions come from the attention mask, not from the model: in a causal mask the row of
the query at position p allows exactly the keys [0, p] (key index j holds position j), so
p = (number of allowed keys) − 1. This holds in prefill, in decode over a static cache (the
unfilled tail is masked), and for the compressed cache of ``omni_passes.kvcache`` (its mask,
cut to the cache's slots, allows [0, min(p, slots − 1)], which is what the op needs there).
A mask that is not of that form (left padding, sliding windows, a float bias) would make the
op compute something else, so ``omni::mask_positions`` checks each row and fails loudly at run
time (``torch._assert_async``: an exception on CPU, a device assert on CUDA); a float bias that is not a 0/−inf mask is
rejected when matching. SDPA called with ``is_causal=True`` and no mask gets q_pos = 0..Sq−1
(SDPA's causal mask is top-left aligned).

vLLM (CPU): ``auto_functionalized(vllm.unified_mla_attention_with_output, ...)`` of a pattern
layer becomes ``auto_functionalized(omni_vllm.sparse_mla_attention, ..., sink, recent)`` with
the same inputs, whose kernel runs vLLM's own MLA layer with the keys restricted to sink +
recent. The vLLM host gives the pass that op (``omni_passes.hosts.vllm.mla_op``, through the
registry's ``host_ops``): this pass knows the graph form, not the host.

The report lists matched pattern layers; pattern layers that were not rewritten appear under
``skipped`` with the reason; layers outside the pattern are listed in the notes as untouched.
"""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx

import kernels  # noqa: F401  (registers omni::sparse_attention)
import kernels.sparse_attention_positions  # noqa: F401  (registers omni::mask_positions)
from omni_passes.fx.attention import (
    DenseAttention,
    Emitter,
    QueryPositions,
    VllmMlaAttention,
    find_attention,
    is_pure_mask,
    operand_node,
    shape_of,
    sym_dim,
)
from omni_passes.fx.utils import PassReport, eager_input_vals

class SparseAttentionPass:
    name = "sparse_attention"

    def __init__(self, sink: int, recent: int, pattern: list[int], check_mask: bool = True,
                 vllm_mla_op: Callable[[], Any] | None = None):
        """
        Args:
            sink, recent: the op's window (sink >= 0, recent >= 1).
            pattern: decoder-layer indices (``model.layers.N``) to compress.
            check_mask: insert the device-side assert that each mask row is causal up to the
                position derived from it (cheap: one compare over the mask per distinct mask).
            vllm_mla_op: returns the op that replaces vLLM's MLA attention in a pattern layer,
                given by the vLLM host (None: vLLM attention sites are skipped, with the reason).
        """
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"sparse_attention: sink must be an integer >= 0, got {sink!r}")
        if not isinstance(recent, int) or recent < 1:
            raise ValueError(f"sparse_attention: recent must be an integer >= 1, got {recent!r}")
        bad = [i for i in pattern if not isinstance(i, int) or i < 0]
        if bad:
            raise ValueError(f"sparse_attention: pattern entries must be decoder-layer indices >= 0, got {bad}")
        self.sink = sink
        self.recent = recent
        self.pattern = sorted(set(pattern))
        self.check_mask = check_mask
        self.vllm_mla_op = vllm_mla_op

    # ------------------------------------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> PassReport:
        report = PassReport(self.name)
        match = find_attention(graph)
        # (graph node, layer, matched site or None, rejection reason or None), in graph order.
        entries = [(s.anchor, s.layer, s, None) for s in match.dense]
        entries += [(s.node, s.layer, s, None) for s in match.vllm_mla]
        entries += [(node, layer, None, reason) for layer, reason, node in match.rejected]
        if not entries:
            for layer in self.pattern:
                report.skip(layer, "no attention found in this graph (no SDPA node, softmax(q·kᵀ)·v bmm pair "
                                   "or vLLM MLA attention op)")
            return report
        order = {node: i for i, node in enumerate(graph.nodes)}
        entries.sort(key=lambda e: order[e[0]])
        if all(layer is None for _, layer, _, _ in entries):
            # No module paths recorded: attention sites appear in model order, one per layer.
            entries = [(node, i, site, reason) for i, (node, _, site, reason) in enumerate(entries)]
            report.notes.append("no decoder-layer names in this graph: layers numbered by attention order")
        sites = [(layer, site) for _, layer, site, reason in entries if site is not None]
        rejected = [(layer, reason) for _, layer, site, reason in entries if site is None]
        for layer, reason in rejected:
            if layer in self.pattern:
                report.skip(layer, reason)
            else:
                report.notes.append(f"layer {layer}: attention not recognised ({reason})")
        positions = QueryPositions(graph, self.name, check=self.check_mask)
        seen: set[int] = set()
        untouched: list[int] = []
        for layer, site in sites:
            if layer is None:
                report.skip(None, "attention site without a decoder-layer index; left dense")
                continue
            if layer not in self.pattern:
                untouched.append(layer)
                continue
            seen.add(layer)
            if isinstance(site, VllmMlaAttention):
                problem = self._rewrite_vllm(graph, site)
            else:
                problem = self._rewrite_dense(graph, site, layer, positions)
            if problem:
                report.skip(layer, problem)
            else:
                report.matched_layers.append(layer)
                report.rewritten_nodes += 1
        rejected_layers = {layer for layer, _ in rejected}
        for layer in self.pattern:
            if layer not in seen and layer not in rejected_layers:
                report.skip(layer, f"no attention of decoder layer {layer} in this graph")
        if untouched:
            report.notes.append(f"layers {sorted(set(untouched))} are not in the pattern: left dense")
        graph.lint()
        return report

    # ------------------------------------------------------------------------------------
    def _rewrite_dense(self, graph: fx.Graph, site: DenseAttention, layer: int,
                       positions: QueryPositions) -> str | None:
        if site.mask is None and not site.is_causal:
            return f"{site.form} attention without a mask and not causal: query positions unknown"
        if site.mask is not None and not site.mask_is_bool and not is_pure_mask(site.mask):
            return "attention mask is a float bias, not a 0/-inf mask; the sparse op cannot add it"
        emit = Emitter(graph, site.anchor)
        with graph.inserting_before(site.anchor):
            q = operand_node(emit, site.q)
            k = operand_node(emit, site.k)
            v = operand_node(emit, site.v)
            q_pos = positions.get(emit, site, q, layer)
            out = emit(torch.ops.omni.sparse_attention.default, (q, k, v, q_pos, self.sink, self.recent, site.scale))
            out.meta["omni_layer"] = layer
            replacement = out
            if site.output_is_3d:  # [B, H, Sq, Dv] -> the second bmm's [B*H, Sq, Dv]
                sq, dv = site.q.shape[2], shape_of(out)[3]
                replacement = emit(torch.ops.aten.reshape.default,
                                   (out, [-1, sym_dim(emit, out, 2, sq), sym_dim(emit, out, 3, dv)]))
        site.output.replace_all_uses_with(replacement)
        return None

    # ------------------------------------------------------------------------------------
    def _rewrite_vllm(self, graph: fx.Graph, site: VllmMlaAttention) -> str | None:
        node, kw = site.node, site.kwargs
        if self.vllm_mla_op is None:
            return "vLLM MLA attention, but the host gave no sparse MLA op (only the vLLM host can rewrite it)"
        if node.target is not torch.ops.higher_order.auto_functionalized:
            return f"{node.target}: only auto_functionalized (v1) vLLM graphs are handled"
        if site.layer_name is None:
            return "vLLM attention without a readable layer name (layer_name input has no LayerName value)"
        for name in ("output_scale", "output_block_scale", "q_dcp_replicated"):
            if kw.get(name) is not None:
                return f"vLLM MLA attention with {name} set (quantised output / context parallel) is not supported"
        if any(u.target is operator.getitem and u.args[1] not in (0, 1) and u.users for u in node.users):
            return "vLLM MLA attention: an output other than `output` is used"
        new_kwargs = {
            "q": kw["q"], "kv_c_normed": kw["kv_c_normed"], "k_pe": kw["k_pe"], "output": kw["output"],
            "layer_name": site.layer_name, "sink": self.sink, "recent": self.recent,
            "kv_cache_dummy_dep": kw.get("kv_cache_dummy_dep"),
        }
        with graph.inserting_before(node):
            new = graph.call_function(torch.ops.higher_order.auto_functionalized,
                                      (self.vllm_mla_op(),), new_kwargs)
        old_val = node.meta.get("val")
        new.meta.update({k: v for k, v in node.meta.items() if k not in ("val", "eager_input_vals")})
        new.meta["val"] = (None, old_val[1]) if isinstance(old_val, tuple) and len(old_val) > 1 else old_val
        # the old node's eager_input_vals describe the old op's arity (Inductor checks it)
        new.meta["eager_input_vals"] = eager_input_vals(new.args, new_kwargs)
        new.meta["omni_layer"] = site.layer
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        return None
