"""Soak: 2,000 requests through `omni-proxy serve` (pd mode) to `omni-proxy sim` processes with
5 % of upstream attempts failing (HTTP 500, stalls, crashes mid-answer). Every request must end
with a completion or a clear error: none lost (a stream cut without an error) and none hung."""

import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

REQUESTS = 2000
CONCURRENCY = 48
CLIENT_TIMEOUT_S = 30.0


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start(args, ready_lines, log):
    proc = subprocess.Popen([sys.executable, "-m", "proxy.cli", *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    seen = 0
    deadline = time.time() + 60
    while seen < ready_lines:
        line = proc.stderr.readline()
        if not line:
            raise RuntimeError(f"{args[0]} exited early: {''.join(log)}")
        log.append(line)
        if "ready" in line:
            seen += 1
        if time.time() > deadline:
            raise RuntimeError(f"{args[0]} did not get ready: {''.join(log)}")
    return proc


async def one_request(session, base, k, rng):
    group = rng.randrange(8)
    prompt = f"shared system prompt number {group} " * 20 + f"user turn {k} " * rng.randrange(1, 20)
    stream = rng.random() < 0.6
    body = {"model": "sim-model", "prompt": prompt, "max_tokens": rng.randrange(2, 12), "stream": stream}
    try:
        async with asyncio.timeout(CLIENT_TIMEOUT_S):
            async with session.post(base + "/v1/completions", json=body, headers={"X-Request-Id": f"soak-{k}"}) as r:
                text = await r.text()
                if r.status != 200:
                    return "error" if "error" in json.loads(text) else "lost"
                if not stream:
                    doc = json.loads(text)
                    return "completed" if doc["choices"][0]["text"] else "lost"
                blocks = [b[6:] for b in text.split("\n\n") if b.startswith("data: ")]
                if not blocks or blocks[-1] != "[DONE]":
                    return "lost"
                if any(b != "[DONE]" and "error" in json.loads(b) for b in blocks):
                    return "error"
                return "completed"
    except TimeoutError:
        return "hung"
    except (aiohttp.ClientError, json.JSONDecodeError):
        return "lost"


async def drive(base):
    rng = random.Random(7)
    outcomes = {}
    queue = list(range(REQUESTS))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def worker():
            while queue:
                k = queue.pop()
                outcomes[k] = await one_request(session, base, k, rng)
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        async with session.get(base + "/metrics") as r:
            metrics = await r.text()
    return outcomes, metrics


def test_soak_2000_requests_with_5_percent_faults_none_lost_none_hung(tmp_path):
    ports = free_ports(10)
    sim_ports, kv_ports, proxy_port = ports[:4], ports[4:8], ports[8]
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps({"step_overhead_s": 0.002, "decode_seq_s": 1e-5}))
    log = []
    sim_args = ["sim", "--profile", str(profile), "--fail-rate", "0.02", "--crash-rate", "0.02",
                "--stall-rate", "0.01", "--crash-after-tokens", "1"]
    for port, kv_port, role in zip(sim_ports, kv_ports, ["prefill", "prefill", "decode", "decode"]):
        sim_args += ["--port", str(port), "--kv-events-port", str(kv_port), "--role", role]
    urls = [f"http://127.0.0.1:{p}" for p in sim_ports]
    serve_args = ["serve", "--mode", "pd", "--port", str(proxy_port), "--policy", "omni", "--retries", "2",
                  "--first-byte-timeout", "1.0", "--request-timeout", "5", "--health-interval", "0.5",
                  "--log-level", "warning",
                  "--prefill", urls[0], "--prefill", urls[1], "--decode", urls[2], "--decode", urls[3]]
    for url, kv_port in zip(urls, kv_ports):
        serve_args += ["--kv-events", f"{url}=tcp://127.0.0.1:{kv_port}"]
    procs = []
    try:
        procs.append(start(sim_args, 4, log))
        procs.append(start(serve_args, 1, log))
        t0 = time.time()
        outcomes, metrics = asyncio.run(drive(f"http://127.0.0.1:{proxy_port}"))
        elapsed = time.time() - t0
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    counts = {k: list(outcomes.values()).count(k) for k in ("completed", "error", "lost", "hung")}
    print(f"soak: {counts} in {elapsed:.1f} s")
    assert len(outcomes) == REQUESTS
    assert counts["lost"] == 0 and counts["hung"] == 0, counts
    assert counts["completed"] >= 0.95 * REQUESTS  # most faults are absorbed by retries
    # every ticket was given back: no load left on any instance
    running = [l for l in metrics.splitlines() if l.startswith("omni_proxy_instance_running{")]
    assert len(running) == 4 and all(l.endswith(" 0.0") for l in running), running
    injected = sum(float(l.rsplit(" ", 1)[1]) for l in metrics.splitlines()
                   if l.startswith("omni_proxy_upstream_errors_total{"))
    assert injected > 0.03 * REQUESTS  # the faults really happened
