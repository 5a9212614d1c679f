"""Persistent run-time tensors the omni ops read, bound to graphs by an integer handle.

Why handles and not graph inputs: a pass that runs on a post-grad graph cannot add graph
inputs. An op that takes ``state`` (an int) and looks its tensors up here reads the *same*
tensor objects on every call, so updating them in place (a new placement, a counter reset)
takes effect at once, with no recompile. Inductor lowerings of the omni ops
(``kernels.inductor_lowerings``) bind the same objects as graph constants, by reference.

Everything an op does per call is tensor-side (counts are multiplied by the ``gate`` tensor),
so it is also right when a CUDA graph replays it. Step hooks are for hosts whose ops run
eagerly every step (vLLM on CPU): the op that opens a forward step calls
``run_step_hooks(state, "begin")`` and the one that closes it ``"end"``; there the host sets the
gate, writes load files and rebalances, between the steps' expert computations. Where only
the start of a step is seen (the eager ``expert_dispatch`` kernel of MoE layer 0, with vendor
expert ops after it), the op calls ``"next"``: the host ends the previous step, if one is open,
then begins this one, so a rebalance never lands between a layer's dispatch and its experts.
"""

from __future__ import annotations

import itertools
import threading
from typing import Callable

import torch

_lock = threading.Lock()
_next_handle = itertools.count(1)
_states: dict[int, dict[str, torch.Tensor]] = {}
_step_hooks: dict[int, list[Callable[[str], None]]] = {}


def register_state(tensors: dict[str, torch.Tensor]) -> int:
    """Register a set of named tensors; returns the handle graphs use to reach them."""
    with _lock:
        handle = next(_next_handle)
        _states[handle] = dict(tensors)
    return handle


def add_tensors(handle: int, tensors: dict[str, torch.Tensor]) -> None:
    """Add named tensors to a registered state (e.g. expert storage rows)."""
    with _lock:
        _tensors(handle).update(tensors)


def _tensors(handle: int) -> dict[str, torch.Tensor]:
    try:
        return _states[handle]
    except KeyError:
        raise LookupError(
            f"omni op state {handle} is not registered in this process: the graph was compiled "
            "by an omni pass elsewhere (e.g. loaded from a compile cache), or its runtime was closed. "
            "Recompile with the pass."
        ) from None


def lookup(handle: int, name: str) -> torch.Tensor:
    tensors = _tensors(handle)
    try:
        return tensors[name]
    except KeyError:
        raise LookupError(f"omni op state {handle} has no tensor '{name}' (has: {sorted(tensors)})") from None


def has_tensor(handle: int, name: str) -> bool:
    return name in _tensors(handle)


def unregister_state(handle: int) -> None:
    with _lock:
        _states.pop(handle, None)
        _step_hooks.pop(handle, None)


def add_step_hook(handle: int, hook: Callable[[str], None]) -> None:
    """Call ``hook("begin")`` / ``hook("end")`` when an eagerly run op opens / closes a step."""
    with _lock:
        _tensors(handle)
        _step_hooks.setdefault(handle, []).append(hook)


def run_step_hooks(handle: int, phase: str) -> None:
    for hook in _step_hooks.get(handle, ()):
        hook(phase)
