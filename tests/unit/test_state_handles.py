"""Handles of the persistent op state (kernels.state): counter handles, stable handles that are
the same in every process, and the resolver a host installs for graphs from a compile cache."""

import subprocess
import sys

import pytest
import torch

from kernels import state


def test_stable_handles_are_the_same_in_another_process_and_differ_by_key():
    here = state.stable_handle("config-a")
    there = subprocess.run([sys.executable, "-c", "from kernels.state import stable_handle; print(stable_handle('config-a'))"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert int(there) == here
    assert state.stable_handle("config-b") != here
    assert here >= state.STABLE_BASE > state.register_state({})  # never collides with counter handles


def test_resolver_builds_unknown_state_once_and_a_taken_handle_is_refused():
    handle = state.stable_handle("resolver-test")
    calls = []

    def resolve(asked: int) -> None:
        calls.append(asked)
        if asked == handle:
            state.register_state({"table": torch.arange(3)}, handle=handle)

    state.set_resolver(resolve)
    try:
        assert torch.equal(state.lookup(handle, "table"), torch.arange(3))
        assert torch.equal(state.lookup(handle, "table"), torch.arange(3))
        assert calls == [handle]
        with pytest.raises(LookupError, match="already registered"):
            state.register_state({}, handle=handle)
        with pytest.raises(LookupError, match="no host here can build that state"):
            state.lookup(handle + 1, "table")  # the resolver was asked and built nothing
        assert calls == [handle, handle + 1]
    finally:
        state.set_resolver(None)
        state.unregister_state(handle)
