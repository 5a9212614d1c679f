"""Requests held in the proxy while every candidate instance is at its policy's limits.

``place`` first tries to place a request at once (when nobody is held before it); otherwise it
waits in the queue. ``kick`` (called whenever load frees, and on a timer) offers placement to
held requests in the queue's order (the policy's ``hold_order``: a function of the held
entries and the time, as the orders of ``scheduling.queue_order`` are). Placing and taking load happen in one synchronous call, so
requests placed in one kick see each other's load.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from proxy.server.errors import NoCapacity
from scheduling.queue_order import Held, fifo_order

Order = Callable[[Sequence[Held], float], list[int]]  # (held entries, now) -> indices in serving order


class _Waiter:
    __slots__ = ("held", "try_place", "future")

    def __init__(self, held: Held, try_place: Callable[[], Any], future: asyncio.Future):
        self.held = held
        self.try_place = try_place
        self.future = future


class HoldQueue:
    def __init__(self, order: Order = fifo_order):
        self.order = order
        self.waiters: list[_Waiter] = []

    def __len__(self) -> int:
        return len(self.waiters)

    async def place(self, held: Held | Callable[[], Held], try_place: Callable[[], Any], timeout: float, now: float,
                    on_orphan: Callable[[Any], None] | None = None) -> Any:
        """A placement from ``try_place`` (which may raise NoInstance); NoCapacity after ``timeout``.

        ``held`` (or a function making it, called only if the request has to wait) is the
        request's queue entry.

        ``on_orphan`` gets a placement made for a request that stopped waiting at that moment
        (timed out or cancelled), so the load it took can be given back.
        """
        if not self.waiters:
            result = try_place()
            if result is not None:
                return result
        loop = asyncio.get_running_loop()
        waiter = _Waiter(held() if callable(held) else held, try_place, loop.create_future())
        self.waiters.append(waiter)
        self.kick(now)
        future = waiter.future

        def expire() -> None:
            if not future.done():
                future.set_exception(NoCapacity(
                    f"held {timeout:g} s in the proxy: every candidate instance stayed at its limits"))

        timer = loop.call_later(timeout, expire)
        taken = False
        try:
            result = await future  # a cancelled caller cancels the future too (if still pending)
            taken = True
            return result
        finally:
            timer.cancel()
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            if not taken and future.done() and not future.cancelled() and future.exception() is None \
                    and on_orphan is not None:
                on_orphan(future.result())

    def kick(self, now: float) -> int:
        """Place whoever can be placed now, in queue order; returns how many were placed."""
        if not self.waiters:
            return 0
        order = self.order([w.held for w in self.waiters], now)
        placed = 0
        keep = [True] * len(self.waiters)
        for k in order:
            waiter = self.waiters[k]
            if waiter.future.done():
                keep[k] = False
                continue
            try:
                result = waiter.try_place()
            except Exception as exc:  # NoInstance: tell that request, go on with the others
                waiter.future.set_exception(exc)
                keep[k] = False
                continue
            if result is not None:
                waiter.future.set_result(result)
                keep[k] = False
                placed += 1
        self.waiters = [w for w, k in zip(self.waiters, keep) if k]
        return placed
