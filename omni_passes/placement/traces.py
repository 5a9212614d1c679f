"""Synthetic expert-load traces shaped like DeepSeek-R1 serving, for planning and benchmarks.

A trace is an int32 tensor ``[steps, moe_layers, experts]``: how many tokens each logical
expert received at each decode step (top-k routings counted once per token and expert).

Sources the model is calibrated on (facts, not code):

* TensorRT-LLM, "Scaling Expert Parallelism in TensorRT-LLM (Part 1)", DeepSeek-R1 on 32
  GB200 GPUs (EP32, 8 expert slots per rank, machine-translation dataset), Table 1, averaged
  over layers and iterations: per rank mean 1024 routed tokens, std 491.6, imbalance ratio
  (max - mean) / mean = 1.564, i.e. **max/mean rank load 2.56 without balancing**; per expert
  mean 128, std 164.1 (CV 1.28), imbalance ratio 10.95, i.e. **max/mean expert load 11.9**.
  Per-layer ratios in its example output range from about 0.46 to 2.46 (max/mean 1.5 to 3.5).
  1024 tokens per rank x 32 ranks / top-8 = 4096 tokens per step, our ``tokens_per_step``.
* The same blog: hot experts (and so hot ranks) stay the same "for tens to hundreds of
  iteration steps or even more"; the hottest layer and the hot experts differ between
  datasets (layer 36 for translation, layer 57 for GSM8K), with some hot experts in common;
  a single request shows the same hot experts across its steps.
* DeepSeek-V3 shape (technical report, arXiv 2412.19437): 61 layers, the first 3 dense, so
  58 MoE layers; 256 routed experts, top-8, 8 groups (group-limited routing). Qwen3-30B-A3B:
  48 MoE layers, 128 experts, top-8, no groups.

Model. For dataset ``d``, layer ``l`` and expert ``e`` the log-popularity is::

    lp[t, l, e] = sigma[d, l] * (sqrt(1 - q) * base[d, l, e] + sqrt(q) * drift[t, l, e])
                  + group_skew * group[d, l, group(e)]

with ``base = sqrt(shared) * common + sqrt(1 - shared) * own[d]`` (unit normals: datasets
share part of their hot experts), ``sigma[d, l] ~ U(skew_low, skew_high)`` per layer (some
layers are far hotter than others, and which ones differs per dataset), ``drift`` a
unit-variance Ornstein-Uhlenbeck process per (layer, expert) with correlation time
``drift_tau`` steps (hot spots persist for about that long), ``q = drift_share`` the part of
the skew that drifts. The marginal at any step does not depend on ``q``, so skew statistics
hold for every trace. Counts are Poisson with mean ``tokens_per_step * top_k *
softmax(lp)`` (at these rates the difference to exact top-k sampling is far below the skew).
``switch_every`` cycles through ``datasets`` profiles (a workload change).

Calibration (seeded, checked in tests/unit/test_placement_traces.py): with skew_low=0.7,
skew_high=1.3, group_skew=0.2 the identity placement on EP32 has mean max/mean rank load
2.56 per step (5th-95th percentile over layers 1.7-4.0), rank CV 0.49, max/mean expert load
11.7 and expert CV 1.32, against TensorRT-LLM's 2.56, 0.48, 11.9 and 1.28. Drift: the blog's
EPLB run (placement from iterations 100-200, EP32 with 9 slots, then measured per iteration)
shows max/mean 1.109; "deepseek-translation" (drift_share=0.02, drift_tau=1000) gives 1.11
the same way over steps 200-800. The other traces' drift settings are assumptions chosen to
span slower and faster change (listed in ``TRACES``). Group skew (0.2) is an assumption: no
published per-group figure was found.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass(frozen=True)
class TraceSpec:
    """Parameters of one synthetic trace (see the module docstring for the model)."""

    name: str
    num_layers: int = 58
    num_experts: int = 256
    top_k: int = 8
    num_groups: int = 8
    tokens_per_step: int = 4096
    steps: int = 800
    skew_low: float = 0.7
    skew_high: float = 1.3
    group_skew: float = 0.2
    drift_share: float = 0.15
    drift_tau: float = 300.0
    datasets: int = 1
    shared: float = 0.3
    switch_every: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_layers", "num_experts", "top_k", "num_groups", "tokens_per_step", "steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"trace {self.name!r}: {key} must be a positive integer, got {value!r}")
        if self.num_experts % self.num_groups:
            raise ValueError(
                f"trace {self.name!r}: num_experts {self.num_experts} is not divisible by num_groups {self.num_groups}"
            )
        if self.top_k > self.num_experts:
            raise ValueError(f"trace {self.name!r}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if not 0.0 <= self.drift_share <= 1.0 or not 0.0 <= self.shared <= 1.0:
            raise ValueError(f"trace {self.name!r}: drift_share and shared must lie in [0, 1]")
        if self.drift_tau <= 0 or self.skew_low < 0 or self.skew_high < self.skew_low:
            raise ValueError(f"trace {self.name!r}: need drift_tau > 0 and 0 <= skew_low <= skew_high")
        if self.datasets < 1 or (self.datasets > 1 and not self.switch_every):
            raise ValueError(f"trace {self.name!r}: several datasets need switch_every > 0")


# Named traces used by the bench. "translation" and "gsm8k" stand for the two datasets of
# the TensorRT-LLM study: same calibration, different hot experts and hot layers (seeds).
TRACES: dict[str, TraceSpec] = {
    spec.name: spec
    for spec in (
        # Calibrated on TensorRT-LLM's EPLB figure: planned on steps 100-200, EPLB (EP32,
        # 9 slots) then shows max/mean 1.11 per step over steps 200-800 (theirs: 1.109).
        TraceSpec("deepseek-translation", drift_share=0.02, drift_tau=1000.0, seed=1),
        TraceSpec("deepseek-gsm8k", drift_share=0.05, drift_tau=500.0, seed=2),
        # Stress: a third of the skew's variance drifts with a 100-step memory (assumed).
        TraceSpec("deepseek-drift", drift_share=0.2, drift_tau=100.0, seed=3),
        # A workload change every 400 steps between two dataset profiles.
        TraceSpec("deepseek-shift", drift_share=0.02, drift_tau=1000.0, datasets=2, switch_every=400, seed=4),
        # Another shape (Qwen3-30B-A3B); the skew calibration is DeepSeek's (assumed).
        TraceSpec("qwen3-30b-a3b", num_layers=48, num_experts=128, num_groups=1, drift_share=0.05, drift_tau=500.0, seed=5),
    )
}


def get_spec(name: str, **overrides) -> TraceSpec:
    """A named trace, optionally with fields replaced (e.g. ``steps=200``)."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(TRACES)}")
    return replace(TRACES[name], **overrides)


