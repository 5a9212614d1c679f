"""How a simulated instance answers a generation: completions, chat completions, responses.

As vLLM 0.32 does: every prompt of a request (completions take a list) times ``n`` sequences,
choice ``index = prompt * n + k``; ``best_of`` is ignored (vLLM 0.32 dropped it and logs the
field as ignored); ``stop`` strings end a sequence with ``finish_reason: "stop"`` and its text
cut before the string (streams hold back what could still become one); ``usage`` counts each
prompt once and every sequence's tokens. Faults (``proxy.sim.faults``) are applied here.

A generation gets what it works with (the engine, the fault plan, the model name), not the
server that hosts them; what a fault does to the connection (:func:`reset`, :func:`crash`)
lives here too.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web

from proxy.sim.engine import WORD_JSON, SimEngine, SimRequest
from proxy.sim.faults import FaultPlan
from proxy.sim.profile import SimProfile
from proxy.wire.openai import error_bytes, max_tokens_of

HTML_500 = (b"<html><head><title>500 Internal Server Error</title></head><body><h1>Internal Server Error</h1>"
            b"<p>upstream http://10.0.3.7:8100/v1/completions (pod vllm-7f9c-0.svc.cluster.local) failed;"
            b" see http://grafana.internal:3000/d/vllm</p></body></html>")
GARBAGE = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"


def error(message: str, status: int, kind: str | None = None, param: str | None = None) -> web.Response:
    return web.Response(body=error_bytes(message, status, kind, param), status=status, content_type="application/json")


def model_error(body: dict[str, Any], model: str) -> web.Response | None:
    """vLLM's 404 for a request naming another model (None: the model is ours or not named)."""
    named = body.get("model")
    if named is not None and named != model:
        return error(f"The model `{named}` does not exist. Valid aliases: {model}.", 404, "NotFoundError", "model")
    return None


async def reset(request: web.Request) -> web.StreamResponse:
    """Drop the connection without an answer (what a dead or refusing server looks like)."""
    if request.transport is not None:
        request.transport.abort()
    await asyncio.Event().wait()  # cancelled as the connection goes
    raise AssertionError("unreachable")


async def crash(engine: SimEngine, request: web.Request, reqs: list[SimRequest]) -> web.StreamResponse:
    """The instance dies under these sequences: they are aborted and the connection dropped."""
    for r in reqs:
        engine.abort(r)
        engine.records[r.rid]["status"] = "crashed"
    return await reset(request)


