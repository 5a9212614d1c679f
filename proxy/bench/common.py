"""What the benchmark commands share: progress messages, a point's result, the warm-up
request, sweep rates, the workload-file options. Benchmarks take these from here, never from each other's modules, so
none of them imports another's internals (and none imports in a circle).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .client import request_body
from .cluster import ClusterSpec
from .metrics import RequestRecord
from .routers import RouterStartError
from .traces import DEFAULT_SCALE, load_workload
from .workload import WorkloadRequest

DEFAULT_RATES = "0.5,1,1.5,2,2.5,3,4,5,6,8"


def say(message: str) -> None:
    """A progress line on stderr (stdout is kept for ``--json``)."""
    print(message, file=sys.stderr, flush=True)


def parse_rates(text: str) -> list[float]:
    """``--rates``: comma-separated positive numbers, sorted, duplicates dropped."""
    try:
        rates = sorted({float(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--rates takes comma-separated numbers, got {text!r}") from None
    if not rates or rates[0] <= 0:
        raise ValueError(f"--rates must be positive numbers, got {text!r}")
    return rates


@dataclass
class PointResult:
    """One benchmark point: its summary (``proxy.bench.metrics.summarize`` plus the runner's
    counters) and the per-request records."""

    summary: dict[str, Any]
    records: list[RequestRecord] = field(default_factory=list)


async def warm_up(targets: Sequence[str], timeout: float = 30.0) -> None:
    """One short request per target: the router has found its workers and the path works."""
    body = request_body(" warm up", 2)
    body["stream"] = False
    body.pop("stream_options")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        for url in targets:
            async with session.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    raise RouterStartError(f"warm-up request through {url} answered {r.status}: {(await r.text())[:200]}")
                await r.read()


def add_trace_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace-scale", type=float, default=DEFAULT_SCALE, metavar="N",
                   help="public traces (--workload): real tokens per simulated token (as the synthetic workloads)")
    p.add_argument("--trace-block-tokens", type=int, default=None, metavar="N",
                   help="Mooncake traces: simulated tokens per 512-token hash block (default 512 / --trace-scale)")


def trace_requests(args: argparse.Namespace, cluster: ClusterSpec) -> list[WorkloadRequest]:
    """``--workload``'s requests (a trace scaled and cut to the cluster's max_model_len)."""
    return load_workload(args.workload, args.trace_scale, args.trace_block_tokens, cluster.max_model_len)
