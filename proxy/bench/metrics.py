"""Serving metrics from recorded timestamps: TTFT, TPOT, ITL, E2E, SLO attainment, goodput.

Definitions follow ``vllm bench serve``:

* TTFT  = first content chunk received - request sent
* E2E   = last byte received - request sent
* TPOT  = (E2E - TTFT) / (output_tokens - 1)  (undefined for one-token outputs)
* ITL   = gaps between successive content chunks of one request (all requests pooled)

A request *meets the SLO* when it completed, TTFT <= ``slo.ttft`` and, if its TPOT is
defined, TPOT <= ``slo.tpot``. A failed request never meets it. **Goodput** of a sweep is the
highest offered rate whose attainment (requests meeting the SLO / requests sent) is at least
``slo.attainment`` (0.9), per minute (QPM). Percentiles interpolate linearly between order
statistics (numpy's default), all in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """What the client saw of one request. Times in seconds on one monotonic clock."""

    index: int
    scheduled: float                 # when the workload says it arrives
    sent: float                      # when the client sent it
    prompt_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each content chunk
    end: float | None = None         # stream finished ([DONE] or body end)
    output_tokens: int = 0           # from usage when the server sent it, else chunks seen
    ok: bool = False
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent if self.ok and self.chunk_times else None

    @property
    def e2e(self) -> float | None:
        return self.end - self.sent if self.ok and self.end is not None else None

    @property
    def tpot(self) -> float | None:
        ttft, e2e = self.ttft, self.e2e
        if ttft is None or e2e is None or self.output_tokens < 2:
            return None
        return (e2e - ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        if not self.ok:
            return []
        t = self.chunk_times
        return [t[k] - t[k - 1] for k in range(1, len(t))]

    @property
    def send_lag(self) -> float:
        """How late the client sent it (open-loop generator health, not a latency)."""
        return self.sent - self.scheduled


@dataclass(frozen=True)
class SLO:
    ttft: float = 2.0        # seconds
    tpot: float = 0.05       # seconds per output token
    attainment: float = 0.9  # share of requests that must meet both

    def met(self, r: RequestRecord) -> bool:
        ttft = r.ttft
        if ttft is None or r.e2e is None or ttft > self.ttft:
            return False
        tpot = r.tpot
        return tpot is None or tpot <= self.tpot

    def to_dict(self) -> dict[str, float]:
        return {"ttft": self.ttft, "tpot": self.tpot, "attainment": self.attainment}


def parse_slo(text: str) -> SLO:
    """``"ttft=2.0,tpot=0.05"`` (any subset; ``attainment=0.9`` too) -> SLO."""
    values: dict[str, float] = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in ("ttft", "tpot", "attainment"):
            raise ValueError(f"--slo takes ttft=S,tpot=S[,attainment=F], got {item!r}")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--slo {key} must be a number, got {value!r}") from None
        if not number > 0 or (key == "attainment" and number > 1):
            raise ValueError(f"--slo {key} must be positive{' and at most 1' if key == 'attainment' else ''}, got {number}")
        values[key] = number
    return SLO(**values)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: Sequence[float]) -> dict[str, float | None]:
    """mean and p50/p90/p99 (None where there are no values, so JSON stays valid)."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    return {"mean": sum(values) / len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


CDF_POINTS = 51  # quantiles kept per point (every 2 %), enough to draw CDFs from the JSON alone


def quantiles(values: Sequence[float], points: int = CDF_POINTS) -> list[float]:
    """``points`` evenly spaced quantiles (0 .. 100 %) of ``values``, rounded to microseconds."""
    if not values:
        return []
    return [round(percentile(values, 100.0 * k / (points - 1)), 6) for k in range(points)]


def summarize(records: Sequence[RequestRecord], slo: SLO, offered_rate: float | None = None) -> dict[str, Any]:
    """Per-run summary: counts, throughput, latency distributions, SLO attainment, and TTFT /
    TPOT quantiles of completed requests (``cdf``) for plots."""
    done = [r for r in records if r.ok]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [r.tpot for r in done if r.tpot is not None]
    e2es = [r.e2e for r in done if r.e2e is not None]
    itls = [g for r in done for g in r.itls]
    if records:
        start = min(r.sent for r in records)
        end = max((r.end for r in done if r.end is not None), default=start)
        duration = max(end - start, 1e-9)
    else:
        duration = 0.0
    met = sum(1 for r in records if slo.met(r))
    out_tokens = sum(r.output_tokens for r in done)
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = (r.error or "unknown")[:80]
            errors[key] = errors.get(key, 0) + 1
    return {
        "offered_rate": offered_rate,
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        "ttft": distribution(ttfts),
        "tpot": distribution(tpots),
        "itl": distribution(itls),
        "e2e": distribution(e2es),
        "slo_met": met,
        "slo_attainment": met / len(records) if records else 0.0,
        "send_lag": distribution([r.send_lag for r in records]),
        "errors": errors,
        "cdf": {"ttft": quantiles(ttfts), "tpot": quantiles(tpots)},
    }


def goodput_qpm(points: Sequence[tuple[float, float]], attainment: float = 0.9) -> float:
    """Highest offered rate (req/s) whose attainment >= ``attainment``, times 60; 0 if none.

    points: (offered rate, attainment) per sweep point, any order.
    """
    passing = [rate for rate, att in points if att >= attainment]
    return 60.0 * max(passing) if passing else 0.0


def added_latency(through: dict[str, Any], direct: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Router overhead: percentile differences of TTFT and E2E against the direct baseline."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in ("ttft", "e2e"):
        out[metric] = {}
        for q in ("p50", "p99"):
            a, b = through[metric][q], direct[metric][q]
            out[metric][q] = None if a is None or b is None else a - b
    return out
