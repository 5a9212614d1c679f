"""Start simulated instances and a proxy in this event loop: for tests and benchmarks.

    async with await Cluster.start("pd", prefill=2, decode=2, policy="omni") as cluster:
        cluster.proxy.url        # the proxy's base URL
        cluster.sims             # SimInstance objects (engine, faults, records) in role order
        cluster.by_role("decode")

Every port is chosen by the OS. KV events are published by every sim and subscribed by the
proxy unless ``kv_events=False``.

For faults that need real processes (SIGSTOP, a soak): :class:`Process` runs ``omni-proxy sim``
or ``omni-proxy serve`` as a subprocess and waits for its ready lines.
"""

from __future__ import annotations

import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from proxy.server.app import ProxyServer
from proxy.server.config import ProxyConfig
from proxy.sim.faults import FaultPlan
from proxy.sim.profile import SimProfile
from proxy.sim.server import SimInstance


@dataclass
class Cluster:
    sims: list[SimInstance]
    proxy: ProxyServer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def by_role(self, role: str) -> list[SimInstance]:
        return [s for s in self.sims if s.role == role]

    def sim(self, url: str) -> SimInstance:
        return next(s for s in self.sims if s.url == url)

    @classmethod
    async def start(cls, mode: str, *, prefill: int = 0, decode: int = 0, collocated: int = 0,
                    policy: str = "omni", policy_options: dict[str, Any] | None = None,
                    profile: SimProfile | None = None, role_profiles: dict[str, SimProfile] | None = None,
                    kv_events: bool = True,
                    faults: dict[int, FaultPlan] | None = None, proxy: bool = True,
                    **proxy_options: Any) -> "Cluster":
        """Sims in order prefill..., decode..., collocated...; ``faults`` maps sim index -> plan.

        ``role_profiles`` gives a role its own timing profile (else ``profile``, else defaults);
        ``proxy_options`` are ``ProxyConfig`` fields (block size and characters per token
        default to the profile's).
        """
        roles = ["prefill"] * prefill + ["decode"] * decode + ["collocated"] * collocated
        faults = faults or {}
        sims = []
        try:
            for k, role in enumerate(roles):
                sim = SimInstance(0, role, (role_profiles or {}).get(role, profile),
                                  kv_events_port=0 if kv_events else None,
                                  faults=faults.get(k, FaultPlan(seed=k)))
                sims.append(await sim.start())
            cluster = cls(sims)
            if proxy:
                config = ProxyConfig(
                    mode=mode, port=0, policy=policy, policy_options=policy_options or {},
                    prefill=[s.url for s in sims if s.role == "prefill"],
                    decode=[s.url for s in sims if s.role == "decode"],
                    instances=[s.url for s in sims if s.role == "collocated"],
                    kv_events={s.url: s.kv_endpoint for s in sims if s.kv_endpoint} if kv_events else {},
                    **{"block_size": (profile or SimProfile()).block_size,
                       "chars_per_token": (profile or SimProfile()).chars_per_token, **proxy_options})
                cluster.proxy = await ProxyServer(config).start()
            return cluster
        except BaseException:
            for s in sims:
                await s.stop()
            raise

    async def stop(self) -> None:
        if self.proxy is not None:
            await self.proxy.stop()
        for s in self.sims:
            await s.stop()

    async def __aenter__(self) -> "Cluster":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


# -- client-side helpers (tests, benchmarks) ------------------------------------------------------
def sse_documents(text: str) -> list:
    """The ``data:`` payloads of an SSE body: parsed JSON documents, and "[DONE]" as a string."""
    import json

    out = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def streamed_text(docs: list, chat: bool) -> str:
    """The completion text carried by streamed chunks (completions or chat)."""
    parts = []
    for d in docs:
        if d == "[DONE]" or not isinstance(d, dict) or not d.get("choices"):
            continue
        choice = d["choices"][0]
        parts.append((choice.get("delta") or {}).get("content") or "" if chat else choice.get("text", ""))
    return "".join(parts)


async def call(session, base: str, body: dict, rid: str | None = None, chat: bool = False):
    """POST a completion; returns (status, body text, headers)."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers = {"X-Request-Id": rid} if rid else {}
    async with session.post(base + path, json=body, headers=headers) as r:
        return r.status, await r.text(), r.headers


async def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


# -- subprocesses -------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


class Process:
    """``omni-proxy ARGS...`` in a subprocess (its own session), stderr kept in a bounded tail."""

    def __init__(self, args: list[str], ready_lines: int = 1, timeout: float = 60.0):
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, start_new_session=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        ready = threading.Semaphore(0)

        def drain() -> None:  # the pipe must never fill, or the process blocks writing its log
            for line in self.proc.stderr:
                self.tail.append(line)
                if ": ready " in line:
                    ready.release()

        threading.Thread(target=drain, daemon=True).start()
        deadline = time.time() + timeout
        for _ in range(ready_lines):
            while not ready.acquire(timeout=0.1):
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"omni-proxy {args[0]} did not get ready: {''.join(self.tail)}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pause(self) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "Process":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
