"""Run torchair's and vllm-ascend's real Python on a machine without Ascend (tests, inspect).

The sources come from ``make install`` (``omni_passes.testing.ascend_sources``: wheels
downloaded by name, Python unpacked under ``.venv/ascend``; ``OMNI_ASCEND_SOURCES`` points
elsewhere). Two things are stood in, and nothing else:

- ``torchair.core._torchair``, torchair's native extension (CANN's Graph Engine), by
  ``omni_passes.testing.torchair_native_standin``: graphs are built and dumped, never
  compiled or run by CANN;
- ``torch_npu`` while vllm-ascend's compilation modules are imported (``vllm_ascend.utils``
  imports it at module level); the code that runs afterwards (``GraphFusionPassManager``,
  ``fusion_pass_compile``) never touches it, and the stub leaves ``sys.modules`` again.

On an Ascend machine, where ``import torchair`` works for real, ``import_torchair`` returns
the real one and stands in nothing.
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from omni_passes.testing.ascend_sources import MANIFEST, TORCH_NPU, VLLM_ASCEND, sys_path_entry

ENV_SOURCES = "OMNI_ASCEND_SOURCES"
STANDIN_MODULE = "torchair.core._torchair"


class AscendSourcesMissing(RuntimeError):
    """The unpacked sources are not where they should be; the message says how to get them."""


@dataclass(frozen=True)
class TorchairInfo:
    path: str             # the torchair package directory
    version: str          # torch-npu version it shipped with ("unknown" for a real install without metadata)
    native: str           # "real" or "stand-in"


def sources_dir() -> Path:
    return Path(os.environ.get(ENV_SOURCES) or Path(sys.prefix) / "ascend")


def manifest() -> dict:
    path = sources_dir() / MANIFEST
    if not path.exists():
        raise AscendSourcesMissing(
            f"torchair/vllm-ascend sources not found at {path.parent} (no {MANIFEST}): run `make install` "
            f"(or `python -m omni_passes.testing.ascend_sources fetch --dest {path.parent}`), or set {ENV_SOURCES}"
        )
    return json.loads(path.read_text())


_added_paths: list[str] = []


def unload() -> None:
    """Take the unpacked torchair / vllm-ascend back out of this process (``sys.path`` entries
    and modules), so later code in a shared process (a test session) sees no torchair. The
    converters they registered on torch ops stay (harmless without torchair)."""
    for entry in _added_paths:
        while entry in sys.path:
            sys.path.remove(entry)
    _added_paths.clear()
    ours = ("kernels.torchair_converters",)  # they hold torchair's module objects
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchair", "vllm_ascend") or m.startswith(ours)]:
        del sys.modules[name]


def _add_path(entry: Path) -> None:
    if not entry.is_dir():
        raise AscendSourcesMissing(f"{entry} is missing although {sources_dir() / MANIFEST} exists: re-run `make install`")
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))
        _added_paths.append(str(entry))


def _real_torchair():
    """torchair as installed (an Ascend machine), or None."""
    try:
        import torch_npu  # noqa: F401  (on Ascend, torch_npu makes torchair importable)
    except Exception:  # noqa: BLE001  (torch_npu fails in many ways without CANN)
        return None
    try:
        import torchair
    except ImportError:
        return None
    return torchair


def import_torchair(allow_standin: bool = True) -> tuple[types.ModuleType, TorchairInfo]:
    """torchair: the installed one if it imports, else the unpacked sources with the native
    module stood in (``allow_standin``). Raises AscendSourcesMissing / ImportError."""
    existing = sys.modules.get("torchair")
    if existing is None:
        existing = _real_torchair()
    if existing is not None:
        standin = getattr(sys.modules.get(STANDIN_MODULE), "STANDIN", False)
        return existing, TorchairInfo(str(Path(existing.__file__).parent), _torch_npu_version(standin),
                                      "stand-in" if standin else "real")
    if not allow_standin:
        raise ImportError("torchair is not installed (it ships with torch_npu on Ascend machines)")
    manifest()
    _add_path(sys_path_entry(sources_dir(), TORCH_NPU))
    from omni_passes.testing import torchair_native_standin

    sys.modules[STANDIN_MODULE] = torchair_native_standin
    torchair = _import_isolated("torchair")
    return torchair, TorchairInfo(str(Path(torchair.__file__).parent), TORCH_NPU.version, "stand-in")


def _torch_npu_version(standin: bool) -> str:
    if standin:
        return TORCH_NPU.version
    module = sys.modules.get("torch_npu")
    return str(getattr(module, "__version__", "unknown"))


def _import_isolated(name: str) -> types.ModuleType:
    """Import ``name`` keeping the process-wide things torchair's import changes: it installs
    SIGINT/SIGTERM handlers (to finalise its engine) and remaps torch.distributed collectives
    for dynamo. Tests share the process, so those are put back as they were."""
    import torch.distributed._functional_collectives as fc

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    remaps = getattr(fc, "traceable_collective_remaps", None)
    saved = dict(remaps) if remaps is not None else None
    try:
        return importlib.import_module(name)
    finally:
        for sig, handler in handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        if saved is not None:
            remaps.clear()
            remaps.update(saved)


# -- vllm-ascend ------------------------------------------------------------------------------

class _TorchNpuStub(types.ModuleType):
    """STUB for ``torch_npu`` during the import of vllm-ascend's compilation modules only."""

    __version__ = f"{TORCH_NPU.version}+stub"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise RuntimeError(f"torch_npu.{name}: this is the import-time stub of omni_passes.testing.ascend; "
                           "no NPU code can run on this machine")


