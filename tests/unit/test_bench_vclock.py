"""The virtual-clock event loop: simulated time jumps over idle waits, real I/O still works."""

import asyncio
import socket
import time

from proxy.bench.vclock import VirtualClockLoop, run_virtual


def test_sleeps_take_virtual_time_not_wall_time():
    async def main():
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        order = []

        async def sleeper(name, seconds):
            await asyncio.sleep(seconds)
            order.append((name, loop.time() - t0))

        await asyncio.gather(sleeper("b", 200.0), sleeper("a", 100.0), sleeper("c", 300.5))
        return order, isinstance(loop, VirtualClockLoop)

    wall = time.monotonic()
    order, virtual = run_virtual(main())
    assert virtual and time.monotonic() - wall < 2.0
    assert [name for name, _ in order] == ["a", "b", "c"]
    assert [t for _, t in order] == [100.0, 200.0, 300.5]


def test_socket_io_is_served_before_the_clock_jumps():
    async def main():
        loop = asyncio.get_running_loop()

        async def echo(reader, writer):
            data = await reader.read(100)
            await asyncio.sleep(5.0)  # the server "works" 5 simulated seconds
            writer.write(data.upper())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, family=socket.AF_INET)
        port = server.sockets[0].getsockname()[1]
        t0 = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        await writer.drain()
        answer = await reader.read(100)
        elapsed = loop.time() - t0
        writer.close()
        server.close()
        await server.wait_closed()
        return answer, elapsed

    answer, elapsed = run_virtual(main())
    assert answer == b"PING"
    assert elapsed == 5.0  # exactly the simulated work: I/O took no simulated time
