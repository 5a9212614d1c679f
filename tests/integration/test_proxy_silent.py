"""A silent instance: an `omni-proxy sim` process SIGSTOPped (alive, sockets open, /health silent too).

Requests already on it with nothing sent to the client yet fail over to a healthy instance
once the prober declares it down; streams already running there end with an error event and
[DONE]; new requests go elsewhere. Real processes, real sockets.
"""

import asyncio
import json
import time

import aiohttp
import pytest

from proxy.harness import Process, free_ports, streamed_text
from proxy.server.app import ProxyServer
from proxy.server.config import ProxyConfig
from proxy.server.prober import detection_bound_s

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(120)]

PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


def sim(tmp_path, role="collocated", **profile):
    port, = free_ports(1)
    path = tmp_path / f"profile-{port}.json"
    path.write_text(json.dumps(profile))
    return Process(["sim", "--port", str(port), "--role", role, "--profile", str(path)]), f"http://127.0.0.1:{port}"


async def record(session, url, rid):
    async with session.get(f"{url}/sim/requests/{rid}") as r:
        return await r.json() if r.status == 200 else None


async def timed(coro):
    out = await coro
    return out, time.monotonic()


async def post(session, base, body, rid, stream_first=None):
    """(status, text, seconds) of a completion; ``stream_first`` is set when the first bytes arrive."""
    t0 = time.monotonic()
    async with session.post(base + "/v1/completions", json=body, headers={"X-Request-Id": rid}) as r:
        parts = []
        async for chunk in r.content.iter_any():
            parts.append(chunk)
            if stream_first is not None and not stream_first.is_set() and b"\n\n" in b"".join(parts):
                stream_first.set()
        return r.status, b"".join(parts).decode(), time.monotonic() - t0


def events(text):
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in text.split("\n\n") if b]


async def test_sigstopped_instance_fails_over_waiting_requests_and_ends_running_streams(tmp_path):
    interval, timeout, misses = 0.2, 0.2, 3
    bound = detection_bound_s(interval, timeout, misses)
    slow = {"step_overhead_s": 0.02, "prefill_token_s": 0.0004}  # 60 tokens ~1.2 s; 2000-token prefill ~0.8 s
    (pa, a), (pb, b) = sim(tmp_path, **slow), sim(tmp_path, **slow)
    with pa, pb:
        config = ProxyConfig(mode="collocated", instances=[a, b], port=0, policy="round_robin",
                             health_interval=interval, health_timeout=timeout, health_misses=misses)
        proxy = await ProxyServer(config).start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
                base = proxy.url
                long = {"prompt": PROMPT, "max_tokens": 60}
                whole = asyncio.ensure_future(timed(post(s, base, long, "whole")))                  # -> a
                await asyncio.sleep(0.05)
                assert (await post(s, base, {"prompt": "x", "max_tokens": 1}, "f1"))[0] == 200      # -> b
                started = asyncio.Event()
                running = asyncio.ensure_future(timed(post(s, base, dict(long, stream=True), "running", started)))  # -> a
                await asyncio.wait_for(started.wait(), 5)
                await asyncio.sleep(0.15)  # a few tokens of it reached the client
                assert (await post(s, base, {"prompt": "x", "max_tokens": 1}, "f2"))[0] == 200      # -> b
                first = asyncio.Event()
                waiting = asyncio.ensure_future(timed(post(s, base, {"prompt": "y" * 8000, "max_tokens": 5,
                                                                     "stream": True}, "waiting", first)))  # -> a, prefilling
                await asyncio.sleep(0.2)
                assert not first.is_set()
                pa.pause()
                stopped = time.monotonic()
                after = [asyncio.ensure_future(timed(post(s, base, {"prompt": PROMPT, "max_tokens": 3}, f"new-{k}")))
                         for k in range(2)]  # -> b, then a (not yet known to be silent)

                (status, text, _), done_at = await whole
                assert status == 200, text
                assert json.loads(text)["choices"][0]["text"] == (await record(s, b, "whole"))["output"]
                assert done_at - stopped < bound + 1.2 + 1.5  # detection, then a whole generation on b

                (status, text, _), done_at = await running
                docs = events(text)
                assert status == 200 and docs[-1] == "[DONE]" and docs[-2]["error"]["type"] == "upstream_error"
                assert 0 < len(streamed_text(docs[:-2], False).split()) < 60
                assert done_at - stopped < bound + timeout + 1.0

                (status, text, _), done_at = await waiting
                docs = events(text)
                assert status == 200 and docs[-1] == "[DONE]", text
                assert streamed_text(docs, False) == (await record(s, b, "waiting"))["output"]

                for k, task in enumerate(after):
                    (status, text, _), _ = await task
                    assert status == 200 and json.loads(text)["choices"][0]["text"] == (await record(s, b, f"new-{k}"))["output"]
                inst = proxy.registry.instances[a]
                assert inst.down and not inst.usable(proxy.now())
                assert proxy.metrics.failovers.labels(a)._value.get() >= 3  # whole, waiting, new-1
                assert proxy.metrics.upstream_errors.labels(a, "down")._value.get() >= 3

                pa.resume()  # back: probes pass, it serves again
                deadline = time.monotonic() + 5
                while not inst.usable(proxy.now()):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                for k in range(2):
                    assert (await post(s, base, {"prompt": "z", "max_tokens": 1}, f"back-{k}"))[0] == 200
                assert await record(s, a, "back-0") or await record(s, a, "back-1")
        finally:
            await proxy.stop()


