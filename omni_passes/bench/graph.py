"""`omni-passes bench graph`: graph-mode DeepSeek decode and prefill, eager vs compiled vs
compiled with each pass, in one run.

    omni-passes bench graph --device cpu --shape tiny --json
    omni-passes bench graph --device cuda --shape v2-lite --layers 4 --batch 16 --context 4096 32768 --json --plot out/

Model: transformers DeepSeek-V3 with random weights in the chosen shape; a static cache so a
decode step is one compiled graph with static shapes; on CUDA, bf16 and every compiled decode
step captured in a CUDA graph (timed as the median of many replays with CUDA events).

Variants: ``eager``, ``compiled``, ``compiled+dispatch`` (identity placement),
``compiled+dispatch-redundant`` (redundant slots for the hottest experts),
``compiled+sparse@C`` (sink+recent attention on the pattern layers, context C) and
``compiled+all@C``. Ratios are against ``compiled`` at the same context.

Amdahl bound for sparse attention: the attention share f of the compiled step at context C
is measured as (step(C) - step(C0)) / step(C) with C0 a short context (attention work is
what grows with context; the rest of the step does not); compressing a fraction p of the
layers can at best remove f * p of the step, so the bound is 1 / (1 - f * p).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from omni_passes.cli.common import UserError, emit_json, say, setup_logging

# DeepSeek-V2-Lite dimensions (64 routed experts, top-6, 2 shared, MLA without q_lora) in the
# V3 architecture, and DeepSeek-V3 layer dimensions (256 experts, top-8, n_group 8).
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {},  # omni_passes.models.TINY_V3
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
        n_routed_experts=64, num_experts_per_tok=6, n_group=1, topk_group=1, n_shared_experts=2,
        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
    ),
    "v3-slice": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, max_position_embeddings=163840,
    ),
}
DEFAULT_LAYERS = {"tiny": 2, "v2-lite": 4, "v3-slice": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: tiny 2, v2-lite 4, v3-slice 2)")
    parser.add_argument("--batch", type=int, default=None, help="decode batch (default: cpu 4, cuda 16)")
    parser.add_argument("--context", type=int, nargs="+", default=None, metavar="C",
                        help="decode contexts (default: cpu 1024, cuda 4096 32768)")
    parser.add_argument("--short-context", type=int, default=None, help="C0 for the attention share (default: cpu 64, cuda 128)")
    parser.add_argument("--prefill-len", type=int, default=None, help="prompt length for prefill timing (default: cpu 64, cuda 2048)")
    parser.add_argument("--passes", default="dispatch,dispatch-redundant,sparse,all",
                        help="variants beyond eager and compiled (comma list of dispatch, dispatch-redundant, sparse, all)")
    parser.add_argument("--sink", type=int, default=None, help="default: cuda 128, cpu 16")
    parser.add_argument("--recent", type=int, default=None, help="default: cuda 384, cpu 48")
    parser.add_argument("--pattern", default="half", help="layers to compress: 'half' (every other layer) or a comma list")
    parser.add_argument("--redundant-slots", type=int, default=None, help="extra slots per MoE layer (default E/8)")
    parser.add_argument("--repeats", type=int, default=None, help="timed decode steps or graph replays")
    parser.add_argument("--no-prefill", action="store_true", help="skip prefill timing (saves one compile per variant)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--plot", metavar="DIR")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON document here")
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="also profile 10 decode steps per variant (no CUDA graph) and keep the TOP kernels by "
                             "device time under 'profile' in the JSON")


# ----------------------------------------------------------------------------------------
def _config(args):
    from omni_passes.models import load_hf_config

    layers = args.layers or DEFAULT_LAYERS[args.shape]
    if args.shape == "tiny":
        return load_hf_config("tiny", layers=layers)
    return load_hf_config("tiny", layers=layers, overrides=SHAPES[args.shape])


def _pattern(args, num_layers: int) -> list[int]:
    if args.pattern == "half":
        return list(range(1, num_layers, 2)) or [0]
    try:
        pattern = [int(i) for i in args.pattern.split(",") if i.strip()]
    except ValueError:
        raise UserError(f"--pattern must be 'half' or a comma list of layer indices, got {args.pattern!r}") from None
    bad = [i for i in pattern if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"--pattern names layer(s) {bad}; the model has {num_layers} layers")
    return pattern


class Timer:
    """Median step time: CUDA graph replays with events on CUDA, wall clock on CPU."""

    def __init__(self, device: str, repeats: int):
        self.device = device
        self.repeats = repeats

    def time_callable(self, fn: Callable[[], Any]) -> float:
        """Median seconds of fn() (no CUDA graph: eager)."""
        samples = []
        for _ in range(max(3, self.repeats // 4)):
            if self.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if self.device == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def time_graph(self, fn: Callable[[], Any]) -> float:
        """Median seconds of one step: captured in a CUDA graph on CUDA, plain on CPU."""
        if self.device != "cuda":
            for _ in range(2):
                fn()
            samples = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - start)
            return statistics.median(samples)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        for _ in range(5):
            graph.replay()
        samples = []
        for _ in range(self.repeats):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            graph.replay()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        del graph
        return statistics.median(samples)


def _hot_placement(model, hf_config, device, inputs, extra: int):
    """Measure loads on a prefill batch, give each extra slot to the expert with the highest
    per-replica load (OmniInfer's replica rule)."""
    import omni_passes
    from omni_passes.cli.demo import replicate_hottest
    from omni_passes.placement.placement import Placement

    probe = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        probe(inputs)
    loads = probe.omni.placement_state.take_load()
    torch._dynamo.reset()
    phy2log = replicate_hottest(loads, extra)
    return Placement(num_layers=phy2log.shape[0], num_logical_experts=hf_config.n_routed_experts,
                     num_ranks=1, num_nodes=1, slots_per_rank=phy2log.shape[1], phy2log=phy2log)


def _kv_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    import omni_passes
    from omni_passes.models import build_model
    from transformers import StaticCache

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = args.batch or (16 if device == "cuda" else 4)
    contexts = args.context or ([4096, 32768] if device == "cuda" else [1024])
    short = args.short_context or (128 if device == "cuda" else 64)
    prefill_len = args.prefill_len or (2048 if device == "cuda" else 64)
    repeats = args.repeats or (200 if device == "cuda" else 10)
    wanted = {v.strip() for v in args.passes.split(",") if v.strip()}
    unknown = wanted - {"dispatch", "dispatch-redundant", "sparse", "all"}
    if unknown:
        raise UserError(f"--passes: unknown variant(s) {sorted(unknown)}")
    sink = args.sink if args.sink is not None else (128 if device == "cuda" else 16)
    recent = args.recent if args.recent is not None else (384 if device == "cuda" else 48)
    hf_config = _config(args)
    num_layers = hf_config.num_hidden_layers
    pattern = _pattern(args, num_layers)
    extra = args.redundant_slots if args.redundant_slots is not None else max(1, hf_config.n_routed_experts // 8)
    timer = Timer(device, repeats)
    say(f"bench graph: {args.shape} ({num_layers} layers, {hf_config.n_routed_experts} experts top-{hf_config.num_experts_per_tok}), "
        f"{dtype}, {device}, batch {batch}, contexts {contexts}, pattern {pattern}")

    def fresh_model():
        return build_model(hf_config, dtype=dtype, device=device, seed=0)

    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, hf_config.vocab_size, (1, prefill_len), generator=generator).to(device)
    step_ids = torch.randint(0, hf_config.vocab_size, (batch, 1), generator=generator).to(device)

    variants: dict[str, dict[str, Any]] = {}

    def checkpoint():
        """Long GPU runs: keep what is measured so far on disk (--out) as it comes."""
        if args.out:
            Path(args.out).write_text(json.dumps({"partial": True, "shape": args.shape, "variants": variants}, indent=2) + "\n")

    def measure(name: str, module, compiled: bool, contexts_here: list[int], compile_start: float | None):
        # One static cache per context, sized to it: a static cache attends over its whole
        # length (masked), so the context a step pays for is the cache length, not the position.
        entry: dict[str, Any] = {"kv_bytes_by_context": {}}
        eager_module = getattr(module, "_orig_mod", module)
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for context in contexts_here:
            cache = StaticCache(config=hf_config, max_cache_len=context)
            position = torch.full((1,), context - 1, dtype=torch.long, device=device)
            with torch.no_grad():
                # transformers allocates the cache on first update: do it eagerly, so the
                # compiled step is traced once, on an allocated cache
                eager_module(input_ids=step_ids, past_key_values=cache,
                             cache_position=torch.zeros(1, dtype=torch.long, device=device), use_cache=True)
                module(input_ids=step_ids, past_key_values=cache, cache_position=position, use_cache=True)
            if compile_start is not None and "compile_s" not in entry:
                if device == "cuda":
                    torch.cuda.synchronize()
                entry["compile_s"] = time.perf_counter() - compile_start

            def step():
                with torch.no_grad():
                    return module(input_ids=step_ids, past_key_values=cache, cache_position=position, use_cache=True).logits

            seconds = timer.time_graph(step) if compiled else timer.time_callable(step)
            if args.profile:
                entry.setdefault("profile_by_context", {})[str(context)] = _profile_kernels(step, device, args.profile)
            entry.setdefault("decode_step_us_by_context", {})[str(context)] = seconds * 1e6
            entry["kv_bytes_by_context"][str(context)] = _kv_bytes(cache)
            step = cache = None  # free this context's cache before the next one
        entry["decode_step_us"] = entry["decode_step_us_by_context"][str(contexts_here[-1])]
        entry["kv_bytes"] = entry["kv_bytes_by_context"][str(contexts_here[-1])]
        if device == "cuda":
            entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
        if not args.no_prefill:
            def prefill():
                with torch.no_grad():
                    return module(input_ids=prompt, use_cache=False).logits

            prefill()  # compiles the prefill shape for compiled variants
            entry["prefill_ms"] = timer.time_callable(prefill) * 1e3
        say(f"  {name}: decode {', '.join(f'{c}: {us:.1f} us' for c, us in entry['decode_step_us_by_context'].items())}"
            + (f", prefill {entry['prefill_ms']:.2f} ms" if "prefill_ms" in entry else "")
            + (f", compile {entry['compile_s']:.1f} s" if "compile_s" in entry else ""))
        return entry

    def compiled_variant(name: str, passes: list[str], placement=None, contexts_here=None, attn=None):
        torch._dynamo.reset()
        model = fresh_model()
        config: dict[str, Any] = {"passes": passes}
        if attn is not None:
            config["sparse_attention"] = attn
        start = time.perf_counter()
        module = omni_passes.compile(model, config, placement=placement)
        entry = measure(name, module, True, contexts_here or contexts, start)
        entry["report"] = module.omni.report()["passes"]
        variants[name] = entry
        checkpoint()
        del module, model
        if device == "cuda":
            torch.cuda.empty_cache()
        return entry

    say("eager ...")
    variants["eager"] = measure("eager", fresh_model(), False, contexts, None)
    say("compiled ...")
    compiled_entry = compiled_variant("compiled", [], contexts_here=sorted({short, *contexts}))
    if "dispatch" in wanted:
        say("compiled+dispatch ...")
        compiled_variant("compiled+dispatch", ["redundant_experts"])
    if "dispatch-redundant" in wanted:
        say(f"compiled+dispatch-redundant ({extra} extra slots per MoE layer) ...")
        placement = _hot_placement(fresh_model(), hf_config, device, prompt, extra)
        compiled_variant("compiled+dispatch-redundant", ["redundant_experts"], placement=placement)
    attn = {"sink": sink, "recent": recent, "pattern": pattern}
    sparse_available = _sparse_pass_available()
    for context in contexts:
        for kind, passes in (("sparse", ["sparse_attention"]), ("all", ["redundant_experts", "sparse_attention"])):
            if kind not in wanted:
                continue
            name = f"compiled+{kind}@{context}"
            if not sparse_available:
                variants[name] = {"skipped": "omni_passes.fx.sparse_attention is not available in this build"}
                continue
            say(f"{name} ...")
            compiled_variant(name, passes, contexts_here=[context], attn=attn)

    _ratios_and_amdahl(variants, compiled_entry, contexts, short, len(pattern) / num_layers)
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "layers": num_layers,
        "batch": batch,
        "contexts": contexts,
        "pattern": pattern,
        "sink": sink,
        "recent": recent,
        "redundant_slots": extra,
        "prefill_len": prefill_len,
        "torch": torch.__version__,
        "variants": variants,
    }


