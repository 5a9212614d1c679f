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

Handles and compile caches: a graph holds its handle as a literal, never the tensors (the ops
look them up per call), so a compiled graph is safe to cache as long as the process that loads
it can resolve the same handle to *its* live state. A host whose graphs may come from a compile
cache (vLLM) registers its state under a handle derived from what the graph was compiled for
(``stable_handle(config fingerprint)``), and installs a resolver: the first op that asks for
an unknown handle calls it, and the host builds its runtime there (vLLM: from the forward
context, inside the first forward), registering the state under that handle.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from typing import Callable

import torch

_lock = threading.RLock()  # reentrant: a resolver registers state while a lookup waits
_next_handle = itertools.count(1)
_states: dict[int, dict[str, torch.Tensor]] = {}
_step_hooks: dict[int, list[Callable[[str], None]]] = {}
_resolver: Callable[[int], None] | None = None
# Counter handles stay below this; stable handles (hashes) are at or above it.
STABLE_BASE = 1 << 40


def stable_handle(key: str) -> int:
    """A handle that is the same in every process for the same ``key`` (a config fingerprint)."""
    digest = hashlib.sha256(key.encode()).digest()
    return STABLE_BASE + int.from_bytes(digest[:5], "big")


def register_state(tensors: dict[str, torch.Tensor], handle: int | None = None) -> int:
    """Register a set of named tensors; returns the handle graphs use to reach them.
    ``handle``: a ``stable_handle`` to register under (it must be free)."""
    with _lock:
        if handle is None:
            handle = next(_next_handle)
        elif handle in _states:
            raise LookupError(f"omni op state {handle} is already registered in this process; close its runtime first")
        _states[handle] = dict(tensors)
    return handle


def set_resolver(resolver: Callable[[int], None] | None) -> None:
    """``resolver(handle)`` is called (once per unknown handle lookup, under the registry's
    lock) to build and register state a graph from a compile cache asks for."""
    global _resolver
    with _lock:
        _resolver = resolver


def add_tensors(handle: int, tensors: dict[str, torch.Tensor]) -> None:
    """Add named tensors to a registered state (e.g. expert storage rows)."""
    with _lock:
        _tensors(handle).update(tensors)


def _tensors(handle: int) -> dict[str, torch.Tensor]:
    state = _states.get(handle)
    if state is None and _resolver is not None:
        with _lock:
            if handle not in _states:
                _resolver(handle)
            state = _states.get(handle)
    if state is None:
        raise LookupError(
            f"omni op state {handle} is not registered in this process: the graph was compiled "
            "by an omni pass elsewhere (e.g. loaded from a compile cache) and no host here can build "
            "that state, or its runtime was closed. Recompile with the pass."
        )
    return state


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
