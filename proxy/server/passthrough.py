"""The rest of vLLM's OpenAI surface, passed through to an instance.

* ``GET /v1/models``, ``GET /version``, ``POST /tokenize``, ``POST /detokenize``: they generate
  nothing, so any usable instance answers (collocated, else decode, else prefill instances, in
  turn; the next one on failure). The same in PD mode: every instance serves the same model.
* ``POST /v1/responses`` (streaming or not): a generation, routed by the policy like a
  completion, collocated mode only (501 in PD mode: there is no disaggregated protocol for
  it). A request with ``previous_response_id`` goes to the instance that produced that
  response (vLLM stores responses per server), as do ``GET /v1/responses/{id}`` and
  ``POST /v1/responses/{id}/cancel``; the proxy remembers the last ``RESPONSE_IDS`` ids.
"""

from __future__ import annotations

import json
import logging
import re
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from proxy.server.attempts import Call, request_id
from proxy.server.errors import AttemptFailed, UpstreamRejected, client_error
from proxy.server.forward import Forwarder
from proxy.server.front import Answer, Request, Response, Routes
from proxy.server.prepare import Prepared, scrub
from proxy.server.relay import RESPONSES
from proxy.server.routing import Router
from proxy.wire.openai import RequestError, parse_json_body
from proxy.wire.text import content_text
from scheduling.policies import RequestInfo

log = logging.getLogger("omni_proxy")

RESPONSE_IDS = 100_000
_RESPONSE_ID = re.compile(rb'"id"\s*:\s*"(resp_[^"]{1,200})"')


