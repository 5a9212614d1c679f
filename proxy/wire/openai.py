"""OpenAI API pieces: request checks that name the problem, error bodies, SSE framing.

Shared by the proxy and the simulated engine. The checks cover what the proxy relies on (the
prompt, lengths, choices, streaming) and the OpenAI schema of chat messages; other fields are
the engine's business and pass through untouched.
"""

from __future__ import annotations

import json
from typing import Any

SSE_DONE = b"data: [DONE]\n\n"
MAX_JSON_DEPTH = 400

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
# content part type -> the field that carries its payload, and that field's JSON type. The
# OpenAI types first, then the ones vLLM accepts besides (``renderers/chat_utils.py``).
CONTENT_PARTS: dict[str, tuple[str, type]] = {
    "text": ("text", str), "image_url": ("image_url", dict), "input_audio": ("input_audio", dict),
    "file": ("file", dict), "refusal": ("refusal", str),
    "input_text": ("text", str), "output_text": ("text", str), "thinking": ("thinking", str),
    "input_image": ("image_url", str), "audio_url": ("audio_url", dict), "video_url": ("video_url", dict),
    "image_embeds": ("image_embeds", object), "audio_embeds": ("audio_embeds", object),
    "video_embeds": ("video_embeds", object), "prompt_embeds": ("data", object),
    "tool_reference": ("name", str),
}
URL_PARTS = ("image_url", "audio_url", "video_url")


