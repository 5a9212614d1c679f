"""Persistent run-time tensors the omni ops read, bound to graphs by an integer handle.

Why handles and not graph constants: a pass that runs on a post-grad graph cannot add graph
inputs, and Inductor copies or inlines tensor constants it is given (small ones become
literals; fake-tensor propagation refuses real ones in custom ops). An op that takes
``state`` (an int) and looks its tensors up here reads the *same* tensor objects on every
call, so updating them in place (a new placement, a counter reset) takes effect at once,
with no recompile, also inside CUDA graphs (the tensors never move).
"""

from __future__ import annotations

import itertools
import threading

import torch

_lock = threading.Lock()
_next_handle = itertools.count(1)
_states: dict[int, dict[str, torch.Tensor]] = {}
_record_hooks: dict[int, list] = {}
_record_gates: dict[int, object] = {}


def register_state(tensors: dict[str, torch.Tensor]) -> int:
    """Register a set of named tensors; returns the handle graphs use to reach them."""
    with _lock:
        handle = next(_next_handle)
        _states[handle] = dict(tensors)
    return handle


def lookup(handle: int, name: str) -> torch.Tensor:
    try:
        tensors = _states[handle]
    except KeyError:
        raise LookupError(
            f"omni op state {handle} is not registered in this process: the graph was compiled "
            "by an omni pass elsewhere (e.g. loaded from a compile cache). Recompile with the pass."
        ) from None
    try:
        return tensors[name]
    except KeyError:
        raise LookupError(f"omni op state {handle} has no tensor '{name}' (has: {sorted(tensors)})") from None


def unregister_state(handle: int) -> None:
    with _lock:
        _states.pop(handle, None)
        _record_hooks.pop(handle, None)
        _record_gates.pop(handle, None)


def add_record_hook(handle: int, hook) -> None:
    """Call ``hook(layer)`` after ``omni::record_expert_load`` adds a batch for ``handle``
    (e.g. to write the loads to a file every N steps)."""
    with _lock:
        _record_hooks.setdefault(handle, []).append(hook)


def record_hooks(handle: int) -> list:
    return _record_hooks.get(handle, ())


def set_record_gate(handle: int, gate) -> None:
    """``gate() -> bool`` decides per call whether a batch counts (a host's warm-up runs
    with dummy tokens must not show up as expert load)."""
    with _lock:
        _record_gates[handle] = gate


def record_gate(handle: int):
    return _record_gates.get(handle)
