"""The pass configuration of this vLLM process, read once.

vLLM asks for the configuration in several places of one process: the general plugin at start-up,
every pass's ``uuid()`` (the compile cache key), and the runtime built on the first graph. They all
call ``process_config()``, which reads ``OMNI_PASSES_CONFIG`` (and the placement file it names) the
first time and hands back the same parsed object afterwards. A changed variable or a rewritten
file (tests, a script driving two engines one after the other) is a new configuration, read once
too: the key is the path with the file's modification time and size (a stat, not a read).
"""

from __future__ import annotations

import os
import threading

from omni_passes.config import ConfigError, PassConfig

ENV_CONFIG = "OMNI_PASSES_CONFIG"

_lock = threading.Lock()
_loaded: dict[tuple[str, int, int], PassConfig] = {}


def process_config() -> PassConfig:
    """The configuration ``OMNI_PASSES_CONFIG`` names; ConfigError naming the problem."""
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise ConfigError(
            f"{ENV_CONFIG} is not set: point it at the pass configuration JSON "
            '(e.g. {"passes": ["redundant_experts"]}) to use omni_passes.vllm_post_grad_pass'
        )
    try:
        stat = os.stat(path)
    except OSError:
        return PassConfig.load(path)  # raises ConfigError naming the file and the problem
    key = (path, stat.st_mtime_ns, stat.st_size)
    with _lock:
        config = _loaded.get(key)
        if config is None:
            config = _loaded[key] = PassConfig.load(path)
        return config