def log_popularity(spec: TraceSpec) -> np.ndarray:
    """The model's log-popularity ``lp`` as float32 ``[steps, L, E]`` (before the softmax)."""
    rng = np.random.default_rng(spec.seed)
    L, E, G, T = spec.num_layers, spec.num_experts, spec.num_groups, spec.steps
    common = rng.standard_normal((L, E))
    bases, sigmas, groups = [], [], []
    for _ in range(spec.datasets):
        own = rng.standard_normal((L, E))
        bases.append(math.sqrt(spec.shared) * common + math.sqrt(1.0 - spec.shared) * own)
        sigmas.append(rng.uniform(spec.skew_low, spec.skew_high, size=(L, 1)))
        groups.append(np.repeat(rng.standard_normal((L, G)), E // G, axis=1))
    # Unit-variance Ornstein-Uhlenbeck drift, one independent process per (layer, expert).
    decay = math.exp(-1.0 / spec.drift_tau)
    kick = math.sqrt(1.0 - decay * decay)
    noise = rng.standard_normal((T, L, E)).astype(np.float32)
    drift = np.empty_like(noise)
    drift[0] = noise[0]
    for t in range(1, T):
        np.multiply(drift[t - 1], decay, out=drift[t])
        drift[t] += kick * noise[t]
    keep, move = math.sqrt(1.0 - spec.drift_share), math.sqrt(spec.drift_share)
    lp = np.empty((T, L, E), dtype=np.float32)
    for t0 in range(0, T, spec.switch_every or T):
        t1 = min(T, t0 + (spec.switch_every or T))
        d = (t0 // (spec.switch_every or T)) % spec.datasets
        lp[t0:t1] = sigmas[d] * (keep * bases[d] + move * drift[t0:t1]) + spec.group_skew * groups[d]
    return lp


def generate(spec: TraceSpec | str) -> torch.Tensor:
    """Token counts per step, layer and expert: int32 ``[steps, L, E]``.

    Deterministic for a given spec (its ``seed``).
    """
    if isinstance(spec, str):
        spec = get_spec(spec)
    lp = log_popularity(spec)
    lp -= lp.max(axis=-1, keepdims=True)
    p = np.exp(lp)
    p /= p.sum(axis=-1, keepdims=True)
    rng = np.random.default_rng(spec.seed + 10_000)
    counts = rng.poisson(p * float(spec.tokens_per_step * spec.top_k)).astype(np.int32)
    return torch.from_numpy(counts)


def windows(trace: torch.Tensor, window: int) -> torch.Tensor:
    """Sum a trace over consecutive windows: ``[steps, L, E]`` → ``[steps // window, L, E]`` int64.

    Trailing steps that do not fill a window are dropped.
    """
    if trace.dim() != 3:
        raise ValueError(f"trace must be [steps, layers, experts], got shape {tuple(trace.shape)}")
    if window <= 0 or window > trace.shape[0]:
        raise ValueError(f"window must be in [1, {trace.shape[0]}] steps, got {window}")
    n = trace.shape[0] // window
    return trace[: n * window].reshape(n, window, *trace.shape[1:]).sum(dim=1, dtype=torch.int64)
