"""Where the proxy's event loop spends its time: a py-spy profile summed into named parts.

    py-spy record --pid PID --duration 15 --rate 250 --format raw --output omni.raw
    python -m proxy.bench.profile omni.raw      # or a .gz of it

``--format raw`` writes one line per distinct stack, ``frame;frame;... COUNT`` (outermost
first, frames ``function (file:line)``). Only the event loop's thread counts (stacks through
``Runner.run``): the other threads of the proxy (the prompt workers' pool managers) wait.
Each stack goes to the first part whose markers one of its frames contains; a stack that
ends in ``Runner.run`` itself is uvloop's own C work (epoll, socket reads and writes,
callback dispatch), which py-spy sees without a Python frame of its own.
"""

from __future__ import annotations

import gzip
import sys
from collections import Counter
from pathlib import Path

LOOP = "Runner.run"
PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("prepare: parse, validate, tokenize, hash blocks", ("Intake.prepare",)),
    ("placement: policy choice, load, hold queue", ("Router.place",)),
    ("policy observation hooks (learning)", ("Router.observe",)),
    ("KV events: ZMQ receive, decode, prefix index", ("KVEventSubscriber", "zmq/")),
    ("metrics (prometheus_client)", ("prometheus_client",)),
    ("upstream HTTP client (aiohttp: request, body writer, response)", (
        "Upstream.", "ClientRequest.", "client_proto", "client_reqrep", "aiohttp/client.py", "connector.py")),
    ("response headers to the client", ("StreamResponse.prepare",)),
    ("relaying events to the client", ("relay (", "StreamResponse.write", "Forwarder._stream")),
    ("rest of the handler: body read, request id, retries", ("ProxyServer._handle", "Forwarder")),
    ("aiohttp server: HTTP parsing, connections", ("web_protocol", "web_app", "web_server")),
)
UVLOOP = "event loop itself (uvloop: epoll, socket I/O, callbacks)"


def shares(lines: list[str]) -> tuple[int, dict[str, float]]:
    """(event-loop samples, part -> share of them), parts in PARTS order then uvloop and other."""
    counts: Counter[str] = Counter()
    total = 0
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack or LOOP not in stack:
            continue
        frames = stack.split(";")
        total += int(n)
        for name, markers in PARTS:
            if any(m in f for f in frames for m in markers):
                counts[name] += int(n)
                break
        else:
            counts[UVLOOP if frames[-1].startswith(LOOP) else "other"] += int(n)
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
