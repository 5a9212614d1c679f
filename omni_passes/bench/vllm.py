"""`omni-passes bench vllm`: vLLM (CPU) serving with the passes, side by side, in one run.

``--device cuda`` runs the GPU benchmark of redundant experts instead
(``omni_passes.bench.vllm_moe_cuda``: DeepSeek-V2-Lite on vLLM CUDA); ``--kv`` (or a sink+recent
pass config, or any ``--kv-*`` option) selects the KV benchmark (``omni_passes.bench.vllm_kv``) on
either device.

Throughput: named engine configurations (``ENGINES``; default passes off, identity placement,
redundant slots) live side by side in one process tree and generate the same prompts in
rounds, the order rotating each round so machine noise falls on all of them. Reported per
engine: output tokens/s per round and median, the ratio to passes off (median of the
per-round ratios and ratio of the medians), start-up time (includes the compile), whether
greedy tokens equal passes off in every round.

Balance (``--balance-rounds``, after the throughput engines are gone): one engine with
redundant slots on an emulated 4 ranks and the online rebalancer on, serving a skewed prompt
set (few distinct prompts, repeated) round after round. After each round the worker's
per-slot loads give that round's rank loads (slot j on rank j // S) and balancedness
(mean/max rank load, averaged over MoE layers); rounds before the first applied rebalance
are "before", rounds after the last applied one "after" (each round's figure and every
event are in the JSON).

    omni-passes bench vllm [--model DIR] [--rounds 6] [--prompts 16] [--max-tokens 32]
        [--engines off,identity,redundant] [--balance-rounds 6] [--json] [--out FILE] [--plot DIR]

Extending: add an ``EngineSpec`` to ``ENGINES`` (a name, and a function returning the pass
configuration for a work directory, or None for passes off).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from omni_passes.cli.common import UserError, emit_json, say, setup_logging, write_json

RANKS, SLOTS_PER_RANK = 4, 5  # the emulated ranks of the redundant placements (20 slots for 16 experts)


@dataclass(frozen=True)
class EngineSpec:
    """One engine configuration: ``pass_config(work, info)`` returns the pass-config dict (paths
    under ``work``) or None for vLLM without the passes. ``info`` has the model's facts."""

    name: str
    pass_config: Callable[[Path, dict], dict | None]


def _loads(work: Path, name: str) -> dict:
    return {"report_path": str(work / f"{name}_report.json"), "expert_load_path": str(work / f"{name}_loads.npy"),
            "slot_load_path": str(work / f"{name}_slots.npy"), "expert_load_interval_steps": 100}


