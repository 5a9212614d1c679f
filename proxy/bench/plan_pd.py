"""`omni-proxy plan-pd`: recommend a prefill:decode split and PD-bypass threshold by simulation.

    omni-proxy plan-pd --cluster proxy/bench/data/colloc4.json --synthetic long_prompt \\
        --slo ttft=1,tpot=0.1 --rates 2,4,6,8,10,12

For N instances (the cluster file's count, or ``--instances``) it simulates every split
P:D with P + D = N (1 <= P < N), each with every ``--bypass`` setting of our ``omni``
policy (``auto``: bypass by predicted TTFT, the policy's default; a number N: the fixed rule
"at most N uncached tokens"; 0: never), and N collocated instances as the baseline; for each candidate it sweeps the offered
rate upwards (stopping at the first rate below the SLO attainment, then bisecting
``--refine`` times between the last passing and the first failing rate) and takes its
goodput. The recommendation is the candidate with the highest goodput; ties go to the higher
mean SLO attainment over the rates all tied candidates ran, then to fewer prefill instances.

Each point runs the simulator, our proxy and the client in this process on a virtual clock
(``proxy.bench.vclock``): real code and sockets, simulated time, so the plan does not depend
on how busy this machine is and a sweep takes seconds per point. ``--real-time`` runs each
point as ``omni-proxy bench`` does instead (separate processes, wall-clock time).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cluster import ClusterSpec, InstanceGroup
from .common import DEFAULT_RATES, add_trace_arguments, parse_rates, say, trace_requests
from .metrics import SLO, parse_slo
from .runner import WorkloadSource
from .synthetic import GENERATORS
from .workload import WorkloadError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, metavar="FILE",
                   help="cluster JSON whose profiles the instances use (prefill/decode groups keep their own)")
    p.add_argument("--instances", type=int, default=None, help="instances to split (default: the cluster file's count)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--workload", metavar="FILE", help="requests: the project's JSONL, a Mooncake JSONL or an Azure CSV trace")
    w.add_argument("--synthetic", choices=sorted(GENERATORS), help="generated workload")
    p.add_argument("--slo", default="ttft=2.0,tpot=0.05", help="SLO: ttft=S,tpot=S[,attainment=F]")
    p.add_argument("--rates", default=DEFAULT_RATES, help="sweep rates (req/s), comma-separated")
    p.add_argument("--refine", type=int, default=2, help="bisection steps between the last passing and first failing rate")
    p.add_argument("--bypass", default="auto,0", help="PD-bypass settings to try, comma-separated: auto (by predicted "
                                                         "TTFT, the default rule) or a token threshold (0: never)")
    p.add_argument("--policy-option", action="append", default=[], metavar="KEY=VALUE",
                   help="other omni policy options for every candidate (e.g. ttft_share=0.5)")
    p.add_argument("--no-collocated", action="store_true", help="do not simulate the collocated baseline")
    p.add_argument("--duration", type=float, default=30.0, help="synthetic workloads: seconds of arrivals per point")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic workloads and prompt text")
    add_trace_arguments(p)
    p.add_argument("--real-time", action="store_true", help="run points as separate processes in wall-clock time")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (table on stderr)")
    p.add_argument("--output", metavar="FILE", help="also write the JSON document to FILE")


AUTO = "auto"


@dataclass
class Candidate:
    prefill: int
    decode: int
    bypass_tokens: int | str | None    # None: collocated; "auto": by predicted TTFT; N: fixed rule
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.bypass_tokens is None:
            return f"collocated x{self.decode}"
        if self.bypass_tokens == AUTO:
            return f"{self.prefill}P:{self.decode}D bypass auto"
        return f"{self.prefill}P:{self.decode}D bypass<={self.bypass_tokens}"

    def cluster(self, base: ClusterSpec) -> ClusterSpec:
        first = base.groups[0].profile
        p = next((g.profile for g in base.groups if g.role == "prefill"), first)
        d = next((g.profile for g in base.groups if g.role in ("decode", "collocated")), first)
        if self.bypass_tokens is None:
            return ClusterSpec((InstanceGroup("collocated", self.decode, d),), base.source)
        return ClusterSpec((InstanceGroup("prefill", self.prefill, p), InstanceGroup("decode", self.decode, d)),
                           base.source)

    @property
    def goodput_qpm(self) -> float:
        return 60.0 * max((pt["rate"] for pt in self.points if pt["passed"]), default=0.0)

    def attainment_at(self, rate: float) -> float | None:
        return next((pt["slo_attainment"] for pt in self.points if pt["rate"] == rate), None)


def _options(items: list[str]) -> dict[str, float]:
    from scheduling.policies import make_policy, policy_options

    allowed = [k for k in policy_options("omni") if k != "bypass_tokens"]
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise ValueError(f"--policy-option takes KEY=VALUE with KEY one of {', '.join(allowed)}; got {item!r}")
        try:
            out[key] = int(value) if key.endswith(("_tokens", "_running")) else float(value)
        except ValueError:
            raise ValueError(f"--policy-option {key} takes a number, got {value!r}") from None
    make_policy("omni", **out)  # rejects bad values with the policy's own message
    return out


def _bypass(text: str) -> list[int | str]:
    out: list[int | str] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if item == AUTO:
            out.append(AUTO)
            continue
        try:
            value = int(item)
        except ValueError:
            raise ValueError(f"--bypass takes 'auto' or non-negative integers, got {item!r}") from None
        if value < 0:
            raise ValueError(f"--bypass takes 'auto' or non-negative integers, got {item!r}")
        out.append(value)
    if not out:
        raise ValueError(f"--bypass takes 'auto' or non-negative integers, got {text!r}")
    return sorted(set(out), key=lambda b: (b != AUTO, b if b != AUTO else 0))


def candidates_for(n: int, bypass: list[int | str], collocated: bool) -> list[Candidate]:
    out = [Candidate(0, n, None)] if collocated else []
    out += [Candidate(p, n - p, b) for p in range(1, n) for b in bypass]
    return out


async def _point(cand: Candidate, base: ClusterSpec, workload: WorkloadSource, slo: SLO, rate: float,
                 options: dict[str, float], real_time: bool) -> dict[str, Any]:
    requests = workload.requests_at(rate)
    opts = dict(options)
    if cand.bypass_tokens not in (None, AUTO):
        opts["bypass_tokens"] = cand.bypass_tokens
    cluster = cand.cluster(base)
    if real_time:
        from .routers import RouterSpec
        from .runner import run_point

        spec = RouterSpec("omni", "omni", tuple((k, str(v)) for k, v in opts.items()), "omni")
        result = await run_point(cluster, spec, requests, slo, rate=rate, seed=workload.seed, progress=False)
    else:
        from .inprocess import run_point_inprocess

        result = await run_point_inprocess(cluster, requests, slo, rate=rate, policy="omni", policy_options=opts,
                                           seed=workload.seed)
    s = result.summary
    return {"rate": rate, "requests": s["requests"], "failed": s["failed"], "slo_attainment": s["slo_attainment"],
            "passed": s["slo_attainment"] >= slo.attainment,
            "ttft": s["ttft"], "tpot": s["tpot"]}


async def sweep(cand: Candidate, base: ClusterSpec, workload: WorkloadSource, slo: SLO, rates: list[float],
                refine: int, options: dict[str, float], real_time: bool) -> None:
    last_pass, first_fail = None, None
    for rate in rates:
        pt = await _point(cand, base, workload, slo, rate, options, real_time)
        cand.points.append(pt)
        say(f"  {cand.label} @ {rate:g} req/s: SLO met {100 * pt['slo_attainment']:.0f}%")
        if pt["passed"]:
            last_pass = rate
        else:
            first_fail = rate
            break
    for _ in range(refine if first_fail is not None else 0):
        lo = last_pass if last_pass is not None else 0.0
        rate = round((lo + first_fail) / 2, 3)
        if rate <= 0 or rate in (lo, first_fail):
            break
        pt = await _point(cand, base, workload, slo, rate, options, real_time)
        cand.points.append(pt)
        say(f"  {cand.label} @ {rate:g} req/s: SLO met {100 * pt['slo_attainment']:.0f}% (refine)")
        if pt["passed"]:
            last_pass = rate
        else:
            first_fail = rate
    cand.points.sort(key=lambda p: p["rate"])


def choose(cands: list[Candidate]) -> Candidate:
    """Highest goodput; ties: higher mean attainment over their common rates, fewer P."""
    best = max(c.goodput_qpm for c in cands)
    tied = [c for c in cands if c.goodput_qpm == best]
    common = set.intersection(*({p["rate"] for p in c.points} for c in tied)) if tied else set()

    def key(c: Candidate):
        mean = sum(c.attainment_at(r) for r in common) / len(common) if common else 0.0
        return (-mean, c.prefill, -1 if c.bypass_tokens in (None, AUTO) else c.bypass_tokens)

    return min(tied, key=key)


def table(cands: list[Candidate], chosen: Candidate) -> str:
    rates = sorted({p["rate"] for c in cands for p in c.points})
    head = ["candidate", "goodput QPM", "TTFT p90 s", "TPOT p90 ms"] + [f"{r:g}/s" for r in rates]
    rows = [head]
    for c in cands:
        at = max((p for p in c.points if p["passed"]), key=lambda p: p["rate"], default=None)
        by_rate = {p["rate"]: p for p in c.points}
        rows.append([("* " if c is chosen else "  ") + c.label, f"{c.goodput_qpm:.0f}",
                     "-" if at is None else f"{at['ttft']['p90']:.3f}",
                     "-" if at is None else f"{1e3 * at['tpot']['p90']:.1f}"]
                    + [f"{100 * by_rate[r]['slo_attainment']:.0f}%" if r in by_rate else "" for r in rates])
    widths = [max(len(r[k]) for r in rows) for k in range(len(head))]
    lines = ["  ".join(cell.rjust(w) if k else cell.ljust(w) for k, (cell, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    try:
        base = ClusterSpec.load(args.cluster)
        n = args.instances or sum(g.count for g in base.groups)
        if n < 2:
            raise ValueError(f"--instances must be at least 2 to split, got {n}")
        slo = parse_slo(args.slo)
        rates = parse_rates(args.rates)
        bypass = _bypass(args.bypass)
        options = _options(args.policy_option)
        if args.refine < 0 or args.duration <= 0:
            raise ValueError("--refine must not be negative and --duration must be positive")
        if args.workload:
            workload = WorkloadSource(Path(args.workload).name, seed=args.seed, file_requests=trace_requests(args, base))
        else:
            workload = WorkloadSource(args.synthetic, duration_s=args.duration, seed=args.seed)
    except (ValueError, WorkloadError) as exc:
        print(f"omni-proxy plan-pd: {exc}", file=sys.stderr)
        return 2
    cands = candidates_for(n, bypass, not args.no_collocated)

    async def run_all() -> None:
        from tqdm import tqdm

        for cand in tqdm(cands, desc="plan-pd", unit="candidate", file=sys.stderr, leave=False):
            await sweep(cand, base, workload, slo, rates, args.refine, options, args.real_time)

    if args.real_time:
        asyncio.run(run_all())
    else:
        from .vclock import run_virtual

        run_virtual(run_all())
    chosen = choose(cands)
    rec = {"prefill": chosen.prefill, "decode": chosen.decode, "mode": "collocated" if chosen.bypass_tokens is None else "pd",
           "bypass_tokens": chosen.bypass_tokens, "goodput_qpm": chosen.goodput_qpm}
    document = {
        "instances": n, "cluster": args.cluster, "workload": workload.to_dict(), "slo": slo.to_dict(),
        "clock": "wall" if args.real_time else "virtual", "policy_options": options,
        "candidates": [{"prefill": c.prefill, "decode": c.decode, "bypass_tokens": c.bypass_tokens,
                        "mode": "collocated" if c.bypass_tokens is None else "pd", "goodput_qpm": c.goodput_qpm,
                        "points": c.points} for c in cands],
        "recommendation": rec,
    }
    what = ("collocated" if chosen.bypass_tokens is None
            else f"P:D = {chosen.prefill}:{chosen.decode}, bypass_tokens = {chosen.bypass_tokens}")
    text = (f"plan-pd: {n} instances, workload {workload.name}, SLO TTFT <= {slo.ttft:g} s, TPOT <= "
            f"{1e3 * slo.tpot:g} ms for {100 * slo.attainment:g}% ({document['clock']} clock)\n"
            f"{table(cands, chosen)}\n\nrecommended: {what} (goodput {chosen.goodput_qpm:.0f} QPM)")
    dumped = json.dumps(document, indent=1)
    if args.output:
        Path(args.output).write_text(dumped + "\n")
    if args.json:
        print(text, file=sys.stderr)
        print(dumped)
    else:
        print(text)
    return 0
