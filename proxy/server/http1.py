"""A lean HTTP/1.1 client for the proxy's upstream side: an asyncio protocol over llhttp.

The proxy sends small JSON bodies to instances and relays what comes back, so it needs a
request written in one go, the answer's head, and the body chunk by chunk as it arrives
(``Content-Length`` or chunked: ``httptools`` decodes both), over keep-alive connections kept
per instance. aiohttp's client does that too, through request, connector, response and stream
objects and a writer task per request; measured on the proxy at 200 req/s it was the largest
share of the event loop's time (docs/serving_bench.md, "Router overhead").

    resp = await pool.request(host, port, b"POST", b"/v1/completions", headers, body)
    resp.status, resp.content_type
    chunk = await resp.content.readany()     # b"" at the end of the body
    resp.release()    # read to its end: the connection goes back to the pool
    resp.close()      # otherwise: the connection is closed, the instance sees the request go

A connection is reused only after its answer was read to the end and both sides agreed to
keep it (``should_keep_alive``), and only while it has been idle for less than
``keepalive_s`` (shorter than the instances' own keep-alive, so a pooled connection is not
reused just as the instance closes it). Every failure is a :class:`UpstreamError`, an
``OSError``, so the callers' handling of socket errors covers it.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque

import httptools

BUFFER_HIGH = 1 << 20  # stop reading a connection whose unread body passes this


def take_buffered(parts: list[bytes]) -> bytes:
    """The body bytes buffered in ``parts``, as one (the single part itself when there is one:
    no copy), leaving ``parts`` empty. Both sides of the proxy's HTTP/1.1 buffer a body this way."""
    data = parts[0] if len(parts) == 1 else b"".join(parts)
    parts.clear()
    return data


class UpstreamError(ConnectionError):
    """The exchange with the instance failed (connect, lost connection, unparseable answer)."""


class ConnectTimeout(UpstreamError, TimeoutError):
    """No connection within the connect timeout."""


class Response:
    """An answer whose head has arrived; its body is read from ``content``."""

    __slots__ = ("status", "headers", "_conn")

    def __init__(self, conn: "_Connection", status: int, headers: dict[bytes, bytes]):
        self.status = status
        self.headers = headers
        self._conn = conn

    @property
    def content(self) -> "Response":
        return self

    @property
    def content_type(self) -> str:
        value = self.headers.get(b"content-type", b"application/octet-stream")
        return value.split(b";", 1)[0].strip().lower().decode("latin-1")

    async def readany(self) -> bytes:
        """The body bytes that arrived since the last call (waiting for some); b"" at its end."""
        return await self._conn.readany()

    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._conn._complete and not self._conn._body

    async def read(self) -> bytes:
        parts = []
        while chunk := await self._conn.readany():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        self._conn.finish(reuse=True)

    def close(self) -> None:
        self._conn.finish(reuse=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an instance, one exchange at a time."""

    def __init__(self, pool: "Pool", key: tuple[str, int]):
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._headers: dict[bytes, bytes] = {}
        self._head: asyncio.Future | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future | None = None
        self._complete = False
        self._keep_alive = False
        self._error: Exception | None = None
        self._paused = False
        self._busy = False

    # -- asyncio protocol ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"unparseable answer: {exc}"))
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._open.discard(self)
        if self._busy and not self._complete:
            self._fail(UpstreamError("connection lost before the answer ended"
                                     + (f": {exc}" if exc else "")))

    # -- llhttp callbacks ------------------------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        if self._head is not None and not self._head.done():
            self._head.set_result(Response(self, self.parser.get_status_code(), self._headers))

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > BUFFER_HIGH and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self._complete = True
        self._keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is done
        self._wake()

    # -- the exchange ---------------------------------------------------------------------------------
    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        self._error = exc
        if self._head is not None and not self._head.done():
            self._head.set_exception(exc)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)

    async def exchange(self, request: list[bytes]) -> Response:
        loop = asyncio.get_running_loop()
        self._busy = True
        self._head = loop.create_future()
        self.transport.writelines(request)
        return await self._head

    async def readany(self) -> bytes:
        while True:
            if self._body:
                data = take_buffered(self._body)
                self._buffered = 0
                if self._paused:
                    self._paused = False
                    self.transport.resume_reading()
                return data
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamError("connection lost before the answer ended")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def finish(self, reuse: bool) -> None:
        """The exchange is over: back to the pool (answer complete, keep-alive) or closed."""
        if not self._busy:
            return
        keep = (reuse and self._complete and self._error is None and not self.closed and not self._body
                and self._keep_alive)
        self._busy = False
        if not keep:
            self.closed = True
            if self.transport is not None:
                self.transport.close()
            return
        self.parser = httptools.HttpResponseParser(self)
        self._headers = {}
        self._head = None
        self._complete = self._keep_alive = False
        self.pool.put(self)


class Pool:
    """Keep-alive connections per (host, port)."""

    def __init__(self, connect_timeout: float, keepalive_s: float):
        self.connect_timeout = connect_timeout
        self.keepalive_s = keepalive_s
        self.idle: dict[tuple[str, int], deque[_Connection]] = {}
        self._open: set[_Connection] = set()

    def put(self, conn: _Connection) -> None:
        conn.idle_since = asyncio.get_running_loop().time()
        self.idle.setdefault(conn.key, deque()).append(conn)

    def _take(self, key: tuple[str, int], now: float) -> _Connection | None:
        idle = self.idle.get(key)
        while idle:
            conn = idle.pop()  # the most recently used first: the likeliest to be open
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.closed = True
            if conn.transport is not None:
                conn.transport.close()
        return None

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Connection(self, key), key[0], key[1])
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {key[0]}:{key[1]} within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc}") from None
        self._open.add(conn)
        return conn

    async def request(self, host: str, port: int, method: bytes, path: bytes, headers: list[tuple[bytes, bytes]],
                      body: bytes | None) -> Response:
        key = (host, port)
        conn = self._take(key, asyncio.get_running_loop().time()) or await self._connect(key)
        head = [method, b" ", path, b" HTTP/1.1\r\nHost: ", host.encode(), b":", str(port).encode(), b"\r\n"]
        for name, value in headers:
            head += [name, b": ", value, b"\r\n"]
        if body is not None:
            head += [b"Content-Length: ", str(len(body)).encode(), b"\r\n"]
        head.append(b"\r\n")
        request = [b"".join(head)]
        if body:
            request.append(body)
        try:
            return await conn.exchange(request)
        except BaseException:
            conn.finish(reuse=False)
            raise

    def close(self) -> None:
        for conn in list(self._open):
            if conn.transport is not None and not conn.closed:
                conn.transport.close()
        self._open.clear()
        self.idle.clear()
