"""What the benchmarks share: timing, cold-L2 copies, device ceilings, error figures, labels.

Every benchmark of ``omni_passes.bench`` that times kernels or decode steps imports these from
here, not from another benchmark:

    time_cuda_graph(calls, iters)      us per call: the calls captured in one CUDA graph, replayed
    time_cpu(calls, iters)             us per call: wall clock, median over calls
    median_cuda_seconds(fn, n)         s per call of fn, CUDA events, median of n
    copy_bandwidth(device)             bytes read + written per s, 1 GiB device-to-device copy
    gemm_flops(device)                 bf16 FLOP/s of an 8192^3 matmul
    device_ceilings(device)            both, as {"copy_bytes_per_s", "bf16_flops_per_s"}
    cold_copies(touched, bytes, ...)   how many cache copies keep a call's bytes out of L2
    interleaved_rounds(timers, rounds) samples of several timers, round by round, order rotated
    ratio_stats(samples, base)         per-round ratios of two timers: median and spread
    rel_err(out, ref), error_text(exc), method_label(row)
    parse_tune(items, parsers)         --tune KEY=V[,KEY=V] values as launch-override dicts
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Hashable

import torch

from omni_passes.cli.common import UserError


# --------------------------------------------------------------------------- timing
def time_cuda_graph(calls: list[Callable[[], object]], iters: int) -> float:
    """Microseconds per call: one CUDA graph holding the calls (repeated to >= 16), replayed
    ``iters`` times per sample, median of 5 samples."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    reps = max(1, math.ceil(16 / len(calls)))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(5):
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / (iters * reps * len(calls)))
    del graph
    return statistics.median(samples)


def time_cpu(calls: list[Callable[[], object]], iters: int) -> float:
    """Microseconds per call on the host clock: median of max(3, iters) calls, rotating over
    ``calls``, after one untimed call."""
    calls[0]()
    samples = []
    for i in range(max(3, iters)):
        t0 = time.perf_counter()
        calls[i % len(calls)]()
        samples.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(samples)


def median_cuda_seconds(fn: Callable[[], object], n: int = 10) -> float:
    """Seconds per call of ``fn`` (after one untimed call), CUDA events, median of ``n``."""
    fn()
    samples = []
    for _ in range(n):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def interleaved_rounds(timers: dict[Hashable, Callable[[], float]], rounds: int) -> dict[Hashable, list[float]]:
    """``rounds`` samples of each timer (a callable returning seconds), taken round by round:
    in round r every timer runs once, the order rotated by r, after one dropped warm-up round.
    On a shared machine a burst of load then falls on every timer of a round alike, so the
    per-round ratios (``ratio_stats``) measure the variants, not the machine."""
    names = list(timers)
    samples: dict[Hashable, list[float]] = {name: [] for name in names}
    for r in range(rounds + 1):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            seconds = timers[name]()
            if r:
                samples[name].append(seconds)
    return samples


def ratio_stats(samples: list[float], base: list[float]) -> dict[str, float | int]:
    """Ratios samples[i] / base[i] of the same rounds: median, quartiles, min, max, rounds; and
    ``of_minima``, the ratio of the two fastest samples (on a contended CPU the fastest sample
    is the one the load disturbed least)."""
    if len(samples) != len(base) or not samples:
        raise ValueError(f"ratio_stats: {len(samples)} samples against {len(base)} base samples")
    ratios = sorted(a / b for a, b in zip(samples, base))
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios[0],) * 3
    return {"median": statistics.median(ratios), "q1": q1, "q3": q3, "min": ratios[0], "max": ratios[-1],
            "rounds": len(ratios), "of_minima": min(samples) / min(base)}


# --------------------------------------------------------------------------- device ceilings
def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy of ``nbytes``: bytes read + written per second (median of 10)."""
    buffers = [torch.empty(nbytes, dtype=torch.uint8, device=device) for _ in range(2)]
    seconds = median_cuda_seconds(lambda: buffers[1].copy_(buffers[0]))
    buffers.clear()
    torch.cuda.empty_cache()
    return 2 * nbytes / seconds


def gemm_flops(device: torch.device | str = "cuda", n: int = 8192) -> float:
    """FLOP/s of an n^3 bf16 matmul (median of 10)."""
    operands = [torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2)]
    seconds = median_cuda_seconds(lambda: operands[0] @ operands[1])
    operands.clear()
    torch.cuda.empty_cache()
    return 2 * n ** 3 / seconds


def device_ceilings(device: torch.device | str) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per s, 1 GiB) and bf16 GEMM rate (8192^3), medians."""
    return {"copy_bytes_per_s": copy_bandwidth(device), "bf16_flops_per_s": gemm_flops(device)}


def cold_copies(case_bytes_touched: int, cache_bytes: int, budget: float, l2_bytes: int) -> int:
    """Cache copies to rotate over so the bytes one call touches are not in L2 from the call
    before: 3x L2 worth of calls, as many as ``budget`` bytes hold, at most 32."""
    want = max(1, math.ceil(3 * l2_bytes / max(1, case_bytes_touched)))
    fit = max(1, int(budget // max(1, cache_bytes)))
    return min(want, fit, 32)


# --------------------------------------------------------------------------- errors and labels
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32."""
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def error_text(exc: BaseException) -> str:
    """First line plus the last informative line (inductor wraps the real cause)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if len(lines) > 1:
        text += " ... " + lines[-1]
    return f"{type(exc).__name__}: {text[:500]}"


def parse_tune(items: list[str], parsers: dict[str, Callable[[str], object]] | None = None) -> list[dict]:
    """``--tune`` values, each ``KEY=V[,KEY=V]``, as launch-override dicts: a value is an ``int``
    unless ``parsers`` names its key's parser."""
    out = []
    for item in items:
        override = {}
        for pair in item.split(","):
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"--tune {item!r}: expected KEY=VALUE pairs separated by commas")
            override[key.strip()] = (parsers or {}).get(key.strip(), int)(value)
        out.append(override)
    return out


def method_label(row: dict) -> str:
    """A result row's method with its launch overrides, e.g. ``latent_sparse[num_splits=1]``."""
    override = row.get("override")
    return row["method"] + ("[" + ",".join(f"{k}={v}" for k, v in override.items()) + "]" if override else "")
