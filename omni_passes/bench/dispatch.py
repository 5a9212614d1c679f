"""Dispatch-pass overhead on a compiled decode step, the two implementations side by side.

    python -m omni_passes.bench.dispatch [--device cpu|cuda] [--shape tiny|v2-lite|v3-slice]
        [--layers N] [--batch B] [--context C] [--rounds 15] [--json] [--out FILE]

Variants, each a fresh model compiled with Inductor: ``compiled`` (no pass), and the dispatch
pass with the identity placement and with redundant slots for the hottest experts, each with
the ops lowered into the graph (``kernels.inductor_lowerings``, the default) and with their
eager kernels (``OMNI_OPS_LOWERING=0``). Timing interleaves the variants round by round, after one dropped warm-up round (on a
shared machine noise then falls on all of them): per round each variant runs ``--steps`` decode
steps (CUDA: replays of one captured CUDA graph, timed with events); reported are the median
step per variant and the median over rounds of each variant's ratio to ``compiled`` in the same
round. Every variant's logits are checked against ``compiled``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from omni_passes.cli.common import emit_json, say, setup_logging, write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="tiny", choices=["tiny", "v2-lite", "v3-slice"])
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: tiny 2, else 4)")
    parser.add_argument("--batch", type=int, default=None, help="decode batch (default: cpu 4, cuda 16)")
    parser.add_argument("--context", type=int, default=None, help="static cache length (default: cpu 1024, cuda 4096)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=None, help="decode steps per variant and round (default: cpu 10, cuda 50)")
    parser.add_argument("--variants", default=None, help=f"comma list (default all: {', '.join(VARIANTS)})")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", metavar="FILE")


# name → (redundant slots?, OMNI_OPS_LOWERING)
VARIANTS = {"compiled": (None, "1"), "dispatch:lowered": (False, "1"), "dispatch:eager-kernels": (False, "0"),
            "dispatch-redundant:lowered": (True, "1"), "dispatch-redundant:eager-kernels": (True, "0")}


def _config(args):
    from omni_passes.bench.graph import SHAPES
    from omni_passes.models import load_hf_config

    layers = args.layers or (2 if args.shape == "tiny" else 4)
    return load_hf_config("tiny", layers=layers, overrides=SHAPES[args.shape] or None)


class Step:
    """One compiled decode step on a static cache; ``time(n)`` runs n steps and returns seconds per step."""

    def __init__(self, module, config, batch, context, device):
        from transformers import StaticCache

        self.module, self.device = module, device
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, config.vocab_size, (batch, 1), generator=generator).to(device)
        self.cache = StaticCache(config=config, max_cache_len=context)
        self.position = torch.full((1,), context - 1, dtype=torch.long, device=device)
        eager = getattr(module, "_orig_mod", module)
        with torch.no_grad():  # allocate the cache eagerly, so the compiled step is traced once
            eager(input_ids=self.ids, past_key_values=self.cache, cache_position=torch.zeros(1, dtype=torch.long, device=device),
                  use_cache=True)
        self.graph = None
        self.logits = self.run()

    def run(self):
        with torch.no_grad():
            return self.module(input_ids=self.ids, past_key_values=self.cache, cache_position=self.position, use_cache=True).logits

    def capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run()

    def time(self, steps: int) -> float:
        if self.device == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(steps):
                self.graph.replay()
            end.record()
            end.synchronize()
            return begin.elapsed_time(end) / 1e3 / steps
        start = time.perf_counter()
        for _ in range(steps):
            self.run()
        return (time.perf_counter() - start) / steps


def _hot_placement(config, device, extra: int):
    """Replicate the hottest experts of a probe prefill (OmniInfer's replica rule)."""
    import omni_passes
    from omni_passes.placement.packing import replicate_hottest
    from omni_passes.models import build_model
    from omni_passes.placement.placement import Placement

    probe = omni_passes.compile(build_model(config, device=device, dtype=_dtype(device)), {"passes": ["redundant_experts"]})
    prompt = torch.randint(0, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        probe(prompt)
    loads = probe.omni.controller.take_load()
    torch._dynamo.reset()
    phy2log = replicate_hottest(loads, extra)
    return Placement(num_layers=phy2log.shape[0], num_logical_experts=config.n_routed_experts, num_ranks=1, num_nodes=1,
                     slots_per_rank=phy2log.shape[1], phy2log=phy2log)


def _dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device == "cuda" else torch.float32


def run(args) -> dict:
    import omni_passes
    from kernels import inductor_lowerings
    from omni_passes.models import build_model

    device = args.device
    config = _config(args)
    batch = args.batch or (16 if device == "cuda" else 4)
    context = args.context or (4096 if device == "cuda" else 1024)
    steps = args.steps or (50 if device == "cuda" else 10)
    extra = max(1, config.n_routed_experts // 8)
    wanted = [v.strip() for v in (args.variants or ",".join(VARIANTS)).split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or "compiled" not in wanted:
        raise SystemExit(f"--variants: unknown {unknown} (known: {', '.join(VARIANTS)}; 'compiled' is required)")
    placement = _hot_placement(config, device, extra) if any(VARIANTS[v][0] for v in wanted) else None
    built: dict[str, Step] = {}
    compile_s = {}
    for name in wanted:
        redundant, lowering = VARIANTS[name]
        passes = [] if redundant is None else ["redundant_experts"]
        p = placement if redundant else None
        os.environ[inductor_lowerings.ENV] = lowering
        torch._dynamo.reset()
        start = time.perf_counter()
        module = omni_passes.compile(build_model(config, device=device, dtype=_dtype(device)), {"passes": passes}, placement=p)
        built[name] = Step(module, config, batch, context, device)
        if device == "cuda":
            built[name].capture()
        compile_s[name] = time.perf_counter() - start
        say(f"{name}: compiled in {compile_s[name]:.1f} s")
    os.environ.pop(inductor_lowerings.ENV, None)
    reference = built["compiled"].logits.float()
    check = {name: float((s.logits.float() - reference).abs().max()) for name, s in built.items()}
    samples: dict[str, list[float]] = {name: [] for name in built}
    for r in range(args.rounds + 1):  # round 0 warms every variant up (first calls are slow) and is dropped
        names = list(built)
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            seconds = built[name].time(steps)
            if r:
                samples[name].append(seconds)
    ratios = {name: statistics.median(a / b for a, b in zip(samples[name], samples["compiled"])) for name in built}
    result = {
        "device": device if device == "cpu" else torch.cuda.get_device_name(), "shape": args.shape,
        "layers": config.num_hidden_layers, "experts": config.n_routed_experts, "top_k": config.num_experts_per_tok,
        "batch": batch, "context": context, "dtype": str(_dtype(device)).replace("torch.", ""), "redundant_slots": extra,
        "rounds": args.rounds, "steps_per_round": steps, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "variants": {name: {"step_us_median": statistics.median(samples[name]) * 1e6, "vs_compiled": ratios[name],
                            "max_abs_diff_vs_compiled": check[name], "compile_s": compile_s[name],
                            "step_us_rounds": [s * 1e6 for s in samples[name]]} for name in built},
    }
    if device == "cuda":
        result["floor"] = _floor(config, batch, context)
    return result


def _floor(config, batch: int, context: int) -> dict:
    """Bytes a decode step must read at least (expert weights the batch can touch, dense and
    attention weights, the static cache) over the H200's HBM bandwidth (4.8 TB/s datasheet)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    dense_layers = getattr(config, "first_k_dense_replace", 0)
    moe_layers = layers - dense_layers
    touched = min(config.n_routed_experts, batch * config.num_experts_per_tok)
    expert_bytes = 3 * h * config.moe_intermediate_size * 2
    mlp = moe_layers * (touched + config.n_shared_experts) * expert_bytes + dense_layers * 3 * h * config.intermediate_size * 2
    latent = config.kv_lora_rank + config.qk_rope_head_dim
    kv = layers * batch * context * config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim
                                                                  + config.v_head_dim) * 2
    total = mlp + kv
    return {"bytes": total, "expert_and_mlp_bytes": mlp, "kv_bytes": kv, "latent_per_token": latent,
            "hbm_bytes_per_s": 4.8e12, "floor_us": total / 4.8e12 * 1e6}


def main(args: argparse.Namespace) -> int:
    setup_logging()
    result = run(args)
    if args.out:
        write_json(args.out, result)
    if args.json:
        emit_json(result)
    else:
        print(f"dispatch overhead, {result['shape']} ({result['layers']} layers), {result['device']}, batch {result['batch']}, "
              f"context {result['context']}, {args.rounds} interleaved rounds")
        for name, v in result["variants"].items():
            print(f"  {name:<34} {v['step_us_median']:10.1f} us  x{v['vs_compiled']:.3f}  max|diff| {v['max_abs_diff_vs_compiled']:.2g}")
    return 0


if __name__ == "__main__":
    import sys

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
