"""`omni-proxy bench`: routers side by side on one simulated cluster and workload.

    omni-proxy bench --cluster proxy/bench/data/colloc4.json --synthetic multi_turn \\
        --router omni --router vllm-router:cache_aware --router sglang-router:cache_aware --sweep

For each router (and each rate of a sweep) it starts the cluster's simulated instances and
the router, sends the workload open-loop, streams every answer, and reports TTFT, TPOT, ITL
and E2E percentiles, throughput, SLO attainment, goodput (QPM at the SLO, sweeps), the
simulators' prefix-cache hits, and the CPU use of simulator, router, client and the rest of
the machine. ``--json`` prints one JSON document on stdout (the table goes to stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from .cluster import ClusterSpec
from .common import DEFAULT_RATES, add_trace_arguments, parse_rates, say, trace_requests
from .metrics import parse_slo
from .report import render
from .routers import parse_spec
from .runner import WorkloadSource, attach_overhead, bench_router, machine_info
from .synthetic import GENERATORS
from .workload import WorkloadError

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cluster", required=True, metavar="FILE",
                   help="cluster JSON: {\"instances\": [{\"role\", \"count\", \"profile\"}]} (proxy/bench/data/ has some)")
    w = p.add_mutually_exclusive_group(required=True)
    w.add_argument("--workload", metavar="FILE",
                   help="requests: the project's JSONL (docs/serving_bench.md), a Mooncake trace (JSONL with "
                        "timestamp, input_length, output_length, hash_ids) or an Azure LLM trace (CSV)")
    w.add_argument("--synthetic", choices=sorted(GENERATORS), help="generated workload (docs/serving_bench.md)")
    p.add_argument("--router", action="append", required=True, metavar="SPEC",
                   help="omni[:POLICY[,OPT=V...]] | vllm-router:POLICY | sglang-router:POLICY | direct; repeatable")
    r = p.add_mutually_exclusive_group(required=True)
    r.add_argument("--rate", type=float, help="offered request rate (req/s); a file's arrivals are rescaled to it")
    r.add_argument("--sweep", action="store_true", help="run the rates of --rates upwards to find goodput (QPM at the SLO)")
    p.add_argument("--rates", default=DEFAULT_RATES, help="sweep rates (req/s), comma-separated")
    p.add_argument("--sweep-patience", type=int, default=1,
                   help="stop a router's sweep after this many rates in a row below the SLO attainment")
    p.add_argument("--refine", type=float, default=0.0, metavar="STEP",
                   help="after a sweep, bisect between the highest passing and the next failing rate until "
                        "they are at most STEP apart (relative, e.g. 0.05); 0: off")
    p.add_argument("--slo", default="ttft=2.0,tpot=0.05",
                   help="SLO: ttft=S,tpot=S[,attainment=F] (attainment default 0.9)")
    p.add_argument("--duration", type=float, default=60.0, help="synthetic workloads: seconds of arrivals per run")
    p.add_argument("--seed", type=int, default=0, help="seed of synthetic workloads and prompt text")
    add_trace_arguments(p)
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one request may take before it counts as failed")
    p.add_argument("--json", action="store_true", help="print one JSON document on stdout (table on stderr)")
    p.add_argument("--output", metavar="FILE", help="also write the JSON document to FILE")
    p.add_argument("--plot", metavar="DIR", help="write TTFT/TPOT CDFs and goodput-vs-rate PNGs to DIR")
    p.add_argument("--save-workload", metavar="FILE.jsonl",
                   help="write the workload of the first rate as JSONL (rerun it with --workload)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall",
                   help="virtual: run omni routers in-process on a simulated clock (no CPU effects, no router "
                        "latency; peers are skipped); for calibrating our policies quickly")


async def _run(args, cluster, workload, specs, slo, rates) -> dict:
    # SIGTERM cancels the run like Ctrl-C does, so routers and simulators are stopped
    import signal

    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    outcomes = []
    for spec in specs:
        say(f"omni-proxy bench: {spec.name} on {cluster.label()} ({cluster.mode}), {workload.name}")

        def on_point(spec, s):
            say(f"  {spec.name} @ {s['offered_rate']:g} req/s: {s['completed']}/{s['requests']} completed, "
                f"SLO met {100 * s['slo_attainment']:.0f}%, TTFT p50 {s['ttft']['p50'] or 0:.3f} s, "
                f"TPOT p50 {1e3 * (s['tpot']['p50'] or 0):.1f} ms")

        outcome = await bench_router(cluster, spec, workload, slo, rates=rates, sweep=args.sweep,
                                     patience=args.sweep_patience, timeout_s=args.timeout,
                                     progress=not args.no_progress, on_point=on_point,
                                     virtual=args.clock == "virtual", refine=args.refine)
        if "skipped" in outcome.entry or "error" in outcome.entry:
            say(f"  {spec.name}: {outcome.entry.get('skipped') or outcome.entry.get('error')}")
        outcomes.append(outcome)
    attach_overhead(outcomes)
    return {"outcomes": outcomes}


def main(args: argparse.Namespace) -> int:
    try:
        cluster = ClusterSpec.load(args.cluster)
        specs = [parse_spec(s) for s in args.router]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"--router given twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
        slo = parse_slo(args.slo)
        rates = parse_rates(args.rates) if args.sweep else [args.rate]
        if not args.sweep and not (args.rate and args.rate > 0):
            raise ValueError(f"--rate must be positive, got {args.rate}")
        if args.duration <= 0 or args.timeout <= 0 or args.sweep_patience < 1:
            raise ValueError("--duration and --timeout must be positive and --sweep-patience at least 1")
        if not 0 <= args.refine < 1:
            raise ValueError(f"--refine must be in [0, 1), got {args.refine}")
        if args.workload:
            workload = WorkloadSource(Path(args.workload).name, seed=args.seed,
                                      file_requests=trace_requests(args, cluster))
        else:
            workload = WorkloadSource(args.synthetic, duration_s=args.duration, seed=args.seed)
    except (ValueError, WorkloadError) as exc:
        print(f"omni-proxy bench: {exc}", file=sys.stderr)
        return 2
    if args.save_workload:
        from .workload import save_jsonl

        save_jsonl(workload.requests_at(rates[0]), args.save_workload)
        say(f"omni-proxy bench: wrote the workload at {rates[0]:g} req/s to {args.save_workload}")
    machine = machine_info()
    if args.clock == "virtual":
        from .vclock import run_virtual

        result = run_virtual(_run(args, cluster, workload, specs, slo, rates))
    else:
        result = asyncio.run(_run(args, cluster, workload, specs, slo, rates))
    outcomes = result["outcomes"]
    entries = {o.spec.name: o.entry for o in outcomes}
    document = {
        "cluster": {"file": args.cluster, "mode": cluster.mode, "label": cluster.label(), **cluster.to_dict()},
        "workload": workload.to_dict(rates[0]),
        "slo": slo.to_dict(),
        "rates": rates,
        "sweep": bool(args.sweep),
        "machine": machine,
        "clock": args.clock,
        "routers": entries,
    }
    header = [f"cluster {cluster.label()} ({args.cluster}), workload {workload.name}, SLO TTFT <= {slo.ttft:g} s, "
              f"TPOT <= {1e3 * slo.tpot:g} ms, {100 * slo.attainment:g}% of requests; machine: {machine['cpus']} cores"]
    text = render(entries, header)
    if args.plot:
        from .plots import write_plots

        for path in write_plots(entries, slo, args.plot, title=f"({workload.name}, {cluster.label()})"):
            say(f"omni-proxy bench: wrote {path}")
    dumped = json.dumps(document, indent=1)
    if args.output:
        Path(args.output).write_text(dumped + "\n")
    if args.json:
        print(text, file=sys.stderr)
        print(dumped)
    else:
        print(text)
    bad = [o for o in outcomes if "error" in o.entry]
    return 1 if bad and len(bad) == len(outcomes) else 0
