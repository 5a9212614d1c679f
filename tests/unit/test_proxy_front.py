"""The proxy's client-facing HTTP/1.1 server over raw sockets: keep-alive and pipelining, chunked
request bodies, Expect: 100-continue, answers and streams byte for byte, unknown routes, bad or
oversized heads, HTTP/1.0, an unread body lingered then closed, a client that leaves."""

import asyncio

import pytest

from proxy.server.front import MAX_HEAD_BYTES, Answer, HttpServer, Routes

pytestmark = pytest.mark.asyncio


async def start(handlers, keepalive=5.0, linger=0.3):
    routes = Routes()
    for (method, path), handler in handlers.items():
        routes.add(method, path, handler)
    server = HttpServer(routes, keepalive_timeout=keepalive, linger_s=linger)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, port, reader, writer


async def read_answer(reader):
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head, await asyncio.wait_for(reader.readexactly(length), 2)


async def echo(request):
    body = await request.read()
    return Answer(200, b"%s %s %s %s" % (request.method.encode(), request.path.encode(), request.query_string.encode(),
                                         body), "text/plain", (("X-Seen", request.headers.get("x-tag", "-")),))


async def test_keep_alive_pipelining_and_chunked_bodies_are_answered_in_order():
    server, _, reader, writer = await start({("POST", "/e"): echo})
    try:
        writer.write(b"POST /e?a=1 HTTP/1.1\r\nHost: x\r\nX-Tag: one\r\nContent-Length: 5\r\n\r\nhello"
                     b"POST /e HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
        head, body = await read_answer(reader)
        assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Seen: one\r\nContent-Length: 17\r\n\r\n")
        assert body == b"POST /e a=1 hello"
        head, body = await read_answer(reader)
        assert b"X-Seen: -" in head and body == b"POST /e  abcde"
        assert len(server.connections) == 1  # one connection served both
    finally:
        writer.close()
        await server.close()


async def test_expect_100_continue_is_answered_when_the_body_is_read():
    server, _, reader, writer = await start({("POST", "/e"): echo})
    try:
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        _, body = await read_answer(reader)
        assert body == b"POST /e  ok"
    finally:
        writer.close()
        await server.close()


async def test_unknown_route_wrong_method_bad_head_and_huge_head():
    async def get(request):
        return Answer(200, request.match_info["id"].encode(), None)

    server, port, reader, writer = await start({("GET", "/r/{id}"): get, ("POST", "/e"): echo})
    try:
        writer.write(b"GET /r/a%20b HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 200") and b"Content-Type" not in head and body == b"a b"
        writer.write(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 404") and b"no route for GET /nowhere" in body
        writer.write(b"GET /e HTTP/1.1\r\nHost: x\r\n\r\n")
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 405") and b"Allow: POST" in head
        writer.write(b"BREW /e HTTP/1.1\r\n\r\n")  # llhttp refuses the method: 400, closed
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /e HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 431") and await asyncio.wait_for(reader.read(), 2) == b""
    finally:
        writer.close()
        await server.close()


async def test_an_answer_before_the_body_ended_lingers_then_closes():
    async def refuse(request):
        return Answer(413, b"{}", close=True)

    server, _, reader, writer = await start({("POST", "/e"): refuse}, linger=0.3)
    try:
        writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        head, body = await read_answer(reader)
        assert head.startswith(b"HTTP/1.1 413") and b"Connection: close" in head
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        writer.write(b"y" * 30)  # still draining: read and dropped, no reset
        assert await asyncio.wait_for(reader.read(), 2) == b""
        assert 0.2 < loop.time() - t0 < 1.0
    finally:
        writer.close()
        await server.close()


async def test_streams_are_chunked_on_http_1_1_and_raw_then_closed_on_http_1_0():
    async def stream(request):
        out = request.stream(200, (("X-Request-Id", "s1"),))
        await out.write(b"data: 1\n\n")
        await out.write(b"data: [DONE]\n\n", last=True)  # the end in the same write
        await out.end()  # nothing more
        return out

    server, port, reader, writer = await start({("GET", "/s"): stream})
    try:
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
        assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Request-Id: s1\r\n"
                        b"Transfer-Encoding: chunked\r\n\r\n")
        body = await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)
        assert body == b"9\r\ndata: 1\n\n\r\ne\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
        writer.write(b"GET /s HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection is kept
        assert (await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 2)).endswith(body)
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /s HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 2)  # the connection closes at the end
        assert data.endswith(b"Connection: close\r\n\r\ndata: 1\n\ndata: [DONE]\n\n")
    finally:
        writer.close()
        await server.close()


async def test_a_client_that_leaves_cancels_its_handler_and_idle_connections_close():
    cancelled = asyncio.Event()

    async def slow(request):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Answer(200, b"")

    server, port, reader, writer = await start({("GET", "/slow"): slow}, keepalive=0.3)
    try:
        writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 2)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert await asyncio.wait_for(reader.read(), 2) == b""  # nothing sent: closed after the keep-alive timeout
        assert 0.2 < loop.time() - t0 < 1.0
        await asyncio.sleep(0.05)
        assert not server.connections
    finally:
        writer.close()
        await server.close()


async def test_close_lets_answers_in_progress_finish_within_the_grace_then_cancels():
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request):
        started.set()
        try:
            await asyncio.sleep(float(request.query["s"]))
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Answer(200, b"done", None)

    server, port, reader, writer = await start({("GET", "/slow"): slow})
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /slow?s=0.3 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(started.wait(), 2)
    await server.close(grace_s=5)  # returns once the answer in progress is given
    head, body = await read_answer(reader)
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and body == b"done"
    assert await asyncio.wait_for(reader.read(), 2) == b"" and await asyncio.wait_for(idle_reader.read(), 2) == b""
    writer.close()
    idle_writer.close()

    started.clear()
    server, port, reader, writer = await start({("GET", "/slow"): slow})
    writer.write(b"GET /slow?s=30 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(started.wait(), 2)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await server.close(grace_s=0.2)  # past the grace: cancelled, the connection closed
    assert cancelled.is_set() and loop.time() - t0 < 1.0
    assert await asyncio.wait_for(reader.read(), 2) == b""
    writer.close()
