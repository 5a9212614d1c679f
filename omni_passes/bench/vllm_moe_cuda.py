"""`omni-passes bench vllm --device cuda`: redundant experts in vLLM 0.26 CUDA, DeepSeek-V2-Lite.

DeepSeek-V2-Lite's full configuration (27 layers, 26 of them MoE with 64 routed experts top-6
and 2 shared), written as ``config.json`` plus a tokenizer (a byte-level BPE padded to the
102,400-entry vocabulary), served with ``load_format="dummy"`` (random weights, nothing
downloaded) in bf16 with CUDA graphs. The engines take token-id prompts and do not decode their
output (``skip_tokenizer_init``), so the tokenizer's 100k filler entries weigh on no start-up
time. The gates are skewed so that expert loads are uneven the way real traffic is
(``omni_passes.bench.vllm_moe_engine.apply_skew``: the same in every engine).

Engines, one at a time (each in its own process, engine core in-process), in this order:

    off            vLLM as it is (compile cache cold)
    identity       the passes, identity placement; its expert-load file feeds the plan
    redundant      8 redundant slots per layer: ``omni-passes plan`` on identity's loads, 8
                   emulated ranks x 9 slots
    rebalance      online rebalancing from a naive start (8 x 9 slots, the spare slots holding
                   experts 0..7): balancedness per round at batch 64, then the timed rounds
    off_warm       passes off again on the compile cache (warm start; a second off measurement)
    identity_warm  identity again on the compile cache (warm start)

Each engine runs the same timed rounds (``--moe-rounds`` per batch, one on a warm start;
batches 1, 16 and 64 in turn: ``--moe-prompt-tokens`` random token ids each, ``--moe-output-tokens`` greedy tokens):
output tokens/s of the round (prefill included) and TPOT (median decode step while every
request decodes), each beside the HBM floor of that step (weights and KV bytes the step must
read, over the device copy bandwidth measured in that engine: ``vllm_moe_figures``). Ratios are
to passes off, its rounds pooled over the cold and the warm engine (engines run one after the
other: an H100 cannot hold two V2-Lite engines with redundant rows side by side).

A time budget (``--moe-budget-s``) skips engines that would not finish in time (in the order
above); ``<out>.partial.json`` is written after every engine, so a run cut off keeps what it
measured. Writes JSON (``--out``), a figure (``--plot DIR``: vllm_moe_cuda.png) and prints every
figure with its floor and the issue's goals.

    omni-passes bench vllm --device cuda [--moe-batches 1,16,64] [--moe-rounds 3]
        [--moe-prompt-tokens 512] [--moe-output-tokens 64] [--moe-budget-s 0]
        [--moe-engines off,identity,...] [--moe-work-dir DIR] [--moe-skew-alpha 0.3] [--out F] [--plot DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from omni_passes.bench import vllm_moe_figures as figures
from omni_passes.bench.vllm_common import (
    EngineProcess,
    add_plot,
    comma_names,
    gpu_name,
    gpu_total_bytes,
    partial_saver,
    print_failure,
    print_goals,
    start_run,
    work_dir,
)
from omni_passes.cli.common import UserError, publish, say

ENGINES = ("off", "identity", "redundant", "rebalance", "off_warm", "identity_warm")
RANKS, REDUNDANT = 8, 8
CAPTURE_SIZES = [1, 2, 4, 8, 16, 24, 32, 48, 64]
REBALANCE = {"interval_steps": 32, "window_steps": 64, "min_gain": 0.005, "layer_min_gain": 0.002}
KV_TARGET_BYTES = 8 * 2**30  # KV cache to leave: batch 64 at 1k tokens needs 2 GiB


def add_moe_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("redundant experts on CUDA (--device cuda; --kv selects the KV benchmark)")
    group.add_argument("--moe-batches", default="1,16,64", help="batch sizes of the timed rounds")
    group.add_argument("--moe-rounds", type=int, default=3, help="timed rounds per batch and engine")
    group.add_argument("--moe-prompt-tokens", type=int, default=512)
    group.add_argument("--moe-output-tokens", type=int, default=64)
    group.add_argument("--moe-balance-rounds", type=int, default=4, help="rounds at batch 64 of the rebalancing engine")
    group.add_argument("--moe-engines", default=",".join(ENGINES), help=f"comma list of {', '.join(ENGINES)}")
    group.add_argument("--moe-budget-s", type=float, default=0.0, help="time budget (0: none); see the module docstring")
    group.add_argument("--moe-gpu-memory-utilization", type=float, default=0.0,
                       help="vLLM's gpu_memory_utilization (0: weights + redundant rows + 8 GiB of KV + overhead)")
    group.add_argument("--moe-skew-alpha", type=float, default=0.3, help="Zipf exponent of the gates' spread")
    group.add_argument("--moe-work-dir", help="model, configs, load files and the compile cache go here (fresh: cold)")


# --------------------------------------------------------------------------- model and configs
def write_model(path: Path) -> Path:
    """DeepSeek-V2-Lite's config.json and a tokenizer of its vocabulary size (kept if present)."""
    from omni_passes.bench.vllm_kv_cuda import V2_LITE_CONFIG

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(V2_LITE_CONFIG, indent=1))
    if not (path / "tokenizer.json").exists():
        from transformers import PreTrainedTokenizerFast

        from omni_passes.testing.tiny_checkpoint import BOS, EOS, PAD, _train_tokenizer

        PreTrainedTokenizerFast(tokenizer_object=_train_tokenizer(V2_LITE_CONFIG["vocab_size"]), bos_token=BOS,
                                eos_token=EOS, pad_token=PAD).save_pretrained(path)
    return path


