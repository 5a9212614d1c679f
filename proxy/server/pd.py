"""The PD flow: prefill on a prefill instance, then decode with the KV it produced.

vLLM's disaggregation protocol: the prefill instance gets the request with ``max_tokens=1``,
``stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``; the decode
instance gets the client's request plus the ``kv_transfer_params`` the prefill answered with;
both see the same ``X-Request-Id``. Fallbacks to decode-only (the decode instance computes the
prompt itself): every prefill attempt failed or timed out (``--first-byte-timeout``), no
prefill instance is usable, every one stayed at its limits for ``--queue-timeout``, or the
prefill answered without ``kv_transfer_params`` (a connector that moves KV by itself). With
a policy that says so (``bypass_prefill``), short prompts skip prefill.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from proxy.server.attempts import Call
from proxy.server.errors import AttemptFailed, NoCapacity, NoInstance
from proxy.server.forward import Forwarder
from proxy.server.metrics import ProxyMetrics
from proxy.server.routing import Router
from proxy.server.upstream import Upstream
from scheduling.load import Ticket

log = logging.getLogger("omni_proxy")


class PDFlow:
    def __init__(self, forwarder: Forwarder, router: Router, upstream: Upstream, metrics: ProxyMetrics,
                 retries: int, prefill_timeout: float):
        self.forwarder = forwarder
        self.router = router
        self.upstream = upstream
        self.metrics = metrics
        self.retries = retries
        self.prefill_timeout = prefill_timeout
        self._warned_no_kv = False

    async def serve(self, call: Call) -> web.StreamResponse:
        prepared = call.prepared
        if self.router.policy.bypass_prefill(call.info, self.router.usable("decode"), self.router.state(),
                                             self.router.usable("prefill")):
            self.metrics.decisions.labels("bypass", "-", "short_uncached_prompt").inc()
            return await self.forwarder.serve(call, "decode", prepared.decode_payload, None)
        params = await self.prefill(call)
        return await self.forwarder.serve(call, "decode", prepared.decode_payload, params)

    async def prefill(self, call: Call) -> dict | None:
        """The ``kv_transfer_params`` to hand to decode, or None (decode-only)."""
        tried: set[str] = set()
        for attempt_no in range(self.retries + 1):
            if attempt_no:
                self.metrics.retries.labels("prefill").inc()
            try:
                choice, ticket = await self.router.place("prefill", call.info, tried, prefill_work=True)
            except NoInstance:
                self.metrics.fallbacks.labels("no_prefill_instance" if not tried else "prefill_failed").inc()
                return None
            except NoCapacity:
                self.metrics.fallbacks.labels("prefill_queue_timeout").inc()
                return None
            try:
                params = await self._once(call, choice.instance, ticket)
                ticket.prefill_done(self.router.now())
            except AttemptFailed:
                tried.add(choice.instance)
                continue
            finally:
                self.router.release(ticket)
            if params is None:
                self.metrics.fallbacks.labels("no_kv_transfer_params").inc()
                if not self._warned_no_kv:
                    self._warned_no_kv = True
                    log.warning("prefill %s returned no kv_transfer_params (no KV connector?): serving decode-only",
                                choice.instance)
            return params
        self.metrics.fallbacks.labels("prefill_failed").inc()
        return None

    async def _once(self, call: Call, instance: str, ticket: Ticket | None = None) -> dict | None:
        fw = self.forwarder
        attempt = fw.begin(instance, "prefill")
        resp: aiohttp.ClientResponse | None = None
        clean = False
        try:
            try:
                async with attempt.phase(attempt.sent_at + self.prefill_timeout):
                    resp = await self.upstream.post(call, instance, call.prepared.prefill_payload)
                    await self.upstream.check(call.rid, instance, resp)
                    _, doc = await self.upstream.read_json(call.rid, instance, resp)
            except TimeoutError:
                raise fw.timed_out(attempt, "prefill answer", self.prefill_timeout) from None
            clean = True
            fw.registry.request_succeeded(instance, self.router.now())
            self.router.observe("on_prefill_done", call.info, instance, "prefill", attempt.sent_at, usage=doc.get("usage"),
                                ticket=ticket)
            params = doc.get("kv_transfer_params")
            return params if isinstance(params, dict) else None
        except AttemptFailed as failure:
            fw.failed(call, "prefill", attempt, failure)
            raise
        finally:
            fw.end(attempt, resp, clean)
