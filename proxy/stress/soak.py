"""Soak: many requests through ``omni-proxy serve`` (PD) while the instances misbehave.

Two ``omni-proxy sim`` processes, each hosting one prefill and one decode instance, inject
faults into ``fault_rate`` of all attempts, spread evenly over every kind the simulator has
(HTTP 500, HTML 500 with internal URLs, 200 with junk, stalls, hangs mid-answer, resets,
truncated events). Partway through, the second process is SIGSTOPped for ``pause_s`` seconds.

The simulator's output is a deterministic function of the request id and the position, so
every answer is checked against what it must be. Each request ends as one of

* ``completed``: 200 and exactly the expected text (stream: well-formed events, ``[DONE]``);
* ``error``: an OpenAI error body naming the request id, or a stream whose text is a correct
  prefix and that ends with one error event and ``[DONE]``;
* ``lost``: anything else (malformed, wrong text, no ``[DONE]``, upstream text leaked);
* ``hung``: no answer within its bound, which follows from the proxy's timeouts:
  ``(retries + 1) * (first_byte + request) + detection + 2`` seconds.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import tempfile
import time
import zlib
from typing import Any

import aiohttp

from proxy.harness import Process, free_ports
from proxy.server.prober import detection_bound_s
from proxy.sim.engine import WORDS, output_token
from proxy.sim.faults import KINDS

LEAKS = ("<html", "10.0.3.7", "cluster.local", "grafana", "127.0.0.1")
TIMEOUTS = {"retries": 2, "first_byte": 1.0, "request": 2.0, "idle": 1.0, "health_interval": 0.25,
            "health_timeout": 0.25, "health_misses": 3}


def expected_text(rid: str, tokens: int) -> str:
    base = zlib.crc32(rid.encode())
    return "".join(WORDS[output_token(base, k)] for k in range(tokens))


def bound_s(t: dict[str, float] = TIMEOUTS) -> float:
    detection = detection_bound_s(t["health_interval"], t["health_timeout"], t["health_misses"])
    return (t["retries"] + 1) * (t["first_byte"] + t["request"]) + detection + 2.0


def classify(rid: str, body: dict, stream: bool, chat: bool, status: int, text: str) -> str:
    if any(leak in text for leak in LEAKS):
        return "lost"
    want = expected_text(rid, body["max_tokens"])
    try:
        if status != 200:
            err = json.loads(text).get("error")
            return "error" if isinstance(err, dict) and rid in err.get("message", "") else "lost"
        if not stream:
            choice = json.loads(text)["choices"][0]
            return "completed" if (choice["message"]["content"] if chat else choice["text"]) == want else "lost"
        if not text.endswith("\n\n"):
            return "lost"
        docs = []
        for block in text[:-2].split("\n\n"):
            if not block.startswith("data: ") or "\n" in block:
                return "lost"
            docs.append(block[6:] if block[6:] == "[DONE]" else json.loads(block[6:]))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        return "lost"
    if not docs or docs[-1] != "[DONE]":
        return "lost"
    got = "".join(((d["choices"][0].get("delta") or {}).get("content") or "") if chat else d["choices"][0]["text"]
                  for d in docs[:-1] if isinstance(d, dict) and d.get("choices"))
    errors = [d for d in docs[:-1] if isinstance(d, dict) and "error" in d]
    if not errors:
        return "completed" if got == want else "lost"
    ok = len(errors) == 1 and docs[-2] is errors[0] and want.startswith(got) and rid in errors[0]["error"]["message"]
    return "error" if ok else "lost"


async def _one(session, base: str, k: int, rng: random.Random, timeout: float) -> tuple[str, float]:
    rid = f"soak-{k}"
    chat = rng.random() < 0.3
    stream = rng.random() < 0.6
    prompt = f"shared system prompt number {rng.randrange(8)} " * 20 + f"user turn {k} " * rng.randrange(1, 20)
    body: dict[str, Any] = {"model": "sim-model", "max_tokens": rng.randrange(2, 12), "stream": stream}
    body.update({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            async with session.post(base + path, json=body, headers={"X-Request-Id": rid}) as r:
                text = await r.text()
                status = r.status
    except TimeoutError:
        return "hung", time.monotonic() - t0
    except (aiohttp.ClientError, UnicodeDecodeError):
        return "lost", time.monotonic() - t0
    return classify(rid, body, stream, chat, status, text), time.monotonic() - t0


async def _drive(base: str, requests: int, concurrency: int, timeout: float, pause_at: int, pause, log):
    rng = random.Random(7)
    outcomes: dict[int, tuple[str, float]] = {}
    queue = list(range(requests - 1, -1, -1))
    paused = asyncio.Event()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker():
            while queue:
                k = queue.pop()
                if k >= pause_at and not paused.is_set():
                    paused.set()
                    asyncio.ensure_future(pause())
                outcomes[k] = await _one(session, base, k, rng, timeout)
                done = len(outcomes)
                if done % max(1, requests // 10) == 0:
                    print(f"soak: {done}/{requests} requests", file=log, flush=True)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        async with session.get(base + "/metrics") as r:
            metrics = await r.text()
    return outcomes, metrics


def _metric_sums(text: str) -> dict[str, float]:
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("omni_proxy_") and not line.startswith("#") and "_total" in line:
            name, value = line.rsplit(" ", 1)
            family = name.split("{", 1)[0]
            labels = name[len(family):]
            key = family + (labels if family in ("omni_proxy_upstream_errors_total", "omni_proxy_pd_fallbacks_total",
                                                 "omni_proxy_requests_total") else "")
            if family == "omni_proxy_upstream_errors_total":
                key = family + "{" + labels.split('kind="', 1)[1].split('"', 1)[0] + "}"
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def run(requests: int = 10_000, concurrency: int = 64, fault_rate: float = 0.05, pause_s: float = 3.0,
        log=sys.stderr) -> dict[str, Any]:
    ports = free_ports(9)
    sim_ports, kv_ports, proxy_port = ports[:4], ports[4:8], ports[8]
    per_kind = fault_rate / len(KINDS)
    profile = {"step_overhead_s": 0.002, "decode_seq_s": 1e-5}
    t = TIMEOUTS
    procs: list[Process] = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(profile, f)
    faults = [a for kind in KINDS for a in (f"--{kind}-rate", str(per_kind))] + ["--fault-after-tokens", "1"]
    urls = [f"http://127.0.0.1:{p}" for p in sim_ports]
    try:
        for group in (0, 1):  # each process: one prefill, one decode
            args = ["sim", "--profile", f.name, "--fault-seed", str(10 * group), *faults]
            for k in (2 * group, 2 * group + 1):
                args += ["--port", str(sim_ports[k]), "--kv-events-port", str(kv_ports[k]),
                         "--role", "prefill" if k % 2 == 0 else "decode"]
            procs.append(Process(args, ready_lines=2))
        serve = ["serve", "--mode", "pd", "--port", str(proxy_port), "--policy", "omni", "--log-level", os.environ.get("OMNI_SOAK_LOG", "error"),
                 "--retries", str(t["retries"]), "--first-byte-timeout", str(t["first_byte"]),
                 "--request-timeout", str(t["request"]), "--idle-timeout", str(t["idle"]),
                 "--health-interval", str(t["health_interval"]), "--health-timeout", str(t["health_timeout"]),
                 "--health-misses", str(t["health_misses"])]
        for k, url in enumerate(urls):
            serve += ["--prefill" if k % 2 == 0 else "--decode", url, "--kv-events", f"{url}=tcp://127.0.0.1:{kv_ports[k]}"]
        procs.append(Process(serve))
        print(f"soak: {requests} requests, {concurrency} at a time, {fault_rate:.0%} of attempts faulty, "
              f"sim process 2 stopped for {pause_s:g} s", file=log, flush=True)

        async def pause() -> None:
            procs[1].pause()
            await asyncio.sleep(pause_s)
            procs[1].resume()

        bound = bound_s()
        t0 = time.monotonic()
        outcomes, metrics = asyncio.run(_drive(f"http://127.0.0.1:{proxy_port}", requests, concurrency,
                                               bound + 10.0, int(requests * 0.4), pause, log))
        wall = time.monotonic() - t0
        injected: dict[str, int] = dict.fromkeys(KINDS, 0)

        async def stats() -> None:
            async with aiohttp.ClientSession() as s:
                for url in urls:
                    async with s.get(url + "/sim/stats") as r:
                        for kind, n in (await r.json())["faults_injected"].items():
                            injected[kind] = injected.get(kind, 0) + n

        asyncio.run(stats())
    finally:
        for p in procs:
            p.stop()
        os.unlink(f.name)
    kinds = [o for o, _ in outcomes.values()]
    latencies = sorted(s for _, s in outcomes.values())
    counts = {k: kinds.count(k) for k in ("completed", "error", "lost", "hung")}
    pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    result = {"requests": requests, "answered": len(outcomes), **counts, "bound_s": bound,
              "within_bound": sum(s <= bound for s in latencies), "wall_s": wall,
              "requests_per_s": len(outcomes) / wall, "latency_s": {"p50": pct(0.5), "p99": pct(0.99), "max": latencies[-1]},
              "faults_injected": injected, "pause_s": pause_s, "proxy": _metric_sums(metrics), "timeouts": t}
    print(f"soak: {counts} in {wall:.1f} s; latency p50 {pct(0.5):.3f} s, p99 {pct(0.99):.3f} s, max "
          f"{latencies[-1]:.2f} s (bound {bound:g} s); faults injected {injected}", file=log, flush=True)
    return result