class Passthrough:
    def __init__(self, mode: str, router: Router, forwarder: Forwarder, intake, timeout: float, retries: int,
                 default_max_tokens: int, serve: Callable):
        self.mode = mode
        self.router = router
        self.forwarder = forwarder
        self.upstream = forwarder.upstream
        self.intake = intake
        self.timeout = timeout
        self.retries = retries
        self.default_max_tokens = default_max_tokens
        self.serve = serve  # the server's request wrapper: outcome metrics and error mapping
        self.owners: OrderedDict[str, str] = OrderedDict()  # response id -> instance
        self._turn = 0

    def install(self, routes: Routes) -> None:
        routes.add("GET", "/v1/models", self.models)
        routes.add("GET", "/version", self.version)
        routes.add("POST", "/tokenize", self.tokenize)
        routes.add("POST", "/detokenize", self.detokenize)
        routes.add("POST", "/v1/responses", self.responses)
        routes.add("GET", "/v1/responses/{id}", self.response_get)
        routes.add("POST", "/v1/responses/{id}/cancel", self.response_cancel)

    # -- any instance ---------------------------------------------------------------------------
    def _any(self) -> list[str]:
        """Usable instances to ask, in turn: collocated or decode ones first, prefill ones last."""
        groups = [self.router.usable(role) for role in ("collocated", "decode", "prefill")]
        self._turn += 1
        out = []
        for urls in groups:
            k = self._turn % len(urls) if urls else 0
            out += urls[k:] + urls[:k]
        return out

    async def models(self, request: Request) -> Response:
        return await self._simple(request, "GET", "/v1/models", None, self._any())

    async def version(self, request: Request) -> Response:
        return await self._simple(request, "GET", "/version", None, self._any())

    async def tokenize(self, request: Request) -> Response:
        return await self._simple_post(request, "/tokenize")

    async def detokenize(self, request: Request) -> Response:
        return await self._simple_post(request, "/detokenize")

    async def _simple_post(self, request: Request, path: str) -> Response:
        rid = request_id(request)
        try:
            raw = await self.intake.read_bytes(request)
            body = parse_json_body(raw)
        except RequestError as exc:
            return client_error(exc.message, exc.status, rid, param=exc.param)
        dropped = scrub(body)
        return await self._simple(request, "POST", path, json.dumps(body).encode() if dropped else raw, self._any(), rid)

    async def _simple(self, request: Request, method: str, path: str, payload: bytes | None, urls: list[str],
                      rid: str | None = None) -> Response:
        """One instance's JSON answer, trying the next on failure."""
        rid = rid or request_id(request)
        if not urls:
            return client_error(f"no usable instance to answer {path}", 503, rid, "service_unavailable")
        failures = 0
        for url in urls[: self.retries + 1]:
            try:
                async with self.forwarder.exchanges.open(rid, url, "passthrough") as ex:
                    data, _ = await ex.send(method, path, payload, self.upstream.read_json, self.timeout,
                                            f"answer to {path}")
                    return Answer(ex.resp.status, data, headers=(("X-Request-Id", rid),))
            except UpstreamRejected as exc:
                return Answer(exc.status, exc.body, headers=(("X-Request-Id", rid),))
            except AttemptFailed as failure:
                failures += 1
                log.warning("request %s: %s %s on %s failed: %s: %s", rid, method, path, url, failure.kind, failure.detail)
        return client_error(f"no instance answered {path} ({failures} attempt(s) failed)", 502, rid, "upstream_error")

    # -- responses --------------------------------------------------------------------------------
    async def responses(self, request: Request) -> Response:
        if self.mode == "pd":
            return client_error("/v1/responses is not served in pd mode (vLLM's disaggregation protocol covers "
                                "completions and chat completions only); use a collocated proxy", 501,
                                request_id(request), "not_implemented")
        return await self.serve(request, "responses", self._responses, "/v1/responses")

    async def _responses(self, call: Call) -> Response:
        raw = await self.intake.read_bytes(call.request)
        body = parse_json_body(raw)
        text = _responses_text(body)
        dropped = scrub(body)
        payload = json.dumps(body).encode() if dropped else raw
        stream = bool(body.get("stream"))
        max_tokens = body.get("max_output_tokens") or self.default_max_tokens
        if not self.intake.offloads(len(raw)):
            tokens = len(self.intake.tokenizer.text_ids(text, False))
        else:  # not worth a worker: routing only needs a size here
            tokens = len(text) // 4
        call.prepared = Prepared(stream, int(max_tokens), tokens, b"", payload, None, None, dropped)
        call.info = RequestInfo(call.rid, tokens, int(max_tokens), (), call.t0)
        previous = body.get("previous_response_id")
        pinned = self.owners.get(previous) if isinstance(previous, str) else None
        response = await self.forwarder.serve(call, "collocated", lambda kv: payload, dialect=RESPONSES, pinned=pinned)
        if call.served_by is not None and call.head is not None:
            found = _RESPONSE_ID.search(call.head[:4096])
            if found:
                self.owners[found.group(1).decode()] = call.served_by
                while len(self.owners) > RESPONSE_IDS:
                    self.owners.popitem(last=False)
        return response

    async def response_get(self, request: Request) -> Response:
        return await self._owned(request, "GET", f"/v1/responses/{request.match_info['id']}")

    async def response_cancel(self, request: Request) -> Response:
        return await self._owned(request, "POST", f"/v1/responses/{request.match_info['id']}/cancel")

    async def _owned(self, request: Request, method: str, path: str) -> Response:
        rid = request_id(request)
        if self.mode == "pd":
            return client_error("/v1/responses is not served in pd mode", 501, rid, "not_implemented")
        owner = self.owners.get(request.match_info["id"])
        if owner is None:
            return client_error(f"response {request.match_info['id']!r} was not produced through this proxy", 404,
                                rid, "NotFoundError", "response_id")
        if owner not in self.router.usable("collocated"):
            return client_error("the instance holding this response is not usable now", 503, rid, "service_unavailable")
        return await self._simple(request, method, path, b"{}" if method == "POST" else None, [owner], rid)


def _responses_text(body: dict[str, Any]) -> str:
    """The text of a Responses API request (instructions and input), for routing's size estimate."""
    if "input" not in body:
        raise RequestError("field 'input' is required for /v1/responses", param="input")
    items = body["input"]
    if isinstance(items, str):
        parts = [items]
    elif isinstance(items, list):
        parts = []
        for k, item in enumerate(items):
            if not isinstance(item, dict):
                raise RequestError(f"input[{k}] must be an object, got {item!r:.60}", param=f"input[{k}]")
            content = item.get("content")
            parts.append(content_text(content) if content is not None else str(item.get("output", "")))
    else:
        raise RequestError(f"field 'input' must be a string or a list of items, got {items!r:.60}", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError(f"field 'instructions' must be a string, got {instructions!r:.60}", param="instructions")
    for name in ("stream", "store"):
        if body.get(name) is not None and not isinstance(body[name], bool):
            raise RequestError(f"field '{name}' must be true or false, got {body[name]!r}", param=name)
    value = body.get("max_output_tokens")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise RequestError(f"field 'max_output_tokens' must be a positive integer, got {value!r}", param="max_output_tokens")
    return (instructions or "") + "".join(parts)
