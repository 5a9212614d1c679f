"""proxy.bench.profile on py-spy --native stacks: the loop's waits are left out, KV events
applied inside a placement count as KV events, the new server's frames as the HTTP server."""

from proxy.bench.profile import UVLOOP, shares

LOOP = "<module> (proxy/cli.py:5);run (uvloop/__init__.py:1);Runner.run (asyncio/runners.py:118);Loop__run (loop.pyx:1)"


def test_native_stacks_leave_out_waits_and_attribute_kv_events_and_the_server():
    lines = [
        f"{LOOP};uv__io_poll (libuv/src/unix/epoll.c:1);epoll_pwait (libc.so.6) 40",  # waiting: left out
        f"{LOOP};_Connection._serve (proxy/server/front.py:420);Router.place (proxy/server/routing.py:90);"
        "Router.state (proxy/server/routing.py:50);KVEventSubscriber.drain (proxy/server/kv_subscriber.py:80) 2",
        f"{LOOP};_Connection._serve (proxy/server/front.py:420);Router.place (proxy/server/routing.py:90) 3",
        f"{LOOP};_Connection.data_received (proxy/server/front.py:300);llhttp__internal__run (parser.c:1) 4",
        f"{LOOP};uv__read (libuv/src/unix/stream.c:1) 1",  # uvloop's own C work
    ]
    total, parts = shares(lines)
    assert total == 10
    assert parts == {"KV events: ZMQ receive, decode, prefix index": 0.2,
                     "placement: policy choice, load, hold queue": 0.3,
                     "HTTP server: parsing requests, connections (aiohttp, or proxy/server/front.py)": 0.4,
                     UVLOOP: 0.1}
