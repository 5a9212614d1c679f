"""OpenAI API pieces: request checks that name the problem, error bodies, SSE framing."""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"


class RequestError(Exception):
    """A client mistake: becomes an HTTP 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


def error_body(message: str, status: int, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    if kind is None:
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_bytes(message: str, status: int, kind: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_body(message, status, kind, param)).encode()


def sse_event(document: Any) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def parse_json_body(raw: bytes) -> dict[str, Any]:
    if not raw:
        raise RequestError("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"field '{name}' must be a positive integer, got {value!r}", param=name)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def validate_request(body: dict[str, Any], chat: bool) -> None:
    """Check the fields routing relies on; everything else is the engine's business."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        messages = body.get("messages")
        if messages is None:
            raise RequestError(f"field 'messages' is required for {endpoint}", param="messages")
        if not isinstance(messages, list) or not messages:
            raise RequestError(f"field 'messages' must be a non-empty list, got {messages!r:.60}", param="messages")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise RequestError(f"messages[{k}] must be an object with a string 'role', got {m!r:.60}", param=f"messages[{k}]")
    else:
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError(f"field 'prompt' is required for {endpoint}", param="prompt")
        ok = (
            isinstance(prompt, str)
            or (_is_token_list(prompt) and prompt)
            or (isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt))
            or (isinstance(prompt, list) and prompt and all(_is_token_list(p) and p for p in prompt))
        )
        if not ok:
            raise RequestError(
                f"field 'prompt' must be a string, a list of strings, a list of token ids or a list of "
                f"token-id lists, got {prompt!r:.60}", param="prompt")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        _positive_int(body, name)
    for name in ("stream",):
        if name in body and not isinstance(body[name], bool):
            raise RequestError(f"field '{name}' must be true or false, got {body[name]!r}", param=name)
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError(f"field 'model' must be a string, got {body['model']!r}", param="model")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise RequestError(f"field 'stream_options' must be an object, got {body['stream_options']!r}", param="stream_options")


def max_tokens_of(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(value) if value else default
