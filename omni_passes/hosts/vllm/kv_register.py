"""Registering sink+recent KV with vLLM: the spec, its manager, the MLA layer class.

Called by the general plugin (``omni_passes.vllm_plugin``) in every vLLM process, so both the
worker (which builds the layers and their specs) and the engine core (whose scheduler looks up
the manager class for each KV cache group spec in ``KVCacheSpecRegistry``) know them.
"""

from __future__ import annotations

from omni_passes.config import PassConfig


def wants_sink_recent_kv(config: PassConfig) -> bool:
    attn = config.sparse_attention
    return "sparse_attention" in config.passes and attn.free_kv and bool(attn.pattern)


def register_sink_recent_kv(config: PassConfig) -> bool:
    """Register everything when the config asks for freed KV blocks; returns whether it did."""
    if not wants_sink_recent_kv(config):
        return False
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    from omni_passes.hosts.vllm.kv_layer import install
    from omni_passes.hosts.vllm.kv_manager import SinkRecentManager
    from omni_passes.hosts.vllm.kv_spec import SinkRecentMLASpec

    # vLLM registers its built-in specs only while the registry is empty: fill it first, or
    # ours would be the only spec it knows.
    KVCacheSpecRegistry.check_kv_cache_spec_registry({})
    KVCacheSpecRegistry.register(SinkRecentMLASpec, SinkRecentManager, uniform_type_base_spec=SinkRecentMLASpec)
    install(config.sparse_attention)
    return True
