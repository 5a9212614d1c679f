"""The simulated instance's Responses API (``POST /v1/responses``), as vLLM 0.32 serves it.

Input is a string or a list of message items, with optional ``instructions``; the output is
one message of ``output_text``. Responses are stored on the instance (unless ``store`` is
false), so ``previous_response_id`` continues a conversation there and is a 404 anywhere else:
the reason a proxy must send follow-ups back to the same instance. Streams send
``response.created``, one ``response.output_text.delta`` per token and ``response.completed``.
The handler gets the engine, fault plan, tokenizer and store it works with, not the server.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from proxy.sim.engine import SimEngine, SimRequest
from proxy.sim.faults import FaultPlan
from proxy.sim.generate import error, fault_answer, model_error
from proxy.wire.openai import RequestError, parse_json_body
from proxy.wire.text import content_text

STORED = 1000


def _input_text(body: dict[str, Any]) -> str:
    items = body.get("input")
    if isinstance(items, str):
        return items
    if isinstance(items, list) and all(isinstance(i, dict) for i in items):
        return "".join(f"<|{i.get('role', 'user')}|>{content_text(i.get('content'))}\n" for i in items)
    raise RequestError(f"field 'input' must be a string or a list of items, got {items!r:.60}", param="input")


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    return f"event: {kind}\ndata: ".encode() + json.dumps({"type": kind, "sequence_number": seq, **fields}).encode() + b"\n\n"


Stored = OrderedDict[str, tuple[dict[str, Any], str]]  # response id -> (document, conversation so far)


async def answer_response(request: web.Request, engine: SimEngine, faults: FaultPlan, tokenizer, model: str,
                          stored_responses: Stored) -> web.StreamResponse:
    try:
        body = parse_json_body(await request.read())
        text = _input_text(body)
    except RequestError as exc:
        return error(exc.message, exc.status, param=exc.param)
    wrong = model_error(body, model)
    if wrong:
        return wrong
    previous = body.get("previous_response_id")
    history = ""
    if previous is not None:
        earlier = stored_responses.get(previous)
        if earlier is None:
            return error(f"Response with id '{previous}' not found.", 404, "NotFoundError", "previous_response_id")
        history = earlier[1]
    stream = bool(body.get("stream"))
    answer = fault_answer(faults.draw(), stream)
    if answer is not None:
        return answer
    rid = request.headers.get("X-Request-Id") or uuid.uuid4().hex
    conversation = history + (body.get("instructions") or "") + text
    ids = tokenizer.text_ids(conversation, False)
    max_tokens = int(body.get("max_output_tokens") or engine.profile.default_max_tokens)
    req = SimRequest(rid, ids, engine.digests_of(ids), max_tokens)
    engine.add(req)
    resp_id, msg_id, created = f"resp_{rid}", f"msg_{rid}", int(time.time())

    def document(status: str) -> dict[str, Any]:
        output = [] if status == "in_progress" else [
            {"type": "message", "id": msg_id, "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": req.text(), "annotations": []}]}]
        return {"id": resp_id, "object": "response", "created_at": created, "model": model, "status": status,
                "output": output, "previous_response_id": previous, "instructions": body.get("instructions"),
                "usage": {"input_tokens": len(ids), "output_tokens": len(req.outputs),
                          "total_tokens": len(ids) + len(req.outputs)}}

    def store() -> None:
        if body.get("store", True):
            stored_responses[resp_id] = (document("completed"), conversation + req.text())
            while len(stored_responses) > STORED:
                stored_responses.popitem(last=False)

    try:
        if not stream:
            while not req.done:
                await req.wake.wait()
                req.wake.clear()
            store()
            return web.Response(body=json.dumps(document("completed")).encode(), content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        seq = 0
        await resp.write(_event("response.created", seq, response=document("in_progress")))
        sent = 0
        while True:
            await req.wake.wait()
            req.wake.clear()
            text_now = req.text()
            if len(text_now) > sent:
                seq += 1
                await resp.write(_event("response.output_text.delta", seq, item_id=msg_id, output_index=0,
                                        content_index=0, delta=text_now[sent:]))
                sent = len(text_now)
            if req.done:
                break
        store()
        await resp.write(_event("response.completed", seq + 1, response=document("completed")))
        await resp.write_eof()
        return resp
    finally:
        if not req.done:
            engine.abort(req)
