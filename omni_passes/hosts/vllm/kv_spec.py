"""``SinkRecentMLASpec``: the vLLM KV cache spec of an MLA layer that keeps only sink + recent.

vLLM builds one ``KVCacheSpec`` per attention layer in the worker, groups layers with equal
specs, and gives each group its own block table and manager over one shared block pool (the
hybrid KV cache manager). A compressed layer's spec differs from ``MLAAttentionSpec`` only in
how many blocks a request can hold at once, so it has the same page layout (one 576-element
latent row per token) and adds the window:

    MLAAttentionSpec      layers 0, 2, ...   FullAttentionManager   every block until the end
    SinkRecentMLASpec     pattern layers     SinkRecentManager      [0, sink) ∪ last `recent`

It subclasses ``AttentionSpec``, not ``MLAAttentionSpec``: vLLM merges every subclass of
``MLAAttentionSpec`` into one full-attention group (``MLAAttentionSpec.merge`` accepts them),
which would put the compressed layers back under the full-attention manager. Its fields are
copied from the layer's own ``MLAAttentionSpec`` (``from_mla_spec``), so shapes, dtype and
page size match it exactly and both groups share pages of the same size. The page size is
written here, not inherited: ``AttentionSpec`` counts a K and a V row per token in some vLLM
versions (0.26), where MLA stores one latent row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec, MLAAttentionSpec

from omni_passes.hosts.vllm.kv_checks import SinkRecentKVError
from omni_passes.kvcache.window import SinkRecentWindow


def plain_mla_spec(spec: KVCacheSpec, layer: str) -> MLAAttentionSpec:
    """``spec``, the KV cache spec vLLM gave ``layer``, if it is a plain ``MLAAttentionSpec`` (what
    ``SinkRecentMLASpec.from_mla_spec`` copies); a subclass (sliding window, sparse indexer) raises
    ``SinkRecentKVError`` naming the layer and the spec."""
    if type(spec) is not MLAAttentionSpec:
        raise SinkRecentKVError(f"{layer}: KV cache spec {type(spec).__name__}; sink+recent KV needs a plain "
                                "MLAAttentionSpec (no sliding window, no sparse indexer)")
    return spec


@dataclass(frozen=True, kw_only=True)
class SinkRecentMLASpec(AttentionSpec):
    sink: int
    recent: int
    cache_dtype_str: str | None = None
    # MLA stores one latent row per token; there is no separate V (as in MLAAttentionSpec).
    head_size_v: int = 0

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)  # AttentionSpec has one in some vLLM versions only
        if parent is not None:
            parent()
        SinkRecentWindow(self.sink, self.recent, self.block_size)  # raises naming the problem

    @classmethod
    def from_mla_spec(cls, spec: MLAAttentionSpec, sink: int, recent: int) -> SinkRecentMLASpec:
        shared = {f.name: getattr(spec, f.name) for f in fields(AttentionSpec)}
        ours = cls(**shared, sink=sink, recent=recent, cache_dtype_str=spec.cache_dtype_str)
        if ours.unpadded_page_size_bytes != spec.unpadded_page_size_bytes:
            raise ValueError(f"sink+recent KV: the layer's MLA pages hold {spec.unpadded_page_size_bytes} bytes, not one "
                             f"{spec.head_size}-element {spec.dtype} row per token ({ours.unpadded_page_size_bytes}); "
                             f"only unquantised latent caches (kv_cache_dtype 'auto') are supported")
        return ours

    @property
    def unpadded_page_size_bytes(self) -> int:
        """One latent row (kv_lora_rank + rope dims) per token and KV head, as in ``MLAAttentionSpec``."""
        return self.block_size * self.num_kv_heads * self.head_size * torch.empty((), dtype=self.dtype).element_size()

    @property
    def real_page_size_bytes(self) -> int:
        return self.unpadded_page_size_bytes

    @property
    def window(self) -> SinkRecentWindow:
        return SinkRecentWindow(self.sink, self.recent, self.block_size)

    def max_memory_usage_bytes(self, vllm_config: Any) -> int:
        scheduler = vllm_config.scheduler_config
        chunked = bool(scheduler.enable_chunked_prefill)
        pipelined = bool(getattr(scheduler, "async_scheduling", False))
        return self.window.max_live_blocks(vllm_config.model_config.max_model_len, chunked, pipelined) * self.page_size_bytes

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        return all(isinstance(s, SinkRecentMLASpec) and (s.sink, s.recent) == (self.sink, self.recent)
                   for s in kv_cache_specs.values())
