"""Where the proxy's event loop spends its time: a py-spy profile summed into named parts.

    py-spy record --pid PID --duration 12 --rate 200 --native --format raw --output omni.raw
    python -m proxy.bench.profile omni.raw      # or a .gz of it

``--format raw`` writes one line per distinct stack, ``frame;frame;... COUNT`` (outermost
first, frames ``function (file:line)``). Only the event loop's thread counts (stacks through
``Runner.run``): the other threads of the proxy (the prompt workers' pool managers) wait.
Each stack goes to the first part whose markers one of its frames contains. With
``--native`` (as measured for issue 26's server-side change) a stack that ends in
``epoll_wait``/``epoll_pwait`` is the loop waiting and is left out (on this project's VM
py-spy's own idle detection counts those waits as busy), and the kernel's socket writes show
as ``write``/``writev`` leaves; without it, a stack that ends in ``Runner.run`` itself is
uvloop's own C work and waiting, which py-spy sees without a Python frame of its own.
"""

from __future__ import annotations

import gzip
import sys
from collections import Counter
from pathlib import Path

LOOP = "Runner.run"
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prepare: parse, validate, tokenize, hash blocks", ("Intake.prepare",)),
    # before placement: the router applies waiting KV events before each decision
    ("KV events: ZMQ receive, decode, prefix index", ("KVEventSubscriber", "zmq/")),
    ("placement: policy choice, load, hold queue", ("Router.place",)),
    ("policy observation hooks (learning)", ("Router.observe",)),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("upstream HTTP client (request, reading the answer)", (
        "Upstream.", "ClientRequest.", "client_proto", "client_reqrep", "aiohttp/client.py", "connector.py",
        "proxy/server/http1.py")),
    ("response headers to the client", ("StreamResponse.prepare",)),
    ("relaying events to the client", ("relay (", "StreamResponse.write", "Forwarder._stream", "Stream.write")),
    ("rest of the handler: body read, request id, retries", ("ProxyServer._handle", "Forwarder")),
    ("HTTP server: parsing requests, connections (aiohttp, or proxy/server/front.py)", (
        "web_protocol", "web_app", "web_server", "proxy/server/front.py")),
)
UVLOOP = "event loop itself (uvloop: epoll, socket I/O, callbacks)"
IDLE = ("epoll_wait", "epoll_pwait")


def shares(lines: list[str]) -> tuple[int, dict[str, float]]:
    """(event-loop samples, part -> share of them), parts in PARTS order then uvloop and other."""
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or LOOP not in stack:
            continue
        frames = stack.split(";")
        if frames[-1].startswith(IDLE):  # --native: the loop waiting for something to do
            continue
        total += int(n)
        for name, markers in PARTS:
            if any(m in f for f in frames for m in markers):
                counts[name] += int(n)
                break
        else:
            native = ".py:" not in frames[-1]  # --native: uvloop, libuv, the kernel's socket calls
            counts[UVLOOP if frames[-1].startswith(LOOP) or native else "other"] += int(n)
    names = [p for p, _ in PARTS] + [UVLOOP, "other"]
    return total, {k: counts[k] / total for k in names if counts[k]} if total else {}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m proxy.bench.profile PROFILE.raw[.gz] (py-spy record --format raw)", file=sys.stderr)
        return 2
    path = Path(argv[0])
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    total, parts = shares(text.splitlines())
    if not total:
        print(f"{argv[0]}: no stack through the event loop ({LOOP}); is it a py-spy raw profile of the proxy?",
              file=sys.stderr)
        return 1
    print(f"event-loop samples: {total}")
    for name, share in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"{100 * share:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