async def test_pd_decode_sigstopped_with_default_timeouts_no_request_waits_30_s(tmp_path):
    """The case as an operator meets it: PD, decode silent, every timeout at its default."""
    defaults = ProxyConfig(mode="pd", decode=["http://x:1"])
    bound = detection_bound_s(defaults.health_interval, defaults.health_timeout, defaults.health_misses)
    assert bound <= 10 and defaults.first_byte_timeout == 300 and defaults.request_timeout == 3600
    slow = {"step_overhead_s": 0.05}  # 100 tokens: 5 s
    (pp, p), (p1, d1), (p2, d2) = sim(tmp_path, "prefill"), sim(tmp_path, "decode", **slow), sim(tmp_path, "decode", **slow)
    with pp, p1, p2:
        proxy = await ProxyServer(ProxyConfig(mode="pd", prefill=[p], decode=[d1, d2], port=0, policy="round_robin")).start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
                base = proxy.url
                body = {"prompt": PROMPT, "max_tokens": 100}
                whole = asyncio.ensure_future(timed(post(s, base, body, "pd-whole")))                        # -> d1
                await asyncio.sleep(0.3)
                assert (await post(s, base, {"prompt": "x", "max_tokens": 1}, "pd-f"))[0] == 200            # -> d2
                started = asyncio.Event()
                running = asyncio.ensure_future(timed(post(s, base, dict(body, stream=True), "pd-running", started)))  # -> d1
                await asyncio.wait_for(started.wait(), 5)
                await asyncio.sleep(0.3)
                p1.pause()
                stopped = time.monotonic()
                fresh = asyncio.ensure_future(timed(post(s, base, dict(body, max_tokens=5, stream=True), "pd-new")))  # -> d2
                fresh2 = asyncio.ensure_future(timed(post(s, base, dict(body, max_tokens=5), "pd-new2")))  # -> d1, silent

                (status, text, _), done_at = await whole
                assert status == 200 and json.loads(text)["choices"][0]["text"] == (await record(s, d2, "pd-whole"))["output"]
                assert done_at - stopped < bound + 5 + 3  # failed over at detection, then 100 tokens on d2
                (status, text, _), done_at = await running
                docs = events(text)
                assert docs[-1] == "[DONE]" and "error" in docs[-2] and done_at - stopped < bound + defaults.health_timeout + 2
                for task, rid in ((fresh, "pd-new"), (fresh2, "pd-new2")):
                    (status, text, _), done_at = await task
                    assert status == 200 and done_at - stopped < bound + 3, (rid, text)
                waits = [done_at - stopped]
                assert max(waits) < 30
        finally:
            await proxy.stop()
