"""An asyncio event loop on a virtual clock: simulated time jumps over idle waits.

The simulator's timing model is ``asyncio.sleep`` and the proxy reads time only through
``loop.time()``, so simulator, proxy and client in one process on this loop run their real
code over real localhost sockets while the clock only moves when nothing is runnable: a
sweep that would take minutes of wall time takes as long as its CPU work, and CPU work costs
no simulated time (so results do not depend on how busy the machine is, and the router's own
latency is not measured: use real-time ``omni-proxy bench`` for that).

How: ``loop.time()`` returns the virtual clock. When the loop would block in ``select`` for
its next timer, it first polls the sockets for a short real grace period (work handed over by
other threads, e.g. ZMQ's I/O thread delivering KV events, gets that long to show up); if
nothing is ready, the clock jumps to the timer instead of waiting.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")

GRACE_S = 0.0005


class _JumpingSelector(selectors.BaseSelector):
    """Delegates to a real selector, but turns idle timeouts into clock jumps."""

    def __init__(self, clock: "VirtualClockLoop"):
        self._real = selectors.DefaultSelector()
        self._clock = clock
        self.jumps = 0

    def register(self, fileobj, events, data=None):
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._real.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._real.modify(fileobj, events, data)

    def get_map(self):
        return self._real.get_map()

    def close(self):
        self._real.close()

    def select(self, timeout=None):
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:  # no timer at all: only I/O can wake us, wait for it for real
            return self._real.select(None)
        events = self._real.select(min(timeout, GRACE_S))
        if events:
            return events
        self._clock.advance(timeout)
        self.jumps += 1
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    def __init__(self, start: float = 0.0):
        self._virtual_now = float(start)
        super().__init__(selector=_JumpingSelector(self))

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += seconds

    @property
    def jumps(self) -> int:
        return self._selector.jumps


def run_virtual(main: Awaitable[T]) -> T:
    """``asyncio.run`` on a fresh virtual-clock loop."""
    loop = VirtualClockLoop()
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
