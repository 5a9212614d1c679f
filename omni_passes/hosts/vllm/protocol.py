"""vLLM's pass protocol, met once for both omni pass objects (vLLM and vllm-ascend).

vLLM's pass managers call more than ``__call__``: the Inductor-level manager hashes every pass's
``uuid()`` into the compile cache key, and on CUDA (piecewise compilation, vLLM 0.26)
``PostGradPassManager`` asks each pass ``is_applicable_for_range(compile_range)`` for every
compile range before running it. A pass that joins those managers by duck typing breaks when a
manager grows a method (that is how vLLM 0.26 CUDA failed at start-up with
``'VllmPostGradPass' object has no attribute 'is_applicable_for_range'``). ``VllmHostPass`` is
the one adapter: it is a ``CustomGraphPass`` (Inductor's protocol), registered as a virtual
subclass of vLLM's ``InductorPass`` / ``VllmInductorPass`` where vLLM is importable, and it
answers every method vLLM's managers call:

    __call__(graph)                 the omni passes on one compiled graph (one piece of several)
    uuid()                          the configuration and the code (no process state)
    is_applicable_for_range(range)  True: the rewrite does not depend on the token count

The runtime (passes, placement controller, serving loop) is built on the first graph of the
worker process, from the configuration read once (``settings.process_config``). A setup error is
raised on the first graph and again, at once, on every later one; vLLM then fails its start-up.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass

from omni_passes.hosts.vllm.settings import process_config

log = logging.getLogger("omni_passes")


class VllmPassSetupError(RuntimeError):
    """The pass cannot be set up for this vLLM model; the message names the file and problem."""


class VllmHostPass(CustomGraphPass):
    """Picklable (vLLM copies its compile config and ships it to the worker); all state is
    built on the first call. Subclasses say how the runtime is created (``create_runtime``)."""

    uuid_prefix = "omni_passes"

    def __init__(self, config: Any = None) -> None:  # vllm-ascend constructs passes with its config
        self._runtime: Any = None
        self._failure: str | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def run_on(self, graph: fx.Graph) -> None:
        with self._lock:
            if self._failure is not None:
                raise VllmPassSetupError(self._failure)
            if self._runtime is None:
                try:
                    self._runtime = self.create_runtime(graph)
                except Exception as exc:
                    self._failure = f"{type(exc).__name__}: {exc}"
                    log.error("omni_passes: setup failed, the engine cannot start: %s", self._failure)
                    _exit_at_once_on_termination()
                    raise VllmPassSetupError(self._failure) from exc
            self._runtime.run(graph)

    def create_runtime(self, graph: fx.Graph):
        from omni_passes.hosts.vllm.runtime import VllmRuntime

        return VllmRuntime.create(graph, process_config())

    # -- vLLM's managers ------------------------------------------------------------------------
    def uuid(self) -> Any:
        """The configuration (placement file contents included) and the code: a second engine
        start with both unchanged hits vLLM's compile cache. Safe because the rewritten graph
        holds nothing of this process: its ops reach run-time state through a stable handle
        that every process resolves to its own live tensors (``kernels.state``)."""
        from omni_passes.pass_manager import code_fingerprint

        config = process_config()  # a bad config fails start-up here, naming the file
        return f"{self.uuid_prefix}:{config.fingerprint()}:{code_fingerprint()}"

    def is_applicable_for_range(self, compile_range: Any) -> bool:  # noqa: ARG002
        return True  # the rewrite is the same for every token count

    # -- introspection (tests, collective_rpc) --------------------------------------------------
    @property
    def runtime(self) -> Any:
        return self._runtime


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
