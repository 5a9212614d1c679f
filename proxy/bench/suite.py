"""The documented comparison: every run of docs/serving_bench.md in one command.

    python -m proxy.bench.suite --out docs/serving_bench [--only NAME ...] [--clock virtual]

Each run is one cluster and workload with several routers; every router is one
``omni-proxy bench`` invocation whose JSON goes to ``OUT/NAME.parts/`` as soon as it ends, so
an interrupted suite resumes where it stopped (a router half done is rerun; ``--force``
reruns everything asked for). When all routers of a run are done they are merged into
``OUT/NAME.json`` (the ``omni-proxy bench --json`` document), its figures go to ``OUT/NAME/``,
and ``OUT/summary.md`` is rewritten: goodput per router and run, our ratios to round robin and
to the best peer, TTFT at a common load, and the overhead tables.

Our proxy runs as ``omni`` with its defaults: the run's SLO is all it is told (``--slo``, as an
operator states it). Peers run with their defaults and tuned (the cache-aware balance threshold
that suits these instances, 8, found by a calibration on another seed, docs/serving_bench.md).

``--clock virtual`` runs the same list on the simulated clock (``proxy.bench.vclock``): our
proxy only, so the peers' rules are stood in for by our implementations of them
(``omni:round_robin``, ``omni:cache_aware``); deterministic and minutes instead of hours.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .command import add_arguments as bench_arguments
from .command import main as bench_main
from .report import common_load, latency_at, prefix_hit_share

SLO = "ttft=1,tpot=0.1"
REFINE = 0.05  # sweeps bisect the saturation edge to 5 % steps

OURS = "omni"
RR = "vllm-router:round_robin"
SMG = "smg:cache_aware"
SMG_TUNED = "smg:cache_aware,balance_abs_threshold=8"
PEERS_COLLOCATED = [RR, "vllm-router:power_of_two", "vllm-router:cache_aware",
                    "vllm-router:cache_aware,balance_abs_threshold=8", "sglang-router:cache_aware",
                    "sglang-router:cache_aware,balance_abs_threshold=8", SMG, SMG_TUNED]
PEERS_PD = [RR, "vllm-router:power_of_two", "vllm-router:cache_aware",
            "vllm-router:cache_aware,balance_abs_threshold=8"]
# the virtual clock runs our proxy only: our implementations of the peers' rules stand in
# (the peers' cache-aware rules are the same rule: one stand-in, at the default and the tuned threshold)
VIRTUAL_STAND_INS = {RR: "omni:round_robin", "vllm-router:cache_aware": "omni:cache_aware",
                     "sglang-router:cache_aware": "omni:cache_aware", SMG: "omni:cache_aware",
                     "vllm-router:cache_aware,balance_abs_threshold=8": "omni:cache_aware,balance_abs=8",
                     "sglang-router:cache_aware,balance_abs_threshold=8": "omni:cache_aware,balance_abs=8",
                     SMG_TUNED: "omni:cache_aware,balance_abs=8"}
# public traces: prompts up to 4k simulated tokens need 1.5 s of prefill alone, and with prompts this
# long against short answers most decode steps carry a full 512-token prefill chunk (0.215 s here)
TRACE_SLO = "ttft=2,tpot=0.25"


@dataclass(frozen=True)
class Run:
    name: str
    cluster: str
    workload: str
    routers: tuple[str, ...]
    rates: str | None = None       # sweep start grid (refined near the edge); None: one --rate
    rate: float | None = None
    slo: str = SLO
    wall_only: bool = False        # overhead runs measure the router's own latency: wall clock only
    trace: bool = False            # workload is a file of proxy/bench/data/ (a public trace), not a generator

    def routers_for(self, clock: str) -> list[str]:
        if clock == "wall":
            return list(self.routers)
        out = []
        for r in self.routers:
            r = VIRTUAL_STAND_INS.get(r, r)
            if r.startswith("omni") and r not in out:
                out.append(r)
        return out

    def argv(self, router: str, output: Path, duration: float, clock: str) -> list[str]:
        source = ["--workload", f"proxy/bench/data/{self.workload}"] if self.trace else ["--synthetic", self.workload]
        args = ["--cluster", f"proxy/bench/data/{self.cluster}.json", *source, "--slo", self.slo,
                "--duration", str(duration), "--output", str(output), "--router", router,
                "--clock", clock]
        if self.rates:
            args += ["--sweep", "--rates", self.rates, "--refine", str(REFINE)]
        else:
            args += ["--rate", str(self.rate)]
        return args


OVERHEAD_ROUTERS = ("direct", "omni", "omni:round_robin", RR, "vllm-router:cache_aware", "sglang-router:cache_aware", SMG)
RUNS = [
    Run("colloc4_multi_turn", "colloc4", "multi_turn", (OURS, *PEERS_COLLOCATED, "vllm-router:kv_aware"),
        rates="20,24,28,32,36,40,44"),
    Run("colloc4_long_prompt", "colloc4", "long_prompt", (OURS, *PEERS_COLLOCATED), rates="9,10,11,12,13,14,16"),
    Run("colloc4_bursty", "colloc4", "bursty", (OURS, RR, "vllm-router:cache_aware", "sglang-router:cache_aware",
                                                "sglang-router:cache_aware,balance_abs_threshold=8"),
        rates="36,40,44,48,52,56,60,64"),
    Run("colloc4_bursty_long", "colloc4", "bursty_long", (OURS, RR, "vllm-router:cache_aware",
                                                          "sglang-router:cache_aware,balance_abs_threshold=8"),
        rates="6,7,8,9,10,11,12"),
    Run("pd_1p3d_long_prompt", "pd_1p3d", "long_prompt", (OURS, *PEERS_PD), rates="8,9,10,11,12,13,14"),
    Run("pd_1p3d_multi_turn", "pd_1p3d", "multi_turn", (OURS, *PEERS_PD), rates="16,18,20,22,24,26,28,30,32"),
    Run("pd_2p2d_long_prompt", "pd_2p2d", "long_prompt", (OURS, RR, "vllm-router:cache_aware,balance_abs_threshold=8"),
        rates="5,6,7,8,9,10,11,12"),
    # not used while the policy was built: another profile, 3 instances, its own SLO
    Run("colloc3_rag", "colloc3_alt", "rag", (OURS, RR, "vllm-router:cache_aware",
                                              "vllm-router:cache_aware,balance_abs_threshold=8",
                                              "sglang-router:cache_aware",
                                              "sglang-router:cache_aware,balance_abs_threshold=8"),
        rates="28,36,44,52,60,70,80,90,100,115,130", slo="ttft=1.5,tpot=0.08"),
    # public traces, as published (proxy/bench/data/TRACES.md): the development windows
    Run("colloc4_mooncake_conversation", "colloc4", "mooncake_conversation_1200.jsonl",
        (OURS, *PEERS_COLLOCATED, "vllm-router:kv_aware"), rates="2,3,4,5,6,7,8", slo=TRACE_SLO, trace=True),
    Run("colloc4_azure_code", "colloc4", "azure_code_3000.csv", (OURS, *PEERS_COLLOCATED, "vllm-router:kv_aware"),
        rates="10,15,20,25,30,35,40,45", slo=TRACE_SLO, trace=True),
    Run("overhead_200rps", "overhead2", "tiny", OVERHEAD_ROUTERS, rate=200.0, wall_only=True),
    Run("overhead_50rps", "overhead2", "tiny", OVERHEAD_ROUTERS, rate=50.0, wall_only=True),
]


def _slug(router: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", router)


def run_one(run: Run, out: Path, duration: float, clock: str, force: bool) -> Path | None:
    """Every router of ``run`` not yet done; then the merged document and its figures."""
    result = out / f"{run.name}.json"
    if result.exists() and not force:
        print(f"suite: {run.name} done already ({result})", file=sys.stderr)
        return result
    parts = out / f"{run.name}.parts"
    if force and parts.exists():
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    routers = run.routers_for(clock)
    for k, router in enumerate(routers):
        part = parts / f"{k:02d}-{_slug(router)}.json"
        if part.exists():
            print(f"suite: {run.name}: {router} done already", file=sys.stderr)
            continue
        print(f"suite: {run.name}: {router} ({k + 1}/{len(routers)})", file=sys.stderr, flush=True)
        tmp = part.with_suffix(".tmp")
        bench = argparse.ArgumentParser()
        bench_arguments(bench)
        code = bench_main(bench.parse_args(run.argv(router, tmp, duration, clock) + ["--no-progress"]))
        if not tmp.exists():
            print(f"suite: {run.name}: {router} exited {code} without a result; rerun the suite to retry",
                  file=sys.stderr)
            return None
        tmp.rename(part)
    docs = [json.loads((parts / f"{k:02d}-{_slug(r)}.json").read_text()) for k, r in enumerate(routers)]
    merged = dict(docs[0])
    merged["routers"] = {name: e for d in docs for name, e in d["routers"].items()}
    if "direct" in merged["routers"]:  # added latency needs direct's numbers from its own part
        from .metrics import added_latency

        direct = merged["routers"]["direct"]
        for name, e in merged["routers"].items():
            if name != "direct" and "ttft" in e and "sweep" not in e and "ttft" in direct:
                e["added_latency"] = added_latency(e, direct)
    merged["machine"] = [d["machine"] for d in docs]
    result.write_text(json.dumps(merged, indent=1) + "\n")
    from .plots import plot_document

    plot_document(merged, out / run.name)
    shutil.rmtree(parts)
    return result


def _rr_name(entries: dict) -> str | None:
    """Round robin's entry: vllm-router's (wall clock) or our stand-in (virtual clock)."""
    return RR if RR in entries else ("omni:round_robin" if "omni:round_robin" in entries else None)


def _pair_load(entries: dict, rr_name: str | None, attainment: float) -> float | None:
    """The common load of omni and round robin alone (the rate the TTFT goal compares at): a
    third router that passed none of their rates does not take the comparison away."""
    if OURS not in entries or rr_name not in entries:
        return None
    return common_load({OURS: entries[OURS], rr_name: entries[rr_name]}, attainment)


def _ours(good: dict[str, float]) -> tuple[str, float] | None:
    return (OURS, good[OURS]) if OURS in good else None


def summary(out: Path) -> str:
    """Markdown: goodput per router and run, ours (defaults) against round robin and the best
    peer, TTFT at a common load, the detail of each run and the overhead tables."""
    docs = {r.name: json.loads((out / f"{r.name}.json").read_text()) for r in RUNS if (out / f"{r.name}.json").exists()}
    lines: list[str] = []
    swept = {n: d for n, d in docs.items() if d.get("sweep")}
    if swept:
        routers: list[str] = []
        for d in swept.values():
            routers += [n for n in d["routers"] if n not in routers]
        lines += ["Goodput (QPM at the SLO):", "", "| router | " + " | ".join(swept) + " |", "|---|" + "---|" * len(swept)]
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
        lines += ["", "`omni` (defaults) against round robin and the best other router; TTFT p50 at the common "
                  "load of omni and round robin (the highest rate both passed):", "",
                  "| run | omni | round robin | best other | omni / round robin | omni / best other "
                  "| common load (req/s) | TTFT p50 omni / round robin |",
                  "|---|---|---|---|---|---|---|---|"]
        for run, d in swept.items():
            entries = d["routers"]
            good = {n: e["goodput_qpm"] for n, e in entries.items() if "goodput_qpm" in e}
            if OURS not in good:
                continue
            rr_name = _rr_name(good)
            peers = {n: q for n, q in good.items() if n != OURS}
            p_name, p = max(peers.items(), key=lambda kv: kv[1]) if peers else ("-", 0.0)
            rr = good.get(rr_name) if rr_name else None
            ratio = lambda a, b: "-" if not b else f"{a / b:.2f}x"  # noqa: E731
            rate = _pair_load(entries, rr_name, d["slo"]["attainment"])
            lat = latency_at(entries, rate) if rate is not None else {}
            t_ours, t_rr = (lat.get(OURS) or {}).get("ttft_p50"), (lat.get(rr_name) or {}).get("ttft_p50")
            ttft = "-" if t_ours is None or not t_rr else f"{t_ours:.3f} / {t_rr:.3f} s = {t_ours / t_rr:.2f}x"
            lines.append(f"| {run} | {good[OURS]:.0f} | {'-' if rr is None else f'{rr:.0f} ({rr_name})'} | "
                         f"{p:.0f} ({p_name}) | {ratio(good[OURS], rr)} | {ratio(good[OURS], p)} | "
                         f"{'-' if rate is None else f'{rate:g}'} | {ttft} |")
    for n, d in swept.items():
        entries = d["routers"]
        rate, among = common_load(entries, d["slo"]["attainment"]), "every router"
        if rate is None:  # some router passed none of the others' rates: compare omni and round robin
            rate, among = _pair_load(entries, _rr_name(entries), d["slo"]["attainment"]), "omni and round robin"
        lines += ["", f"{n} ({d['cluster']['label']}, SLO TTFT <= {d['slo']['ttft']:g} s, TPOT <= "
                  f"{1e3 * d['slo']['tpot']:g} ms): each router at its goodput rate; TTFT p50 / p90 at the common "
                  f"load of {among} {'-' if rate is None else f'{rate:g} req/s'}", "",
                  "| router | QPM | SLO met | TTFT p50 / p99 (s) | TPOT p50 / p99 (ms) | prefix hit share "
                  "| router CPU mean / peak | machine CPU peak | TTFT p50 / p90 at common load (s) |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        lat = latency_at(entries, rate) if rate is not None else {}
        for name, e in entries.items():
            if "goodput_qpm" not in e:
                lines.append(f"| {name} | {'skipped' if 'skipped' in e else 'error'} ||||||||")
                continue
            at = lat.get(name)
            common = "-" if at is None else f"{at['ttft_p50']:.3f} / {at['ttft_p90']:.3f}"
            lines.append(f"| {name} | " + " | ".join(_detail_cells(e) + [common]) + " |")
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
    p.add_argument("--clock", choices=("wall", "virtual"), default="wall",
                   help="virtual: our proxy only, on the simulated clock (peers' rules by our stand-ins)")
    p.add_argument("--force", action="store_true", help="rerun runs whose JSON already exists")
    p.add_argument("--summary-only", action="store_true", help="only rewrite summary.md from the JSON files")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.summary_only:
        for run in RUNS:
            if (args.only and run.name not in args.only) or (run.wall_only and args.clock == "virtual"):
                continue
            print(f"suite: {run.name}", file=sys.stderr, flush=True)
            if run_one(run, out, args.duration, args.clock, args.force) is None:
                failed.append(run.name)
    (out / "summary.md").write_text(summary(out))
    print((out / "summary.md").read_text())
    if failed:
        print(f"suite: unfinished: {', '.join(failed)} (rerun the same command to resume)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
