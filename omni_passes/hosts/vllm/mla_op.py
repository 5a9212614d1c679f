"""``omni_vllm::sparse_mla_attention``: vLLM's MLA attention restricted to sink + recent keys.

What the sparse-attention pass puts in place of ``vllm.unified_mla_attention_with_output`` in
the pattern layers of a vLLM graph (CPU). Same inputs, plus ``sink`` and ``recent``; the layer
name is a string constant (read off the graph's LayerName input by the pass)::

    omni_vllm::sparse_mla_attention(Tensor q, Tensor kv_c_normed, Tensor k_pe, Tensor(a!) output,
                                    str layer_name, int sink, int recent,
                                    Tensor? kv_cache_dummy_dep=None) -> ()

It runs the layer's own ``MLAAttention.forward_impl`` (projections, W_UK/W_UV absorption, vLLM's
kernels) on modified attention metadata, so only the set of keys changes:

* **decode** (the MQA path, one query per request at position p = seq_len − 1): the visible rows
  — positions [0, sink) and (p − recent, p] — are copied from the paged cache into a scratch
  paged cache, packed from its first block, and vLLM's decode kernel runs with a block table
  over that scratch and ``seq_lens = min(seq_len, sink + recent)``. The kernel attends to every
  token of its block list and MLA keys carry their RoPE already, so attending to the packed set
  is exactly sink+recent attention. (OmniInfer trims the block table to whole sink and recent
  blocks, which keeps up to a block of extra tokens at the window's start; the copy keeps the
  token-exact semantics of ``omni::sparse_attention``, at the cost of copying sink + recent
  latent rows per request and layer.)
* **prefill** (the MHA path over the new tokens): the prefill backend is wrapped so that its
  ``run_prefill_new_tokens`` computes ``omni::sparse_attention`` per request, with positions
  0..L−1, on the q/k/v that vLLM's ``forward_mha`` built. A chunk with cached context (chunked
  prefill, which vLLM turns off for MLA on CPU but uses elsewhere) also reads the context rows
  its queries see, [0, sink) ∪ [C + 1 − recent, C), from the paged cache and attends over them
  and the new keys under the window mask; vLLM's own context pass (which would read the whole
  context) is dropped.

When no sequence in the batch is longer than sink + recent, every query already sees exactly its
window, and the op calls ``forward_impl`` unchanged (bit-identical to the dense run).

Limits (each raises naming itself rather than computing something else): hisparse caches, KV
caches that are not [blocks, block_size, row]. Every block table entry this op reads holds a
visible position, so with sink+recent KV (``omni_passes.hosts.vllm.kv_layer``: blocks outside
the window freed) it never touches a freed block or the null block.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["sparse_mla_attention", "sparse_mla_attention_op", "visible_positions"]


@torch.library.custom_op("omni_vllm::sparse_mla_attention", mutates_args=("output",))
def sparse_mla_attention(q: torch.Tensor, kv_c_normed: torch.Tensor, k_pe: torch.Tensor, output: torch.Tensor,
                         layer_name: str, sink: int, recent: int,
                         kv_cache_dummy_dep: torch.Tensor | None = None) -> None:
    from vllm.model_executor.layers.attention.attention import get_attention_context

    attn_metadata, layer, kv_cache, _ = get_attention_context(layer_name)
    if getattr(layer, "hisparse_cache", None) is not None:
        raise NotImplementedError(f"{layer_name}: sink+recent attention over a hisparse KV cache is not supported")
    # A layer with sink+recent KV (``vllm_layer.compress_layer``) guards its ``forward_impl``
    # against dense reads of freed blocks; this op is the caller allowed past that guard.
    forward_impl = getattr(layer, "dense_forward_impl", layer.forward_impl)
    if attn_metadata is None or attn_metadata.max_seq_len <= sink + recent:
        forward_impl(q, kv_c_normed, k_pe, kv_cache, attn_metadata, output=output)
        return
    changes: dict[str, Any] = {}
    if attn_metadata.prefill is not None and attn_metadata.num_prefills > 0:
        prefill = attn_metadata.prefill
        context = None
        if prefill.chunked_context is not None:
            # vLLM would attend over the whole cached context (freed blocks included): the
            # wrapper reads the visible context rows itself, so vLLM's context pass is dropped.
            context = _CachedContext(layer.impl, kv_cache, prefill.block_table,
                                     prefill.chunked_context.context_lens_list, layer_name)
        wrapped = _SinkRecentPrefill(prefill.prefill_backend, prefill.query_start_loc, sink, recent, context)
        changes["prefill"] = dataclasses.replace(prefill, prefill_backend=wrapped, chunked_context=None)
    if attn_metadata.decode is not None and attn_metadata.num_decodes > 0:
        kv_cache, changes["decode"] = _compact_decode(kv_cache, attn_metadata.decode, sink, recent, layer_name)
    forward_impl(q, kv_c_normed, k_pe, kv_cache, dataclasses.replace(attn_metadata, **changes), output=output)


@sparse_mla_attention.register_fake
def _sparse_mla_attention_fake(q, kv_c_normed, k_pe, output, layer_name, sink, recent, kv_cache_dummy_dep=None):
    return None


def sparse_mla_attention_op():
    return torch.ops.omni_vllm.sparse_mla_attention.default


# --------------------------------------------------------------------------- decode
def visible_positions(seq_lens: torch.Tensor, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions a decode query sees, packed: seq_lens [R] -> (positions [R, W] int64, valid [R, W])
    with W = sink + recent. A sequence of length L >= W sees 0..sink−1 then L−recent..L−1; a
    shorter one sees 0..L−1 (the tail is padding, ``valid`` False)."""
    window = sink + recent
    t = torch.arange(window, device=seq_lens.device)
    length = seq_lens.to(torch.int64)[:, None]
    full = torch.where(t < sink, t, length - recent + (t - sink))
    positions = torch.where(length >= window, full, t)
    valid = t < torch.clamp(length, max=window)
    return torch.where(valid, positions, torch.zeros_like(positions)), valid


