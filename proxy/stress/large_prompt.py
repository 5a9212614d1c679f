"""Does one huge prompt stall everybody else? Small requests' latency while a 15 MB prompt passes.

Two ``omni-proxy sim`` processes (one instance each) behind ``omni-proxy serve`` (collocated,
policy omni), every one a subprocess; the client runs here. Small requests arrive open-loop at
``rate`` per second, each timed from send to its last byte: first alone ("quiet"), then while
the large request is in flight, from sending it to its answer ("during"). The large prompt is
over the sims' context length, so they refuse it with a 400 (as vLLM does) once the proxy has
read, parsed, tokenized, hashed and routed it: what is measured is the proxy's handling.

Variants, run one after the other against the same sims: ``offload`` (the default: bodies of
``--offload-bytes`` or more are prepared in a worker process) and ``inline``
(``--offload-bytes 0``: all of it on the event loop, as the proxy used to do).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import aiohttp

from proxy.harness import Process, free_ports

TEXT = ("Serving large language models well means keeping every accelerator busy while no request "
        "waits long. ")


def stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    v = sorted(values)

    def pct(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {"n": len(v), "p50_ms": pct(0.5) * 1e3, "p90_ms": pct(0.9) * 1e3, "p99_ms": pct(0.99) * 1e3,
            "max_ms": v[-1] * 1e3, "mean_ms": sum(v) / len(v) * 1e3}


async def _small(session: aiohttp.ClientSession, base: str, k: int, out: list[float], failures: list[int],
                 timeline: list[tuple[float, float]] | None = None) -> None:
    t0 = time.monotonic()
    async with session.post(base + "/v1/completions", json={"prompt": f"small request {k}", "max_tokens": 1}) as r:
        await r.read()
        if r.status != 200:
            failures.append(r.status)
    out.append(time.monotonic() - t0)
    if timeline is not None:
        timeline.append((t0, out[-1]))


async def _drive(session, base: str, rate: float, until: asyncio.Event, out: list[float], failures: list[int],
                 start_k: int, timeline: list) -> int:
    tasks, k = [], start_k
    t0 = time.monotonic()
    while not until.is_set():
        tasks.append(asyncio.ensure_future(_small(session, base, k, out, failures, timeline)))
        k += 1
        delay = t0 + (k - start_k) / rate - time.monotonic()
        try:
            await asyncio.wait_for(until.wait(), max(0.0, delay))
        except TimeoutError:
            pass
    await asyncio.gather(*tasks)
    return k


async def measure(base: str, prompt_bytes: int, rate: float, quiet_s: float) -> dict[str, Any]:
    big = json.dumps({"prompt": (TEXT * (prompt_bytes // len(TEXT) + 1))[:prompt_bytes], "max_tokens": 1}).encode()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=300)) as s:
        for k in range(20):  # warm connections and code paths
            await _small(s, base, -k - 1, [], [])
        quiet, during, failures, timeline = [], [], [], []
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(quiet_s, stop.set)
        start = time.monotonic()
        k = await _drive(s, base, rate, stop, quiet, failures, 0, timeline)
        stop = asyncio.Event()
        driver = asyncio.ensure_future(_drive(s, base, rate, stop, during, failures, k, timeline))
        t0 = time.monotonic()
        async with s.post(base + "/v1/completions", data=big, headers={"Content-Type": "application/json"}) as r:
            answer = await r.text()
            status = r.status
        big_s = time.monotonic() - t0
        stop.set()
        await driver
        async with s.get(base + "/metrics") as r:
            offloaded = any(line.startswith("omni_proxy_offloaded_prompts_total 1.0") for line in (await r.text()).splitlines())
    return {"quiet": stats(quiet), "during": stats(during), "small_failures": len(failures),
            "large": {"bytes": len(big), "status": status, "seconds": big_s, "offloaded": offloaded,
                      "sent_at_s": t0 - start, "answer": answer[:200]},
            "timeline": [(round(t - start, 4), round(lat * 1e3, 3)) for t, lat in sorted(timeline)]}


def _run_loop(coro):
    """uvloop when installed, as the proxy and sims use: asyncio's own write buffer copies a
    15 MB body around quadratically while sending it, which would stall the client instead."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(prompt_mb: float = 15.0, rate: float = 100.0, quiet_s: float = 2.0,
        variants: tuple[str, ...] = ("offload", "inline"), log=sys.stderr) -> dict[str, Any]:
    ports = free_ports(2 + len(variants))
    sims = [Process(["sim", "--port", str(p)]) for p in ports[:2]]
    out: dict[str, Any] = {"prompt_mb": prompt_mb, "small_rate_per_s": rate, "variants": {}}
    try:
        urls = [f"http://127.0.0.1:{p}" for p in ports[:2]]
        for variant, port in zip(variants, ports[2:]):
            args = ["serve", "--mode", "collocated", "--port", str(port), "--log-level", "warning",
                    "--instance", urls[0], "--instance", urls[1]]
            if variant == "inline":
                args += ["--offload-bytes", "0"]
            print(f"large-prompt: {variant}: starting the proxy", file=log, flush=True)
            with Process(args):
                print(f"large-prompt: {variant}: {quiet_s:g} s of small requests alone, then with a "
                      f"{prompt_mb:g} MB prompt", file=log, flush=True)
                result = _run_loop(measure(f"http://127.0.0.1:{port}", int(prompt_mb * 1e6), rate, quiet_s))
            out["variants"][variant] = result
            d, q = result["during"], result["quiet"]
            print(f"large-prompt: {variant}: small requests p50 {q['p50_ms']:.1f} / p99 {q['p99_ms']:.1f} ms alone, "
                  f"p50 {d['p50_ms']:.1f} / p99 {d['p99_ms']:.1f} / max {d['max_ms']:.1f} ms during the large "
                  f"request ({result['large']['seconds']:.2f} s, status {result['large']['status']})",
                  file=log, flush=True)
    finally:
        for p in sims:
            p.stop()
    v = out["variants"]
    if "offload" in v and "inline" in v:
        out["p99_during_inline_over_offload"] = v["inline"]["during"]["p99_ms"] / v["offload"]["during"]["p99_ms"]
    return out


def plot(result: dict[str, Any], path: str) -> None:
    """Small-request latency over time, one panel per variant, the large request shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = result["variants"]
    fig, axes = plt.subplots(1, len(variants), figsize=(6 * len(variants), 4), sharey=True, squeeze=False)
    for ax, (name, v) in zip(axes[0], variants.items()):
        xs, ys = zip(*v["timeline"])
        ax.scatter(xs, ys, s=4)
        start = v["large"]["sent_at_s"]
        ax.axvspan(start, start + v["large"]["seconds"], alpha=0.15, color="tab:red",
                   label=f"{result['prompt_mb']:g} MB prompt in flight")
        ax.axhline(50, ls="--", color="gray", lw=0.8, label="50 ms goal")
        d = v["during"]
        ax.set_title(f"{name}: p50 {d['p50_ms']:.0f} ms, p99 {d['p99_ms']:.0f} ms while it is in flight")
        ax.set_xlabel("seconds since the first small request")
        ax.set_yscale("log")
        ax.legend(loc="upper left", fontsize=8)
    axes[0][0].set_ylabel("small request latency (ms)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
