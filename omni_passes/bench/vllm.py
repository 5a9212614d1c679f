"""`omni-passes bench vllm`: offline vLLM (CPU) throughput with the passes on vs off.

Two engines live side by side in one process tree, one with the compile-config line and
``OMNI_PASSES_CONFIG``, one without; generate rounds alternate between them so machine
noise falls on both. Reports output tokens/s per round, the on/off ratio (median of the
per-pair ratios) and each engine's start-up time (which includes its compile).

    omni-passes bench vllm [--model DIR] [--rounds 6] [--prompts 16] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from omni_passes.cli.common import emit_json, say, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory (default: a generated tiny DeepSeek-V3)")
    parser.add_argument("--rounds", type=int, default=6, help="timed generate rounds per engine")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", metavar="FILE")
    from omni_passes.bench.vllm_kv import add_kv_arguments

    add_kv_arguments(parser)  # sink+recent KV: dense vs compressed (--pass-config with free_kv, or --kv)


def _engine(name, model, pass_config, cache_dir, commands, results):
    from omni_passes.testing.vllm_run import COMPILE_CONFIG, child_env

    env = child_env(pass_config, cache_dir)
    os.environ.clear()
    os.environ.update(env)
    from vllm import LLM, SamplingParams

    kwargs = dict(model=model, dtype="float32", max_model_len=512, max_num_seqs=16, seed=0)
    if pass_config:
        kwargs["compilation_config"] = COMPILE_CONFIG
    start = time.perf_counter()
    llm = LLM(**kwargs)
    results.put((name, "ready", time.perf_counter() - start))
    while True:
        command = commands.get()
        if command is None:
            break
        prompts, max_tokens = command
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        begin = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begin
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        results.put((name, "round", {"seconds": elapsed, "tokens": tokens, "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}))
    del llm
    results.put((name, "done", None))


def main(args: argparse.Namespace) -> int:
    from omni_passes.bench import vllm_kv

    if vllm_kv.wants_kv_bench(args):
        return vllm_kv.main(args)
    setup_logging()
    work = Path(tempfile.mkdtemp(prefix="omni-bench-vllm-"))
    model = args.model
    if model is None:
        from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

        model = str(make_tiny_deepseek_checkpoint(work / "model"))
    config = work / "passes.json"
    config.write_text(json.dumps({"passes": ["redundant_experts"], "report_path": str(work / "report.json"),
                                  "expert_load_path": str(work / "loads.npy"), "expert_load_interval_steps": 100}))
    words = "the router scores each expert and keeps the best groups then picks the top experts".split()
    prompts = [" ".join(words[i % len(words):] + words[: i % len(words)]) for i in range(args.prompts)]

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    engines = {}
    startup: dict[str, float] = {}
    for name, pass_config in (("off", None), ("on", str(config))):
        commands = ctx.Queue()
        proc = ctx.Process(target=_engine, args=(name, model, pass_config, str(work / f"inductor-{name}"), commands, results))
        proc.start()
        engines[name] = (proc, commands)
        # start one at a time: two compiles at once on a small machine would skew start-up times
        while True:
            who, kind, value = results.get(timeout=900)
            if kind == "ready":
                say(f"engine {who} ready in {value:.1f} s")
                startup[who] = value
                break
    rounds: dict[str, list[dict]] = {"off": [], "on": []}
    for i in range(args.rounds + 1):  # round 0 warms both engines up and is not timed
        order = ("off", "on") if i % 2 == 0 else ("on", "off")
        for name in order:
            engines[name][1].put((prompts, args.max_tokens))
            who, kind, value = results.get(timeout=900)
            if i > 0:
                rounds[who].append(value)
        say(f"round {i}/{args.rounds} done")
    for proc, commands in engines.values():
        commands.put(None)
    for proc, _ in engines.values():
        proc.join(timeout=120)
    same_tokens = all(a["token_ids"] == b["token_ids"] for a, b in zip(rounds["on"], rounds["off"]))
    tps = {name: [r["tokens"] / r["seconds"] for r in values] for name, values in rounds.items()}
    ratios = [on / off for on, off in zip(tps["on"], tps["off"])]
    result = {
        "model": model,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "startup_s": startup,
        "tokens_per_s": {name: {"median": statistics.median(v), "all": v} for name, v in tps.items()},
        "ratio_on_off": statistics.median(ratios),
        "ratios": ratios,
        "same_tokens": same_tokens,
        "report": json.loads((work / "report.json").read_text()) if (work / "report.json").exists() else None,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        emit_json(result)
    else:
        print(f"vLLM CPU offline throughput, {args.prompts} prompts x {args.max_tokens} tokens, {args.rounds} alternating rounds")
        for name in ("off", "on"):
            print(f"  passes {name:>3}: {result['tokens_per_s'][name]['median']:8.1f} output tokens/s, start-up {startup[name]:.1f} s")
        print(f"  ratio on/off: {result['ratio_on_off']:.3f} (per round: {', '.join(f'{r:.3f}' for r in ratios)}); same tokens: {same_tokens}")
    return 0
