"""One benchmark point with simulator, our proxy and the client in this process and event loop.

Used on the virtual clock (``proxy.bench.vclock``) by ``plan-pd``: the same simulator, proxy
and client code as a real-time ``omni-proxy bench`` point, over real localhost sockets, but
without process boundaries, so the clock can jump over idle time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from proxy.server.app import ProxyServer
from proxy.server.config import ProxyConfig
from proxy.sim.faults import FaultPlan
from proxy.sim.server import SimInstance
from scheduling.slo import SLOTarget

from .client import drive
from .cluster import ClusterSpec
from .common import PointResult, warm_up
from .metrics import SLO, summarize
from .workload import PromptBuilder, WorkloadRequest


async def run_point_inprocess(cluster: ClusterSpec, requests: Sequence[WorkloadRequest], slo: SLO, *,
                              rate: float | None, policy: str = "omni", policy_options: dict[str, Any] | None = None,
                              seed: int = 0, kv_events: bool = True, timeout_s: float = 600.0) -> PointResult:
    builder = PromptBuilder(seed)
    prompts = [builder.text(r, k) for k, r in enumerate(requests)]
    sims: list[SimInstance] = []
    proxy = None
    try:
        for k, (role, profile) in enumerate(cluster.instances()):
            sims.append(await SimInstance(0, role, profile, kv_events_port=0 if kv_events else None,
                                          faults=FaultPlan(seed=k)).start())
        config = ProxyConfig(
            mode=cluster.mode, port=0, policy=policy, policy_options=dict(policy_options or {}),
            slo=SLOTarget(slo.ttft, slo.tpot),
            prefill=[s.url for s in sims if s.role == "prefill"], decode=[s.url for s in sims if s.role == "decode"],
            instances=[s.url for s in sims if s.role == "collocated"],
            kv_events={s.url: s.kv_endpoint for s in sims if s.kv_endpoint},
            block_size=cluster.block_size, chars_per_token=cluster.chars_per_token)
        proxy = await ProxyServer(config).start()
        await warm_up([proxy.url])
        for s in sims:
            s.engine.reset_prefix_cache()
        await asyncio.sleep(0.1)  # let the cleared-cache events reach the proxy
        records = await drive([proxy.url], requests, prompts, timeout_s=timeout_s, progress=False)
        roles: dict[str, dict[str, float]] = {}
        for s in sims:
            acc = roles.setdefault(s.role, {"instances": 0})
            acc["instances"] += 1
            for key, value in s.engine.stats().items():
                if key in ("prompt_tokens", "cached_tokens", "generated_tokens", "kv_pulled", "steps", "busy_s",
                           "finished", "aborted"):
                    acc[key] = acc.get(key, 0) + value
        for acc in roles.values():
            acc["prefix_hit_share"] = acc["cached_tokens"] / acc["prompt_tokens"] if acc.get("prompt_tokens") else None
    finally:
        if proxy is not None:
            await proxy.stop()
        for s in sims:
            await s.stop()
    summary = summarize(records, slo, rate)
    summary["simulator"] = {"roles": roles}
    return PointResult(summary, records)
