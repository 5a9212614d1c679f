"""The proxy's client-facing HTTP/1.1 server: an asyncio protocol over llhttp (``httptools``).

Every route of the proxy (the OpenAI endpoints, ``/health``, ``/metrics``, the admin routes)
is served here, on one port. Measured at 200 req/s, aiohttp's web server with its request,
response and writer objects was the largest share of the proxy's event loop once the upstream
client had been made lean (docs/serving_bench.md, "Router overhead"); what a proxy needs from
a server is less: the request head, the body chunk by chunk, and answers written in one go.

    client ──TCP──> _Connection (llhttp) ──> Request ──> handler(request)
                         <── Answer: head + body, one write
                         <── Stream: head + first event in one write, then one chunk per relay write

Connections (one :class:`_Connection` each):

* keep-alive; requests on one connection are answered in order (pipelined ones wait, their
  bodies buffered);
* ``keepalive_timeout`` closes a connection that is idle, or holds an incomplete request head,
  that long after it opened or after its last answer (a slowloris client holds nothing);
* the body is read by the handler (``Request.readany``/``read``), with backpressure: reading
  from the socket pauses while more than ``BODY_HIGH`` bytes wait unread; ``Expect:
  100-continue`` is answered when the handler first reads the body;
* an answer marked ``close``, or one given before the body was read to its end (a 408 or
  413), closes the connection; what is left of the body is read and dropped for at most
  ``linger_s`` first, so the client sees the answer rather than a reset;
* a client that goes away (EOF or reset) cancels its handler, which closes the upstream
  attempt, so the instance aborts the request;
* a head that llhttp refuses, or one over ``MAX_HEAD_BYTES``, gets 400 / 431 and the
  connection closes;
* ``close`` stops listening, closes idle connections and gives answers in progress a grace
  period (60 s, as aiohttp's server did) before cancelling them.

Answers carry ``Content-Length``; streams use chunked transfer encoding (HTTP/1.0 clients: the
raw bytes, then the connection closes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Union
from urllib.parse import parse_qsl, unquote

import httptools

from proxy.server.http1 import take_buffered

log = logging.getLogger("omni_proxy")

BODY_HIGH = 1 << 20      # unread request body bytes at which reading from the socket pauses
MAX_HEAD_BYTES = 1 << 16  # request line and headers together
MAX_HEADERS = 128

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


def _status_line(status: int) -> bytes:
    return b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Unknown"))


def _head(status: int, headers: tuple[tuple[str, str], ...] | None, content_type: bytes | None) -> list[bytes]:
    parts = [_status_line(status)]
    if content_type is not None:
        parts += (b"Content-Type: ", content_type, b"\r\n")
    for name, value in headers or ():
        parts += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    return parts


class Answer:
    """A whole answer: written with its head in one go."""

    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(self, status: int, body: bytes, content_type: str | None = "application/json",
                 headers: tuple[tuple[str, str], ...] | None = None, close: bool = False):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers
        self.close = close  # the connection closes after it (the body may not have been read)

    def encode(self, keep_alive: bool) -> bytes:
        parts = _head(self.status, self.headers, None if self.content_type is None else self.content_type.encode())
        parts += (b"Content-Length: ", b"%d" % len(self.body), b"\r\n",
                  b"\r\n" if keep_alive else b"Connection: close\r\n\r\n", self.body)
        return b"".join(parts)


class Stream:
    """A streamed answer. Its head leaves with the first ``write`` (one write, one TCP segment
    fewer before the first token); ``end``, or a ``write`` marked ``last``, finishes it.
    ``write`` waits only while the client's socket buffer is full."""

    __slots__ = ("conn", "head", "chunked", "started", "ended")

    def __init__(self, conn: "_Connection", status: int, headers: tuple[tuple[str, str], ...],
                 content_type: str, chunked: bool):
        self.conn = conn
        self.chunked = chunked
        parts = _head(status, headers, content_type.encode())
        parts.append(b"Transfer-Encoding: chunked\r\n\r\n" if chunked else b"Connection: close\r\n\r\n")
        self.head = b"".join(parts)
        self.started = False
        self.ended = False

    async def write(self, data: bytes, last: bool = False) -> None:
        """Send ``data``; with ``last``, the end of the stream goes in the same write."""
        if not data and not last:
            return
        conn = self.conn
        if conn.closing or self.ended:
            raise ConnectionResetError("the client connection is closed")
        frame = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked and data else data
        if not self.started:
            self.started = True
            frame = self.head + frame
        if last:
            self.ended = True
            if self.chunked:
                frame += b"0\r\n\r\n"
        conn.transport.write(frame)
        if conn.write_paused:
            await conn.drain()

    async def end(self) -> None:
        if not self.ended:
            await self.write(b"", last=True)


Response = Union[Answer, Stream]
Handler = Callable[["Request"], Awaitable[Response]]


