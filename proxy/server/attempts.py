"""A client request, its attempts on instances, and the attempts in flight per instance.

Every wait on an upstream runs inside an ``asyncio.timeout`` owned by its :class:`Attempt`,
so one mechanism ends it, whatever the reason: the phase's own deadline, or the instance being
declared down (the prober's verdict or an opened circuit). ``InFlight.abandon`` then

* expires the current wait of every attempt that has sent nothing to its client yet: the
  attempt fails with kind ``down`` and the request is retried on another instance;
* shortens the idle limit of every stream already running there to the grace period, so a
  stream that is really silent ends within it (with an error event and ``[DONE]``) while one
  that still flows (an instance whose circuit opened over other requests) goes on.

Streams are watched by a :class:`Watchdog`: one timer that re-arms itself, rather than a new
timeout per chunk; it measures how long the relay has waited on the upstream (idle) and on
the client (a client that stopped reading).
"""

from __future__ import annotations

import asyncio
import itertools
import os
from typing import Any

from proxy.server.front import Request
from scheduling.policies import RequestInfo

# Request ids made here: 32 hex digits as uuid4's, a random prefix per process and a counter
# (uuid4 reads the OS's random source for every request).
_RID_PREFIX = os.urandom(10).hex()
_rid_seq = itertools.count()


def request_id(request: Request) -> str:
    """The client's ``X-Request-Id``, else a new ``omni-<32 hex>`` id unique to this process."""
    return request.headers.get("x-request-id") or f"omni-{_RID_PREFIX}{next(_rid_seq):012x}"


class Call:
    """One client request on its way through the proxy (``prepared``/``info`` once its body is read)."""

    __slots__ = ("request", "rid", "t0", "path", "endpoint", "prepared", "info", "outcome", "ttft", "served_by", "head")

    def __init__(self, request: Request, rid: str, t0: float, path: str, endpoint: str):
        self.request = request
        self.rid = rid
        self.t0 = t0
        self.path = path          # upstream path
        self.endpoint = endpoint  # metrics label
        self.prepared: Any = None
        self.info: RequestInfo | None = None
        self.outcome = "ok"
        self.ttft: float | None = None
        self.served_by: str | None = None  # the instance whose answer the client got
        self.head: bytes | None = None     # that answer's body (whole) or first events (stream)

    @property
    def stream(self) -> bool:
        return self.prepared.stream


class Attempt:
    """One request sent to one instance."""

    __slots__ = ("instance", "stage", "sent_at", "client_started", "down_reason", "timeout", "watchdog",
                 "idle_s", "waiting_since", "writing_since", "_loop")

    def __init__(self, instance: str, stage: str, loop: asyncio.AbstractEventLoop, idle_s: float):
        self.instance = instance
        self.stage = stage
        self._loop = loop
        self.sent_at = loop.time()
        self.client_started = False   # bytes went to the client: no failover any more
        self.down_reason: str | None = None
        self.timeout: asyncio.Timeout | None = None
        self.watchdog: Watchdog | None = None
        self.idle_s = idle_s
        self.waiting_since: float | None = None
        self.writing_since: float | None = None

    def phase(self, deadline: float) -> asyncio.Timeout:
        """The timeout for one wait before the client has bytes (expires at once if abandoned)."""
        if self.down_reason is not None:
            deadline = self._loop.time()
        self.timeout = asyncio.timeout_at(deadline)
        return self.timeout

    def abandon(self, reason: str, grace_s: float) -> None:
        if self.down_reason is not None:
            return
        self.down_reason = reason
        if not self.client_started:
            if self.timeout is not None:
                try:
                    self.timeout.reschedule(self._loop.time())
                except RuntimeError:  # between phases: the next phase() expires at once
                    pass
        else:
            self.idle_s = min(self.idle_s, grace_s)
            if self.watchdog is not None:
                self.watchdog.poke()


class Watchdog:
    """Expires an entered ``asyncio.Timeout`` when a stream waits too long on either side."""

    __slots__ = ("attempt", "timeout", "write_idle_s", "fired", "_handle", "_loop")

    def __init__(self, attempt: Attempt, timeout: asyncio.Timeout, write_idle_s: float):
        self.attempt = attempt
        self.timeout = timeout
        self.write_idle_s = write_idle_s
        self.fired: str | None = None  # "upstream" or "client"
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        attempt.watchdog = self
        self._check()

    def _check(self) -> None:
        self._handle = None
        a, now = self.attempt, self._loop.time()
        reading, writing = a.waiting_since, a.writing_since
        if reading is not None and now - reading >= a.idle_s:
            self.fired = "upstream"
        elif writing is not None and now - writing >= self.write_idle_s:
            self.fired = "client"
        if self.fired:
            self.timeout.reschedule(now)
            return
        due = min((reading if reading is not None else now) + a.idle_s,
                  (writing if writing is not None else now) + self.write_idle_s)
        self._handle = self._loop.call_at(due, self._check)

    def poke(self) -> None:
        """Re-check now (the idle limit changed)."""
        if self._handle is not None:
            self._handle.cancel()
            self._check()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self.attempt.watchdog = None


class InFlight:
    """Attempts in flight, per instance."""

    def __init__(self) -> None:
        self.by_instance: dict[str, set[Attempt]] = {}

    def begin(self, instance: str, stage: str, idle_s: float) -> Attempt:
        attempt = Attempt(instance, stage, asyncio.get_running_loop(), idle_s)
        self.by_instance.setdefault(instance, set()).add(attempt)
        return attempt

    def end(self, attempt: Attempt) -> None:
        attempts = self.by_instance.get(attempt.instance)
        if attempts is not None:
            attempts.discard(attempt)

    def count(self, instance: str) -> int:
        return len(self.by_instance.get(instance, ()))

    def abandon(self, instance: str, reason: str, grace_s: float) -> tuple[int, int]:
        """Fail over what can be, shorten the rest; returns (failed over, streams shortened)."""
        over = streams = 0
        for attempt in list(self.by_instance.get(instance, ())):
            if attempt.down_reason is None:
                over += not attempt.client_started
                streams += attempt.client_started
            attempt.abandon(reason, grace_s)
        return over, streams
