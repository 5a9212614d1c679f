"""Serving a request from one stage: place it, send it, relay the answer, retry before the first byte.

The retry loop (:meth:`Forwarder.retrying`) is the one for every stage; the PD prefill uses it
too. An attempt's lifecycle is :mod:`proxy.server.exchange`'s. An attempt that fails before any byte reached the client (connect error, 5xx, timeout, a bad
answer, a stream cut before its first event, or its instance declared down meanwhile) is
retried on another instance of the stage, ``--retries`` times (on one that already failed it
when no other is left). Deadlines, counted from the
moment the attempt is sent: ``--first-byte-timeout`` to a stream's first event,
``--request-timeout`` to a whole non-streaming answer; a silent instance is caught earlier by
the prober (``proxy.server.prober``). Once the client has bytes, a broken stream ends with an
error event (``proxy.server.relay``).

Verdicts: a failure counts against the instance's circuit breaker (unless the instance was
already declared down; ``exchange``); a complete answer counts as its success.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from proxy.server.attempts import Attempt, Call
from proxy.server.config import ProxyConfig
from proxy.server.errors import AllAttemptsFailed, AttemptFailed, NoInstance
from proxy.server.exchange import Exchanges
from proxy.server.front import Answer, Response, Stream
from proxy.server.instances import Registry
from proxy.server.metrics import ProxyMetrics
from proxy.server.relay import COMPLETIONS, Dialect, relay
from proxy.server.routing import Router
from scheduling.load import Ticket

log = logging.getLogger("omni_proxy")
T = TypeVar("T")


class Forwarder:
    def __init__(self, config: ProxyConfig, router: Router, registry: Registry, exchanges: Exchanges,
                 metrics: ProxyMetrics, now: Callable[[], float]):
        self.config = config
        self.router = router
        self.registry = registry
        self.exchanges = exchanges
        self.upstream = exchanges.upstream
        self.metrics = metrics
        self.now = now

    # -- the retry loop -------------------------------------------------------------------------------
    async def retrying(self, stage: str, call: Call, attempt: Callable[[str, Ticket], Awaitable[T]], *,
                       prefill_work: Callable[[], bool], pinned: str | None = None, reuse_failed: bool = True,
                       on_failure: Callable[[AttemptFailed], None] | None = None) -> T:
        """``attempt(instance, ticket)`` on a placement at ``stage``, again on another instance
        after each AttemptFailed, ``--retries`` times; each placement's load is given back
        after its attempt.

        When every instance has failed this request, ``reuse_failed`` lets one of them serve it
        again; otherwise the loop ends. Raises NoInstance when nothing could be placed at all,
        AllAttemptsFailed after failures, NoCapacity from placement as it comes.
        ``prefill_work()`` says whether the instance computes the prompt (asked per placement).
        """
        tried: set[str] = set()
        failures: list[AttemptFailed] = []
        for attempt_no in range(self.config.retries + 1):
            if attempt_no:
                self.metrics.retries.labels(stage).inc()
            try:
                try:
                    choice, ticket = await self.router.place(stage, call.info, tried, prefill_work=prefill_work(),
                                                             pinned=pinned)
                except NoInstance:
                    if not tried or not reuse_failed:
                        raise
                    # no other instance left: one that failed this request may still serve it
                    choice, ticket = await self.router.place(stage, call.info, set(), prefill_work=prefill_work(),
                                                             pinned=pinned)
            except NoInstance:
                if failures:
                    break
                raise
            try:
                return await attempt(choice.instance, ticket)
            except AttemptFailed as failure:
                failures.append(failure)
                tried.add(choice.instance)
                if on_failure is not None:
                    on_failure(failure)
            finally:
                self.router.release(ticket)
        raise AllAttemptsFailed(failures)

    # -- serving ------------------------------------------------------------------------------------
    async def serve(self, call: Call, stage: str, payload: Callable[[dict | None], bytes], kv_params: dict | None = None,
                    dialect: Dialect = COMPLETIONS, pinned: str | None = None) -> Response:
        """Serve from ``stage`` with retries on its other instances.

        ``payload(kv_params)`` gives the body to send; after a failed attempt that carried
        ``kv_transfer_params`` the retry goes without them (the failed attempt may have
        consumed the KV they point at).
        """
        def without_kv(failure: AttemptFailed) -> None:
            nonlocal kv_params
            if kv_params is not None:
                kv_params = None
                self.metrics.fallbacks.labels("decode_retry").inc()

        return await self.retrying(
            stage, call, lambda instance, ticket: self.once(call, stage, instance, payload(kv_params), ticket, dialect),
            prefill_work=lambda: kv_params is None, pinned=pinned, on_failure=without_kv)

    async def once(self, call: Call, stage: str, instance: str, payload: bytes, ticket: Ticket,
                   dialect: Dialect) -> Response:
        """One attempt; AttemptFailed only while the client has no byte yet."""
        c = self.config
        async with self.exchanges.open(call.rid, instance, stage, call) as ex:
            if call.stream:
                first, pending = await ex.send("POST", call.path, payload, self.upstream.first_events,
                                               c.first_byte_timeout, "stream event")
            else:
                data, doc = await ex.send("POST", call.path, payload, self.upstream.read_json, c.request_timeout,
                                          "complete answer")
            now = self.now()
            ticket.prefill_done(now)
            call.served_by = instance
            if not call.stream:
                ex.clean = True
                call.head = data
                self.registry.request_succeeded(instance, now)
                self.router.observe("on_complete", call.info, instance, stage, ex.attempt.sent_at,
                                    usage=doc.get("usage"), ticket=ticket)
                return Answer(ex.resp.status, data, headers=(("X-Request-Id", call.rid),))
            call.head = first
            call.ttft = now - call.t0

            def first_byte() -> None:  # after the first event left: off the client's TTFT path
                self.metrics.ttft.observe(call.ttft)
                self.router.observe("on_first_byte", call.info, instance, stage, ex.attempt.sent_at, ticket=ticket)

            out, ex.clean = await self._stream(call, stage, ex.attempt, ex.resp, first, pending, ticket, dialect,
                                               first_byte)
            return out

    async def _stream(self, call: Call, stage: str, attempt: Attempt, resp, first: bytes, pending: bytes,
                      ticket: Ticket, dialect: Dialect, first_byte: Callable[[], None]) -> tuple[Stream, bool]:
        """Relay a stream that has its first event; (response, whether it completed). The
        answer's head leaves with the first event, in one write; ``first_byte`` runs right
        after that write (before the task yields, unless the client's socket buffer is full), whatever
        the write gave."""
        attempt.client_started = True
        if attempt.down_reason is not None:  # declared down between the first event and now
            attempt.idle_s = min(attempt.idle_s, self.config.health_timeout)
        out = call.request.stream(200, (("Cache-Control", "no-cache"), ("X-Request-Id", call.rid)))
        try:
            try:
                await out.write(first)
            finally:
                first_byte()
            result = await relay(call, attempt, resp, out, first, pending, dialect, self.config.idle_timeout, ticket.grow)
            await out.end()
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