@dataclass(frozen=True)
class VllmAscend:
    compiler_interface: types.ModuleType   # vllm_ascend.compilation.compiler_interface
    pass_manager: types.ModuleType         # vllm_ascend.compilation.graph_fusion_pass_manager
    pass_key: str                          # vllm_ascend.utils.COMPILATION_PASS_KEY ("graph_fusion_manager")
    version: str
    path: str


def import_vllm_ascend() -> VllmAscend:
    """vllm-ascend's real compilation modules from the unpacked sources (vLLM must import)."""
    manifest()
    _add_path(sys_path_entry(sources_dir(), VLLM_ASCEND))
    had_torch_npu = "torch_npu" in sys.modules
    if not had_torch_npu:
        sys.modules["torch_npu"] = _TorchNpuStub("torch_npu")
    try:
        compiler_interface = importlib.import_module("vllm_ascend.compilation.compiler_interface")
        pass_manager = importlib.import_module("vllm_ascend.compilation.graph_fusion_pass_manager")
        utils = importlib.import_module("vllm_ascend.utils")
    finally:
        if not had_torch_npu:
            sys.modules.pop("torch_npu", None)
    package = sys.modules["vllm_ascend"]
    return VllmAscend(compiler_interface, pass_manager, utils.COMPILATION_PASS_KEY, VLLM_ASCEND.version,
                      str(Path(package.__file__).parent))


class VllmAscendFusionBackend:
    """A torch.compile backend for vLLM on CPU that compiles the way vllm-ascend's
    ``AscendCompiler`` does with npugraph_ex off: vllm-ascend's real ``fusion_pass_compile``
    (aot_autograd, forward compiler = the pass manager), with a real ``GraphFusionPassManager``
    holding the pass vLLM resolved for the ``graph_fusion_manager`` key, added as vLLM's
    ``VllmBackend.configure_post_pass`` adds it on an NPU.

    vLLM names the backend by qualified name (``compilation_config={"mode": 2, "backend":
    "omni_passes.testing.ascend.vllm_ascend_fusion_backend", "inductor_passes":
    {"graph_fusion_manager": "omni_passes.vllm_ascend_fusion_pass"}}``) and resolves it while
    its config is current; the module ``__getattr__`` below builds one per resolution then, since
    the config is no longer current when dynamo calls the backend.
    """

    def __init__(self, vllm_config):
        self.vllm_config = vllm_config
        self.compiled_graphs = 0

    def __call__(self, gm, example_inputs):
        from vllm.compilation.passes.inductor_pass import pass_context
        from vllm.config.utils import Range

        ascend = import_vllm_ascend()
        passes = self.vllm_config.compilation_config.inductor_compile_config
        if ascend.pass_key not in passes:
            raise RuntimeError(f"compilation_config.inductor_passes has no {ascend.pass_key!r} entry: nothing for "
                               "vllm-ascend's GraphFusionPassManager to run")
        from vllm.compilation.passes.vllm_inductor_pass import VllmInductorPass

        graph_pass = passes[ascend.pass_key]
        if not isinstance(graph_pass, VllmInductorPass):  # the manager's bare assert, with a message
            raise TypeError(f"inductor_passes[{ascend.pass_key!r}] resolved to {graph_pass!r}, not a VllmInductorPass: "
                            "vllm-ascend's GraphFusionPassManager refuses it")
        manager = ascend.pass_manager.GraphFusionPassManager()
        manager.add(graph_pass)
        compile_range = Range(1, self.vllm_config.scheduler_config.max_num_batched_tokens)
        with pass_context(compile_range):
            compiled, _ = ascend.compiler_interface.fusion_pass_compile(
                gm, example_inputs, {ascend.pass_key: manager}, compile_range)
        self.compiled_graphs += 1
        return compiled


def __getattr__(name: str):
    if name == "vllm_ascend_fusion_backend":
        from vllm.config import get_current_vllm_config

        return VllmAscendFusionBackend(get_current_vllm_config())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