class Request:
    """One client request: its head at once, its body as it arrives."""

    __slots__ = ("conn", "method", "path", "query_string", "headers", "version", "keep_alive", "content_length",
                 "match_info", "complete", "_body", "_buffered", "_waiter", "_expect_continue", "_query")

    def __init__(self, conn: "_Connection", method: str, url: bytes, headers: dict[str, str], version: str,
                 keep_alive: bool):
        self.conn = conn
        self.method = method
        path, _, query = url.partition(b"?")
        self.path = path.decode("latin-1")
        self.query_string = query.decode("latin-1")
        self.headers = headers  # lower-case names
        self.version = version
        self.keep_alive = keep_alive
        length = headers.get("content-length")
        self.content_length = int(length) if length is not None else None
        self.match_info: dict[str, str] = {}
        self.complete = False
        self._body: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._expect_continue = headers.get("expect", "").lower() == "100-continue"
        self._query: dict[str, str] | None = None

    @property
    def query(self) -> dict[str, str]:
        if self._query is None:
            self._query = dict(parse_qsl(self.query_string))
        return self._query

    # -- the body ------------------------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._body.append(data)
        self._buffered += len(data)
        if self._buffered > BODY_HIGH:
            self.conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at its end."""
        while True:
            if self._body:
                data = take_buffered(self._body)
                self._buffered = 0
                self.conn.resume_reading()
                return data
            if self.complete:
                return b""
            if self.conn.closing:
                raise ConnectionResetError("the client connection closed before the request body ended")
            if self._expect_continue:
                self._expect_continue = False
                self.conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            self._waiter = self.conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def take_complete(self) -> bytes | None:
        """The whole body if it has all arrived (no waiting), else None."""
        if not self.complete:
            return None
        data = take_buffered(self._body)
        self._buffered = 0
        return data

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body; ValueError once it passes ``limit`` bytes."""
        parts, size = [], 0
        while chunk := await self.readany():
            size += len(chunk)
            if limit is not None and size > limit:
                raise ValueError(f"request body over {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    # -- answering -----------------------------------------------------------------------------
    def stream(self, status: int = 200, headers: tuple[tuple[str, str], ...] = (),
               content_type: str = "text/event-stream") -> Stream:
        return Stream(self.conn, status, headers, content_type, chunked=self.version != "1.0")


class Routes:
    """Handlers by method and path: exact paths, and ``PREFIX{name}SUFFIX`` patterns."""

    def __init__(self) -> None:
        self.exact: dict[str, dict[str, Handler]] = {}
        self.patterns: list[tuple[str, str, str, str, Handler]] = []

    def add(self, method: str, path: str, handler: Handler) -> None:
        if "{" in path:
            prefix, rest = path.split("{", 1)
            name, suffix = rest.split("}", 1)
            self.patterns.append((method, prefix, suffix, name, handler))
        else:
            self.exact.setdefault(path, {})[method] = handler

    def resolve(self, request: Request) -> Handler | Answer:
        """The handler (``request.match_info`` filled in), or a 404 / 405 answer."""
        methods = self.exact.get(request.path)
        if methods is not None:
            handler = methods.get(request.method)
            if handler is not None:
                return handler
            return _method_not_allowed(request, methods)
        path, allowed = request.path, {}
        for method, prefix, suffix, name, handler in self.patterns:
            if path.startswith(prefix) and path.endswith(suffix) and len(path) > len(prefix) + len(suffix):
                value = path[len(prefix):len(path) - len(suffix)]
                if "/" in value:
                    continue
                if method == request.method:
                    request.match_info = {name: unquote(value)}
                    return handler
                allowed[method] = handler
        if allowed:
            return _method_not_allowed(request, allowed)
        return _error(404, f"no route for {request.method} {request.path[:200]}", "NotFoundError")


def _error(status: int, message: str, kind: str, headers: tuple[tuple[str, str], ...] | None = None) -> Answer:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    return Answer(status, body, headers=headers)


def _method_not_allowed(request: Request, methods: dict[str, Handler]) -> Answer:
    return _error(405, f"method {request.method} is not allowed on {request.path[:200]}", "invalid_request_error",
                  (("Allow", ", ".join(sorted(methods))),))


class _Connection(asyncio.Protocol):
    """One client connection (module docstring)."""

    def __init__(self, server: "HttpServer"):
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False
        self.write_paused = False
        self._drain: asyncio.Future | None = None
        self._read_paused = False
        self._url: list[bytes] = []
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        self._parsing: Request | None = None    # the request whose head/body llhttp is reading
        self._queue: deque[Request] = deque()   # complete heads waiting for their turn
        self._task: asyncio.Task | None = None  # the handler of the request being answered
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None     # close if still idle then (None: a request is served)
        self._lingering = False

    # -- asyncio protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        self._arm(self.server.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "protocol upgrades are not served")
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # an exception raised in one of the callbacks below
            if isinstance(cause, _HeadTooLarge):
                self._refuse(431, f"request head over {MAX_HEAD_BYTES} bytes or {MAX_HEADERS} headers")
            elif cause is not None:
                log.error("reading a client request failed", exc_info=cause)
                self._refuse(500, "the proxy failed reading this request")
            elif not self._lingering:
                self._refuse(400, f"malformed HTTP request: {exc}")
            else:
                self._close()

    def eof_received(self) -> bool:
        return False  # the client is gone: the transport closes and its handler is cancelled

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for request in (self._parsing, *self._queue):
            if request is not None:
                request._wake()
        self._queue.clear()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client connection closed"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        if self.closing:
            raise ConnectionResetError("the client connection is closed")
        if self.write_paused:
            self._drain = self.loop.create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def pause_reading(self) -> None:
        if not self._read_paused and not self.closing:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._read_paused and not self.closing:
            self._read_paused = False
            self.transport.resume_reading()

    # -- llhttp callbacks ------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = []
        self._headers = {}
        self._head_bytes = 0

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._head_bytes += len(url)
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > MAX_HEAD_BYTES or len(self._headers) >= MAX_HEADERS:
            raise _HeadTooLarge()
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = self._headers.get(key)
        self._headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        p = self.parser
        request = Request(self, p.get_method().decode("latin-1"), b"".join(self._url), self._headers,
                          p.get_http_version(), p.should_keep_alive())
        self._parsing = request
        if self._lingering:
            return
        if self._task is None:
            self._start(request)
        else:
            self._queue.append(request)

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None and not self._lingering:
            self._parsing._feed(body)

    def on_message_complete(self) -> None:
        request, self._parsing = self._parsing, None
        if self._lingering:
            self._close()  # the rest of the refused body has come: nothing more to drain
        elif request is not None:
            request._finish()

    # -- serving ---------------------------------------------------------------------------------
    def _start(self, request: Request) -> None:
        self._deadline = None  # the timer, if any, finds nothing to do when it fires
        self._task = self.loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            route = self.server.routes.resolve(request)
            response = route if isinstance(route, Answer) else await route(request)
        except asyncio.CancelledError:
            return  # the client went away
        except ConnectionResetError:
            self._close()
            return
        except Exception:
            log.exception("%s %s: the handler failed", request.method, request.path)
            response = _error(500, "the proxy failed on this request", "server_error")
        self._task = None
        if self.closing:
            return
        if isinstance(response, Stream):
            if not response.ended:  # ended badly (the relay gave up on the client): cut the connection
                self._close()
                return
            reuse = response.chunked and request.keep_alive
            close_now = not reuse or self.server.stopping
        else:
            reuse = request.keep_alive and not response.close and not self.server.stopping
            self.transport.write(response.encode(reuse and request.complete))
            close_now = not reuse
        if not request.complete:
            self._linger()  # the body was not read to its end: drop the rest, then close
            return
        if close_now:
            self._close()
            return
        if self._queue:
            self._start(self._queue.popleft())
        else:
            self._arm(self.server.keepalive_timeout)

    def _refuse(self, status: int, message: str) -> None:
        """A request llhttp cannot read (or too large a head): answer and close."""
        if self.closing:
            return
        if self._task is None:
            self.transport.write(_error(status, message, "invalid_request_error").encode(False))
        self._close()

    def _linger(self) -> None:
        self._lingering = True
        self._queue.clear()
        self._arm(self.server.linger_s)
        self.resume_reading()

    def _arm(self, seconds: float) -> None:
        """Close after ``seconds`` unless a request starts. One timer per connection, moved
        lazily: it re-checks the deadline when it fires (no timer made and cancelled per request)."""
        self._deadline = deadline = self.loop.time() + seconds
        if self._timer is not None and self._timer.when() > deadline:
            self._timer.cancel()
            self._timer = None
        if self._timer is None:
            self._timer = self.loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        if self._deadline is None:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._expire)
            return
        self._close()

    def _close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.closing:
            self.closing = True
            self.transport.close()


class _HeadTooLarge(Exception):
    pass


class HttpServer:
    """Listens and serves ``routes`` (module docstring)."""

    def __init__(self, routes: Routes, keepalive_timeout: float, linger_s: float):
        self.routes = routes
        self.keepalive_timeout = keepalive_timeout
        self.linger_s = linger_s
        self.connections: set[_Connection] = set()
        self.stopping = False  # closing: connections close after their answer
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, backlog: int = 4096) -> int:
        """Listen; returns the port (the one the OS picked for 0)."""
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(lambda: _Connection(self), host, port, reuse_address=True,
                                                     backlog=backlog)
        return self._server.sockets[0].getsockname()[1]

    async def close(self, grace_s: float = 60.0) -> None:
        """Stop listening, close idle connections, give the requests being answered ``grace_s``
        seconds to finish (as aiohttp's server did), then close the rest (their handlers are
        cancelled)."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(0)  # requests whose head has just arrived start being answered
        for conn in list(self.connections):
            if conn._task is None:
                conn._close()
        tasks = [conn._task for conn in self.connections if conn._task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=grace_s)
        tasks = [conn._task for conn in self.connections if conn._task is not None]
        for conn in list(self.connections):
            conn._close()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
