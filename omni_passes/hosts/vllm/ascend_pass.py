"""The omni passes inside vllm-ascend: ``omni_passes.vllm_ascend_fusion_pass``.

Enable on an Ascend machine with::

    OMNI_PASSES_CONFIG=passes.json vllm serve MODEL \
        --compilation-config '{"inductor_passes": {"graph_fusion_manager": "omni_passes.vllm_ascend_fusion_pass"}}'

How vllm-ascend 0.26 reaches it (read from its sources): the NPU platform's pass key is
``graph_fusion_manager``; vLLM resolves that entry of ``inductor_passes`` to this object and
``VllmBackend.configure_post_pass`` adds it to vllm-ascend's ``GraphFusionPassManager``, which
asserts ``isinstance(pass, VllmInductorPass)`` (``register_with_vllm`` registers this class as
a virtual subclass, so no vLLM import is needed to define it). ``AscendCompiler`` then runs
``fusion_pass_compile``: aot_autograd whose forward compiler calls the manager with the
GraphModule, under aot_autograd's active FakeTensorMode.

Two consequences handled here:
- the run-time state (placement tables, load counters) is built with fake mode switched off
  (``unset_fake_temporarily``): built under it, ``PlacementController`` hits
  ``DataDependentOutputException: aten._local_scalar_dense``;
- the manager passes a GraphModule; the pass rewrites its graph in place and recompiles it.

When vllm-ascend does *not* call graph passes (README, docs/ascend.md): with
``cudagraph_mode`` NONE compilation is off; in FULL / FULL_DECODE_ONLY modes npugraph_ex
(``enable_npugraph_ex``, on by default) compiles without ``graph_fusion_manager``. Modes with
piecewise graphs (PIECEWISE, FULL_AND_PIECEWISE) turn it off; or turn it off in
``additional_config.ascend_compilation_config``.

The protocol (uuid, ``is_applicable_for_range``, pickling, setup failures) and the run-time logic
(config, state, report, load files) are those of ``omni_passes.vllm_post_grad_pass``
(``protocol.VllmHostPass``, ``runtime.VllmRuntime``).
"""

from __future__ import annotations

import importlib.util
import sys

import torch.fx as fx

from omni_passes.hosts.vllm.protocol import VllmHostPass, register_as_vllm_pass
from omni_passes.hosts.vllm.settings import process_config


class OmniAscendPass(VllmHostPass):
    """A vLLM inductor pass for vllm-ascend's ``GraphFusionPassManager``: accepts a Graph or a
    GraphModule, returns what it was given, rewritten in place."""

    uuid_prefix = "omni_passes.ascend"

    def __call__(self, graph_or_module):
        graph = graph_or_module.graph if isinstance(graph_or_module, fx.GraphModule) else graph_or_module
        self.run_on(graph)
        if isinstance(graph_or_module, fx.GraphModule):
            graph_or_module.recompile()
        return graph_or_module

    def create_runtime(self, graph: fx.Graph):
        """The runtime outside any active FakeTensorMode: the placement tables and load counters
        are real, persistent tensors (vllm-ascend calls passes under aot_autograd's fake mode)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from omni_passes.hosts.vllm.runtime import VllmRuntime

        with unset_fake_temporarily():
            return VllmRuntime.create(graph, process_config())


_OmniAscendPass = OmniAscendPass
del OmniAscendPass  # reached through __getattr__ below, which registers it with vLLM first


def __getattr__(name: str):
    if name == "OmniAscendPass":
        register_with_vllm(import_vllm=True)
        return _OmniAscendPass
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_vllm(import_vllm: bool = False) -> None:
    """Make ``isinstance(pass, VllmInductorPass)`` true for ``OmniAscendPass`` (vllm-ascend's
    manager asserts it; vLLM then also keeps it unwrapped and calls its ``uuid()``). vLLM must
    have been imported (or ``import_vllm``): a torch-only install never imports it.

    Registering late is harmless, too late is not: vLLM wraps a pass it does not recognise in a
    ``CallableInductorPass`` while it parses the compile config. ``vllm serve`` imports vLLM
    before omni_passes, so the import-time registration suffices; a script that imports
    omni_passes first calls this after ``import vllm``."""
    if "vllm" not in sys.modules and not (import_vllm and importlib.util.find_spec("vllm") is not None):
        return
    register_as_vllm_pass(_OmniAscendPass, "VllmInductorPass", "vllm_inductor_pass")
