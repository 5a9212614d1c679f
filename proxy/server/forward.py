"""Serving a request from one stage: place it, send it, relay the answer, retry before the first byte.

An attempt that fails before any byte reached the client (connect error, 5xx, timeout, a bad
answer, a stream cut before its first event, or its instance declared down meanwhile) is
retried on another instance of the stage, ``--retries`` times (on one that already failed it
when no other is left). Deadlines, counted from the
moment the attempt is sent: ``--first-byte-timeout`` to a stream's first event,
``--request-timeout`` to a whole non-streaming answer; a silent instance is caught earlier by
the prober (``proxy.server.prober``). Once the client has bytes, a broken stream ends with an
error event (``proxy.server.relay``).

Verdicts: a failure counts against the instance's circuit breaker (unless the instance was
already declared down); a complete answer counts as its success.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import aiohttp
from aiohttp import web

from proxy.server.attempts import Attempt, Call, InFlight
from proxy.server.config import ProxyConfig
from proxy.server.errors import AllAttemptsFailed, AttemptFailed, NoInstance
from proxy.server.instances import Registry
from proxy.server.metrics import ProxyMetrics
from proxy.server.relay import COMPLETIONS, Dialect, relay
from proxy.server.routing import Router
from proxy.server.upstream import Upstream
from scheduling.load import Ticket

log = logging.getLogger("omni_proxy")


class EventStream(web.StreamResponse):
    """A streamed answer whose headers leave with its first event, in one write (aiohttp
    sends a StreamResponse's headers on ``prepare`` otherwise): one syscall and one TCP
    segment fewer on the way to the client's first token. The proxy has the first event in
    hand when it answers, so nothing waits for it. Older aiohttp ignores the attribute."""

    _send_headers_immediately = False


class Forwarder:
    def __init__(self, config: ProxyConfig, router: Router, registry: Registry, upstream: Upstream,
                 inflight: InFlight, metrics: ProxyMetrics, now: Callable[[], float]):
        self.config = config
        self.router = router
        self.registry = registry
        self.upstream = upstream
        self.inflight = inflight
        self.metrics = metrics
        self.now = now

    # -- verdicts ---------------------------------------------------------------------------------
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

    def begin(self, instance: str, stage: str) -> Attempt:
        return self.inflight.begin(instance, stage, self.config.idle_timeout)

    def end(self, attempt: Attempt, resp: aiohttp.ClientResponse | None = None, clean: bool = False) -> None:
        """The attempt is over. Its upstream response, if any, goes back to the connection pool
        when it was read to the end (``clean``); otherwise it is closed, so the instance sees
        the connection go and aborts the request."""
        self.inflight.end(attempt)
        inst = self.registry.instances.get(attempt.instance)
        if inst is not None:
            inst.breaker.end_trial()
        if resp is not None:
            if clean:
                resp.release()
            else:
                resp.close()

    @staticmethod
    def timed_out(attempt: Attempt, what: str, limit: float) -> AttemptFailed:
        if attempt.down_reason is not None:
            return AttemptFailed(attempt.instance, "down", f"instance declared down: {attempt.down_reason}")
        return AttemptFailed(attempt.instance, "timeout", f"no {what} within {limit:g} s")

    # -- serving ------------------------------------------------------------------------------------
    async def serve(self, call: Call, stage: str, payload: Callable[[dict | None], bytes], kv_params: dict | None = None,
                    dialect: Dialect = COMPLETIONS, pinned: str | None = None) -> web.StreamResponse:
        """Serve from ``stage`` with retries on its other instances.

        ``payload(kv_params)`` gives the body to send; after a failed attempt that carried
        ``kv_transfer_params`` the retry goes without them (the failed attempt may have
        consumed the KV they point at).
        """
        tried: set[str] = set()
        failures: list[AttemptFailed] = []
        for attempt_no in range(self.config.retries + 1):
            if attempt_no:
                self.metrics.retries.labels(stage).inc()
            try:
                try:
                    choice, ticket = await self.router.place(stage, call.info, tried, prefill_work=kv_params is None,
                                                             pinned=pinned)
                except NoInstance:
                    if not tried:
                        raise
                    # no other instance left: one that failed this request may still serve it
                    choice, ticket = await self.router.place(stage, call.info, set(), prefill_work=kv_params is None,
                                                             pinned=pinned)
            except NoInstance:
                if failures:
                    break
                raise
            try:
                return await self.once(call, stage, choice.instance, payload(kv_params), ticket, dialect)
            except AttemptFailed as failure:
                failures.append(failure)
                tried.add(choice.instance)
                if kv_params is not None:
                    kv_params = None
                    self.metrics.fallbacks.labels("decode_retry").inc()
            finally:
                self.router.release(ticket)
        raise AllAttemptsFailed(failures)

    async def once(self, call: Call, stage: str, instance: str, payload: bytes, ticket: Ticket,
                   dialect: Dialect) -> web.StreamResponse:
        """One attempt; AttemptFailed only while the client has no byte yet."""
        c = self.config
        attempt = self.begin(instance, stage)
        resp: aiohttp.ClientResponse | None = None
        clean = False
        try:
            limit = c.first_byte_timeout if call.stream else c.request_timeout
            try:
                async with attempt.phase(attempt.sent_at + limit):
                    resp = await self.upstream.post(call, instance, payload)
                    await self.upstream.check(call.rid, instance, resp)
                    if call.stream:
                        first, pending = await self.upstream.first_events(call.rid, instance, resp)
                    else:
                        data, doc = await self.upstream.read_json(call.rid, instance, resp)
            except TimeoutError:
                raise self.timed_out(attempt, "stream event" if call.stream else "complete answer", limit) from None
            now = self.now()
            ticket.prefill_done(now)
            call.served_by = instance
            if not call.stream:
                clean = True
                call.head = data
                self.registry.request_succeeded(instance, now)
                self.router.observe("on_complete", call.info, instance, stage, attempt.sent_at, usage=doc.get("usage"),
                                    ticket=ticket)
                return web.Response(body=data, status=resp.status, content_type="application/json",
                                    headers={"X-Request-Id": call.rid})
            call.head = first
            call.ttft = now - call.t0
            self.metrics.ttft.observe(call.ttft)
            self.router.observe("on_first_byte", call.info, instance, stage, attempt.sent_at, ticket=ticket)
            out, clean = await self._stream(call, stage, attempt, resp, first, pending, ticket, dialect)
            return out
        except AttemptFailed as failure:
            self.failed(call, stage, attempt, failure)
            raise
        finally:
            self.end(attempt, resp, clean)

    async def _stream(self, call: Call, stage: str, attempt: Attempt, resp: aiohttp.ClientResponse, first: bytes,
                      pending: bytes, ticket: Ticket, dialect: Dialect) -> tuple[web.StreamResponse, bool]:
        """Relay a stream that has its first event; (response, whether it completed)."""
        attempt.client_started = True
        if attempt.down_reason is not None:  # declared down between the first event and now
            attempt.idle_s = min(attempt.idle_s, self.config.health_timeout)
        out = EventStream(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                   "X-Request-Id": call.rid})
        try:
            await out.prepare(call.request)
            await out.write(first)
            result = await relay(call, attempt, resp, out, first, pending, dialect, self.config.idle_timeout, ticket.grow)
            await out.write_eof()
        except ConnectionResetError:
            call.outcome = "client_gone"  # resp is closed by the caller: the instance aborts
            return out, False
        now = self.now()
        if result.ok:
            self.registry.request_succeeded(attempt.instance, now)
            if result.events > 2:
                self.metrics.tpot.observe((now - call.t0 - call.ttft) / (result.events - 2))
        else:
            call.outcome = "stream_error"
            self.metrics.upstream_errors.labels(attempt.instance, "stream_broken").inc()
            if attempt.down_reason is None:
                self.registry.request_failed(attempt.instance, now, f"stream_broken: {result.why}")
        self.router.observe("on_complete", call.info, attempt.instance, stage, attempt.sent_at, ok=result.ok,
                            usage=result.usage, chunks=max(0, result.events - 1), ticket=ticket)
        return out, result.ok