class RequestError(Exception):
    """A client mistake: becomes an HTTP 4xx with an OpenAI-style error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param

    def __reduce__(self):  # keeps status and param across a process pool
        return (RequestError, (self.message, self.status, self.param))


def error_body(message: str, status: int, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    if kind is None:
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def error_bytes(message: str, status: int, kind: str | None = None, param: str | None = None) -> bytes:
    return json.dumps(error_body(message, status, kind, param)).encode()


def sse_event(document: Any) -> bytes:
    return b"data: " + json.dumps(document, separators=(",", ":")).encode() + b"\n\n"


def events_end(buffer: bytes) -> int:
    """Length of the complete SSE events at the start of ``buffer`` (0 if none is complete).

    An event ends with a blank line: ``\\n\\n`` or ``\\r\\n\\r\\n``.
    """
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    return max(lf + 2 if lf >= 0 else 0, crlf + 4 if crlf >= 0 else 0)


def looks_like_sse(buffer: bytes) -> bool:
    """Whether the first event of ``buffer`` is an SSE event (a field line or a comment)."""
    head = buffer.lstrip(b"\r\n")[:8]
    return head.startswith((b"data:", b":", b"event:", b"id:", b"retry:"))


# -- parsing ------------------------------------------------------------------------------------
def json_depth_over(value: Any, limit: int) -> bool:
    """Whether ``value`` nests containers more than ``limit`` deep (iterative, no recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values() if isinstance(v, (dict, list)))
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item if isinstance(v, (dict, list)))
    return False


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object from a request body; RequestError (400) naming what is wrong.

    Containers nested more than ``max_depth`` deep are refused (the walk runs only when the
    body holds more than ``max_depth`` brackets, so ordinary bodies pay two byte counts).
    """
    if not raw:
        raise RequestError("request body is empty; expected a JSON object")
    too_deep = f"request body nests JSON more than {max_depth} levels deep"
    try:
        body = json.loads(raw)
    except RecursionError:
        raise RequestError(too_deep) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise RequestError(f"request body must be a JSON object, got {type(body).__name__}")
    if raw.count(b"[") + raw.count(b"{") > max_depth and json_depth_over(body, max_depth):
        raise RequestError(too_deep)
    return body


# -- request checks -------------------------------------------------------------------------------
def _positive_int(body: dict[str, Any], name: str) -> None:
    value = body.get(name)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"field '{name}' must be a positive integer, got {value!r}", param=name)


def _is_token_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _check_part(part: Any, where: str) -> None:
    if isinstance(part, str):  # vLLM accepts bare strings in a content list
        return
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise RequestError(f"{where} must be an object with a string 'type', got {part!r:.60}", param=where)
    kind = part["type"]
    if kind not in CONTENT_PARTS:
        raise RequestError(f"{where} has unknown type {kind!r}; known: {', '.join(CONTENT_PARTS)}", param=where)
    field, typ = CONTENT_PARTS[kind]
    value = part.get(field)
    if value is None or (typ is not object and not isinstance(value, typ)):
        raise RequestError(f"{where} of type {kind!r} needs field '{field}' ({typ.__name__ if typ is not object else 'any'}), "
                           f"got {value!r:.60}", param=f"{where}.{field}")
    if kind in URL_PARTS and not isinstance(value.get("url"), str):
        raise RequestError(f"{where}.{field}.url must be a string, got {value.get('url')!r:.60}", param=f"{where}.{field}.url")


def validate_messages(messages: Any) -> None:
    """Chat messages as the OpenAI schema defines them (plus vLLM's extra content part types)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError(f"field 'messages' must be a non-empty list, got {messages!r:.60}", param="messages")
    for k, m in enumerate(messages):
        where = f"messages[{k}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"{where} must be an object with a string 'role', got {m!r:.60}", param=where)
        role = m["role"]
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", param=f"{where}.role")
        content = m.get("content")
        if content is None:
            if role not in ("assistant", "function"):  # only these may leave content null
                raise RequestError(f"{where} ({role}) needs 'content'", param=f"{where}.content")
        elif isinstance(content, list):
            for j, part in enumerate(content):
                _check_part(part, f"{where}.content[{j}]")
        elif not isinstance(content, str):
            raise RequestError(f"{where}.content must be a string, a list of content parts or null, got "
                               f"{content!r:.60}", param=f"{where}.content")
        for name in ("name", "tool_call_id"):
            if name in m and m[name] is not None and not isinstance(m[name], str):
                raise RequestError(f"{where}.{name} must be a string, got {m[name]!r:.60}", param=f"{where}.{name}")
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise RequestError(f"{where} (tool) needs a string 'tool_call_id'", param=f"{where}.tool_call_id")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise RequestError(f"{where}.tool_calls must be a list, got {m['tool_calls']!r:.60}", param=f"{where}.tool_calls")


def validate_request(body: dict[str, Any], chat: bool) -> None:
    """Check the fields routing relies on and the message schema; the rest is the engine's."""
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    if chat:
        if body.get("messages") is None:
            raise RequestError(f"field 'messages' is required for {endpoint}", param="messages")
        validate_messages(body["messages"])
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
    for name in ("max_tokens", "max_completion_tokens", "n", "best_of"):
        _positive_int(body, name)
    n, best_of = body.get("n") or 1, body.get("best_of")
    if best_of is not None and best_of < n:
        raise RequestError(f"field 'best_of' ({best_of}) must be at least 'n' ({n})", param="best_of")
    stop = body.get("stop")
    if stop is not None and not isinstance(stop, str) and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise RequestError(f"field 'stop' must be a string or a list of strings, got {stop!r:.60}", param="stop")
    for name in ("stream",):
        if name in body and body[name] is not None and not isinstance(body[name], bool):
            raise RequestError(f"field '{name}' must be true or false, got {body[name]!r}", param=name)
    if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
        raise RequestError(f"field 'model' must be a string, got {body['model']!r}", param="model")
    if "stream_options" in body and body["stream_options"] is not None and not isinstance(body["stream_options"], dict):
        raise RequestError(f"field 'stream_options' must be an object, got {body['stream_options']!r}", param="stream_options")


def choices_of(body: dict[str, Any]) -> int:
    """Sequences a request asks the engine to generate per prompt (``n``, or ``best_of`` if larger)."""
    return max(int(body.get("n") or 1), int(body.get("best_of") or 1))


def max_tokens_of(body: dict[str, Any], default: int) -> int:
    value = body.get("max_completion_tokens") or body.get("max_tokens")
    return int(value) if value else default
