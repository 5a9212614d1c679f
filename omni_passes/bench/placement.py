"""`omni-passes bench placement`: our planner and vLLM's EPLB, side by side, same traces.

For every trace (``omni_passes.placement.traces``) and cluster budget (ranks, nodes, slots per
rank, expert groups), the trace is cut into windows of ``--window`` steps and both planners
run on the same windows:

  static       plan on window t, score on window t (both planners get the window sum)
  predictive   plan on window t, score on window t+1: EPLB on the window sum (what vLLM
               does), ours on its forecast of the window's per-step series; "ours (sum)"
               plans on the sum too, to show what comes from the planner alone
  online       re-plan every window from the previous placement: EPLB with its
               old_global_expert_indices, ours migration-aware (repair or fresh per layer,
               --min-gain); predictive balance and slots moved per re-plan
  time         planning time per call, both on the same [layers, experts] sums, interleaved

The metric is ``omni_passes.placement.metrics``: mean over layers of mean/max rank load.
Gains are relative: (ours / EPLB - 1) x 100 %.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from omni_passes.cli.common import UserError, emit_json, say


@dataclass(frozen=True)
class Budget:
    name: str
    ranks: int
    nodes: int
    slots_per_rank: int
    groups: int

    def mode(self, num_experts: int) -> str:
        hierarchical = self.nodes > 1 and self.groups > 1 and self.groups % self.nodes == 0
        return "hierarchical" if hierarchical else "global"

    def redundant(self, num_experts: int) -> int:
        return self.ranks * self.slots_per_rank - num_experts


# DeepSeek (256 experts, 8 groups): vLLM passes n_group=8 and the real node count, so EPLB
# goes hierarchical whenever 8 % nodes == 0; "global" budgets pass groups=1.
DEEPSEEK_BUDGETS = (
    Budget("EP32x8 hier", 32, 4, 8, 8),
    Budget("EP32x9 hier", 32, 4, 9, 8),
    Budget("EP32x9 global", 32, 4, 9, 1),
    Budget("EP64x5 hier", 64, 8, 5, 8),
    Budget("EP64x5 global", 64, 8, 5, 1),
    Budget("EP72x4 global", 72, 9, 4, 8),  # 8 groups on 9 nodes: EPLB falls back to global
)
QWEN_BUDGETS = (
    Budget("EP16x8 global", 16, 2, 8, 1),
    Budget("EP16x9 global", 16, 2, 9, 1),
    Budget("EP32x5 global", 32, 4, 5, 1),
)
TIMING_BUDGET = "EP64x5 global"  # 58 x 256 on 64 ranks / 8 nodes (see docs/placement.md)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--traces", nargs="+", default=None, help="trace names (default: all in traces.TRACES)")
    parser.add_argument("--steps", type=int, default=800, help="steps per trace")
    parser.add_argument("--window", type=int, default=100, help="steps per planning window")
    parser.add_argument("--min-gain", type=float, default=0.005, help="ours online: per-layer gain needed to move slots")
    parser.add_argument("--quick", action="store_true", help="small run for CI: 2 traces, 300 steps, 2 budgets each")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots to DIR")


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, (time.perf_counter() - start) * 1e3


def _gain(ours: float, peer: float) -> float:
    return (ours / peer - 1.0) * 100.0


def run_case(trace: torch.Tensor, budget: Budget, window: int, min_gain: float) -> tuple[dict, dict, dict]:
    """All measurements for one trace and budget.

    Returns:
        (the result entry, per-layer imbalance averaged over windows, and the raw
        ``[windows, layers]`` arrays), the last two for the plots.
    """
    from omni_passes.placement import metrics
    from omni_passes.placement.eplb_peer import eplb_plan
    from omni_passes.placement.placement import Placement
    from omni_passes.placement.forecast import forecast_loads
    from omni_passes.placement.planner import PlanOptions, plan

    R, N, S, G = budget.ranks, budget.nodes, budget.slots_per_rank, budget.groups
    steps, L, E = trace.shape
    sums = [trace[t : t + window].sum(0, dtype=torch.int64) for t in range(0, steps - window + 1, window)]
    series = [trace[t : t + window].numpy() for t in range(0, steps - window + 1, window)]
    identity = Placement.identity(L, E, R, N, S)
    score = lambda p, load: metrics.score(p, load)  # noqa: E731

    rec: dict[str, list] = {k: [] for k in (
        "id_static", "eplb_static", "ours_static", "eplb_pred", "ours_pred", "ours_pred_sum",
        "eplb_ms", "ours_ms", "forecast_ms", "eplb_online_ms", "ours_online_ms", "eplb_online", "ours_online", "eplb_moves", "ours_moves")}
    layers = {"identity": [], "eplb": [], "ours": [], "eplb_pred": [], "ours_pred": []}
    eplb_prev = ours_prev = None
    for t, load in enumerate(sums):
        nxt = sums[t + 1] if t + 1 < len(sums) else None
        # Static, and the timing: same [L, E] input, interleaved (EPLB first on even windows).
        order = ("eplb", "ours") if t % 2 == 0 else ("ours", "eplb")
        plans = {}
        for who in order:
            if who == "eplb":
                plans[who], ms = _timed(eplb_plan, load, R, N, S, G)
            else:
                plans[who], ms = _timed(plan, load, R, N, S, G)
            rec[f"{who}_ms"].append(ms)
        rep = {who: score(p, load) for who, p in plans.items()}
        rep_id = score(identity, load)
        rec["id_static"].append(rep_id.mean_balancedness)
        rec["eplb_static"].append(rep["eplb"].mean_balancedness)
        rec["ours_static"].append(rep["ours"].mean_balancedness)
        layers["identity"].append(rep_id.imbalance)
        layers["eplb"].append(rep["eplb"].imbalance)
        layers["ours"].append(rep["ours"].imbalance)
        if nxt is None:
            continue
        # Predictive: plan on window t, score on window t + 1.
        (expected, _), f_ms = _timed(forecast_loads, series[t].astype(np.float64))
        rec["forecast_ms"].append(f_ms)
        ours_f = plan(expected, R, N, S, G)
        rep_e, rep_o = score(plans["eplb"], nxt), score(ours_f, nxt)
        rec["eplb_pred"].append(rep_e.mean_balancedness)
        rec["ours_pred"].append(rep_o.mean_balancedness)
        rec["ours_pred_sum"].append(score(plans["ours"], nxt).mean_balancedness)
        layers["eplb_pred"].append(rep_e.imbalance)
        layers["ours_pred"].append(rep_o.imbalance)
        # Online: each re-plan starts from the placement in use.
        e_new, e_ms = _timed(eplb_plan, load, R, N, S, G, previous=eplb_prev)
        o_new, o_ms = _timed(plan, expected, R, N, S, G, previous=ours_prev, options=PlanOptions(min_gain=min_gain))
        if eplb_prev is not None:
            rec["eplb_online_ms"].append(e_ms)
            rec["ours_online_ms"].append(o_ms)
        if eplb_prev is not None:
            rec["eplb_moves"].append(metrics.slots_changed(eplb_prev, e_new))
            rec["ours_moves"].append(metrics.slots_changed(ours_prev, o_new))
        rec["eplb_online"].append(score(e_new, nxt).mean_balancedness)
        rec["ours_online"].append(score(o_new, nxt).mean_balancedness)
        eplb_prev, ours_prev = e_new, o_new

    mean = lambda key: float(np.mean(rec[key])) if rec[key] else float("nan")  # noqa: E731
    med = lambda key: float(statistics.median(rec[key])) if rec[key] else float("nan")  # noqa: E731
    result = {
        "budget": budget.name,
        "ranks": R, "nodes": N, "slots_per_rank": S, "groups": G,
        "redundant": budget.redundant(E), "mode": budget.mode(E), "windows": len(sums),
        "identity": {"static": mean("id_static")},
        "eplb": {
            "static": mean("eplb_static"), "predictive": mean("eplb_pred"), "plan_ms": med("eplb_ms"),
            "online": {"predictive": mean("eplb_online"), "moves_per_replan": mean("eplb_moves"),
                       "plan_ms": med("eplb_online_ms")},
        },
        "ours": {
            "static": mean("ours_static"), "predictive": mean("ours_pred"), "predictive_sum": mean("ours_pred_sum"),
            "plan_ms": med("ours_ms"), "forecast_ms": med("forecast_ms"),
            "online": {"predictive": mean("ours_online"), "moves_per_replan": mean("ours_moves"),
                       "plan_ms": med("ours_online_ms")},
        },
    }
    result["gain_pct"] = {
        "static": _gain(result["ours"]["static"], result["eplb"]["static"]),
        "predictive": _gain(result["ours"]["predictive"], result["eplb"]["predictive"]),
        "predictive_sum": _gain(result["ours"]["predictive_sum"], result["eplb"]["predictive"]),
        "online": _gain(result["ours"]["online"]["predictive"], result["eplb"]["online"]["predictive"]),
    }
    per_layer = {k: np.asarray(v).mean(axis=0).tolist() for k, v in layers.items() if v}
    return result, per_layer, {k: np.asarray(v) for k, v in layers.items() if v}


def _cases(args) -> list[tuple[str, tuple[Budget, ...], int]]:
    from omni_passes.placement import traces

    names = args.traces or list(traces.TRACES)
    unknown = [n for n in names if n not in traces.TRACES]
    if unknown:
        raise UserError(f"--traces: unknown trace(s) {', '.join(unknown)}; known: {', '.join(traces.TRACES)}")
    steps = args.steps
    out = []
    for name in names:
        budgets = QWEN_BUDGETS if traces.TRACES[name].num_experts == 128 else DEEPSEEK_BUDGETS
        if args.quick:
            budgets = budgets[1:3] if len(budgets) > 2 else budgets[:2]
        out.append((name, budgets, steps))
    return out


def main(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except UserError as exc:
        say(f"omni-passes bench placement: error: {exc}")
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from omni_passes.placement import traces
    from omni_passes.placement.eplb_peer import eplb_policy

    if args.quick:
        args.traces = args.traces or ["deepseek-translation", "qwen3-30b-a3b"]
        args.steps = min(args.steps, 300)
    if args.window < 2 or args.steps < 2 * args.window:
        raise UserError(f"need --window >= 2 and --steps >= 2 x --window, got {args.window} and {args.steps}")
    try:
        eplb_policy()
    except ImportError as exc:
        raise UserError(str(exc)) from None
    started = time.perf_counter()
    cases = _cases(args)
    results, plots = [], {}
    total = sum(len(b) for _, b, _ in cases)
    with tqdm(total=total, desc="placement bench", file=sys.stderr, disable=None) as bar:
        for name, budgets, steps in cases:
            trace = traces.generate(traces.get_spec(name, steps=steps))
            for budget in budgets:
                bar.set_postfix_str(f"{name} {budget.name}")
                result, per_layer, raw = run_case(trace, budget, args.window, args.min_gain)
                result["trace"] = name
                results.append(result)
                plots[(name, budget.name)] = (per_layer, raw)
                bar.update(1)
    document = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "vllm": _vllm_version()},
        "settings": {"steps": args.steps, "window": args.window, "min_gain": args.min_gain,
                     "traces": [c[0] for c in cases]},
        "results": results,
        "summary": summarise(results),
        "elapsed_s": time.perf_counter() - started,
    }
    if args.plot:
        document["plots"] = write_plots(args.plot, results, plots)
    if args.json:
        emit_json(document)
    else:
        print_table(document)
    return 0


def _vllm_version() -> str | None:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001  (any import failure just means "not reported")
        return None


def summarise(results: list[dict]) -> dict:
    gains = {k: [r["gain_pct"][k] for r in results] for k in ("static", "predictive", "online")}
    timing = [r for r in results if r["budget"] == TIMING_BUDGET and r["trace"].startswith("deepseek")]
    summary = {
        f"mean_gain_{k}_pct": float(np.mean(v)) for k, v in gains.items()
    } | {
        f"min_gain_{k}_pct": float(np.min(v)) for k, v in gains.items()
    }
    summary["ours_ge_eplb_everywhere"] = {k: bool(min(v) >= 0.0) for k, v in gains.items()}
    summary["mean_gain_static_and_predictive_pct"] = float(np.mean(gains["static"] + gains["predictive"]))
    summary["moves_ratio_online"] = float(
        np.mean([r["ours"]["online"]["moves_per_replan"] / max(r["eplb"]["online"]["moves_per_replan"], 1) for r in results])
    )
    if timing:
        summary["timing"] = {
            "budget": TIMING_BUDGET,
            "ours_ms_median": float(np.median([r["ours"]["plan_ms"] for r in timing])),
            "eplb_ms_median": float(np.median([r["eplb"]["plan_ms"] for r in timing])),
        }
    summary["plan_ms_ratio_mean"] = float(np.mean([r["ours"]["plan_ms"] / r["eplb"]["plan_ms"] for r in results]))
    return summary


def print_table(doc: dict) -> None:
    head = (f"{'trace':<21} {'budget':<14} {'red':>4} {'mode':<5} {'ident':>6} | {'static EPLB':>11} {'ours':>6} {'gain%':>6} | "
            f"{'pred EPLB':>9} {'ours':>6} {'gain%':>6} | {'online EPLB':>11} {'ours':>6} {'moves E/O':>11} | {'ms EPLB/ours':>12}")
    print(head)
    print("-" * len(head))
    for r in doc["results"]:
        e, o, g = r["eplb"], r["ours"], r["gain_pct"]
        print(f"{r['trace']:<21} {r['budget']:<14} {r['redundant']:>4} {r['mode'][:5]:<5} {r['identity']['static']:>6.3f} | "
              f"{e['static']:>11.4f} {o['static']:>6.4f} {g['static']:>+6.2f} | "
              f"{e['predictive']:>9.4f} {o['predictive']:>6.4f} {g['predictive']:>+6.2f} | "
              f"{e['online']['predictive']:>11.4f} {o['online']['predictive']:>6.4f} "
              f"{e['online']['moves_per_replan']:>5.0f}/{o['online']['moves_per_replan']:<5.0f} | "
              f"{e['plan_ms']:>5.1f}/{o['plan_ms']:<6.1f}")
    s = doc["summary"]
    print()
    print(f"mean gain over EPLB: static {s['mean_gain_static_pct']:+.2f} %, predictive {s['mean_gain_predictive_pct']:+.2f} %, "
          f"online {s['mean_gain_online_pct']:+.2f} % (worst case: {s['min_gain_static_pct']:+.2f} / "
          f"{s['min_gain_predictive_pct']:+.2f} / {s['min_gain_online_pct']:+.2f} %)")
    print(f"ours >= EPLB everywhere: {s['ours_ge_eplb_everywhere']}; online slots moved, ours/EPLB: {s['moves_ratio_online']:.2f}")
    if "timing" in s:
        t = s["timing"]
        print(f"planning time, {t['budget']} (58 x 256): ours {t['ours_ms_median']:.1f} ms, EPLB {t['eplb_ms_median']:.1f} ms (median)")
    print(f"elapsed {doc['elapsed_s']:.0f} s; machine: {doc['machine']['cpus']} CPUs, torch {doc['machine']['torch']}, "
          f"vllm {doc['machine']['vllm']}")


def write_plots(directory: str, results: list[dict], plots: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    written = []
    # 1. Per-layer imbalance, static and predictive, one panel per budget of each trace.
    for trace in dict.fromkeys(r["trace"] for r in results):
        budgets = [r["budget"] for r in results if r["trace"] == trace]
        fig, axes = plt.subplots(len(budgets), 1, figsize=(11, 2.6 * len(budgets)), sharex=True, squeeze=False)
        for ax, budget in zip(axes[:, 0], budgets):
            per_layer, _ = plots[(trace, budget)]
            x = np.arange(len(per_layer["ours"]))
            ax.plot(x, per_layer["identity"], color="0.6", label="before (identity)")
            ax.plot(x, per_layer["eplb"], color="tab:orange", label="EPLB static")
            ax.plot(x, per_layer["ours"], color="tab:blue", label="ours static")
            if "eplb_pred" in per_layer:
                ax.plot(x, per_layer["eplb_pred"], color="tab:orange", ls="--", label="EPLB predictive")
                ax.plot(x, per_layer["ours_pred"], color="tab:blue", ls="--", label="ours predictive")
            ax.set_yscale("log")
            ax.set_ylabel("max/mean")
            ax.set_title(f"{trace}, {budget}", fontsize=9)
        axes[0, 0].legend(fontsize=7, ncol=5, loc="upper right")
        axes[-1, 0].set_xlabel("MoE layer")
        fig.tight_layout()
        path = os.path.join(directory, f"per_layer_{trace}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    # 2. Distribution over layers (and windows) of predictive imbalance, EPLB vs ours.
    keys = list(plots)
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(keys)), 4.5))
    data, labels, colors = [], [], []
    for trace, budget in keys:
        raw = plots[(trace, budget)][1]
        if "eplb_pred" not in raw:
            continue
        data += [raw["eplb_pred"].ravel(), raw["ours_pred"].ravel()]
        colors += ["tab:orange", "tab:blue"]
        labels += [f"{trace.replace('deepseek-', 'ds-')}\n{budget}", ""]
    parts = ax.boxplot(data, patch_artist=True, showfliers=False)
    for patch, color in zip(parts["boxes"], colors):
        patch.set_facecolor(color)
    ax.set_xticks(np.arange(1, len(data) + 1, 2) + 0.5, labels[::2], rotation=90, fontsize=6)
    ax.set_ylabel("predictive max/mean per layer")
    ax.set_title("distribution over layers and windows (orange EPLB, blue ours)", fontsize=9)
    fig.tight_layout()
    path = os.path.join(directory, "predictive_distribution.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written
