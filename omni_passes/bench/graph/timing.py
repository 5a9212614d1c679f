"""Timing a graph bench's variants: each step made ready once, then timed in interleaved
rounds against the variants it is compared with.

On a shared machine the load changes within minutes (a CPU host's compiled step varied
7-144 ms within one hour), so variants timed one after another compare loads, not variants.
Here each round times every step of a group once (order rotated per round, warm-up round
dropped, ``omni_passes.bench.measure.interleaved_rounds``), and a ratio is taken per round
between steps of the same round: its median and spread over the rounds are what is reported.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from omni_passes.bench.measure import interleaved_rounds, ratio_stats


class StepTimer:
    """One step, ready to be timed again and again.

    ``graph=True`` on CUDA: the step is captured once in a CUDA graph, and a sample is
    ``steps`` replays timed with CUDA events. Otherwise a sample is ``steps`` plain calls on
    the host clock (synchronised on CUDA). ``sample()`` returns seconds per step.
    """

    def __init__(self, fn: Callable[[], Any], device: str, steps: int, graph: bool):
        self.fn, self.device, self.steps = fn, device, max(1, steps)
        self.graph = None
        if graph and device == "cuda":
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                fn()
            for _ in range(3):
                self.graph.replay()
        else:
            for _ in range(2):
                fn()

    def sample(self) -> float:
        if self.graph is not None:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(self.steps):
                self.graph.replay()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3 / self.steps
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(self.steps):
            self.fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / self.steps

    def close(self) -> None:
        self.graph = None
        self.fn = None


Key = tuple[str, str]  # (variant name, "decode@<context>" or "prefill")


def time_group(timers: dict[Key, StepTimer], rounds: int) -> dict[Key, list[float]]:
    """Seconds per step of every timer, ``rounds`` interleaved rounds (one warm-up dropped)."""
    return interleaved_rounds({key: timer.sample for key, timer in timers.items()}, rounds)


def paired_ratios(samples: dict[Key, list[float]], variant: str, base: str) -> dict[str, dict[str, float]]:
    """Per measurement both ``variant`` and ``base`` took in these rounds: the per-round ratio
    variant / base, its median and spread (``measure.ratio_stats``)."""
    out = {}
    for (name, what), values in samples.items():
        if name == variant and (base, what) in samples:
            out[what] = ratio_stats(values, samples[(base, what)])
    return out


def profile_kernels(step: Callable[[], Any], device: str, top: int, steps: int = 10) -> dict[str, Any]:
    """Per-step device time of the ``top`` most expensive kernels over ``steps`` plain (not
    graph-captured) steps: where a variant's time goes, e.g. what still scales with the cache."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) if device == "cuda" else event.self_cpu_time_total
        if us > 0 and (device != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"kernel": event.key[:160], "us_per_step": us / steps, "calls_per_step": event.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "total_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows[:top]}