def moe_layers(config: dict) -> int:
    first, freq = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1) or 1
    return sum(1 for i in range(config["num_hidden_layers"]) if i >= first and i % freq == 0)


def pass_config(work: Path, name: str, placement: str | None = None, rebalance: dict | None = None) -> str:
    data: dict[str, Any] = {"passes": ["redundant_experts"], "report_path": str(work / f"{name}_report.json"),
                            "expert_load_path": str(work / f"{name}_loads.npy"),
                            "slot_load_path": str(work / f"{name}_slots.npy"), "expert_load_interval_steps": 64}
    if placement:
        data["placement"] = placement
    if rebalance:
        data["rebalance"] = rebalance
    path = work / f"{name}.json"
    path.write_text(json.dumps(data))
    return str(path)


def naive_placement(work: Path, layers: int, experts: int) -> str:
    """Every expert once, the spare slots holding experts 0, 1, ...: a start that knows no loads."""
    from omni_passes.placement.placement import Placement

    path = work / "naive_placement.json"
    Placement.identity(layers, experts, num_ranks=RANKS, slots_per_rank=(experts + REDUNDANT) // RANKS).save(path)
    return str(path)


def plan_from_loads(loads: Path, work: Path, experts: int) -> tuple[str, dict]:
    """``omni-passes plan`` on the identity engine's load file: 8 ranks x 9 slots (8 redundant)."""
    out = work / "planned_placement.json"
    cmd = [sys.executable, "-m", "omni_passes.cli", "plan", "--loads", str(loads), "--ranks", str(RANKS),
           "--slots-per-rank", str((experts + REDUNDANT) // RANKS), "--out", str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"omni-passes plan failed ({proc.returncode}): {proc.stderr[-2000:]}")
    document = json.loads(proc.stdout)
    return str(out), {"command": " ".join(cmd[1:]), "balance": {k: v.get("mean_balancedness") if isinstance(v, dict) else v
                                                                 for k, v in document["balance"].items()}}


def recorded_loads(work: Path, status: dict) -> Path:
    """The identity engine's expert-load file, if it holds every counted token (the file is
    rewritten every 64 steps and at exit); else the same loads from its status."""
    path = work / "identity_loads.npy"
    counted = np.asarray(status["total_expert_load"], dtype=np.int64)
    if path.exists() and np.load(path).sum() == counted.sum():
        return path
    fallback = work / "identity_loads_from_status.npy"
    np.save(fallback, counted)
    return fallback


# --------------------------------------------------------------------------- engines
def engine_kwargs(model: str, config: str | None, args: argparse.Namespace, utilization: float) -> dict:
    from omni_passes.testing.vllm_cuda_engine import engine_kwargs as base

    length = -(-(args.moe_prompt_tokens + args.moe_output_tokens + 64) // 256) * 256
    return base(model, config, capture_sizes=CAPTURE_SIZES, max_model_len=length, max_num_seqs=max(CAPTURE_SIZES),
                gpu_memory_utilization=utilization, load_format="dummy", skip_tokenizer_init=True,
                max_num_batched_tokens=8192)


def measure(engine: EngineProcess, record: dict, args: argparse.Namespace, save) -> None:
    """The timed rounds: ``--moe-rounds`` per batch (one on a warm start: a second measurement
    of its configuration, not the main one), batches in turn; one untimed warm-up round per
    batch first. (With one warm-up at the largest batch, every engine's first timed round at
    batch 1 ran at a third of its second's rate on the H100, passes off included: whatever a
    batch's shapes set up on first use is not what the rounds should time.)"""
    batches = [int(b) for b in args.moe_batches.split(",")]
    for batch in batches:
        engine.ask("round", _round(batch, args, seed=batch, tag=f"warm{batch}-"))
    record.setdefault("rounds", [])
    for i in range(1 if engine.name.endswith("_warm") else args.moe_rounds):
        for batch in batches:
            value = engine.ask("round", _round(batch, args, seed=1000 * (i + 1) + batch, tag=f"r{i}b{batch}-"))
            record["rounds"].append(value)
            save()
            tpot = value["tpot_s"]
            say(f"  {engine.name} round {i + 1} batch {batch}: {value['tokens_per_s']:.0f} tok/s, TPOT "
                f"{'n/a' if tpot is None else f'{tpot * 1e3:.2f} ms'}" + (f" GAVE UP {value['gave_up']}" if value["gave_up"] else ""))


def _round(batch: int, args: argparse.Namespace, seed: int, tag: str) -> dict:
    return {"batch": batch, "prompt_tokens": args.moe_prompt_tokens, "output_tokens": args.moe_output_tokens,
            "seed": seed, "tag": tag}


def balance_rounds(engine: EngineProcess, record: dict, args: argparse.Namespace, slots_per_rank: int, save) -> None:
    """Rounds at batch 64 with online rebalancing: each round's slot loads (status deltas) give
    its balancedness over the emulated ranks."""
    previous = engine.ask("status")
    rounds = []
    for i in range(args.moe_balance_rounds):
        value = engine.ask("round", _round(64, args, seed=50_000 + i, tag=f"bal{i}-"))
        status = engine.ask("status")
        delta = (np.asarray(status["total_slot_load"]) - np.asarray(previous["total_slot_load"])).tolist()
        applied = [e for e in status.get("rebalance_events", [])[len(previous.get("rebalance_events", [])):] if e["applied"]]
        rounds.append({"round": i + 1, "balancedness": figures.rank_balancedness(delta, slots_per_rank),
                       "rebalances_applied": len(applied), "tokens_per_s": value["tokens_per_s"],
                       "steps": [previous["serving_steps"] + 1, status["serving_steps"]]})
        say(f"  rebalance round {i + 1}: balancedness {rounds[-1]['balancedness']:.4f}, "
            f"{len(applied)} rebalances applied")
        previous = status
        record["balance"] = {"rounds": rounds, "events": status.get("rebalance_events", [])}
        save()


# --------------------------------------------------------------------------- driver
def main(args: argparse.Namespace) -> int:
    start_run()
    names = comma_names("--moe-engines", args.moe_engines, ENGINES, "engine")
    if "redundant" in names and "identity" not in names:
        raise UserError("--moe-engines: 'redundant' plans on the loads the 'identity' engine records; add identity")
    work = work_dir(args.moe_work_dir, "omni-bench-vllm-moe-")
    model = args.model or str(write_model(work / "deepseek-v2-lite"))
    config = json.loads((Path(model) / "config.json").read_text())
    experts, layers = config["n_routed_experts"], moe_layers(config)
    utilization = args.moe_gpu_memory_utilization or _auto_utilization(config)
    skew = {"alpha": args.moe_skew_alpha, "seed": 0, "target_std": 1.0}
    result: dict[str, Any] = {
        "device": "cuda", "gpu": gpu_name(), "model": model,
        "model_config": {k: config[k] for k in ("num_hidden_layers", "n_routed_experts", "num_experts_per_tok",
                                                "n_shared_experts", "kv_lora_rank", "qk_rope_head_dim")},
        "moe_layers": layers, "ranks": RANKS, "redundant_per_layer": REDUNDANT, "capture_sizes": CAPTURE_SIZES,
        "gpu_memory_utilization": utilization, "skew": skew, "rebalance": REBALANCE,
        "workload": {"batches": args.moe_batches, "rounds": args.moe_rounds, "prompt_tokens": args.moe_prompt_tokens,
                     "output_tokens": args.moe_output_tokens},
        "slots_per_rank": {"identity": experts // RANKS, "redundant": (experts + REDUNDANT) // RANKS,
                           "rebalance": (experts + REDUNDANT) // RANKS},
        "engines": {}, "skipped": {}}
    save = partial_saver(args.out, work / "vllm_moe_cuda.partial.json", result)

    say(f"work dir {work}; gpu_memory_utilization {utilization}; engines {names}")
    begin = time.perf_counter()
    budget = args.moe_budget_s or math.inf
    took: dict[str, float] = {}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    # the engine processes' module imports torch: only once the arguments are checked
    from omni_passes.bench.vllm_moe_engine import engine_main

    for name in names:
        elapsed = time.perf_counter() - begin
        estimate = _estimate(name, took)
        if elapsed + estimate > budget:
            result["skipped"][name] = f"time budget: {elapsed:.0f} s spent, about {estimate:.0f} s needed, budget {budget:.0f} s"
            say(f"skipping engine {name}: {result['skipped'][name]}")
            save()
            continue
        record: dict[str, Any] = result["engines"].setdefault(name, {})
        started = time.perf_counter()
        try:
            path = _engine_config(name, work, layers, experts, result)
            record["pass_config"] = json.loads(Path(path).read_text()) if path else None
            say(f"starting engine {name}")
            # one compile cache per configuration (a warm start shares its cold start's): Inductor's
            # cache must not serve one configuration's graph to another (vllm_cuda_engine.prepare_env)
            cache_root = str(work / f"cache-{name.removesuffix('_warm')}")
            engine = EngineProcess(ctx, name, engine_main, (model, path, engine_kwargs(model, path, args, utilization),
                                                            cache_root, skew), results, timeout=1200)
            try:
                record["ready"] = ready = engine.receive("ready")
                save()
                say(f"engine {name} ready in {ready['startup_s']:.1f} s on {ready.get('device')}")
                if name == "rebalance":
                    balance_rounds(engine, record, args, result["slots_per_rank"]["rebalance"], save)
                measure(engine, record, args, save)
                if path:
                    status = engine.ask("status")
                    record["status"] = {k: status.get(k) for k in ("total_expert_load", "total_slot_load", "placement",
                                                                   "graphs_compiled", "from_compile_cache",
                                                                   "placement_updates", "serving_steps")}
                    record["placement"] = status.get("placement")
                    record["report"] = status.get("report")
            finally:
                engine.stop()
            if name == "identity":
                placement, plan = plan_from_loads(recorded_loads(work, record["status"]), work, experts)
                result["plan"] = {"placement": placement, **plan}
        except Exception as exc:  # noqa: BLE001  (recorded; the next engine still runs)
            record["error"] = str(exc)[-4000:]
            say(f"engine {name} FAILED: {str(exc)[-2000:]}")
        took[name] = time.perf_counter() - started
        record["wall_s"] = took[name]
        save()
    result["wall_s"] = time.perf_counter() - begin
    result["summary"] = figures.summarize(result)
    if args.plot:
        add_plot(result, plot, args.plot)
    save()
    publish(result, args.out, args.json, print_summary)
    return 0 if all("error" not in e for e in result["engines"].values()) else 1


def _engine_config(name: str, work: Path, layers: int, experts: int, result: dict) -> str | None:
    if name.startswith("off"):
        return None
    if name.startswith("identity"):
        return pass_config(work, "identity")  # the same file for the warm start: the same cache key
    if name == "redundant":
        if "plan" not in result:
            raise RuntimeError("no planned placement: the identity engine did not finish")
        return pass_config(work, "redundant", placement=result["plan"]["placement"])
    return pass_config(work, "rebalance", placement=naive_placement(work, layers, experts), rebalance=REBALANCE)


def _estimate(name: str, took: dict[str, float]) -> float:
    """Seconds an engine will take: as long as the slowest cold one so far (warm: 60% of it)."""
    cold = max((t for n, t in took.items() if not n.endswith("_warm")), default=150.0)
    return 0.6 * cold if name.endswith("_warm") else cold


def _auto_utilization(config: dict) -> float:
    from omni_passes.bench.vllm_kv_cuda import auto_utilization, deepseek_weight_bytes

    total = gpu_total_bytes()
    if total is None:
        return 0.8
    rows = moe_layers(config) * REDUNDANT * 3 * config["hidden_size"] * config["moe_intermediate_size"] * 2
    return auto_utilization(total, deepseek_weight_bytes(config) + rows, KV_TARGET_BYTES, overhead_bytes=6 * 2**30)


# --------------------------------------------------------------------------- report
def print_summary(result: dict) -> None:
    s = result["summary"]
    w = result["workload"]
    print(f"vLLM CUDA, DeepSeek-V2-Lite (dummy weights, skewed gates, bf16) on {result.get('gpu')}; batches "
          f"{w['batches']}, {w['rounds']} rounds of {w['prompt_tokens']} prompt + {w['output_tokens']} output tokens; "
          f"{result.get('wall_s', 0):.0f} s")
    for name, engine in result["engines"].items():
        print_failure(name, engine)
    for name, skipped in result.get("skipped", {}).items():
        print(f"  {name}: skipped ({skipped})")
    for name, engine in s["engines"].items():
        ready = result["engines"][name].get("ready", {})
        copy = ready.get("copy_bandwidth", {}).get("bytes_per_s")
        same = engine["same_tokens_as_off"]
        print(f"  {name}: start {engine['startup_s']:.1f} s" + (f", copy {copy / 1e12:.2f} TB/s" if copy else "")
              + (f", tokens = passes off in {same['equal']}/{same['compared']} rounds" if same["compared"] else "")
              + (f", loads max/mean {engine['load_imbalance']['max_over_mean']:.2f}" if "load_imbalance" in engine else ""))
        for batch, fig in engine["batches"].items():
            tpot = fig.get("tpot_s")
            line = (f"    B{batch}: {fig['tokens_per_s']:.0f} tok/s" if fig.get("tokens_per_s") else f"    B{batch}: n/a")
            if tpot:
                line += f", TPOT {tpot * 1e3:.2f} ms"
            if fig.get("floor_s"):
                line += f" (floor {fig['floor_s'] * 1e3:.2f} ms, {fig['of_floor'] * 100:.0f}% of it)" if fig.get("of_floor") \
                    else f" (floor {fig['floor_s'] * 1e3:.2f} ms)"
            if "tokens_per_s_vs_off" in fig:
                line += f"; vs off: tok/s x{fig['tokens_per_s_vs_off']:.3f}"
            if "tpot_vs_off" in fig:
                line += f", TPOT x{fig['tpot_vs_off']:.3f}"
            print(line)
    balance = s.get("balancedness", {})
    if balance:
        print("  balancedness over 8 emulated ranks: " + ", ".join(
            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in balance.items() if k != "rebalance_rounds")
            + (f"; per rebalancing round {[round(x, 4) for x in balance['rebalance_rounds']]}" if "rebalance_rounds" in balance else ""))
    if "plan" in result:
        print(f"  plan: {result['plan']['command']}: {result['plan']['balance']}")
    print_goals(s["goals"], digits=4)


def plot(result: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    s = result["summary"]
    names = [n for n in s["engines"]]
    batches = sorted({b for e in s["engines"].values() for b in e["batches"]})
    colors = dict(zip(ENGINES, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "silver", "lightsteelblue")))
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(n for n in names if not n.startswith("off")):
        values = [s["engines"][name]["batches"].get(b, {}).get("tokens_per_s_vs_off") or 0 for b in batches]
        ax.bar([x + i * width for x in range(len(batches))], values, width, color=colors.get(name), label=name)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.axhline(figures.GOALS["identity_ratio"], color="tab:red", lw=0.8, ls="--")
    ax.set_xticks([x + 0.3 for x in range(len(batches))], [f"B{b}" for b in batches])
    ax.set_ylim(0.8, 1.05)
    ax.set_ylabel("output tokens/s / passes off")
    ax.set_title("throughput vs passes off (red: 0.99 goal)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, name in enumerate(names):
        xs = [x + i * width for x in range(len(batches))]
        ax.bar(xs, [(s["engines"][name]["batches"].get(b, {}).get("tpot_s") or 0) * 1e3 for b in batches], width,
               color=colors.get(name), label=name)
        ax.scatter(xs, [(s["engines"][name]["batches"].get(b, {}).get("floor_s") or float("nan")) * 1e3 for b in batches],
                   color="black", marker="_", s=200, zorder=3)
    ax.set_xticks([x + 0.3 for x in range(len(batches))], [f"B{b}" for b in batches])
    ax.set_ylabel("TPOT, ms (black: HBM floor)")
    ax.set_title("decode step time")
    ax = axes[2]
    balance = s.get("balancedness", {})
    if "rebalance_rounds" in balance:
        rounds = balance["rebalance_rounds"]
        ax.plot(range(1, len(rounds) + 1), rounds, marker="o", color=colors["rebalance"], label="online rebalancing")
    for name, style in (("identity", ":"), ("redundant", "--")):
        if name in balance:
            ax.axhline(balance[name], color=colors[name], ls=style, label=f"{name} (static)")
    ax.axhline(figures.GOALS["balancedness_after"], color="tab:red", lw=0.8, ls="--")
    ax.set_xlabel("round at batch 64")
    ax.set_ylabel("balancedness, 8 emulated ranks (mean/max)")
    ax.set_title("per-slot load balance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "vllm_moe_cuda.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
