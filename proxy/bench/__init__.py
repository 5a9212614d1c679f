"""`omni-proxy bench` and `omni-proxy plan-pd`: the serving benchmark on simulated clusters.

Modules: ``workload`` (JSONL format, prompt text), ``synthetic`` (generators), ``cluster``
(cluster files), ``metrics`` (TTFT/TPOT/ITL/E2E, goodput), ``client`` (open-loop streaming
load), ``routers`` (our proxy and the peers as processes), ``simhost`` (the simulator
process), ``cpu`` (CPU use), ``runner`` (points and sweeps), ``report`` / ``plots`` (table,
PNGs), ``command`` (the bench CLI), ``plan_pd`` (the P:D planner). See docs/serving_bench.md.
"""

from .command import add_arguments, main

__all__ = ["add_arguments", "main"]
