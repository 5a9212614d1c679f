"""One benchmark point and sweeps: simulated cluster + router under test + open-loop client.

Every point starts from nothing, so no router or simulator carries state from the previous
one: a fresh simulator process (``proxy.bench.simhost``) hosting the cluster, a fresh router
process, one warm-up request (then the simulators' prefix caches are emptied), the workload,
then CPU use, simulator counters and the simulator's loop lag are collected and both
processes stopped. The client runs in this process, so three processes share the machine:
simulator, router, client.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import synthetic
from .client import drive
from .common import PointResult, warm_up
from .cluster import ClusterSpec
from .cpu import CpuMonitor
from .metrics import SLO, added_latency, goodput_qpm, summarize
from .routers import Instances, RouterProcess, RouterSpec, RouterStartError, Unsupported, die_with_parent
from .workload import PromptBuilder, WorkloadRequest, at_rate, describe


@dataclass
class WorkloadSource:
    """A synthetic generator (regenerated per rate, same seed) or a file (rescaled per rate)."""

    name: str
    duration_s: float = 60.0
    seed: int = 0
    file_requests: list[WorkloadRequest] | None = None

    def requests_at(self, rate: float) -> list[WorkloadRequest]:
        if self.file_requests is not None:
            return at_rate(self.file_requests, rate)
        return synthetic.generate(self.name, rate, self.duration_s, self.seed)

    def to_dict(self, rate: float | None = None) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "kind": "file" if self.file_requests is not None else "synthetic",
                             "seed": self.seed}
        if self.file_requests is None:
            d["duration_s"] = self.duration_s
            d["token_scale"] = synthetic.TOKEN_SCALE
        if rate is not None:
            d["shape_at_rate"] = describe(self.requests_at(rate))
        return d


class SimHost:
    """The simulator process of one point."""

    def __init__(self, cluster: ClusterSpec):
        self.cluster = cluster
        self.proc: asyncio.subprocess.Process | None = None
        self.instances: Instances | None = None
        self._log = tempfile.TemporaryFile()

    async def start(self, timeout: float = 60.0) -> "SimHost":
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.bench.simhost", json.dumps(self.cluster.to_dict()),
            stdout=asyncio.subprocess.PIPE, stderr=self._log, stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True, preexec_fn=die_with_parent)
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
            started = json.loads(line)
        except (asyncio.TimeoutError, json.JSONDecodeError):
            await self.stop()
            self._log.seek(0)
            raise RouterStartError(f"simulator did not start: {self._log.read()[-600:].decode(errors='replace')}") from None
        inst = Instances(block_size=self.cluster.block_size, chars_per_token=self.cluster.chars_per_token)
        for item in started["instances"]:
            getattr(inst, item["role"]).append(item["url"])
            if item.get("kv_endpoint"):
                inst.kv_endpoints[item["url"]] = item["kv_endpoint"]
        self.instances = inst
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    async def stats(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Simulator counters summed per role, and the prefix-cache hit share of computed prompts."""
        roles: dict[str, dict[str, float]] = {}
        for role in ("prefill", "decode", "collocated"):
            for url in getattr(self.instances, role):
                async with session.get(url + "/sim/stats") as r:
                    s = await r.json()
                acc = roles.setdefault(role, {"instances": 0})
                acc["instances"] += 1
                for key in ("prompt_tokens", "cached_tokens", "generated_tokens", "kv_pulled", "kv_expired",
                            "steps", "busy_s", "finished", "aborted"):
                    acc[key] = acc.get(key, 0) + s.get(key, 0)
        for acc in roles.values():
            acc["prefix_hit_share"] = acc["cached_tokens"] / acc["prompt_tokens"] if acc.get("prompt_tokens") else None
        return roles

    async def reset_caches(self, session: aiohttp.ClientSession) -> None:
        for url in self.instances.all:
            async with session.post(url + "/reset_prefix_cache") as r:
                await r.read()

    async def stop(self) -> dict[str, Any]:
        if self.proc is None or self.proc.returncode is not None:
            return {}
        try:
            self.proc.send_signal(signal.SIGTERM)
        except ProcessLookupError:
            return {}
        result: dict[str, Any] = {}
        try:
            out, _ = await asyncio.wait_for(self.proc.communicate(), 20)
            for line in out.decode().splitlines():
                if line.startswith("{") and "loop_lag" in line:
                    result = json.loads(line)
        except asyncio.TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        return result