def _profile_kernels(step: Callable[[], Any], device: str, top: int, steps: int = 10) -> dict[str, Any]:
    """Per-step device time of the ``top`` most expensive kernels over ``steps`` plain (not
    graph-captured) steps: where a variant's time goes, e.g. what still scales with the cache."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    step()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device == "cuda":
            torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "self_device_time_total", 0.0) if device == "cuda" else event.self_cpu_time_total
        if us > 0 and (device != "cuda" or event.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"kernel": event.key[:160], "us_per_step": us / steps, "calls_per_step": event.count / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    return {"steps": steps, "total_us_per_step": sum(r["us_per_step"] for r in rows), "top": rows[:top]}


def _sparse_pass_available() -> bool:
    try:
        from omni_passes.fx.sparse_attention import SparseAttentionPass  # noqa: F401
    except ImportError:
        return False
    return True


def _ratios_and_amdahl(variants, compiled_entry, contexts, short, fraction) -> None:
    base = compiled_entry["decode_step_us_by_context"]
    for name, entry in variants.items():
        if "decode_step_us_by_context" not in entry:
            continue
        entry["ratio_vs_compiled"] = {c: us / base[c] for c, us in entry["decode_step_us_by_context"].items() if c in base}
        if "prefill_ms" in entry and "prefill_ms" in compiled_entry:
            entry["prefill_ratio_vs_compiled"] = entry["prefill_ms"] / compiled_entry["prefill_ms"]
    for context in contexts:
        step_c, step_0 = base.get(str(context)), base.get(str(short))
        if step_c is None or step_0 is None:
            continue
        share = max(0.0, (step_c - step_0) / step_c)
        bound = 1.0 / (1.0 - share * fraction)
        for kind in ("sparse", "all"):
            entry = variants.get(f"compiled+{kind}@{context}")
            if entry and "decode_step_us" in entry:
                gain = step_c / entry["decode_step_us"]
                entry["amdahl"] = {"attention_share": share, "compressed_fraction": fraction, "bound_speedup": bound,
                                   "measured_speedup": gain, "of_bound": (gain - 1) / (bound - 1) if bound > 1 else None}


def _table(result: dict) -> str:
    lines = [f"{'variant':<34}{'context':>8}{'decode (us)':>14}{'vs compiled':>13}{'prefill (ms)':>14}{'compile (s)':>13}"]
    for name, entry in result["variants"].items():
        if "skipped" in entry:
            lines.append(f"{name:<34}  skipped: {entry['skipped']}")
            continue
        for context, us in entry["decode_step_us_by_context"].items():
            ratio = entry.get("ratio_vs_compiled", {}).get(context)
            prefill = entry.get("prefill_ms")
            compile_s = entry.get("compile_s")
            lines.append(f"{name:<34}{context:>8}{us:>14.1f}{(f'{ratio:.3f}x' if ratio else '-'):>13}"
                         f"{(f'{prefill:.2f}' if prefill is not None else '-'):>14}{(f'{compile_s:.1f}' if compile_s else '-'):>13}")
        if "amdahl" in entry:
            a = entry["amdahl"]
            lines.append(f"{'':<34}  attention share {a['attention_share']:.2f}, compressed {a['compressed_fraction']:.2f}: "
                         f"bound {a['bound_speedup']:.3f}x, measured {a['measured_speedup']:.3f}x")
    return "\n".join(lines)


def _plot(result: dict, out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, entry in result["variants"].items():
        for context, us in entry.get("decode_step_us_by_context", {}).items():
            groups.setdefault(name.split("@")[0], []).append((int(context), us))
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (us)")
    ax.set_title(f"{result['shape']} on {result['device']}, batch {result['batch']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = out_dir / f"graph_{result['shape']}_{'cuda' if result['device'] != 'cpu' else 'cpu'}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def main(args: argparse.Namespace) -> int:
    setup_logging()
    result = run(args)
    if args.plot:
        result["plot"] = _plot(result, Path(args.plot))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        emit_json(result)
    else:
        print(_table(result))
    return 0
