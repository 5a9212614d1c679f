"""The proxy service: OpenAI endpoints in front of vLLM instances, PD or collocated.

A completion request goes through: read and check the body (4xx naming the problem) ->
tokenize and hash the prompt's blocks -> choose instance(s) with the policy (holding the
request in the proxy while every candidate is at its limits) -> forward.

PD mode uses vLLM's disaggregation protocol: the prefill instance gets the request with
``max_tokens=1``, ``stream=false`` and ``kv_transfer_params={"do_remote_decode": true, ...}``;
the decode instance gets the original request plus the ``kv_transfer_params`` the prefill
returned; both see the same ``X-Request-Id``. A prefill that fails on every attempt, or
returns no ``kv_transfer_params``, falls back to decode-only (the decode instance computes the
prompt). A decode attempt that fails is retried decode-only: the KV it was pointed at may
already be consumed, so ``kv_transfer_params`` are never sent twice.

Reliability: an attempt that fails before the first byte reached the client (connect error,
timeout, 5xx, broken stream) is retried on another instance, ``--retries`` times; after the
first byte, a broken upstream stream ends the client's stream with an SSE error event and
``[DONE]``. Upstream 4xx answers are passed through (the request itself is wrong). A client
that disconnects cancels the handler, which closes the upstream connections (so vLLM aborts
the request) and gives the load back.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from proxy.server.config import ProxyConfig
from proxy.server.holding import HoldQueue, NoCapacity, NoInstance
from proxy.server.instances import CircuitBreaker, Instance, Registry, normalize_url
from proxy.server.kv_subscriber import KVEventSubscriber
from proxy.server.metrics import ProxyMetrics
from proxy.server.tokenizer import make_tokenizer
from proxy.wire.openai import (
    SSE_DONE,
    RequestError,
    error_body,
    error_bytes,
    max_tokens_of,
    parse_json_body,
    sse_event,
    validate_request,
)
from scheduling.block_hash import BlockHasher
from scheduling.load import LoadModel, Ticket
from scheduling.policies import Choice, ClusterState, RequestInfo, make_policy
from scheduling.prefix_index import PrefixIndex

log = logging.getLogger("omni_proxy")

PREFILL_KV_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                     "remote_block_ids": None, "remote_host": None, "remote_port": None}


class AttemptFailed(Exception):
    """One upstream attempt failed before any byte reached the client (retryable)."""

    def __init__(self, instance: str, kind: str, detail: str):
        super().__init__(f"{instance}: {detail}")
        self.instance = instance
        self.kind = kind


class UpstreamRejected(Exception):
    """The instance answered 4xx: the request is at fault; the client gets that answer."""

    def __init__(self, status: int, body: bytes, content_type: str):
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


class AllAttemptsFailed(Exception):
    pass


class _Ctx:
    """One client request on its way through the proxy."""

    __slots__ = ("request", "body", "raw", "chat", "rid", "info", "stream", "t0", "outcome", "ttft", "path")

    def __init__(self, request, body, raw, chat, rid, info, t0):
        self.request = request
        self.body = body
        self.raw = raw
        self.chat = chat
        self.rid = rid
        self.info = info
        self.stream = bool(body.get("stream"))
        self.t0 = t0
        self.outcome = "ok"
        self.ttft: float | None = None
        self.path = "/v1/chat/completions" if chat else "/v1/completions"


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(document).encode(), status=status, content_type="application/json")


def _error(message: str, status: int, kind: str | None = None, param: str | None = None) -> web.Response:
    return web.Response(body=error_bytes(message, status, kind, param), status=status, content_type="application/json")


class ProxyServer:
    def __init__(self, config: ProxyConfig):
        self.config = config.check()
        c = self.config
        self.policy = make_policy(c.policy, slo=c.slo, **c.policy_options)
        self.tokenizer = make_tokenizer(c.tokenizer, c.chars_per_token)
        self.hasher = BlockHasher(c.block_size, c.hash_algo, c.hash_seed)
        self.index = PrefixIndex(c.index_capacity_blocks, c.approx_ttl)
        self.loads = LoadModel()
        self.registry = Registry()
        stages = ("prefill", "decode") if c.mode == "pd" else ("collocated",)
        self.queues = {s: HoldQueue(self.policy.hold_order(s)) for s in stages}
        self.metrics = ProxyMetrics(self)
        self.subscribers: dict[str, KVEventSubscriber] = {}
        self.session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._server = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._warned_no_kv = False
        for role, urls in (("prefill", c.prefill), ("decode", c.decode), ("collocated", c.instances)):
            for url in urls:
                self._register(url, role, c.kv_events.get(url))

    # -- state ------------------------------------------------------------------------------
    @property
    def health_checked(self) -> bool:
        return self.config.health_interval > 0

    def now(self) -> float:
        return (self._loop or asyncio.get_event_loop()).time()

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def _register(self, url: str, role: str, kv_endpoint: str | None) -> Instance:
        c = self.config
        inst = Instance(url, role, kv_endpoint, CircuitBreaker(c.breaker_failures, c.breaker_cooldown))
        self.registry.add(inst)
        self.loads.add(url, role)
        self.index.add_instance(url, events=bool(kv_endpoint))
        if kv_endpoint:
            self.subscribers[url] = KVEventSubscriber(url, kv_endpoint, self.index, c.block_size, c.kv_topic,
                                                      self._on_kv_event)
            if self._loop is not None:
                self.subscribers[url].start()
        return inst

    async def _unregister(self, url: str) -> Instance:
        inst = self.registry.remove(url)
        sub = self.subscribers.pop(url, None)
        if sub is not None:
            await sub.stop()
        self.index.remove_instance(url)
        self.loads.remove(url)  # tickets in flight keep their own reference
        return inst

    def _on_kv_event(self, instance: str, kind: str) -> None:
        self.metrics.kv_events.labels(instance, kind).inc()

    # -- lifecycle --------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_endpoint)
        app.router.add_get("/admin/instances", self.admin_list)
        app.router.add_post("/admin/instances", self.admin_add)
        app.router.add_delete("/admin/instances", self.admin_remove)
        return app

    async def start(self) -> "ProxyServer":
        self._loop = asyncio.get_running_loop()
        c = self.config
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=c.connect_timeout)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=30), timeout=timeout,
            auto_decompress=False)
        for sub in self.subscribers.values():
            sub.start()
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._server = await self._loop.create_server(self._runner.server, c.host, c.port, reuse_address=True, backlog=4096)
        if c.port == 0:
            c.port = self._server.sockets[0].getsockname()[1]
        self._tasks.append(self._loop.create_task(self._housekeeping(), name="proxy-housekeeping"))
        if self.health_checked:
            self._tasks.append(self._loop.create_task(self._health_loop(), name="proxy-health"))
        log.info("omni-proxy serve: %s mode, policy %s, listening on %s", c.mode, c.policy, self.url)
        return self

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for sub in self.subscribers.values():
            await sub.stop()
        if self.session is not None:
            await self.session.close()

    async def _housekeeping(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(0.1)
            ticks += 1
            self._kick()
            if ticks % 10 == 0:
                self.index.expire(self.now())

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await asyncio.gather(*(self._probe(i) for i in list(self.registry.instances.values())))
            self._kick()

    async def _probe(self, inst: Instance) -> None:
        ok = False
        try:
            async with self.session.get(inst.url + "/health",
                                        timeout=aiohttp.ClientTimeout(total=self.config.health_timeout)) as r:
                ok = r.status == 200
                if not ok:
                    inst.last_error = f"health check answered {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            inst.last_error = f"health check failed: {type(exc).__name__} {exc}"
        inst.last_health_ok = ok
        if ok:
            inst.breaker.record_success(self.now(), from_health=True)
        else:
            inst.breaker.record_failure(self.now())

    def _kick(self) -> None:
        now = self.now()
        for q in self.queues.values():
            if q.waiters:
                q.kick(now)

    # -- routing ----------------------------------------------------------------------------
    def _state(self) -> ClusterState:
        return ClusterState(self.loads, self.index, self.config.block_size, self.now())

    def _why_none(self, role: str, exclude: set[str]) -> str:
        insts = self.registry.of_role(role)
        if not insts:
            return f"no {role} instance is registered"
        parts = []
        for i in insts:
            if i.url in exclude:
                parts.append(f"{i.url} failed this request")
            else:
                parts.append(f"{i.url} circuit {i.breaker.state}" + (f" ({i.last_error})" if i.last_error else ""))
        return f"no usable {role} instance: " + "; ".join(parts)

    async def _place(self, stage: str, ctx: _Ctx, exclude: set[str], prefill_work: bool) -> tuple[Choice, Ticket]:
        choose = {"prefill": self.policy.choose_prefill, "decode": self.policy.choose_decode,
                  "collocated": self.policy.choose_collocated}[stage]
        info = ctx.info
        bs = self.config.block_size

        def try_place():
            state = self._state()
            candidates = [u for u in self.registry.usable(stage, state.now, self.health_checked) if u not in exclude]
            if not candidates:
                raise NoInstance(self._why_none(stage, exclude))
            choice = choose(info, candidates, state)
            if choice is None:
                return None
            work = choice.uncached_tokens(info, bs) if prefill_work else 0
            return choice, self.loads.acquire(choice.instance, work, info.prompt_tokens, state.now, info.max_tokens)

        def held():
            return self.policy.held(stage, info, self._state())

        queue = self.queues["decode" if stage == "decode" else ("prefill" if stage == "prefill" else "collocated")]
        choice, ticket = await queue.place(held, try_place, self.config.queue_timeout, self.now(),
                                           on_orphan=lambda placed: self._release(placed[1]))
        self.metrics.decisions.labels(stage, choice.instance, choice.reason).inc()
        if info.block_keys:
            self.index.insert_approx(choice.instance, info.block_keys, self.now())
        if stage != "decode" or prefill_work:
            self.metrics.prompt_tokens.inc(info.prompt_tokens)
            self.metrics.matched_tokens.inc(min(info.prompt_tokens, choice.matched_blocks * bs))
        return choice, ticket

    def _release(self, ticket: Ticket) -> None:
        ticket.release(self.now())
        self._kick()

    def _failed(self, failure: AttemptFailed) -> None:
        self.metrics.upstream_errors.labels(failure.instance, failure.kind).inc()
        inst = self.registry.instances.get(failure.instance)
        if inst is not None:
            inst.last_error = str(failure)
            inst.breaker.record_failure(self.now())

    def _succeeded(self, instance: str) -> None:
        inst = self.registry.instances.get(instance)
        if inst is not None:
            inst.breaker.record_success(self.now())

    # -- upstream calls ---------------------------------------------------------------------
    async def _post(self, ctx: _Ctx, instance: str, payload: bytes, timeout: float) -> aiohttp.ClientResponse:
        """POST and wait for the response headers; connection problems become AttemptFailed."""
        try:
            return await asyncio.wait_for(
                self.session.post(instance + ctx.path, data=payload,
                                  headers={"Content-Type": "application/json", "X-Request-Id": ctx.rid}),
                timeout)
        except asyncio.TimeoutError:
            raise AttemptFailed(instance, "timeout", f"no response within {timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise AttemptFailed(instance, "connect", f"{type(exc).__name__}: {exc}") from None

    async def _check_status(self, instance: str, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            body = await asyncio.wait_for(resp.read(), 10)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            body = b""
        if resp.status >= 500:
            text = body.decode("utf-8", "replace")[:300]
            raise AttemptFailed(instance, "http_5xx", f"answered {resp.status}: {text}")
        raise UpstreamRejected(resp.status, body, resp.content_type or "application/json")

    async def _prefill_once(self, ctx: _Ctx, instance: str, payload: bytes) -> dict | None:
        timeout = self.config.first_byte_timeout
        resp = await self._post(ctx, instance, payload, timeout)
        try:
            await self._check_status(instance, resp)
            try:
                data = await asyncio.wait_for(resp.read(), timeout)
            except asyncio.TimeoutError:
                raise AttemptFailed(instance, "timeout", f"prefill response not complete within {timeout:g} s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AttemptFailed(instance, "broken", f"prefill response broken: {type(exc).__name__}: {exc}") from None
            try:
                doc = json.loads(data)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise AttemptFailed(instance, "bad_response", f"prefill answer is not JSON: {data[:80]!r}") from None
            params = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
            return params if isinstance(params, dict) else None
        finally:
            resp.close()

    async def _forward(self, ctx: _Ctx, instance: str, payload: bytes, ticket: Ticket) -> web.StreamResponse:
        """Send to one instance and relay the answer; AttemptFailed only before the first byte."""
        c = self.config
        attempt_t0 = self.now()
        resp = await self._post(ctx, instance, payload, c.first_byte_timeout if ctx.stream else c.request_timeout)
        clean = False
        try:
            await self._check_status(instance, resp)
            streaming = ctx.stream and resp.content_type == "text/event-stream"
            if not streaming:
                try:
                    data = await asyncio.wait_for(resp.read(), c.request_timeout)
                except asyncio.TimeoutError:
                    raise AttemptFailed(instance, "timeout", f"response not complete within {c.request_timeout:g} s") from None
                except (aiohttp.ClientError, OSError) as exc:
                    raise AttemptFailed(instance, "broken", f"response broken: {type(exc).__name__}: {exc}") from None
                clean = True
                ticket.prefill_done(self.now())  # bookkeeping only: the whole latency is not prefill time
                self._succeeded(instance)
                return web.Response(body=data, status=resp.status, content_type=resp.content_type,
                                    headers={"X-Request-Id": ctx.rid})
            elapsed = self.now() - attempt_t0
            try:
                first = await asyncio.wait_for(resp.content.readany(), max(0.001, c.first_byte_timeout - elapsed))
            except asyncio.TimeoutError:
                raise AttemptFailed(instance, "timeout", f"no first token within {c.first_byte_timeout:g} s") from None
            except (aiohttp.ClientError, OSError) as exc:
                raise AttemptFailed(instance, "broken", f"stream broke before the first token: {type(exc).__name__}: {exc}") from None
            if not first:
                raise AttemptFailed(instance, "broken", "stream ended before the first token")
            # From here on the client has bytes: no retry any more.
            now = self.now()
            self.policy.on_first_token(ticket, now)
            self._succeeded(instance)
            ctx.ttft = now - ctx.t0
            self.metrics.ttft.observe(ctx.ttft)
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                              "X-Request-Id": ctx.rid})
            try:
                await out.prepare(ctx.request)
                await out.write(first)
                chunks = first.count(b"data: ")
                ticket.grow(chunks)
                tail = first[-64:]
                broken: str | None = None
                while True:
                    try:
                        chunk = await asyncio.wait_for(resp.content.readany(), c.idle_timeout)
                    except asyncio.TimeoutError:
                        broken = f"no data for {c.idle_timeout:g} s"
                        break
                    except (aiohttp.ClientError, OSError) as exc:
                        broken = f"{type(exc).__name__}: {exc}"
                        break
                    if not chunk:
                        break
                    await out.write(chunk)
                    n = chunk.count(b"data: ")
                    chunks += n
                    ticket.grow(n)
                    tail = (tail + chunk)[-64:]
                if broken is None and b"[DONE]" not in tail:
                    broken = "stream ended without [DONE]"
                if broken is not None:
                    failure = AttemptFailed(instance, "stream_broken", broken)
                    self._failed(failure)
                    ctx.outcome = "stream_error"
                    await out.write(sse_event(error_body(f"upstream {instance} failed mid-stream: {broken}", 502,
                                                         "upstream_error")))
                    await out.write(SSE_DONE)
                else:
                    clean = True
                    tokens = chunks - 1
                    if tokens > 1:
                        self.metrics.tpot.observe((self.now() - ctx.t0 - ctx.ttft) / (tokens - 1))
                    usage = isinstance(ctx.body.get("stream_options"), dict) and ctx.body["stream_options"].get("include_usage")
                    self.policy.on_complete(ticket, tokens - (1 if usage else 0), self.now())
                await out.write_eof()
                return out
            except ConnectionResetError:
                # the client left mid-stream: close the upstream (finally) so the instance aborts
                ctx.outcome = "client_gone"
                clean = False
                return out
        finally:
            if clean:
                resp.release()
            else:
                resp.close()  # the instance sees the connection go and aborts the request

    # -- serving ----------------------------------------------------------------------------
    async def _serve_stage(self, ctx: _Ctx, stage: str, kv_params: dict | None = None) -> web.StreamResponse:
        """Serve from ``stage`` ("collocated" or "decode") with retries on other instances."""
        tried: set[str] = set()
        failures: list[AttemptFailed] = []
        base = None
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.metrics.retries.labels(stage).inc()
            if stage == "collocated":
                payload = ctx.raw
            else:
                if base is None:
                    base = {k: v for k, v in ctx.body.items() if k != "kv_transfer_params"}
                doc = dict(base, kv_transfer_params=kv_params) if kv_params is not None else base
                payload = json.dumps(doc).encode()
            try:
                choice, ticket = await self._place(stage, ctx, tried, prefill_work=kv_params is None)
            except NoInstance:
                if failures:
                    break
                raise
            try:
                return await self._forward(ctx, choice.instance, payload, ticket)
            except AttemptFailed as failure:
                self._failed(failure)
                self.policy.on_failure(ticket, failure.kind, self.now())
                failures.append(failure)
                tried.add(choice.instance)
                if kv_params is not None:
                    kv_params = None  # possibly consumed by the failed attempt: decode-only from now on
                    self.metrics.fallbacks.labels("decode_retry").inc()
            finally:
                self._release(ticket)
        raise AllAttemptsFailed(f"{len(failures)} attempt(s) failed: " + "; ".join(str(f) for f in failures))

    async def _prefill(self, ctx: _Ctx) -> dict | None:
        """Run the PD prefill; the kv_transfer_params to hand to decode, or None (decode-only)."""
        doc = dict(ctx.body)
        doc.pop("stream_options", None)
        doc.pop("min_tokens", None)
        doc.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_KV_PARAMS))
        if "max_completion_tokens" in doc:
            doc["max_completion_tokens"] = 1
        payload = json.dumps(doc).encode()
        tried: set[str] = set()
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.metrics.retries.labels("prefill").inc()
            try:
                choice, ticket = await self._place("prefill", ctx, tried, prefill_work=True)
            except NoInstance:
                self.metrics.fallbacks.labels("no_prefill_instance" if not tried else "prefill_failed").inc()
                return None
            except NoCapacity:
                self.metrics.fallbacks.labels("prefill_queue_timeout").inc()
                return None
            try:
                params = await self._prefill_once(ctx, choice.instance, payload)
                self.policy.on_prefill_answer(ticket, self.now())
                self._succeeded(choice.instance)
                if params is None:
                    self.metrics.fallbacks.labels("no_kv_transfer_params").inc()
                    if not self._warned_no_kv:
                        self._warned_no_kv = True
                        log.warning("prefill %s returned no kv_transfer_params (no KV connector?): serving "
                                    "decode-only", choice.instance)
                return params
            except AttemptFailed as failure:
                self._failed(failure)
                self.policy.on_failure(ticket, failure.kind, self.now())
                tried.add(choice.instance)
            finally:
                self._release(ticket)
        self.metrics.fallbacks.labels("prefill_failed").inc()
        return None

    async def _serve_pd(self, ctx: _Ctx) -> web.StreamResponse:
        state = self._state()
        decodes = self.registry.usable("decode", state.now, self.health_checked)
        prefills = self.registry.usable("prefill", state.now, self.health_checked)
        if self.policy.bypass_prefill(ctx.info, decodes, state, prefills):
            self.metrics.decisions.labels("bypass", "-", "short_uncached_prompt").inc()
            return await self._serve_stage(ctx, "decode", None)
        params = await self._prefill(ctx)
        return await self._serve_stage(ctx, "decode", params)

    async def _completion(self, request: web.Request, chat: bool) -> web.StreamResponse:
        endpoint = "chat" if chat else "completions"
        t0 = self.now()
        outcome = "error"
        ctx = None
        try:
            if request.content_length is not None and request.content_length > self.config.max_body_bytes:
                raise RequestError(f"request body is {request.content_length} bytes, over the limit of "
                                   f"{self.config.max_body_bytes} bytes (--max-body-bytes)", 413)
            try:
                raw = await request.read()
            except web.HTTPRequestEntityTooLarge:
                raise RequestError(f"request body is over the limit of {self.config.max_body_bytes} bytes "
                                   f"(--max-body-bytes)", 413) from None
            body = parse_json_body(raw)
            validate_request(body, chat)
            rid = request.headers.get("X-Request-Id") or f"omni-{uuid.uuid4().hex}"
            ids = self.tokenizer.prompt_ids(body, chat)
            keys = self.hasher.keys(ids) if self.policy.uses_prefix_index else ()
            info = RequestInfo(rid, len(ids), max_tokens_of(body, self.config.default_max_tokens), keys, t0)
            ctx = _Ctx(request, body, raw, chat, rid, info, t0)
            if self.config.mode == "pd":
                response = await self._serve_pd(ctx)
            else:
                response = await self._serve_stage(ctx, "collocated")
            outcome = ctx.outcome
            if outcome == "ok":
                self.metrics.e2e.observe(self.now() - t0)
                if not ctx.stream:
                    self.metrics.ttft.observe(self.now() - t0)
            return response
        except RequestError as exc:
            outcome = "client_error"
            return _error(exc.message, exc.status, param=exc.param)
        except UpstreamRejected as exc:
            outcome = "upstream_4xx"
            return web.Response(body=exc.body, status=exc.status, content_type=exc.content_type)
        except NoInstance as exc:
            outcome = "no_instance"
            return _error(str(exc), 503, "service_unavailable")
        except NoCapacity as exc:
            outcome = "no_capacity"
            return _error(str(exc), 503, "service_unavailable")
        except AllAttemptsFailed as exc:
            outcome = "upstream_error"
            return _error(f"upstream failed: {exc}", 502, "upstream_error")
        except (asyncio.CancelledError, ConnectionResetError):
            outcome = "client_gone"
            raise
        finally:
            self.metrics.requests.labels(endpoint, outcome).inc()

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._completion(request, chat=True)

    # -- plain endpoints --------------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        now = self.now()
        order = ("collocated", "decode", "prefill")
        urls = [u for role in order for u in self.registry.usable(role, now, self.health_checked)]
        for url in urls:
            try:
                async with self.session.get(url + "/v1/models", timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status == 200:
                        return web.Response(body=await r.read(), status=200, content_type="application/json")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                continue
        return _error("no instance answered /v1/models", 503, "service_unavailable")

    def _serviceable(self, now: float) -> bool:
        role = "decode" if self.config.mode == "pd" else "collocated"
        return bool(self.registry.usable(role, now, self.health_checked))

    async def health(self, request: web.Request) -> web.Response:
        now = self.now()
        usable = {role: self.registry.usable(role, now, self.health_checked) for role in ("prefill", "decode", "collocated")}
        ok = self._serviceable(now)
        return _json({"status": "ok" if ok else "unavailable", "mode": self.config.mode,
                      "usable": {k: v for k, v in usable.items() if v or self.registry.of_role(k)}},
                     200 if ok else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -- admin ------------------------------------------------------------------------------
    def _admin_denied(self, request: web.Request) -> web.Response | None:
        token = self.config.admin_token
        if not token:
            return _error("admin endpoints are disabled: start omni-proxy serve with --admin-token "
                          "(or OMNI_PROXY_ADMIN_TOKEN)", 403, "permission_error")
        given = request.headers.get("Authorization", "")
        if not given.startswith("Bearer ") or not hmac.compare_digest(given[7:].encode(), token.encode()):
            return _error("admin endpoints need the header 'Authorization: Bearer <admin token>'", 401,
                          "authentication_error")
        return None

    def _describe(self, inst: Instance) -> dict[str, Any]:
        load = self.loads.instances.get(inst.url)
        return {"url": inst.url, "role": inst.role, "kv_events": inst.kv_endpoint, "breaker": inst.breaker.state,
                "last_health_ok": inst.last_health_ok, "last_error": inst.last_error,
                "running": load.running if load else 0, "prefill_tokens": load.prefill_tokens if load else 0,
                "kv_tokens": load.kv_tokens if load else 0, "index_blocks": self.index.size(inst.url),
                "prefill_model": {"intercept_s": load.model.intercept, "slope_s_per_token": load.model.slope,
                                  "observations": load.model.observations} if load else None}

    async def admin_list(self, request: web.Request) -> web.Response:
        denied = self._admin_denied(request)
        if denied:
            return denied
        return _json({"mode": self.config.mode, "policy": self.policy.describe(),
                      "instances": [self._describe(i) for i in self.registry.instances.values()],
                      "held": {k: len(q) for k, q in self.queues.items()}})

    async def _admin_body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = parse_json_body(await request.read())
        except RequestError:
            body = {}
        if not body and request.query.get("url"):
            body = dict(request.query)
        return body

    async def admin_add(self, request: web.Request) -> web.Response:
        denied = self._admin_denied(request)
        if denied:
            return denied
        body = await self._admin_body(request)
        roles = ("prefill", "decode") if self.config.mode == "pd" else ("collocated",)
        role = body.get("role", roles[0] if len(roles) == 1 else None)
        if role not in roles:
            return _error(f"field 'role' must be one of {', '.join(roles)} in {self.config.mode} mode, got {role!r}",
                          400, param="role")
        kv_endpoint = body.get("kv_events")
        if kv_endpoint is not None and (not isinstance(kv_endpoint, str) or not kv_endpoint.startswith(("tcp://", "ipc://"))):
            return _error(f"field 'kv_events' must be a ZMQ address like tcp://HOST:PORT, got {kv_endpoint!r}", 400,
                          param="kv_events")
        try:
            url = normalize_url(str(body.get("url", "")))
            inst = self._register(url, role, kv_endpoint)
        except ValueError as exc:
            return _error(str(exc), 400, param="url")
        self._kick()
        return _json(self._describe(inst), 201)

    async def admin_remove(self, request: web.Request) -> web.Response:
        denied = self._admin_denied(request)
        if denied:
            return denied
        body = await self._admin_body(request)
        try:
            url = normalize_url(str(body.get("url", "")))
            inst = await self._unregister(url)
        except ValueError as exc:
            return _error(str(exc), 400, param="url")
        except KeyError as exc:
            return _error(str(exc.args[0]), 404, param="url")
        return _json({"removed": inst.url, "role": inst.role})
