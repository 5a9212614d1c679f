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
