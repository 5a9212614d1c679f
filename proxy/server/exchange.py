"""One upstream attempt from its start to its end, written once for every caller: a completion
(``forward``), a PD prefill (``pd``) and the passthrough routes (``passthrough``).

    async with exchanges.open(rid, instance, stage, call) as ex:    # in flight from here
        head = await ex.send(method, path, payload, read, limit, what)
        ...                                      # ex.clean = True once the answer was read to its end
    # on the way out: a failure (AttemptFailed) of an attempt serving a client request (``call``
    # given) gets its verdict; the upstream response goes back to the connection pool when
    # clean, else it is closed, so the instance sees the connection go and aborts the request

``send`` is the wait before the client has any byte: the request sent, the status checked,
the first part of the answer read (``read``), all inside the attempt's phase
(:meth:`proxy.server.attempts.Attempt.phase`), so its own deadline or the instance being
declared down ends it; a timeout becomes :class:`AttemptFailed` of kind ``timeout`` (or
``down``).

Verdicts: a failure counts against the instance's circuit breaker (unless the instance was
already declared down) and is reported to the policy (``on_complete``, not ok).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from proxy.server.attempts import Attempt, Call, InFlight
from proxy.server.errors import AttemptFailed
from proxy.server.instances import Registry
from proxy.server.metrics import ProxyMetrics
from proxy.server.routing import Router
from proxy.server.upstream import Upstream

log = logging.getLogger("omni_proxy")

Read = Callable[[str, str, aiohttp.ClientResponse], Awaitable[Any]]  # (rid, instance, resp) -> what was read


class Exchanges:
    """What every attempt works with; :meth:`open` starts one."""

    def __init__(self, inflight: InFlight, registry: Registry, upstream: Upstream, router: Router,
                 metrics: ProxyMetrics, idle_timeout: float, now: Callable[[], float]):
        self.inflight = inflight
        self.registry = registry
        self.upstream = upstream
        self.router = router
        self.metrics = metrics
        self.idle_timeout = idle_timeout
        self.now = now

    def open(self, rid: str, instance: str, stage: str, call: Call | None = None) -> "Exchange":
        """An attempt to enter with ``async with``; ``call``: the client request it serves
        (its failures then get a verdict; without it the caller judges)."""
        return Exchange(self, rid, instance, stage, call)

    def failed(self, call: Call, stage: str, attempt: Attempt, failure: AttemptFailed) -> None:
        self.inflight.end(attempt)  # before the verdict: an opening circuit fails over the others only
        self.metrics.upstream_errors.labels(failure.instance, failure.kind).inc()
        log.warning("request %s: attempt on %s (%s) failed: %s: %s", call.rid, failure.instance, stage,
                    failure.kind, failure.detail)
        if failure.counts:
            self.registry.request_failed(failure.instance, self.now(), f"{failure.kind}: {failure.detail}")
        else:
            self.metrics.failovers.labels(failure.instance).inc()
        self.router.observe("on_complete", call.info, failure.instance, stage, attempt.sent_at, ok=False)

    def end(self, attempt: Attempt, resp: aiohttp.ClientResponse | None, clean: bool) -> None:
        self.inflight.end(attempt)
        inst = self.registry.instances.get(attempt.instance)
        if inst is not None:
            inst.breaker.end_trial()
        if resp is not None:
            if clean:
                resp.release()
            else:
                resp.close()


class Exchange:
    """One request sent to one instance (module docstring)."""

    __slots__ = ("owner", "rid", "instance", "stage", "call", "attempt", "resp", "clean")

    def __init__(self, owner: Exchanges, rid: str, instance: str, stage: str, call: Call | None):
        self.owner = owner
        self.rid = rid
        self.instance = instance
        self.stage = stage
        self.call = call
        self.attempt: Attempt | None = None
        self.resp: aiohttp.ClientResponse | None = None
        self.clean = False  # the answer was read to its end: the connection can be reused

    async def __aenter__(self) -> "Exchange":
        self.attempt = self.owner.inflight.begin(self.instance, self.stage, self.owner.idle_timeout)
        return self

    async def __aexit__(self, kind, exc, tb) -> bool:
        if isinstance(exc, AttemptFailed) and self.call is not None:
            self.owner.failed(self.call, self.stage, self.attempt, exc)
        self.owner.end(self.attempt, self.resp, self.clean)
        return False

    async def send(self, method: str, path: str, payload: bytes | None, read: Read, limit: float, what: str) -> Any:
        """Send, check the answer's status, and ``read`` its first part, within ``limit`` seconds
        of the attempt's start; AttemptFailed (``what`` names the awaited part) otherwise."""
        attempt, up = self.attempt, self.owner.upstream
        try:
            async with attempt.phase(attempt.sent_at + limit):
                self.resp = await up.send(self.rid, self.instance, method, path, payload)
                await up.check(self.rid, self.instance, self.resp)
                return await read(self.rid, self.instance, self.resp)
        except TimeoutError:
            if attempt.down_reason is not None:
                raise AttemptFailed(self.instance, "down", f"instance declared down: {attempt.down_reason}") from None
            raise AttemptFailed(self.instance, "timeout", f"no {what} within {limit:g} s") from None