def _compact_decode(kv_cache: torch.Tensor, decode: Any, sink: int, recent: int, layer_name: str):
    if kv_cache.dim() != 3:
        raise NotImplementedError(f"{layer_name}: KV cache of shape {tuple(kv_cache.shape)}; expected "
                                  "[num_blocks, block_size, row] (vLLM CPU MLA)")
    block_size, row = kv_cache.shape[1], kv_cache.shape[2]
    table, seq_lens = decode.block_table, decode.seq_lens
    requests, window = seq_lens.shape[0], sink + recent
    positions, _ = visible_positions(seq_lens, sink, recent)
    blocks = torch.gather(table.to(torch.int64), 1, positions // block_size)
    slots = blocks * block_size + positions % block_size                          # [R, W]
    rows = kv_cache.reshape(-1, row).index_select(0, slots.reshape(-1)).reshape(requests, window, row)
    per_request = -(-window // block_size)
    scratch = kv_cache.new_zeros(requests * per_request, block_size, row)
    scratch.view(requests, per_request * block_size, row)[:, :window] = rows
    new_table = torch.arange(requests * per_request, dtype=table.dtype, device=table.device).view(requests, per_request)
    new_lens = torch.clamp(seq_lens, max=window)
    return scratch, dataclasses.replace(decode, block_table=new_table, seq_lens=new_lens)


# --------------------------------------------------------------------------- prefill
class _SinkRecentPrefill:
    """Wraps vLLM's MLA prefill backend: new-token attention becomes sink+recent.

    Without cached context (a whole prompt) the new tokens attend over their own fresh keys with
    ``omni::sparse_attention`` (positions 0..L−1). With cached context (chunked prefill: tokens
    [C, C + L) of a longer prompt) each query at p also sees the context keys [0, sink) ∪
    (p − recent, C); those rows are read from the paged cache (``_CachedContext``), expanded as
    vLLM expands its context, and attended together with the new keys under the window mask.
    """

    def __init__(self, inner: Any, query_start_loc: torch.Tensor, sink: int, recent: int,
                 context: "_CachedContext | None" = None):
        self._inner = inner
        self._starts = [int(x) for x in query_start_loc.cpu()]
        self._sink, self._recent = sink, recent
        self._context = context

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def run_prefill_new_tokens(self, q, k, v, return_softmax_lse, out=None, output_scale=None):
        if return_softmax_lse or output_scale is not None:
            raise NotImplementedError("sink+recent prefill: log-sum-exp / fused output quantisation not supported")
        import kernels  # noqa: F401  (registers omni::sparse_attention)

        chunks = []
        scale = float(self._inner.scale)
        for r, (start, end) in enumerate(zip(self._starts[:-1], self._starts[1:])):
            context_len = self._context.lengths[r] if self._context is not None else 0
            if context_len:
                chunks.append(self._with_context(r, context_len, q[start:end], k[start:end], v[start:end], scale))
                continue
            positions = torch.arange(end - start, device=q.device)[None]
            qr, kr, vr = (x[start:end].transpose(0, 1)[None] for x in (q, k, v))      # [1, H, L, D]
            dtype = v.dtype
            res = torch.ops.omni.sparse_attention(qr.to(dtype), kr.to(dtype), vr, positions,
                                                  self._sink, self._recent, scale)
            chunks.append(res[0].transpose(0, 1))                                    # [L, H, Dv]
        result = torch.cat(chunks, dim=0)
        if out is not None:
            out.copy_(result)
            return out
        return result

    def _with_context(self, r: int, context_len: int, q, k, v, scale: float) -> torch.Tensor:
        """q, k, v [L, H, D] of tokens [C, C + L) -> output [L, H, Dv]."""
        key_pos, k_ctx, v_ctx = self._context.visible_rows(r, context_len, self._sink, self._recent)
        length = q.shape[0]
        q_pos = context_len + torch.arange(length, device=q.device)
        key_pos = torch.cat([key_pos, q_pos])
        keys = torch.cat([k_ctx.to(k.dtype), k]).transpose(0, 1).float()            # [H, n + L, D]
        values = torch.cat([v_ctx.to(v.dtype), v]).transpose(0, 1).float()
        visible = (key_pos[None] <= q_pos[:, None]) & (
            (key_pos[None] < self._sink) | (key_pos[None] > q_pos[:, None] - self._recent))  # [L, n + L]
        scores = torch.matmul(q.transpose(0, 1).float(), keys.transpose(1, 2)) * scale     # [H, L, n + L]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values).transpose(0, 1).to(v.dtype)


class _CachedContext:
    """The cached context of the prefill requests of one step, read row by row: only the rows a
    sink+recent query can see, so freed blocks (null entries) are never touched."""

    def __init__(self, impl: Any, kv_cache: torch.Tensor, block_table: torch.Tensor, lengths: list[int],
                 layer_name: str):
        if kv_cache.dim() != 3:
            raise NotImplementedError(f"{layer_name}: KV cache of shape {tuple(kv_cache.shape)}; expected "
                                      "[num_blocks, block_size, row] (vLLM CPU MLA)")
        self._impl, self._cache, self._table = impl, kv_cache, block_table
        self.lengths = [int(n) for n in lengths]

    def visible_rows(self, r: int, context_len: int, sink: int, recent: int):
        """Positions [0, sink) ∪ [C + 1 − recent, C) of request r's context (the union of what its
        new queries see there) -> (positions [n], k [n, H, Dqk], v [n, H, Dv]) as vLLM's MLA
        prefill builds them from the latent rows."""
        impl, cache = self._impl, self._cache
        block_size, row = cache.shape[1], cache.shape[2]
        first_recent = max(min(sink, context_len), context_len + 1 - recent)
        positions = torch.cat([torch.arange(min(sink, context_len)), torch.arange(first_recent, context_len)])
        positions = positions.to(self._table.device)
        blocks = self._table[r].to(torch.int64)[positions // block_size]
        rows = cache.reshape(-1, row).index_select(0, blocks * block_size + positions % block_size)
        kv_c, k_pe = rows[:, :impl.kv_lora_rank], rows[:, impl.kv_lora_rank:].unsqueeze(1)
        kv_nope = impl.kv_b_proj(kv_c)[0].view(-1, impl.num_heads, impl.qk_nope_head_dim + impl.v_head_dim)
        k_nope, v = kv_nope.split([impl.qk_nope_head_dim, impl.v_head_dim], dim=-1)
        return positions, impl._concat_k_nope_k_pe(k_nope, k_pe), v