class PointError(RuntimeError):
    """A point whose measurement is void: the simulator or the router died during it."""


def _check_alive(sims: SimHost, router: RouterProcess) -> None:
    """Void the point when a process under measurement exited before it ended (a killed
    simulator turns every later request into a connection error, not into a router's result)."""
    if sims.proc is not None and sims.proc.returncode is not None:
        raise PointError(f"the simulator process exited with code {sims.proc.returncode} during the point")
    code = router.proc.poll() if router.proc is not None else None
    if code is not None:
        raise PointError(f"the router process ({router.spec.name}) exited with code {code} during the point")


async def run_point(cluster: ClusterSpec, spec: RouterSpec, requests: Sequence[WorkloadRequest], slo: SLO, *,
                    rate: float | None, seed: int = 0, timeout_s: float = 300.0, progress: bool = True) -> PointResult:
    """Start the cluster and ``spec``, replay ``requests``, measure, stop. Raises Unsupported or
    RouterStartError when the router cannot run."""
    builder = PromptBuilder(seed)
    prompts = [builder.text(r, k) for k, r in enumerate(requests)]
    sims = await SimHost(cluster).start()
    router = RouterProcess(spec, sims.instances, slo=f"ttft={slo.ttft!r},tpot={slo.tpot!r}")
    try:
        await router.start()
        targets = router.targets
        await warm_up(targets)
        async with aiohttp.ClientSession() as session:
            await sims.reset_caches(session)
        pids = {"simulator": sims.pid, "client": os.getpid()}
        if router.pid is not None:
            pids["router"] = router.pid
        monitor = CpuMonitor(pids).start()
        label = f"{spec.name} @ {rate:g}/s" if rate is not None else spec.name
        records = await drive(targets, requests, prompts, timeout_s=timeout_s, progress=progress, label=label)
        cpu = await monitor.stop()
        _check_alive(sims, router)
        try:
            async with aiohttp.ClientSession() as session:
                sim_stats = await sims.stats(session)
        except aiohttp.ClientError as exc:
            raise PointError(f"could not read the simulator's counters after the point: {exc}") from None
    finally:
        await router.stop()
        lag = await sims.stop()
    summary = summarize(records, slo, rate)
    summary["cpu"] = cpu
    summary["simulator"] = {"roles": sim_stats, **lag}
    return PointResult(summary, records)


@dataclass
class RouterOutcome:
    """What ``omni-proxy bench`` reports for one router."""

    spec: RouterSpec
    entry: dict[str, Any]
    points: list[PointResult] = field(default_factory=list)


def typed_options(spec: RouterSpec) -> dict[str, Any]:
    """An omni spec's options with the types ``omni-proxy serve`` gives them."""
    from proxy.server.command import POLICY_FLAGS

    types = {opt: typ for opt, typ, _ in POLICY_FLAGS.values()}
    return {key: types.get(key, float)(value) for key, value in spec.options}


async def run_point_virtual(cluster: ClusterSpec, spec: RouterSpec, requests: Sequence[WorkloadRequest], slo: SLO, *,
                            rate: float | None, seed: int = 0, timeout_s: float = 300.0, progress: bool = True) -> PointResult:
    """The in-process point (simulated clock when the loop is a VirtualClockLoop); omni only."""
    if spec.kind != "omni":
        raise Unsupported("the virtual clock runs our proxy in-process; peers run in wall-clock time only")
    from .inprocess import run_point_inprocess  # the in-process server stack, loaded only when used

    return await run_point_inprocess(cluster, requests, slo, rate=rate, policy=spec.policy,
                                     policy_options=typed_options(spec), seed=seed, timeout_s=timeout_s)


