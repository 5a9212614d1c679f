"""vLLM general plugin (entry point ``vllm.general_plugins``: ``omni_passes``; the old path
``omni_passes.vllm_plugin:register`` is an alias).

vLLM loads it in every process it starts. It registers the omni custom ops (so graphs that
call them load anywhere), makes vLLM treat ``omni_passes.vllm_post_grad_pass`` as its own
``InductorPass`` (so the pass's ``uuid()`` keys the compile caches), and, when
``OMNI_PASSES_CONFIG`` is set, validates that file and the placement file it names early, so
a bad config is reported before the model loads. (Whether a placement fits the model is
checked when the model's graph compiles, in the worker; a refusal there fails vLLM's start-up
and the server exits.) Enabling the pass is still the compile-config line (README). With
``sparse_attention.free_kv`` (the default) it also registers sink+recent KV for the pattern
layers (``_register_kv_cache``).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("omni_passes")


def register() -> None:
    import kernels  # noqa: F401  (registers omni::* ops)
    from omni_passes.hosts.vllm.ascend_pass import register_with_vllm as register_ascend_with_vllm
    from omni_passes.hosts.vllm.post_grad_pass import register_with_vllm
    from omni_passes.hosts.vllm.settings import ENV_CONFIG, process_config

    register_with_vllm()
    register_ascend_with_vllm()
    if os.environ.get(ENV_CONFIG):
        from omni_passes.hosts.vllm.runtime import install_resolver

        config = process_config()  # raises ConfigError naming the file and the problem
        config.placement_object  # noqa: B018  (parsed once, here: PlacementError naming the file)
        log.info("omni_passes plugin: %s = %s, passes %s", ENV_CONFIG, os.environ[ENV_CONFIG], list(config.passes))
        if "redundant_experts" in config.passes:
            _define_cuda_moe_ops()
            install_resolver(config)  # a warm start builds the runtime at the first op call
        _register_kv_cache(config)


def _define_cuda_moe_ops() -> None:
    """On vLLM CUDA the omni MoE ops must exist before a compiled graph that calls them loads
    from vLLM's compile cache (no pass runs then)."""
    try:
        from vllm.platforms import current_platform
    except ImportError:
        return
    if current_platform.is_cuda_alike():
        from kernels.vllm_slot_moe import define_slot_ops

        define_slot_ops()


def _register_kv_cache(config) -> None:
    """Sink+recent KV cache spec, manager and MLA layer class for the pattern layers."""
    from omni_passes.hosts.vllm.kv_register import register_sink_recent_kv

    if "sparse_attention" in config.passes:
        # The op the pass inserts, registered up front: a compiled graph loaded from a cache
        # calls it without the pass having run in this process.
        import omni_passes.hosts.vllm.mla_op  # noqa: F401
    if register_sink_recent_kv(config):
        attn = config.sparse_attention
        log.info("omni_passes plugin: sink+recent KV for layers %s (sink %d, recent %d)",
                 list(attn.pattern), attn.sink, attn.recent)
