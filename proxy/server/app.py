"""The proxy service: OpenAI endpoints in front of vLLM instances, PD or collocated.

A completion goes: read the body (``intake``: size and time limits) -> prepare it (``prepare``:
parse, validate, drop engine-steering fields, tokenize, hash; in a worker process when large)
-> route (``routing``: the policy, holding the request while every instance is at its limits)
-> forward (``forward``, each attempt an ``exchange``; PD mode: ``pd`` first) -> relay (``relay``). Clients are
served by ``front`` (an asyncio protocol over llhttp), instances reached through ``http1``. The prober (``prober``)
and the circuit breakers (``instances``) decide which instances are usable; when one is
declared down, its attempts in flight (``attempts``) fail over. ``admin``, ``passthrough`` and
``metrics`` are the other routes. This module wires the pieces together and maps outcomes to
answers: errors are OpenAI-shaped, carry the request id, and never upstream text or URLs.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.server.admin import AdminRoutes
from proxy.server.attempts import Call, InFlight, request_id
from proxy.server.config import ProxyConfig
from proxy.server.errors import AllAttemptsFailed, NoCapacity, NoInstance, UpstreamRejected, client_error
from proxy.server.exchange import Exchanges
from proxy.server.forward import Forwarder
from proxy.server.front import Answer, HttpServer, Request, Response, Routes
from proxy.server.instances import CircuitBreaker, Instance, Registry
from proxy.server.intake import Intake
from proxy.server.kv_subscriber import KVEventSubscriber
from proxy.server.metrics import InstanceView, ProxyMetrics, Snapshot
from proxy.server.passthrough import Passthrough
from proxy.server.pd import PDFlow
from proxy.server.prepare import PrepareSpec
from proxy.server.prober import HealthProber
from proxy.server.routing import Router
from proxy.server.upstream import Upstream
from proxy.wire.openai import RequestError
from scheduling.load import LoadModel
from scheduling.policies import RequestInfo, make_policy
from scheduling.prefix_index import PrefixIndex

__all__ = ["ProxyServer", "ProxyConfig"]

log = logging.getLogger("omni_proxy")

UPSTREAM_KEEPALIVE_S = 4.0
LINGER_S = 1.0


class ProxyServer:
    def __init__(self, config: ProxyConfig):
        self.config = c = config.check()
        self.policy = make_policy(c.policy, slo=c.slo, **c.policy_options)
        self.intake = Intake(
            PrepareSpec(c.mode, c.tokenizer, c.chars_per_token, c.block_size, c.hash_algo, c.hash_seed,
                        c.default_max_tokens, self.policy.uses_prefix_index, c.max_prefix_blocks),
            max_body_bytes=c.max_body_bytes, body_timeout=c.body_timeout, offload_bytes=c.offload_bytes,
            workers=c.prompt_workers)
        self.tokenizer, self.hasher = self.intake.tokenizer, self.intake.hasher
        self.index = PrefixIndex(c.index_capacity_blocks, c.approx_ttl)
        self.loads = LoadModel()
        self.inflight = InFlight()
        self.registry = Registry(on_down=self._on_down, health_misses=c.health_misses)
        self.metrics = ProxyMetrics(self.snapshot)
        stages = ("prefill", "decode") if c.mode == "pd" else ("collocated",)
        self.router = Router(self.policy, self.registry, self.loads, self.index, c.block_size, stages,
                             c.queue_timeout, self.metrics, self.now, refresh=self._apply_kv_events)
        self.queues = self.router.queues
        self.upstream = Upstream(c.connect_timeout, UPSTREAM_KEEPALIVE_S)
        self.prober = HealthProber(self.registry, lambda: self.upstream.session, c.health_interval, c.health_timeout,
                                   on_probe=self.router.kick)
        exchanges = Exchanges(self.inflight, self.registry, self.upstream, self.router, self.metrics, c.idle_timeout,
                              self.now)
        self.forwarder = Forwarder(c, self.router, self.registry, exchanges, self.metrics, self.now)
        self.pd = PDFlow(self.forwarder, self.router, self.metrics, c.first_byte_timeout)
        self.passthrough = Passthrough(c.mode, self.router, self.forwarder, self.intake, c.first_byte_timeout,
                                       c.retries, c.default_max_tokens, self._handle)
        self.admin = AdminRoutes(c.admin_token, c.mode, self._listing, self._admin_add, self.remove_instance)
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self._serve_completion, self._serve_chat = self._completion(False), self._completion(True)
        self._http: HttpServer | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        for role, urls in (("prefill", c.prefill), ("decode", c.decode), ("collocated", c.instances)):
            for url in urls:
                self.add_instance(url, role, c.kv_events.get(url))

    # -- state --------------------------------------------------------------------------------------
    def now(self) -> float:
        return (self._loop or asyncio.get_event_loop()).time()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def add_instance(self, url: str, role: str, kv_endpoint: str | None) -> Instance:
        c = self.config
        inst = Instance(url, role, kv_endpoint, CircuitBreaker(c.breaker_failures, c.breaker_cooldown))
        self.registry.add(inst)
        self.loads.add(url, role)
        self.index.add_instance(url, events=bool(kv_endpoint))
        if kv_endpoint:
            self.subscribers[url] = KVEventSubscriber(url, kv_endpoint, self.index, c.block_size, c.kv_topic,
                                                      self._on_kv_event)
        if self._loop is not None:
            self._watch(url)
        return inst

    def _watch(self, url: str) -> None:
        if url in self.subscribers:
            self.subscribers[url].start()
        self.prober.watch(url)

    async def remove_instance(self, url: str) -> Instance:
        inst = self.registry.remove(url)
        await self.prober.unwatch(url)
        sub = self.subscribers.pop(url, None)
        if sub is not None:
            await sub.stop()
        self.index.remove_instance(url)
        self.loads.remove(url)  # tickets in flight keep their own reference
        return inst

    def _apply_kv_events(self) -> None:
        for sub in self.subscribers.values():
            sub.drain()

    def _on_kv_event(self, instance: str, kind: str) -> None:
        self.metrics.labelled(self.metrics.kv_events, instance, kind).inc()

    def _on_down(self, url: str, reason: str) -> None:
        over, streams = self.inflight.abandon(url, reason, self.config.health_timeout)
        self.metrics.instance_down.labels(url, "probe" if "probe" in reason else "breaker").inc()
        log.warning("instance %s is down: %s; failing over %d request(s), %d running stream(s) get %g s",
                    url, reason, over, streams, self.config.health_timeout)

    def snapshot(self) -> Snapshot:
        now = self.now()
        views = []
        for inst in list(self.registry.instances.values()):
            load = self.loads.instances.get(inst.url)
            views.append(InstanceView(
                inst.url, inst.role, load.running if load else 0, load.prefill_tokens if load else 0,
                load.kv_tokens if load else 0, inst.usable(now), self.index.size(inst.url),
                load.model.slope if load else 0.0, self.inflight.count(inst.url)))
        return Snapshot(views, {stage: len(q) for stage, q in self.queues.items()})

    def _describe(self, inst: Instance) -> dict[str, Any]:
        load = self.loads.instances.get(inst.url)
        return {"url": inst.url, "role": inst.role, "kv_events": inst.kv_endpoint, "state": inst.state(),
                "breaker": inst.breaker.state, "down": inst.down, "last_health_ok": inst.last_health_ok,
                "last_error": inst.last_error, "attempts": self.inflight.count(inst.url),
                "running": load.running if load else 0, "prefill_tokens": load.prefill_tokens if load else 0,
                "kv_tokens": load.kv_tokens if load else 0, "index_blocks": self.index.size(inst.url),
                "prefill_model": {"intercept_s": load.model.intercept, "slope_s_per_token": load.model.slope,
                                  "observations": load.model.observations} if load else None}

    def _listing(self) -> dict[str, Any]:
        return {"mode": self.config.mode, "policy": self.policy.describe(),
                "instances": [self._describe(i) for i in self.registry.instances.values()],
                "held": {k: len(q) for k, q in self.queues.items()}}

    def _admin_add(self, url: str, role: str, kv_endpoint: str | None) -> dict[str, Any]:
        inst = self.add_instance(url, role, kv_endpoint)
        self.router.kick()
        return self._describe(inst)

    # -- lifecycle ------------------------------------------------------------------------------------
    def routes(self) -> Routes:
        routes = Routes()
        routes.add("POST", "/v1/completions", self.completions)
        routes.add("POST", "/v1/chat/completions", self.chat_completions)
        routes.add("GET", "/health", self.health)
        routes.add("GET", "/metrics", self.metrics_endpoint)
        self.passthrough.install(routes)
        self.admin.install(routes)
        return routes

    async def start(self) -> "ProxyServer":
        self._loop = asyncio.get_running_loop()
        c = self.config
        await self.upstream.start()
        for url in self.registry.instances:
            self._watch(url)
        # keepalive_timeout closes a connection idle (or with an incomplete request head) that long;
        # after an answer to a body not read to its end (408, 413), the rest is drained for
        # LINGER_S at most before the connection closes
        self._http = HttpServer(self.routes(), c.keepalive_timeout, LINGER_S)
        c.port = await self._http.start(c.host, c.port)
        self._tasks.append(self._loop.create_task(self._housekeeping(), name="proxy-housekeeping"))
        log.info("omni-proxy serve: %s mode, policy %s, listening on %s", c.mode, c.policy, self.url)
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.prober.stop()
        self.router.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        for sub in self.subscribers.values():
            await sub.stop()
        await self.upstream.close()
        self.intake.close()

    async def _housekeeping(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(0.1)
            ticks += 1
            self._apply_kv_events()
            self.router.kick()
            if ticks % 10 == 0:
                self.index.expire(self.now())

    # -- completions ------------------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._handle(request, "completions", self._serve_completion, "/v1/completions")

    async def chat_completions(self, request: Request) -> Response:
        return await self._handle(request, "chat", self._serve_chat, "/v1/chat/completions")

    def _completion(self, chat: bool) -> Callable[[Call], Awaitable[Response]]:
        async def serve(call: Call) -> Response:
            raw = await self.intake.read(call.request)
            if not isinstance(raw, bytes):
                self.metrics.offloaded.inc()
            call.prepared = prepared = await self.intake.prepare(raw, chat)
            for name in prepared.dropped:
                self.metrics.dropped_fields.labels(name).inc()
            call.info = RequestInfo(call.rid, prepared.prompt_tokens, prepared.max_tokens, prepared.block_keys(), call.t0)
            if self.config.mode == "pd":
                return await self.pd.serve(call)
            payload = prepared.payload or raw
            return await self.forwarder.serve(call, "collocated", lambda kv: payload)

        return serve

    async def _handle(self, request: Request, endpoint: str, serve: Callable[[Call], Awaitable[Response]],
                      path: str | None = None) -> Response:
        """Run ``serve`` and turn every outcome into an answer and a metric."""
        t0 = self.now()
        rid = request_id(request)
        call = Call(request, rid, t0, path or request.path, endpoint)
        try:
            response = await serve(call)
            if call.outcome == "ok":
                e2e = self.now() - t0
                self.metrics.e2e.observe(e2e)
                if call.ttft is None:
                    self.metrics.ttft.observe(e2e)  # a whole answer: its first byte came at the end
            return response
        except RequestError as exc:
            call.outcome = "client_error"
            response = client_error(exc.message, exc.status, rid, param=exc.param)
            if exc.status in (408, 413):
                response.close = True  # the rest of the body may still be on its way
            return response
        except UpstreamRejected as exc:
            call.outcome = "upstream_4xx"
            return Answer(exc.status, exc.body, headers=(("X-Request-Id", rid),))
        except NoInstance as exc:
            call.outcome = "no_instance"
            log.warning("request %s: %s (%s)", rid, exc, getattr(exc, "detail", ""))
            return client_error(str(exc), 503, rid, "service_unavailable")
        except NoCapacity as exc:
            call.outcome = "no_capacity"
            return client_error(str(exc), 503, rid, "service_unavailable")
        except AllAttemptsFailed as exc:
            call.outcome = "upstream_error"
            log.warning("request %s: every attempt failed: %s", rid, exc)
            return client_error(f"no instance could serve the request ({len(exc.failures)} attempt(s) failed)", 502,
                                rid, "upstream_error")
        except (asyncio.CancelledError, ConnectionResetError):
            call.outcome = "client_gone"
            raise
        except Exception:
            call.outcome = "error"
            log.exception("request %s: unexpected error", rid)
            return client_error("the proxy failed on this request", 500, rid)
        finally:
            self.metrics.labelled(self.metrics.requests, endpoint, call.outcome).inc()

    # -- own endpoints ------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Answer:
        now = self.now()
        usable = {role: len(self.registry.usable(role, now)) for role in ("prefill", "decode", "collocated")
                  if self.registry.of_role(role)}
        ok = usable.get("decode" if self.config.mode == "pd" else "collocated", 0) > 0
        return Answer(200 if ok else 503, json.dumps({"status": "ok" if ok else "unavailable", "mode": self.config.mode,
                                                      "usable": usable}).encode())

    async def metrics_endpoint(self, request: Request) -> Answer:
        return Answer(200, self.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