def refine_rate(points: Sequence[tuple[float, bool]], step: float) -> float | None:
    """The next rate of a sweep's refinement: the geometric midpoint between the highest
    passing rate and the lowest failing rate above it while they are more than ``step``
    (relative) apart; None when done. points: (rate, passed)."""
    passing = [r for r, ok in points if ok]
    if not passing or step <= 0:
        return None
    lo = max(passing)
    above = [r for r, ok in points if not ok and r > lo]
    if not above:
        return None
    hi = min(above)
    if hi <= lo * (1 + step):
        return None
    mid = round((lo * hi) ** 0.5, 2)
    return mid if lo < mid < hi and mid not in {r for r, _ in points} else None


async def bench_router(cluster: ClusterSpec, spec: RouterSpec, workload: WorkloadSource, slo: SLO, *,
                       rates: Sequence[float], sweep: bool, patience: int = 1, timeout_s: float = 300.0,
                       progress: bool = True, on_point: Callable[[RouterSpec, dict], None] | None = None,
                       virtual: bool = False, refine: float = 0.0) -> RouterOutcome:
    """One rate, or a sweep over ``rates`` (ascending) that stops after ``patience`` failing
    points in a row (and steps below the lowest rate when that one fails already), then, with
    ``refine`` > 0, bisects between the highest passing and the next failing rate until they
    are at most ``refine`` (relative) apart, so goodput is known to that step near saturation.
    Sweep entry: the summary at the goodput rate (the lowest rate when none passes),
    ``goodput_qpm``, and every point under ``sweep`` (by rate)."""
    base: dict[str, Any] = {"router": spec.kind, "policy": spec.policy, "mode": cluster.mode}
    points: list[PointResult] = []

    async def one(rate: float) -> PointResult:
        point = await (run_point_virtual if virtual else run_point)(
            cluster, spec, workload.requests_at(rate), slo, rate=rate, seed=workload.seed, timeout_s=timeout_s,
            progress=progress)
        if on_point is not None:
            on_point(spec, point.summary)
        return point

    def passed(point: PointResult) -> bool:
        return point.summary["slo_attainment"] >= slo.attainment

    try:
        misses = 0
        for rate in rates:
            points.append(await one(rate))
            if sweep:
                misses = 0 if passed(points[-1]) else misses + 1
                if misses >= patience:
                    break
        # the lowest rate already fails: step down by the grid's first step (up to 4 times)
        # until one passes, so a weak router gets its goodput instead of 0
        step = rates[1] - rates[0] if len(rates) > 1 else rates[0] / 4
        probe = rates[0]
        for _ in range(4 if sweep and not passed(points[0]) else 0):
            probe = round(probe - step, 3)
            if probe <= 0:
                break
            points.insert(0, await one(probe))
            if passed(points[0]):
                break
        while sweep:
            mid = refine_rate([(p.summary["offered_rate"], passed(p)) for p in points], refine)
            if mid is None:
                break
            points.append(await one(mid))
        points.sort(key=lambda p: p.summary["offered_rate"])
    except Unsupported as exc:
        return RouterOutcome(spec, {**base, "skipped": str(exc)})
    except (RouterStartError, PointError) as exc:
        return RouterOutcome(spec, {**base, "error": str(exc)}, points)
    if not sweep:
        return RouterOutcome(spec, {**base, **points[0].summary}, points)
    qpm = goodput_qpm([(p.summary["offered_rate"], p.summary["slo_attainment"]) for p in points], slo.attainment)
    passing = [p for p in points if p.summary["slo_attainment"] >= slo.attainment]
    shown = max(passing, key=lambda p: p.summary["offered_rate"]) if passing else points[0]
    entry = {**base, **shown.summary, "goodput_qpm": qpm,
             "sweep": [{k: v for k, v in p.summary.items() if k not in ("errors",)} for p in points]}
    return RouterOutcome(spec, entry, points)


def attach_overhead(outcomes: Sequence[RouterOutcome]) -> None:
    """With a ``direct`` run at the same single rate, give every router its added latency."""
    direct = next((o for o in outcomes if o.spec.kind == "direct" and "ttft" in o.entry), None)
    if direct is None:
        return
    for o in outcomes:
        if o is not direct and "ttft" in o.entry and "sweep" not in o.entry:
            o.entry["added_latency"] = added_latency(o.entry, direct.entry)


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        info["load_avg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    from importlib import metadata

    for pkg in ("vllm-router", "sglang-router", "aiohttp"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    return info
