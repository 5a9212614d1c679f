"""Registering sink+recent KV with vLLM: the spec, its manager, the MLA layer class.

Called by the general plugin (``omni_passes.vllm_plugin``) in every vLLM process, so both the
worker (which builds the layers and their specs) and the engine core (whose scheduler looks up
the manager class for each KV cache group spec in ``KVCacheSpecRegistry``) know them.

What is registered depends on the platform, because attention is changed in different places:

    platform   free_kv   layer class (kv_layer)        spec + manager
    CPU        true      yes (spec, masked writes)     yes
    CPU        false     no: the sparse-attention graph pass does the attention
    CUDA       true      yes (sparse impl, spec)       yes
    CUDA       false     yes (sparse impl over dense KV; no graph pass sees attention there)
"""

from __future__ import annotations

from omni_passes.config import PassConfig


def wants_sink_recent_kv(config: PassConfig) -> bool:
    """Whether the config asks for freed KV blocks (sink+recent KV groups)."""
    attn = config.sparse_attention
    return "sparse_attention" in config.passes and attn.free_kv and bool(attn.pattern)


def wants_layer_hook(config: PassConfig, cuda: bool) -> bool:
    """Whether the pattern layers must be built through ``SinkRecentMLAWrapper``."""
    attn = config.sparse_attention
    return "sparse_attention" in config.passes and bool(attn.pattern) and (attn.free_kv or cuda)


def register_sink_recent_kv(config: PassConfig) -> bool:
    """Register what this platform needs for the config's sparse attention; returns whether it
    registered anything."""
    if not ("sparse_attention" in config.passes and config.sparse_attention.pattern):
        return False
    from vllm.platforms import current_platform

    if not wants_layer_hook(config, current_platform.is_cuda()):
        return False
    from omni_passes.hosts.vllm.kv_layer import install

    if wants_sink_recent_kv(config):
        from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

        from omni_passes.hosts.vllm.kv_manager import SinkRecentManager
        from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec

        # vLLM registers its built-in specs only while the registry is empty: fill it first, or
        # ours would be the only spec it knows.
        KVCacheSpecRegistry.check_kv_cache_spec_registry({})
        KVCacheSpecRegistry.register(SinkRecentMLASpec, SinkRecentManager, uniform_type_base_spec=SinkRecentMLASpec)
    install(config.sparse_attention)
    return True
