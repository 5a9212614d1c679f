"""The HTTP client towards the instances: sending, classifying answers, reading them whole.

Every answer is checked before anything reaches the client:

* connect errors, 5xx, a body cut short: :class:`AttemptFailed` (retryable);
* 4xx: :class:`UpstreamRejected` carrying the instance's JSON error as it is (the request is at
  fault, e.g. a prompt over the context length), or a generic error if the body is not JSON;
* a 200 whose body is not a JSON object, or a stream answered without ``text/event-stream``
  or whose first event is not SSE: ``AttemptFailed`` of kind ``bad_response``.

Error bodies are logged with the request id (up to ``LOGGED_BODY`` bytes), never relayed.
Timeouts are the caller's (``Attempt.phase``); this module only maps exceptions.

Requests to ``http://`` instances go through the lean client of ``proxy.server.http1`` (an
asyncio protocol over llhttp, keep-alive pool per instance); aiohttp's client serves the
health prober and any other scheme.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from proxy.server.errors import AttemptFailed, UpstreamRejected
from proxy.server.http1 import ConnectTimeout, Pool
from proxy.wire.openai import error_bytes, events_end, looks_like_sse

log = logging.getLogger("omni_proxy")

LOGGED_BODY = 2000
MAX_ERROR_BODY = 1 << 16
MAX_EVENT = 1 << 20  # one SSE event larger than this is not an event stream


class Upstream:
    def __init__(self, connect_timeout: float, keepalive_s: float):
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self.session: aiohttp.ClientSession | None = None
        self.pool = Pool(connect_timeout, keepalive_s)
        self._targets: dict[str, tuple[str, int, bytes] | None] = {}

    async def start(self) -> None:
        # keep-alive shorter than uvicorn's 5 s (vLLM's server), so a pooled connection is not
        # reused just as the instance closes it
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=self.keepalive_s),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout), auto_decompress=False)

    async def close(self) -> None:
        self.pool.close()
        if self.session is not None:
            await self.session.close()

    def _target(self, instance: str) -> tuple[str, int, bytes] | None:
        """(host, port, path prefix) of an ``http://`` instance URL; None for anything else."""
        if instance not in self._targets:
            u = urlsplit(instance)
            self._targets[instance] = ((u.hostname or "", u.port or 80, u.path.rstrip("/").encode())
                                       if u.scheme == "http" and u.hostname else None)
        return self._targets[instance]

    async def send(self, rid: str, instance: str, method: str, path: str, payload: bytes | None) -> Any:
        """The answer's head (an ``http1.Response`` or an aiohttp ``ClientResponse``)."""
        target = self._target(instance)
        if target is not None:
            host, port, prefix = target
            headers = [(b"X-Request-Id", rid.encode())]
            if payload is not None:
                headers.append((b"Content-Type", b"application/json"))
            try:
                return await self.pool.request(host, port, method.encode(), prefix + path.encode(), headers, payload)
            except OSError as exc:
                kind = "timeout" if isinstance(exc, ConnectTimeout) else "connect"
                raise AttemptFailed(instance, kind, f"{type(exc).__name__}: {exc}") from None
        headers = {"X-Request-Id": rid}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        try:
            return await self.session.request(method, instance + path, data=payload, headers=headers)
        except (aiohttp.ClientError, OSError) as exc:
            kind = "timeout" if isinstance(exc, aiohttp.ServerTimeoutError) else "connect"
            raise AttemptFailed(instance, kind, f"{type(exc).__name__}: {exc}") from None

    async def check(self, rid: str, instance: str, resp) -> None:
        """Raise unless the answer is a success (its body is logged, not returned)."""
        if resp.status < 400:
            return
        try:
            body = await read_limited(resp, MAX_ERROR_BODY)
        except (aiohttp.ClientError, OSError):
            body = b""
        log.warning("request %s: %s answered %d: %r", rid, instance, resp.status, body[:LOGGED_BODY])
        if resp.status >= 500:
            raise AttemptFailed(instance, "http_5xx", f"answered {resp.status}")
        if _json_error(body):
            raise UpstreamRejected(resp.status, body)
        raise UpstreamRejected(resp.status, error_bytes(
            f"the instance rejected the request with status {resp.status} (request id {rid})", resp.status))

    async def read_json(self, rid: str, instance: str, resp) -> tuple[bytes, dict]:
        """The whole body of a success, which must be a JSON object."""
        try:
            data = await resp.read()
        except (aiohttp.ClientError, OSError) as exc:
            raise AttemptFailed(instance, "broken", f"answer broken: {type(exc).__name__}: {exc}") from None
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            log.warning("request %s: %s answered %d with a body that is not a JSON object: %r", rid, instance,
                        resp.status, data[:LOGGED_BODY])
            raise AttemptFailed(instance, "bad_response", f"answered {resp.status} with a body that is not a JSON object")
        return data, doc

    async def first_events(self, rid: str, instance: str, resp) -> tuple[bytes, bytes]:
        """(complete first SSE events, the bytes after them) of a streaming success."""
        if resp.content_type != "text/event-stream":
            log.warning("request %s: %s answered a stream with Content-Type %r", rid, instance, resp.content_type)
            raise AttemptFailed(instance, "bad_response", f"answered a stream with Content-Type {resp.content_type!r}")
        buf = b""
        while True:
            try:
                chunk = await resp.content.readany()
            except (aiohttp.ClientError, OSError) as exc:
                raise AttemptFailed(instance, "broken", f"stream broke before its first event: {type(exc).__name__}") from None
            if not chunk:
                raise AttemptFailed(instance, "broken", "stream ended before its first event")
            buf += chunk
            end = events_end(buf)
            if end:
                break
            if len(buf) > MAX_EVENT:
                end = 0
                break
        if not end or not looks_like_sse(buf):
            log.warning("request %s: %s streamed something that is not SSE: %r", rid, instance, buf[:LOGGED_BODY])
            raise AttemptFailed(instance, "bad_response", "streamed something that is not SSE")
        return buf[:end], buf[end:]


async def read_limited(resp, limit: int) -> bytes:
    parts, size = [], 0
    while size < limit:
        chunk = await resp.content.readany()
        if not chunk:
            break
        parts.append(chunk)
        size += len(chunk)
    return b"".join(parts)[:limit]


def _json_error(body: bytes) -> bool:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return False
    return isinstance(doc, dict) and ("error" in doc or doc.get("object") == "error")