def _redundant_placement(work: Path, info: dict, name: str) -> str:
    """Every expert once, the spare slots replicating experts 0, 1, ... (no load knowledge), on
    ``RANKS`` ranks: what a deployment starts from before it has measured anything."""
    from omni_passes.placement.placement import Placement

    placement = Placement.identity(info["moe_layers"], info["experts"], num_ranks=RANKS,
                                   slots_per_rank=max(SLOTS_PER_RANK, -(-info["experts"] // RANKS) + 1))
    path = work / f"{name}_placement.json"
    placement.save(path)
    return str(path)


ENGINES: dict[str, EngineSpec] = {
    "off": EngineSpec("off", lambda work, info: None),
    "identity": EngineSpec("identity", lambda work, info: {"passes": ["redundant_experts"], **_loads(work, "identity")}),
    "redundant": EngineSpec("redundant", lambda work, info: {
        "passes": ["redundant_experts"], "placement": _redundant_placement(work, info, "redundant"),
        **_loads(work, "redundant")}),
}


def rebalancing_config(work: Path, info: dict, interval_steps: int) -> dict:
    return {"passes": ["redundant_experts"], "placement": _redundant_placement(work, info, "rebalance"),
            **_loads(work, "rebalance"),
            "rebalance": {"interval_steps": interval_steps, "window_steps": interval_steps, "min_gain": 0.02,
                          "layer_min_gain": 0.01, "max_moves": 16}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a generated tiny DeepSeek-V3)")
    parser.add_argument("--rounds", type=int, default=6, help="timed generate rounds per engine")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engines", default="off,identity,redundant", help=f"comma list of {', '.join(ENGINES)}")
    parser.add_argument("--balance-rounds", type=int, default=6, help="rounds of the skewed-prompt rebalancing run (0: skip)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", metavar="FILE")
    parser.add_argument("--plot", metavar="DIR", help="write the figure there (bench_vllm.png; vllm_kv.png in KV mode)")
    from omni_passes.bench.vllm_kv import add_kv_arguments
    from omni_passes.bench.vllm_moe_cuda import add_moe_arguments

    add_kv_arguments(parser)  # sink+recent KV: dense vs compressed (--pass-config with free_kv, or --kv)
    add_moe_arguments(parser)  # --device cuda: redundant experts on DeepSeek-V2-Lite


def wants_moe_cuda_bench(args: argparse.Namespace) -> bool:
    """``--device cuda`` without anything that asks for the KV benchmark: ``--kv``, a sink+recent
    pass config, or a ``--kv-*`` option set to other than its default."""
    if getattr(args, "device", "cpu") != "cuda" or getattr(args, "kv", False):
        return False
    path = getattr(args, "pass_config", None)
    if path:
        from omni_passes.config import PassConfig
        from omni_passes.hosts.vllm.kv_register import wants_sink_recent_kv

        if wants_sink_recent_kv(PassConfig.load(path)):
            return False
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    default = vars(defaults.parse_args([]))
    return not any(key.startswith("kv_") and value != default.get(key) for key, value in vars(args).items())


# ---- the engine process ----------------------------------------------------------------------
def _engine(name, model, pass_config, cache_dir, commands, results):
    from omni_passes.testing.vllm_run import child_env, engine_kwargs

    env = child_env(pass_config, cache_dir)
    os.environ.clear()
    os.environ.update(env)
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**engine_kwargs(model, pass_config, max_num_seqs=16))
    results.put((name, "ready", time.perf_counter() - start))
    while True:
        command = commands.get()
        if command is None:
            break
        if command[0] == "status":
            results.put((name, "status", llm.collective_rpc("omni_status")[0] if pass_config else None))
            continue
        _, prompts, max_tokens = command
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results.put((name, "round", {"seconds": elapsed, "tokens": tokens,
                                     "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}))
    del llm
    results.put((name, "done", None))


class Engines:
    """Engine processes by name, started one at a time (two compiles at once would skew start-up)."""

    def __init__(self, model: str, work: Path):
        self.model, self.work = model, work
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.procs: dict[str, tuple] = {}
        self.startup: dict[str, float] = {}

    def start(self, name: str, config: dict | None) -> None:
        path = None
        if config is not None:
            path = self.work / f"{name}_passes.json"
            path.write_text(json.dumps(config))
        commands = self.ctx.Queue()
        proc = self.ctx.Process(target=_engine, args=(name, self.model, str(path) if path else None,
                                                      str(self.work / f"inductor-{name}"), commands, self.results))
        proc.start()
        self.procs[name] = (proc, commands)
        who, kind, value = self.results.get(timeout=1200)
        if kind != "ready" or who != name:
            raise UserError(f"engine {name} did not start: {who} {kind}")
        self.startup[name] = value
        say(f"engine {name} ready in {value:.1f} s")

    def ask(self, name: str, command: tuple):
        self.procs[name][1].put(command)
        who, kind, value = self.results.get(timeout=1200)
        assert who == name, (who, name)
        return value

    def stop(self) -> None:
        for proc, commands in self.procs.values():
            commands.put(None)
        waiting = set(self.procs)
        while waiting:  # each engine says "done" as it shuts down; drain them before any other start
            try:
                who, kind, _ = self.results.get(timeout=120)
            except Exception:
                break
            if kind == "done":
                waiting.discard(who)
        for proc, _ in self.procs.values():
            proc.join(timeout=120)
        self.procs.clear()


# ---- measurements ----------------------------------------------------------------------------
def _model_info(model: str) -> dict:
    config = json.loads((Path(model) / "config.json").read_text())
    layers, first_dense = config["num_hidden_layers"], config.get("first_k_dense_replace", 0)
    freq = config.get("moe_layer_freq", 1) or 1
    moe = [i for i in range(layers) if i >= first_dense and i % freq == 0]
    return {"moe_layers": len(moe), "experts": config["n_routed_experts"]}


def throughput(engines: Engines, names: list[str], prompts: list[str], args) -> dict:
    rounds: dict[str, list[dict]] = {name: [] for name in names}
    for i in range(args.rounds + 1):  # round 0 warms every engine up and is not timed
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            value = engines.ask(name, ("generate", prompts, args.max_tokens))
            if i > 0:
                rounds[name].append(value)
        say(f"round {i}/{args.rounds} done")
    tps = {name: [r["tokens"] / r["seconds"] for r in values] for name, values in rounds.items()}
    result = {}
    for name in names:
        entry = {"tokens_per_s": {"median": statistics.median(tps[name]), "all": tps[name]},
                 "startup_s": engines.startup[name],
                 "same_tokens_as_off": all(a["token_ids"] == b["token_ids"] for a, b in zip(rounds[name], rounds.get("off", rounds[name])))}
        if "off" in tps and name != "off":
            ratios = [a / b for a, b in zip(tps[name], tps["off"])]
            entry["ratio_vs_off"] = {"median_of_round_ratios": statistics.median(ratios), "of_medians":
                                     statistics.median(tps[name]) / statistics.median(tps["off"]), "rounds": ratios}
        report = engines.work / f"{name}_report.json"
        if report.exists():
            entry["report"] = json.loads(report.read_text())["passes"]
        result[name] = entry
    return result


def rank_balancedness(slot_load, phy2log_rows: int, slots_per_rank: int) -> float:
    """Mean over MoE layers of mean/max rank load (slot j on rank j // S); 1 for an idle layer."""
    import torch

    from omni_passes.placement import metrics

    loads = torch.as_tensor(slot_load, dtype=torch.float64)
    ranks = loads.view(phy2log_rows, -1, slots_per_rank).sum(-1)
    return float(metrics.balancedness(ranks).mean())


def balance(engines: Engines, info: dict, args) -> dict:
    """The skewed-prompt run with online rebalancing (module docstring)."""
    words = ["the", "router", "scores", "experts"]
    skewed = [" ".join(words * 3), "numbers 1 2 3 4 5 6 7 8"] * (args.prompts // 2)
    steps_per_round = args.max_tokens + 1
    engines.start("rebalance", rebalancing_config(engines.work, info, interval_steps=steps_per_round))
    previous = engines.ask("rebalance", ("status",))
    rounds = []
    for i in range(args.balance_rounds):
        engines.ask("rebalance", ("generate", skewed, args.max_tokens))
        status = engines.ask("rebalance", ("status",))
        delta = [[a - b for a, b in zip(x, y)] for x, y in zip(status["total_slot_load"], previous["total_slot_load"])]
        rounds.append({"round": i + 1, "first_step": previous["serving_steps"] + 1, "last_step": status["serving_steps"],
                       "balancedness": rank_balancedness(delta, len(delta), previous["placement"]["slots_per_rank"])})
        say(f"balance round {i + 1}: balancedness {rounds[-1]['balancedness']:.4f}")
        previous = status
    summary = summarize_balance(rounds, previous.get("rebalance_events", []))
    return {"ranks": RANKS, "slots_per_rank": previous["placement"]["slots_per_rank"], "prompts": skewed[:2],
            "interval_steps": steps_per_round, "startup_s": engines.startup["rebalance"], **summary}


def summarize_balance(rounds: list[dict], events: list[dict]) -> dict:
    """Mark each round with the rebalances that changed its placement (an event at step s is
    applied after step s: it affects the round's steps after s), then "before" = the rounds
    before the first applied one took effect, "after" = the rounds after the last one did."""
    applied = [e["step"] for e in events if e["applied"]]
    for r in rounds:
        r["applied_rebalances"] = sum(r["first_step"] - 1 <= s < r["last_step"] for s in applied)
    changed = [r["round"] for r in rounds if r["applied_rebalances"]]
    before = [r["balancedness"] for r in rounds if not changed or r["round"] < changed[0]]
    after = [r["balancedness"] for r in rounds if changed and r["round"] > changed[-1]]
    return {"rounds": rounds, "events": events,
            "balancedness_before": statistics.mean(before) if before else None,
            "balancedness_after": statistics.mean(after) if after else None}


def plot(result: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    names = [n for n in result["engines"] if "ratio_vs_off" in result["engines"][n]]
    for i, name in enumerate(names):
        ratio = result["engines"][name]["ratio_vs_off"]
        axes[0].scatter([i] * len(ratio["rounds"]), ratio["rounds"], color="tab:blue", alpha=0.5)
        axes[0].hlines(ratio["median_of_round_ratios"], i - 0.25, i + 0.25, color="tab:red")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].axhline(0.97, color="tab:green", lw=0.8, ls="--")
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_ylabel("tokens/s / passes off, same round (red: median)")
    axes[0].set_title("vLLM CPU throughput vs passes off (green: 0.97 goal)")
    if result.get("balance"):
        rounds = result["balance"]["rounds"]
        axes[1].plot([r["round"] for r in rounds], [r["balancedness"] for r in rounds], marker="o")
        for r in rounds:
            if r["applied_rebalances"]:
                axes[1].axvline(r["round"], color="tab:orange", alpha=0.3)
        axes[1].set_xlabel("round (orange: a rebalance applied during it)")
        axes[1].set_ylabel("rank balancedness, mean/max over 4 ranks")
        axes[1].set_title("skewed prompts, online rebalancing")
    fig.tight_layout()
    path = str(Path(out_dir) / "bench_vllm_cpu.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(args: argparse.Namespace) -> int:
    from omni_passes.bench import vllm_kv

    if wants_moe_cuda_bench(args):
        from omni_passes.bench import vllm_moe_cuda

        return vllm_moe_cuda.main(args)
    if vllm_kv.wants_kv_bench(args):
        return vllm_kv.main(args)
    setup_logging()
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise UserError(f"--engines: unknown engine(s) {unknown}; known: {', '.join(ENGINES)}")
    work = Path(tempfile.mkdtemp(prefix="omni-bench-vllm-"))
    model = args.model
    if model is None:
        from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

        model = str(make_tiny_deepseek_checkpoint(work / "model"))
    info = _model_info(model)
    words = "the router scores each expert and keeps the best groups then picks the top experts".split()
    prompts = [" ".join(words[i % len(words):] + words[: i % len(words)]) for i in range(args.prompts)]
    engines = Engines(model, work)
    try:
        for name in names:
            engines.start(name, ENGINES[name].pass_config(work, info))
        result = {"model": model, "prompts": args.prompts, "max_tokens": args.max_tokens, "rounds": args.rounds,
                  "engines": throughput(engines, names, prompts, args)}
        if args.out:  # keep the throughput figures if the balance run fails
            write_json(args.out, result)
        engines.stop()
        if args.balance_rounds > 0:
            result["balance"] = balance(engines, info, args)
    finally:
        engines.stop()
    if args.plot:
        result["plots"] = plot(result, args.plot)
    if args.out:
        write_json(args.out, result)
    if args.json:
        emit_json(result)
    else:
        print(f"vLLM CPU offline throughput, {args.prompts} prompts x {args.max_tokens} tokens, {args.rounds} rotating rounds")
        for name, entry in result["engines"].items():
            ratio = entry.get("ratio_vs_off")
            extra = (f", vs off {ratio['median_of_round_ratios']:.3f} (median of rounds), {ratio['of_medians']:.3f} (of medians)"
                     if ratio else "")
            print(f"  {name:>9}: {entry['tokens_per_s']['median']:8.1f} tokens/s, start-up {entry['startup_s']:.1f} s, "
                  f"same tokens as off: {entry['same_tokens_as_off']}{extra}")
        if "balance" in result:
            b = result["balance"]
            series = ", ".join(f"{r['balancedness']:.3f}" for r in b["rounds"])
            print(f"  skewed prompts on {b['ranks']} emulated ranks: balancedness before {b['balancedness_before']}, "
                  f"after {b['balancedness_after']} (per round: {series})")
    return 0
