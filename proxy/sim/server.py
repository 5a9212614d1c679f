"""One simulated vLLM instance: OpenAI HTTP API, PD protocol, KV events on ZMQ, faults.

Speaks what the proxy speaks to vLLM: ``/v1/completions`` and ``/v1/chat/completions``
(streaming and not; ``n``, list prompts, ``stop``; 404 for another model name), ``/v1/responses``
(stored per instance, ``previous_response_id``), ``/tokenize``, ``/detokenize``, ``/version``,
``/v1/models``, ``/health``, ``/metrics``, ``/reset_prefix_cache``, the ``X-Request-Id`` header,
and vLLM's disaggregation fields: a request with ``kv_transfer_params.do_remote_decode`` is a PD
prefill whose response returns ``kv_transfer_params`` (``do_remote_prefill``,
``remote_engine_id``, ``remote_host``, ``remote_port``, ``remote_request_id``,
``remote_block_ids``); a request carrying those pulls the KV from that prefill instance
(``POST /sim/kv/pull``) instead of prefilling, and recomputes the prompt when the KV is not
there any more.

Simulator-only endpoints: ``GET /sim/stats``, ``GET|POST /sim/faults`` (see
``proxy.sim.faults``), ``GET /sim/requests/{id}`` (what a request produced), ``POST /sim/kv/pull``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from typing import Any

import aiohttp
from aiohttp import web

from proxy.sim.engine import SimEngine, SimRequest
from proxy.sim.faults import FaultPlan
from proxy.sim.generate import Generation, check_lengths, error, fault_answer, model_error, reset, stops_of
from proxy.sim.profile import SimProfile
from proxy.sim.responses import Stored, answer_response
from proxy.wire import kv_events as kv
from proxy.wire.openai import RequestError, max_tokens_of, parse_json_body, validate_request
from proxy.wire.text import render_chat
from proxy.wire.tokens import make_tokenizer
from scheduling.block_hash import to_key

log = logging.getLogger("omni_proxy.sim")

ROLES = ("prefill", "decode", "collocated")
LARGE_BODY = 1 << 20
_LOCAL: dict[str, "SimInstance"] = {}  # engine id -> instance, for in-process KV pulls


def _json(document: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(document).encode(), status=status, content_type="application/json")


class KVPublisher:
    """ZMQ PUB socket sending vLLM KV event batches: frames (topic, seq, msgpack batch)."""

    def __init__(self, endpoint: str, topic: str = "", int_hashes: bool = False):
        import zmq

        self._zmq = zmq
        self.socket = zmq.Context.instance().socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.set_hwm(100_000)
        if endpoint.endswith(":0"):  # any free port
            port = self.socket.bind_to_random_port(endpoint[: -len(":0")])
            endpoint = f"{endpoint[: -len(':0')]}:{port}"
        else:
            self.socket.bind(endpoint)
        self.endpoint = endpoint
        self.topic = topic.encode()
        self.int_hashes = int_hashes
        self.seq = 0

    def publish(self, events: list[kv.Event]) -> None:
        if self.int_hashes:
            for e in events:
                if isinstance(e, (kv.BlockStored, kv.BlockRemoved)):
                    e.block_hashes = [to_key(h) for h in e.block_hashes]
                if isinstance(e, kv.BlockStored) and e.parent_block_hash is not None:
                    e.parent_block_hash = to_key(e.parent_block_hash)
        batch = kv.EventBatch(ts=time.time(), events=events, data_parallel_rank=0)
        try:
            self.socket.send_multipart(kv.frames(self.topic, self.seq, batch), flags=self._zmq.NOBLOCK)
        except self._zmq.Again:
            pass  # PUB at its high-water mark drops, as vLLM's publisher does
        self.seq += 1

    def close(self) -> None:
        self.socket.close(linger=0)


class SimInstance:
    def __init__(
        self,
        port: int,
        role: str = "collocated",
        profile: SimProfile | None = None,
        model: str = "sim-model",
        host: str = "127.0.0.1",
        kv_events_port: int | None = None,
        kv_topic: str = "",
        faults: FaultPlan | None = None,
        tokenizer=None,
    ):
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        self.port = port
        self.role = role
        self.profile = profile or SimProfile()
        self.model = model
        self.host = host
        self.kv_events_port = kv_events_port
        self.kv_topic = kv_topic
        self.faults = faults or FaultPlan()
        self.tokenizer = tokenizer or make_tokenizer(None, self.profile.chars_per_token)
        self.responses_store: Stored = OrderedDict()
        self._pieces: OrderedDict[int, str] = OrderedDict()  # char-block id -> its text (for /detokenize)
        self.engine: SimEngine | None = None
        self.publisher: KVPublisher | None = None
        self.refusing_until = 0.0
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._session: aiohttp.ClientSession | None = None
        self._created = int(time.time())
        self._refuse_task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def engine_id(self) -> str:
        return f"sim-{self.host}:{self.port}"

    @property
    def kv_endpoint(self) -> str | None:
        return self.publisher.endpoint if self.publisher else None

    # -- lifecycle --------------------------------------------------------------------------
    def build_app(self) -> web.Application:
        app = web.Application(client_max_size=256 * 1024 * 1024)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/reset_prefix_cache", self.reset_prefix_cache)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/v1/responses/{id}", self.response_get)
        app.router.add_post("/v1/responses/{id}/cancel", self.response_cancel)
        app.router.add_post("/sim/kv/pull", self.kv_pull)
        app.router.add_get("/sim/stats", self.stats)
        app.router.add_get("/sim/faults", self.get_faults)
        app.router.add_post("/sim/faults", self.set_faults)
        app.router.add_get("/sim/requests/{rid}", self.request_record)
        return app

    async def start(self) -> "SimInstance":
        if self.kv_events_port is not None:
            self.publisher = KVPublisher(f"tcp://{self.host}:{self.kv_events_port}", self.kv_topic,
                                         self.profile.int_block_hashes)
            self.kv_events_port = int(self.publisher.endpoint.rsplit(":", 1)[1])
        self.engine = SimEngine(self.profile, self.publisher.publish if self.publisher else None)
        self.engine.slowdown = self.faults.slowdown
        self.engine.start()
        self._runner = web.AppRunner(self.build_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await self._listen()
        _LOCAL[self.engine_id] = self
        return self

    async def _listen(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._runner.server, self.host, self.port,
                                                reuse_address=True, backlog=2048)
        if self.port == 0:
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        _LOCAL.pop(self.engine_id, None)
        if self._refuse_task is not None:
            self._refuse_task.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
        if self.engine is not None:
            await self.engine.stop()
        if self._session is not None:
            await self._session.close()
        if self.publisher is not None:
            self.publisher.close()

    async def refuse_for(self, seconds: float) -> None:
        """Stop listening (connections refused) for ``seconds``; reset requests meanwhile."""
        loop = asyncio.get_running_loop()
        self.refusing_until = loop.time() + seconds
        self.faults.injected["refuse"] += 1
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._refuse_task is not None:
            self._refuse_task.cancel()

        async def reopen() -> None:
            await asyncio.sleep(seconds)
            self.refusing_until = 0.0
            await self._listen()

        self._refuse_task = loop.create_task(reopen())

    def _refusing(self) -> bool:
        return self.refusing_until > 0.0

    # -- plain endpoints --------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.StreamResponse:
        if self._refusing():
            return await reset(request)
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [{
            "id": self.model, "object": "model", "created": self._created, "owned_by": "omni-sim",
            "root": self.model, "parent": None, "max_model_len": self.profile.max_model_len}]})

    async def metrics(self, request: web.Request) -> web.Response:
        s = self.engine.stats()
        label = f'{{model_name="{self.model}",role="{self.role}"}}'
        lines = [
            f"vllm:num_requests_running{label} {s['running']}",
            f"vllm:num_requests_waiting{label} {s['waiting']}",
            f"omni_sim:free_blocks{label} {s['free_blocks']}",
            f"omni_sim:busy_seconds_total{label} {s['busy_s']}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def stats(self, request: web.Request) -> web.Response:
        return _json({"role": self.role, "engine_id": self.engine_id, **self.engine.stats(),
                      "faults_injected": dict(self.faults.injected)})

    async def get_faults(self, request: web.Request) -> web.Response:
        return _json(self.faults.to_dict())

    async def set_faults(self, request: web.Request) -> web.Response:
        try:
            changes = json.loads(await request.read())
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object of fault fields")
            self.faults.update(changes)
        except (ValueError, json.JSONDecodeError) as exc:
            return error(str(exc), 400)
        self.engine.slowdown = self.faults.slowdown
        refuse = changes.get("refuse_s")
        if refuse:
            # answer first, then close the socket
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self.refuse_for(float(refuse))))
        return _json(self.faults.to_dict())

    async def request_record(self, request: web.Request) -> web.Response:
        record = self.engine.records.get(request.match_info["rid"])
        if record is None:
            return error(f"no record of request {request.match_info['rid']!r}", 404)
        return _json(record)

    async def reset_prefix_cache(self, request: web.Request) -> web.Response:
        self.engine.reset_prefix_cache()
        return web.Response(status=200)

    async def kv_pull(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        held = self.engine.pull(str(body.get("request_id")))
        if held is None:
            return error(f"engine {self.engine_id} holds no KV for request {body.get('request_id')!r}", 404)
        return _json({"prompt_tokens": held.prompt_len})

    # -- tokenizer endpoints --------------------------------------------------------------------
    async def _openai_body(self, request: web.Request, chat: bool | None) -> tuple[bytes, dict, bool] | web.Response:
        """Read, parse and validate an OpenAI request body and check its model: ``(raw, body,
        chat)``, or the error response vLLM would give. ``chat=None``: chat iff it has ``messages``."""
        try:
            raw = await request.read()
            body = parse_json_body(raw)
            chat = "messages" in body if chat is None else chat
            validate_request(body, chat)
        except RequestError as exc:
            return error(exc.message, exc.status, param=exc.param)
        wrong = model_error(body, self.model)
        return wrong if wrong is not None else (raw, body, chat)

    async def tokenize(self, request: web.Request) -> web.Response:
        parsed = await self._openai_body(request, None)
        if isinstance(parsed, web.Response):
            return parsed
        _, body, chat = parsed
        ids = self.tokenizer.prompt_ids(body, chat)
        if not hasattr(self.tokenizer, "decode"):
            self._learn(body, chat, ids)
        return _json({"count": len(ids), "max_model_len": self.profile.max_model_len, "tokens": ids, "token_strs": None})

    def _learn(self, body: dict[str, Any], chat: bool, ids: list[int]) -> None:
        """Remember which text each char-block id stands for, so /detokenize can answer."""
        text = render_chat(body["messages"]) if chat else body["prompt"]
        if isinstance(text, str):
            step = self.profile.chars_per_token
            for k, token in enumerate(ids):
                self._pieces[token] = text[k * step:(k + 1) * step]
            while len(self._pieces) > 100_000:
                self._pieces.popitem(last=False)

    async def detokenize(self, request: web.Request) -> web.Response:
        try:
            body = parse_json_body(await request.read())
        except RequestError as exc:
            return error(exc.message, exc.status)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return error(f"field 'tokens' must be a list of token ids, got {tokens!r:.60}", 400, param="tokens")
        wrong = model_error(body, self.model)
        if wrong:
            return wrong
        if hasattr(self.tokenizer, "decode"):
            return _json({"prompt": self.tokenizer.decode(tokens)})
        unknown = [t for t in tokens if t not in self._pieces]
        if unknown:
            return error(f"token id(s) {unknown[:5]} unknown to this instance's character-block tokenizer", 400,
                         param="tokens")
        return _json({"prompt": "".join(self._pieces[t] for t in tokens)})

    async def version(self, request: web.Request) -> web.Response:
        return _json({"version": f"omni-sim {self.engine_id}"})

    # -- generation -------------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _prompts(self, body: dict[str, Any], chat: bool, size: int) -> list[list[int]]:
        if size < LARGE_BODY:
            return self.tokenizer.prompts(body, chat)
        # a large prompt: tokenize in a thread so the instance keeps answering probes meanwhile
        return await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.prompts, body, chat)

    async def _generate(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self._refusing():
            return await reset(request)
        parsed = await self._openai_body(request, chat)
        if isinstance(parsed, web.Response):
            return parsed
        raw, body, _ = parsed
        rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
        stream = bool(body.get("stream"))
        fault = self.faults.draw()
        answer = fault_answer(fault, stream)
        if answer is not None:
            return answer
        if fault == "stall":
            await asyncio.Event().wait()  # until the client goes away
        p = self.profile
        max_tokens = max_tokens_of(body, p.default_max_tokens)
        if hasattr(self.tokenizer, "longest") and self.tokenizer.longest(body, chat) + max_tokens > p.max_model_len:
            prompts = [[0] * self.tokenizer.longest(body, chat)]  # over the limit: no need to tokenize it
        else:
            prompts = await self._prompts(body, chat, len(raw))
        too_long = check_lengths(p, prompts, max_tokens)
        if too_long:
            return too_long
        gen = Generation(self.engine, self.faults, self.model, request, rid, body, chat, prompts,
                         fault)
        params = body.get("kv_transfer_params")
        if params is not None and not isinstance(params, dict):
            return error(f"field 'kv_transfer_params' must be an object, got {params!r:.60}", 400)
        if params and (gen.n > 1 or len(prompts) > 1):
            return error("kv_transfer_params need a single prompt and n = 1", 400)
        params = params or {}
        remote_decode = bool(params.get("do_remote_decode"))
        kv_ready, kv_source = False, "local"
        if params.get("do_remote_prefill"):
            missing = [k for k in ("remote_engine_id", "remote_host", "remote_port", "remote_request_id") if k not in params]
            if missing:
                return error(f"kv_transfer_params lacks {', '.join(missing)}", 400)
            if await self._pull_remote(params):
                await asyncio.sleep(p.transfer_time(len(prompts[0])) * self.engine.slowdown)
                kv_ready, kv_source = True, "remote"
            else:
                kv_source = "recomputed"  # the KV is gone (or never was): compute the prompt here
        stops = stops_of(body)
        for i, ids in enumerate(prompts):
            for k in range(gen.n):
                req = SimRequest(gen.sub_rid(i * gen.n + k), ids, self.engine.digests_of(ids), max_tokens,
                                 remote_decode, kv_ready, stops)
                req.kv_source = kv_source
                req.kv_params_in = body.get("kv_transfer_params")
                gen.reqs.append(req)
                self.engine.add(req)
        try:
            if stream:
                return await gen.stream()
            return await gen.whole(self._kv_params_out(gen.reqs[0]))
        finally:
            for req in gen.reqs:
                if not req.done:
                    self.engine.abort(req)

    async def _pull_remote(self, params: dict[str, Any]) -> bool:
        rid = str(params["remote_request_id"])
        local = _LOCAL.get(str(params["remote_engine_id"]))
        if local is not None:
            return local.engine.pull(rid) is not None
        url = f"http://{params['remote_host']}:{params['remote_port']}/sim/kv/pull"
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self._session.post(url, json={"request_id": rid}, timeout=aiohttp.ClientTimeout(total=10)) as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    def _kv_params_out(self, req: SimRequest) -> dict[str, Any] | None:
        if not req.remote_decode:
            return None
        return {"do_remote_prefill": True, "do_remote_decode": False, "remote_engine_id": self.engine_id,
                "remote_block_ids": list(range(len(req.digests) + 1)), "remote_host": self.host,
                "remote_port": self.port, "remote_request_id": req.rid, "tp_size": 1}

    # -- responses API ----------------------------------------------------------------------------
    async def responses(self, request: web.Request) -> web.StreamResponse:
        if self._refusing():
            return await reset(request)
        return await answer_response(request, self.engine, self.faults, self.tokenizer, self.model,
                                     self.responses_store)

    async def response_get(self, request: web.Request) -> web.Response:
        stored = self.responses_store.get(request.match_info["id"])
        if stored is None:
            return error(f"Response with id '{request.match_info['id']}' not found.", 404, "NotFoundError", "response_id")
        return _json(stored[0])

    async def response_cancel(self, request: web.Request) -> web.Response:
        if request.match_info["id"] not in self.responses_store:
            return error(f"Response with id '{request.match_info['id']}' not found.", 404, "NotFoundError", "response_id")
        return error("Cannot cancel a synchronous response.", 400)


async def start_instances(ports: list[int], roles: list[str], profile: SimProfile | None = None,
                          model: str = "sim-model", host: str = "127.0.0.1",
                          kv_events_ports: list[int | None] | None = None,
                          faults: list[FaultPlan] | None = None, kv_topic: str = "") -> list[SimInstance]:
    """Start one instance per port in this event loop (for tests, benchmarks and the CLI)."""
    kv_events_ports = kv_events_ports or [None] * len(ports)
    faults = faults or [FaultPlan() for _ in ports]
    out = []
    for port, role, kv_port, plan in zip(ports, roles, kv_events_ports, faults):
        out.append(await SimInstance(port, role, profile, model, host, kv_port, kv_topic, plan).start())
    return out
