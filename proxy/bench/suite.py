"""The documented comparison: every run of docs/serving_bench.md in one command.

    python -m proxy.bench.suite --out docs/serving_bench [--only NAME ...] [--duration 30]

Each run is one ``omni-proxy bench`` invocation (its JSON and PNGs go to ``OUT/NAME.json``
and ``OUT/NAME/``); at the end ``OUT/summary.md`` holds the goodput table (QPM at the SLO per
router and run, with the ratios the goals name) and the overhead table. Runs already in
``OUT`` are kept unless ``--force``: a long suite can be resumed.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from .command import add_arguments as bench_arguments
from .command import main as bench_main
from .report import prefix_hit_share

SLO = "ttft=1,tpot=0.1"
# our policies with their token limits given in the scaled workloads' tokens (1 = 16 real), and
# decode_max_running = the ~24 sequences an instance decodes within the TPOT SLO; the
# cache_aware balance threshold was chosen the same way for ours and the peers
# (docs/serving_bench.md, "calibration", run on another seed).
OMNI = "omni:omni,bypass_tokens=8,prefill_max_tokens=2048,decode_max_running=24"
OMNI_CA = "omni:cache_aware,balance_abs=8"
PEERS_COLLOCATED = ["vllm-router:round_robin", "vllm-router:power_of_two", "vllm-router:cache_aware",
                    "vllm-router:cache_aware,balance_abs_threshold=8", "sglang-router:cache_aware",
                    "sglang-router:cache_aware,balance_abs_threshold=8"]
PEERS_PD = ["vllm-router:round_robin", "vllm-router:power_of_two", "vllm-router:cache_aware",
            "vllm-router:cache_aware,balance_abs_threshold=8", "sglang-router:cache_aware"]


@dataclass(frozen=True)
class Run:
    name: str
    cluster: str
    workload: str
    routers: tuple[str, ...]
    rates: str | None = None       # sweep rates; None: a single --rate
    rate: float | None = None

    def argv(self, out: Path, duration: float) -> list[str]:
        args = ["--cluster", f"proxy/bench/data/{self.cluster}.json", "--synthetic", self.workload, "--slo", SLO,
                "--duration", str(duration), "--output", str(out / f"{self.name}.json"),
                "--plot", str(out / self.name)]
        for r in self.routers:
            args += ["--router", r]
        args += ["--sweep", "--rates", self.rates] if self.rates else ["--rate", str(self.rate)]
        return args


MULTI_RATES = "24,28,30,32,34,36,38,40,44"
LONG_RATES = "10,11,12,13,14,15,16,18"
RUNS = [
    Run("colloc4_multi_turn", "colloc4", "multi_turn",
        (OMNI, OMNI_CA, "omni", *PEERS_COLLOCATED, "vllm-router:kv_aware"), rates=MULTI_RATES),
    Run("colloc4_long_prompt", "colloc4", "long_prompt", (OMNI, OMNI_CA, "omni", *PEERS_COLLOCATED), rates=LONG_RATES),
    Run("pd_1p3d_long_prompt", "pd_1p3d", "long_prompt", (OMNI, *PEERS_PD), rates=LONG_RATES),
    # 1P:3D saturates lower on multi_turn (one prefill instance; plan-pd: ~21-24 req/s)
    Run("pd_1p3d_multi_turn", "pd_1p3d", "multi_turn", (OMNI, *PEERS_PD), rates="16,18,20,21,22,23,24"),
    Run("colloc4_bursty", "colloc4", "bursty", (OMNI, OMNI_CA, "vllm-router:round_robin", "vllm-router:cache_aware",
                                                "sglang-router:cache_aware"), rates="40,44,48,52,56,60,64"),
    Run("overhead_200rps", "overhead2", "tiny", ("direct", "omni", "omni:round_robin", "vllm-router:round_robin",
                                                 "vllm-router:cache_aware", "sglang-router:cache_aware"), rate=200.0),
    Run("overhead_50rps", "overhead2", "tiny", ("direct", "omni", "omni:round_robin", "vllm-router:round_robin",
                                                "vllm-router:cache_aware", "sglang-router:cache_aware"), rate=50.0),
]


def summary(out: Path) -> str:
    """Markdown: goodput per router and run, ratios to vllm-router round_robin and the best peer."""
    docs = {r.name: json.loads((out / f"{r.name}.json").read_text()) for r in RUNS if (out / f"{r.name}.json").exists()}
    lines = []
    swept = {n: d for n, d in docs.items() if d.get("sweep")}
    if swept:
        routers: list[str] = []
        for d in swept.values():
            routers += [n for n in d["routers"] if n not in routers]
        lines += ["| router | " + " | ".join(swept) + " |", "|---|" + "---|" * len(swept)]
        for name in routers:
            cells = []
            for d in swept.values():
                e = d["routers"].get(name)
                if e is None:
                    cells.append("")
                elif "goodput_qpm" in e:
                    cells.append(f"{e['goodput_qpm']:.0f}")
                else:
                    cells.append("skipped" if "skipped" in e else "error")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| run | ours (best) | vllm-router:round_robin | best peer | ours / round_robin | ours / best peer |",
                  "|---|---|---|---|---|---|"]
        for run, d in swept.items():
            good = {n: e["goodput_qpm"] for n, e in d["routers"].items() if "goodput_qpm" in e}
            ours = {n: q for n, q in good.items() if n.startswith("omni")}
            peers = {n: q for n, q in good.items() if not n.startswith("omni")}
            if not ours or not peers:
                continue
            o_name, o = max(ours.items(), key=lambda kv: kv[1])
            p_name, p = max(peers.items(), key=lambda kv: kv[1])
            rr = good.get("vllm-router:round_robin")
            ratio = lambda a, b: "-" if not b else f"{a / b:.2f}x"  # noqa: E731
            lines.append(f"| {run} | {o:.0f} ({o_name}) | {'-' if rr is None else f'{rr:.0f}'} | {p:.0f} ({p_name}) | "
                         f"{ratio(o, rr)} | {ratio(o, p)} |")
    for n, d in swept.items():
        lines += ["", f"{n}: each router at its goodput rate (the highest passing rate of its sweep)", "",
                  "| router | QPM | SLO met | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | prefix hit share | router CPU mean / peak | machine CPU peak |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, e in d["routers"].items():
            if "goodput_qpm" not in e:
                lines.append(f"| {name} | {'skipped' if 'skipped' in e else 'error'} |||||||")
                continue
            lines.append(f"| {name} | " + " | ".join(_detail_cells(e)) + " |")
    for n, d in docs.items():
        if d.get("sweep"):
            continue
        lines += ["", f"{n}: added latency vs direct at {d['rates'][0]:g} req/s (ms), and CPU (% of one core, mean)",
                  "", "| router | TTFT p50 | TTFT p99 | E2E p50 | E2E p99 | router CPU | simulator CPU | client CPU |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, e in d["routers"].items():
            a = e.get("added_latency")
            cpu = e.get("cpu") or {}
            f = lambda v: "-" if v is None else f"{1e3 * v:.2f}"  # noqa: E731
            c = lambda k: f"{cpu[k]['mean']:.0f}" if k in cpu else "-"  # noqa: E731
            row = [f(a["ttft"]["p50"]), f(a["ttft"]["p99"]), f(a["e2e"]["p50"]), f(a["e2e"]["p99"])] if a else ["(baseline)"] + [""] * 3
            lines.append(f"| {name} | " + " | ".join(row + [c("router"), c("simulator"), c("client")]) + " |")
    return "\n".join(lines) + "\n"


def _detail_cells(e: dict) -> list[str]:
    """QPM, SLO attainment, TTFT/TPOT p50 and p99, prefix hit share and CPU of one router entry."""
    hit = prefix_hit_share(e)
    cpu = e.get("cpu") or {}
    pct = lambda k, f: f"{cpu[k][f]:.0f} %" if k in cpu else "-"  # noqa: E731
    return [f"{e['goodput_qpm']:.0f}", f"{100 * e['slo_attainment']:.0f} %",
            f"{e['ttft']['p50']:.3f} / {e['ttft']['p99']:.3f}", f"{1e3 * e['tpot']['p50']:.1f} / {1e3 * e['tpot']['p99']:.1f}",
            "-" if hit is None else f"{hit:.2f}", f"{pct('router', 'mean')} / {pct('router', 'peak')}",
            pct("machine", "peak")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m proxy.bench.suite", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/serving_bench", help="directory for JSON, PNGs and summary.md")
    p.add_argument("--only", action="append", choices=[r.name for r in RUNS], help="run only these (repeatable)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals per point")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON already exists")
    p.add_argument("--summary-only", action="store_true", help="only rewrite summary.md from the JSON files")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.summary_only:
        for run in RUNS:
            if args.only and run.name not in args.only:
                continue
            if (out / f"{run.name}.json").exists() and not args.force:
                print(f"suite: {run.name} done already ({out / run.name}.json)", file=sys.stderr)
                continue
            print(f"suite: {run.name}", file=sys.stderr, flush=True)
            bench = argparse.ArgumentParser()
            bench_arguments(bench)
            code = bench_main(bench.parse_args(run.argv(out, args.duration)))
            if code:
                print(f"suite: {run.name} exited {code}", file=sys.stderr)
    (out / "summary.md").write_text(summary(out))
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
