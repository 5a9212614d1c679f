"""STAND-IN for ``torchair.core._torchair``, torchair's one native module (``libge_runner.so``).

This is not torchair. torchair is Python except this extension, which links CANN's Graph
Engine: it loads, compiles and runs GE graphs on an NPU, and answers questions about CANN's
operator registry. None of that exists on a machine without CANN. With this module put in
its place (``omni_passes.testing.ascend.import_torchair``), torchair's real Python runs up to
and including building the GE graph (FX → GE converters, the protobuf ``GraphDef``, its text
dump); anything that would need CANN raises ``NoCANN`` naming the call.

What it provides, and why each is safe to provide:
- ``TorchDataType``: an enum of tensor dtypes (only llm_datadist reads it);
- ``TorchNpuGraphBase``: the executor base class; constructing one is harmless (torchair
  makes one per graph), every method of it (load, compile, run, ...) raises ``NoCANN``;
- engine lifecycle calls (``InitializeGraphEngine``, ``FinalizeGraphEngine``, log paths,
  dump switches) do nothing: there is no engine to start or stop;
- the registry queries (``get_registered_ir_def``, ``check_cann_compat``), ``export``,
  ``GetSocName``, ``as_torch_tensors`` raise ``NoCANN``: answering them would mean inventing
  what CANN's registry or device says.
"""

from __future__ import annotations

import enum

STANDIN = True  # lets callers tell this module from the real extension


class NoCANN(RuntimeError):
    """The call needs CANN's Graph Engine, which this stand-in does not have."""


def _needs_cann(name: str):
    def call(*args, **kwargs):
        raise NoCANN(f"torchair.core._torchair.{name} needs CANN's Graph Engine; this machine runs the "
                     "stand-in (omni_passes/testing/torchair_native_standin.py), which only lets torchair "
                     "build GE graphs, not compile or run them")

    call.__name__ = name
    return call


class TorchDataType(enum.IntEnum):
    BOOL = 0
    UINT8 = 1
    INT8 = 2
    INT16 = 3
    UINT16 = 4
    INT32 = 5
    UINT32 = 6
    INT64 = 7
    UINT64 = 8
    BF16 = 9
    FLOAT16 = 10
    FLOAT32 = 11
    FLOAT64 = 12
    COMPLEX64 = 13
    COMPLEX128 = 14


class TorchNpuGraphBase:
    """The GE executor's base class: constructible, but it loads, compiles and runs nothing."""

    def __init__(self, name: str = ""):
        self.name = name

    # torchair calls these through super(), which bypasses __getattr__: each must exist
    load = staticmethod(_needs_cann("TorchNpuGraphBase.load"))
    compile = staticmethod(_needs_cann("TorchNpuGraphBase.compile"))
    auto_tune = staticmethod(_needs_cann("TorchNpuGraphBase.auto_tune"))
    run = staticmethod(_needs_cann("TorchNpuGraphBase.run"))
    set_hint_shape = staticmethod(_needs_cann("TorchNpuGraphBase.set_hint_shape"))

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _needs_cann(f"TorchNpuGraphBase.{attr}")


def _no_engine(*args, **kwargs) -> None:
    return None


InitializeGraphEngine = _no_engine
FinalizeGraphEngine = _no_engine
SetDebugLogPath = _no_engine
InitDeviceStdoutChannel = _no_engine
AclopStartDumpArgs = _no_engine
AclopStopDumpArgs = _no_engine
AclmdlSetDump = _no_engine

get_registered_ir_def = _needs_cann("get_registered_ir_def")
check_cann_compat = _needs_cann("check_cann_compat")
export = _needs_cann("export")
GetSocName = _needs_cann("GetSocName")
as_torch_tensors = _needs_cann("as_torch_tensors")
StupidRepeat = _needs_cann("StupidRepeat")
