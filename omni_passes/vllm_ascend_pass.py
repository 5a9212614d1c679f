"""vllm-ascend entry for the omni passes. UNVERIFIED: no Ascend device here.

vllm-ascend (written against its documented hooks) takes extra graph passes from the
``graph_fusion_manager`` key of ``inductor_compile_config``, asserts each one subclasses vLLM's
``VllmInductorPass``, and may call it with a ``torch.fx.GraphModule`` rather than a Graph.
``OmniAscendPass`` is that adapter over the same run-time logic as
``omni_passes.vllm_post_grad_pass`` (``omni_passes.vllm_pass._VllmRuntime``): it reads
``OMNI_PASSES_CONFIG``, builds the state, runs the configured passes, writes report and loads.

The class is built on first access because its base class comes from vLLM, which a
torch-only install does not have::

    from omni_passes.vllm_ascend_pass import OmniAscendPass   # needs vllm importable
"""

from __future__ import annotations

import threading
from typing import Any

import torch.fx as fx


def _vllm_inductor_pass_base():
    try:
        from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass
    except ImportError:
        from vllm.compilation.vllm_inductor_pass import VllmInductorPass  # older vLLM layout
    return VllmInductorPass


def _build_class():
    from omni_passes.vllm_pass import _VllmRuntime, load_config_from_env

    base = _vllm_inductor_pass_base()

    class OmniAscendPass(base):
        """Accepts a Graph or a GraphModule; returns what it was given, rewritten in place."""

        def __init__(self, config: Any):
            super().__init__(config)
            self._runtime = None
            self._lock = threading.Lock()

        def __call__(self, graph_or_module):
            graph = graph_or_module.graph if isinstance(graph_or_module, fx.GraphModule) else graph_or_module
            with self._lock:
                if self._runtime is None:
                    self._runtime = _VllmRuntime.create(graph)
                self._runtime.run(graph)
            if isinstance(graph_or_module, fx.GraphModule):
                graph_or_module.recompile()
            return graph_or_module

        def uuid(self) -> Any:
            return f"omni_passes.ascend:{load_config_from_env().fingerprint()}"

        @property
        def runtime(self):
            return self._runtime

    return OmniAscendPass


_lock = threading.Lock()
_cls = None


def __getattr__(name: str):
    global _cls
    if name == "OmniAscendPass":
        with _lock:
            if _cls is None:
                _cls = _build_class()
        return _cls
    raise AttributeError(name)
