"""The proxy's lean upstream HTTP/1.1 client against a scripted raw server: keep-alive reuse,
chunked and Content-Length bodies, a body cut short, a refused connection, close()."""

import asyncio

import pytest

from proxy.server.http1 import Pool, UpstreamError


async def serve(script):
    """A raw TCP server answering each request on a connection with the next item of
    ``script`` (bytes, or None to close the connection); returns (server, port, peers)."""
    peers = []

    async def handle(reader, writer):
        peers.append(writer.get_extra_info("peername"))
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
            if length:
                await reader.readexactly(length[0])
            answer = script.pop(0)
            if answer is None:
                writer.close()
                return
            writer.write(answer)
            await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], peers


@pytest.mark.asyncio
async def test_keep_alive_reuse_chunked_and_length_bodies():
    script = [b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
              b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nTransfer-Encoding: chunked\r\n\r\n"
              b"6\r\ndata: \r\n8\r\n[DONE]\n\n\r\n0\r\n\r\n"]
    server, port, peers = await serve(script)
    pool = Pool(connect_timeout=2, keepalive_s=4)
    r = await pool.request("127.0.0.1", port, b"POST", b"/v1/completions", [(b"X-Request-Id", b"a")], b'{"x":1}')
    assert (r.status, r.content_type, await r.read()) == (200, "application/json", b"{}")
    r.release()
    r = await pool.request("127.0.0.1", port, b"POST", b"/v1/completions", [], b"{}")
    assert r.content_type == "text/event-stream"
    assert await r.read() == b"data: [DONE]\n\n"
    r.release()
    assert len(peers) == 1  # both exchanges on one connection
    pool.close()
    server.close()


@pytest.mark.asyncio
async def test_body_cut_short_and_closed_connections_are_errors():
    server, port, peers = await serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345"])
    pool = Pool(connect_timeout=2, keepalive_s=4)
    r = await pool.request("127.0.0.1", port, b"GET", b"/x", [], None)
    assert await r.readany() == b"12345"
    r.close()  # not read to its end: the connection is dropped, not pooled
    assert not pool.idle.get(("127.0.0.1", port)) and r._conn.closed
    server.close()
    await server.wait_closed()
    with pytest.raises(UpstreamError, match="cannot connect"):
        await pool.request("127.0.0.1", port, b"GET", b"/x", [], None)
    pool.close()


@pytest.mark.asyncio
async def test_connection_lost_mid_body():
    server, port, _ = await serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345", None])

    pool = Pool(connect_timeout=2, keepalive_s=4)
    r = await pool.request("127.0.0.1", port, b"GET", b"/x", [], None)
    assert await r.readany() == b"12345"
    # the server sends no more and closes when the next request line arrives: simulate by closing
    r._conn.transport.write(b"GET /y HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(UpstreamError, match="connection lost before the answer ended"):
        await r.read()
    r.close()
    pool.close()
    server.close()
