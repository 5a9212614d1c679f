"""The PD flow: prefill on a prefill instance, then decode with the KV it produced.

vLLM's disaggregation protocol: the prefill instance gets the request with ``max_tokens=1``,
``stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``; the decode
instance gets the client's request plus the ``kv_transfer_params`` the prefill answered with;
both see the same ``X-Request-Id``. Fallbacks to decode-only (the decode instance computes the
prompt itself): every prefill attempt failed or timed out (``--first-byte-timeout``), no
prefill instance is usable, every one stayed at its limits for ``--queue-timeout``, or the
prefill answered without ``kv_transfer_params`` (a connector that moves KV by itself). With
a policy that says so (``Router.bypass_prefill``), a prompt skips prefill. Prefill attempts
go through the same retry loop as every stage (``Forwarder.retrying``), without reusing an
instance that failed the request.
"""

from __future__ import annotations

import logging

from proxy.server.attempts import Call
from proxy.server.errors import AllAttemptsFailed, NoCapacity, NoInstance
from proxy.server.forward import Forwarder
from proxy.server.front import Response
from proxy.server.metrics import ProxyMetrics
from proxy.server.routing import Router
from scheduling.load import Ticket

log = logging.getLogger("omni_proxy")


class PDFlow:
    def __init__(self, forwarder: Forwarder, router: Router, metrics: ProxyMetrics, prefill_timeout: float):
        self.forwarder = forwarder
        self.router = router
        self.upstream = forwarder.upstream
        self.metrics = metrics
        self.prefill_timeout = prefill_timeout
        self._warned_no_kv = False

    async def serve(self, call: Call) -> Response:
        prepared = call.prepared
        if self.router.bypass_prefill(call.info):
            return await self.forwarder.serve(call, "decode", prepared.decode_payload, None)
        params = await self.prefill(call)
        return await self.forwarder.serve(call, "decode", prepared.decode_payload, params)

    async def prefill(self, call: Call) -> dict | None:
        """The ``kv_transfer_params`` to hand to decode, or None (decode-only)."""
        try:
            instance, params = await self.forwarder.retrying("prefill", call, lambda i, t: self._once(call, i, t),
                                                             prefill_work=lambda: True, reuse_failed=False)
        except NoInstance:
            self.metrics.fallbacks.labels("no_prefill_instance").inc()
            return None
        except NoCapacity:
            self.metrics.fallbacks.labels("prefill_queue_timeout").inc()
            return None
        except AllAttemptsFailed:
            self.metrics.fallbacks.labels("prefill_failed").inc()
            return None
        if params is None:
            self.metrics.fallbacks.labels("no_kv_transfer_params").inc()
            if not self._warned_no_kv:
                self._warned_no_kv = True
                log.warning("prefill %s returned no kv_transfer_params (no KV connector?): serving decode-only",
                            instance)
        return params

    async def _once(self, call: Call, instance: str, ticket: Ticket) -> tuple[str, dict | None]:
        """One prefill attempt: (its instance, the ``kv_transfer_params`` it answered, if any)."""
        async with self.forwarder.exchanges.open(call.rid, instance, "prefill", call) as ex:
            _, doc = await ex.send("POST", call.path, call.prepared.prefill_payload, self.upstream.read_json,
                                   self.prefill_timeout, "prefill answer")
            ex.clean = True
            self.forwarder.registry.request_succeeded(instance, self.router.now())
            self.router.observe("on_prefill_done", call.info, instance, "prefill", ex.attempt.sent_at,
                                usage=doc.get("usage"), ticket=ticket)
        ticket.prefill_done(self.router.now())
        params = doc.get("kv_transfer_params")
        return instance, params if isinstance(params, dict) else None