def stops_of(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if not stop:
        return ()
    return (stop,) if isinstance(stop, str) else tuple(stop)


class Generation:
    """The sequences of one request on one instance."""

    def __init__(self, engine: SimEngine, faults: FaultPlan, model: str, request: web.Request, rid: str, body: dict,
                 chat: bool, prompts: list[list[int]], fault: str | None):
        self.engine = engine
        self.faults = faults
        self.model = model
        self.request = request
        self.rid = rid
        self.body = body
        self.chat = chat
        self.prompts = prompts
        self.fault = fault
        self.n = int(body.get("n") or 1)
        self.created = int(time.time())
        self.reqs: list[SimRequest] = []
        self.object = "chat.completion" if chat else "text_completion"
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{rid}"

    def sub_rid(self, index: int) -> str:
        return self.rid if len(self.prompts) * self.n == 1 else f"{self.rid}-{index}"

    def usage(self) -> dict[str, int]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(r.outputs) for r in self.reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def record(self) -> None:
        """With several sequences, ``records[rid]`` lists them (each is also under ``rid-INDEX``)."""
        if len(self.reqs) > 1:
            subs = [self.engine.records.get(r.rid) for r in self.reqs]
            self.engine.records[self.rid] = {"request_id": self.rid, "choices": subs,
                                                  "output": subs[0]["output"] if subs[0] else ""}

    # -- whole answers ------------------------------------------------------------------------------
    async def whole(self, params_out: dict | None) -> web.StreamResponse:
        after = self.faults.after_tokens
        while not all(r.done for r in self.reqs):
            waiting = next(r for r in self.reqs if not r.done)
            await waiting.wake.wait()
            waiting.wake.clear()
            if self.fault == "crash" and max(len(r.outputs) for r in self.reqs) >= after:
                return await crash(self.engine, self.request, self.reqs)
        self.record()
        if self.fault == "crash":
            return await crash(self.engine, self.request, self.reqs)
        choices = []
        for k, r in enumerate(self.reqs):
            if self.chat:
                choices.append({"index": k, "message": {"role": "assistant", "content": r.text()}, "logprobs": None,
                                "finish_reason": r.finish_reason, "stop_reason": r.stop_reason})
            else:
                choices.append({"index": k, "text": r.text(), "logprobs": None, "finish_reason": r.finish_reason,
                                "stop_reason": r.stop_reason})
        doc = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices, "usage": self.usage(), "kv_transfer_params": params_out}
        data = json.dumps(doc).encode()
        if self.fault in ("hang", "truncate"):
            return await self.cut_body(data)
        return web.Response(body=data, content_type="application/json")

    async def cut_body(self, data: bytes) -> web.StreamResponse:
        """Half the body under a Content-Length for all of it; then silence (hang) or a close."""
        resp = web.StreamResponse(headers={"Content-Type": "application/json", "Content-Length": str(len(data))})
        await resp.prepare(self.request)
        await resp.write(data[: len(data) // 2])
        if self.fault == "hang":
            await asyncio.Event().wait()
        self.request.transport.close()
        return resp

    # -- streams --------------------------------------------------------------------------------------
    def _chunk(self, index: int, text: str | bytes, finish: str | None, stop_reason: str | None = None,
               role: bool = False) -> bytes:
        head = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model}
        if isinstance(text, bytes):
            text = json.loads(text)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": finish, "stop_reason": stop_reason}
        if finish is not None and self.chat:
            choice["stop_reason"] = stop_reason
        return b"data: " + json.dumps(dict(head, choices=[choice]), separators=(",", ":")).encode() + b"\n\n"

    async def stream(self) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(self.request)
        if len(self.reqs) == 1 and not self.reqs[0].stop:
            done = await self._stream_one(resp, self.reqs[0])
        else:
            done = await self._stream_many(resp)
        if done is not None:
            return done
        self.record()
        options = self.body.get("stream_options") or {}
        if options.get("include_usage"):
            usage = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.model, "choices": [], "usage": self.usage()}
            await resp.write(b"data: " + json.dumps(usage).encode() + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def _mid_stream_fault(self, resp: web.StreamResponse, sent: int) -> web.StreamResponse | None:
        if self.fault not in ("crash", "hang", "truncate") or sent < self.faults.after_tokens:
            return None
        if self.fault == "crash":
            return await crash(self.engine, self.request, self.reqs)
        if self.fault == "hang":
            await asyncio.Event().wait()
        await resp.write(b'data: {"id":"' + self.id.encode() + b'","object":"' + self.object.encode() + b'","choi')
        await resp.write_eof()
        for r in self.reqs:
            self.engine.abort(r)
        return resp

    async def _stream_one(self, resp: web.StreamResponse, req: SimRequest) -> web.StreamResponse | None:
        """The fast path: one sequence, no stop strings; chunks from preformatted bytes."""
        model = json.dumps(self.model)
        if self.chat:
            head = (f'data: {{"id":"{self.id}","object":"chat.completion.chunk","created":{self.created},'
                    f'"model":{model},"choices":[{{"index":0,"delta":{{').encode()
            open_text, role = b'"content":', b'"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'
            tail = b'},"logprobs":null,"finish_reason":null}]}\n\n'
            last = b'},"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
        else:
            head = (f'data: {{"id":"{self.id}","object":"text_completion","created":{self.created},'
                    f'"model":{model},"choices":[{{"index":0,').encode()
            open_text, role = b'"text":', b""
            tail = b',"logprobs":null,"finish_reason":null,"stop_reason":null}]}\n\n'
            last = b',"logprobs":null,"finish_reason":"length","stop_reason":null}]}\n\n'
        sent = 0
        while True:
            await req.wake.wait()
            req.wake.clear()
            n = len(req.outputs)
            if n > sent:
                parts = []
                if sent == 0 and self.chat:
                    parts.append(head + role)
                for k in range(sent, n):
                    final = req.done and k == n - 1 and req.state == "finished"
                    parts.append(head + open_text + WORD_JSON[req.outputs[k]] + (last if final else tail))
                sent = n
                await resp.write(b"".join(parts))
                cut = await self._mid_stream_fault(resp, sent)
                if cut is not None:
                    return cut
            if req.done:
                return None

    async def _stream_many(self, resp: web.StreamResponse) -> web.StreamResponse | None:
        """Several sequences and/or stop strings: text deltas per choice, holding back what could
        still turn out to be the start of a stop string."""
        hold = [max((len(x) for x in r.stop), default=1) - 1 for r in self.reqs]
        sent_chars = [0] * len(self.reqs)
        finished = [False] * len(self.reqs)
        if self.chat:
            await resp.write(b"".join(self._chunk(k, "", None, role=True) for k in range(len(self.reqs))))
        tokens = 0
        while not all(finished):
            waiting = next(r for r, f in zip(self.reqs, finished) if not f)
            await waiting.wake.wait()
            waiting.wake.clear()
            parts = []
            for k, r in enumerate(self.reqs):
                if finished[k]:
                    continue
                text = r.text()
                visible = text if r.done else text[: max(0, len(text) - hold[k])]
                delta = visible[sent_chars[k]:]
                sent_chars[k] = len(visible)
                if r.done:
                    finished[k] = True
                    parts.append(self._chunk(k, delta, r.finish_reason, r.stop_reason))
                elif delta:
                    parts.append(self._chunk(k, delta, None))
            if parts:
                await resp.write(b"".join(parts))
                tokens = max(len(r.outputs) for r in self.reqs)
                cut = await self._mid_stream_fault(resp, tokens)
                if cut is not None:
                    return cut
            if any(r.state == "aborted" for r in self.reqs):
                return None
        return None


def check_lengths(p: SimProfile, prompts: list[list[int]], max_tokens: int) -> web.Response | None:
    for ids in prompts:
        if len(ids) + max_tokens > p.max_model_len:
            return error(f"This model's maximum context length is {p.max_model_len} tokens. However, you requested "
                         f"{len(ids) + max_tokens} tokens ({len(ids)} in the messages, {max_tokens} in the completion).",
                         400)
        if -(-(len(ids) + max_tokens) // p.block_size) > p.num_kv_blocks:
            return error(f"request needs more KV blocks than the cache has ({p.num_kv_blocks})", 400)
    return None


def fault_answer(fault: str | None, stream: bool) -> web.Response | None:
    """The answer of a fault that needs no generation (None: generate)."""
    if fault == "fail":
        return error("injected failure", 500)
    if fault == "html":
        return web.Response(body=HTML_500, status=500, content_type="text/html")
    if fault == "garbage":
        if stream:
            return web.Response(body=b"<html><body>" + GARBAGE + b"</body></html>\n\n", content_type="text/event-stream")
        return web.Response(body=GARBAGE, content_type="text/plain")
    return None


__all__ = ["Generation", "check_lengths", "crash", "error", "fault_answer", "max_tokens_of", "model_error", "reset",
           "stops_of"]
