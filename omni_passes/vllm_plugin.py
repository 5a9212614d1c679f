"""vLLM general plugin (entry point ``vllm.general_plugins``: ``omni_passes``).

vLLM loads it in every process it starts. It registers the omni custom ops (so graphs that
call them load anywhere), makes vLLM treat ``omni_passes.vllm_post_grad_pass`` as its own
``InductorPass`` (so the pass's ``uuid()`` keys the compile caches), and, when
``OMNI_PASSES_CONFIG`` is set, validates that file early so a bad config is reported before
the model loads. Enabling the pass is still the compile-config line (README).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("omni_passes")


def register() -> None:
    import kernels  # noqa: F401  (registers omni::* ops)
    from omni_passes.vllm_ascend_pass import register_with_vllm as register_ascend_with_vllm
    from omni_passes.vllm_pass import ENV_CONFIG, load_config_from_env, register_with_vllm

    register_with_vllm()
    register_ascend_with_vllm()
    if os.environ.get(ENV_CONFIG):
        config = load_config_from_env()  # raises ConfigError naming the file and the problem
        log.info("omni_passes plugin: %s = %s, passes %s", ENV_CONFIG, os.environ[ENV_CONFIG], list(config.passes))
