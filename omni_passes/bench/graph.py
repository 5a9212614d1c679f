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
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch

from omni_passes import numerics
from omni_passes.cli.common import UserError, emit_json, say, setup_logging, write_json

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
    parser.add_argument("--passes", default="dispatch,dispatch-redundant,sparse,all,latent,latent+sparse",
                        help="variants beyond eager and compiled (comma list of dispatch, dispatch-redundant, sparse, "
                             "all, latent, latent+sparse)")
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
    loads = probe.omni.controller.take_load()
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


VARIANT_PASSES = {  # --passes name -> (passes, whether the variant is per context with sink+recent)
    "dispatch": (["redundant_experts"], False),
    "dispatch-redundant": (["redundant_experts"], False),
    "latent": (["latent_attention"], False),
    "sparse": (["sparse_attention"], True),
    "all": (["redundant_experts", "sparse_attention"], True),
    "latent+sparse": (["sparse_attention", "latent_attention"], True),
}
# The compiled variant without the pass, for each variant (its "pass error" peer).
PEERS = {"dispatch": "compiled", "dispatch-redundant": "compiled", "latent": "compiled",
         "all": "compiled+sparse", "latent+sparse": "compiled+sparse"}
SPARSE_KINDS = ("sparse", "all", "latent+sparse")  # variants whose reference is the masked eager


def run(args: argparse.Namespace) -> dict[str, Any]:
    import omni_passes
    from omni_passes.models import build_model

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but CUDA is not available here")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batch = args.batch or (16 if device == "cuda" else 4)
    contexts = args.context or ([4096, 32768] if device == "cuda" else [1024])
    short = args.short_context or (128 if device == "cuda" else 64)
    prefill_len = args.prefill_len or (2048 if device == "cuda" else 64)
    repeats = args.repeats or (200 if device == "cuda" else 10)
    wanted = [v.strip() for v in args.passes.split(",") if v.strip()]
    unknown = sorted(set(wanted) - set(VARIANT_PASSES))
    if unknown:
        raise UserError(f"--passes: unknown variant(s) {unknown}; known: {', '.join(VARIANT_PASSES)}")
    if any(c < 2 for c in [short, *contexts]):
        raise UserError(f"--context and --short-context must be >= 2, got {contexts} and {short}")
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
    attn = {"sink": sink, "recent": recent, "pattern": pattern}
    with_sparse = any(VARIANT_PASSES[w][1] for w in wanted)
    all_contexts = sorted({short, *contexts})
    steps = DecodeSteps(hf_config, step_ids, device, dtype)

    say("eager ...")
    eager = fresh_model()
    references = {c: {"eager": steps.logits(eager, c)} for c in all_contexts}
    if with_sparse:
        from omni_passes.kvcache.attention import masked_reference

        with masked_reference(eager, sink, recent, pattern):
            for c in contexts:
                references[c]["masked eager"] = steps.logits(eager, c)
    floor = StepFloor.measure(eager, steps, hf_config, batch, dtype, device, sink, recent, pattern)
    del eager

    variants: dict[str, dict[str, Any]] = {}
    logits: dict[tuple[str, int], torch.Tensor] = {}

    def checkpoint():
        """Long GPU runs: keep what is measured so far on disk (--out) as it comes."""
        if args.out:
            write_json(args.out, {"partial": True, "shape": args.shape, "variants": variants})

    def measure(name: str, family: str, module, compiled: bool, contexts_here: list[int], compile_start: float | None):
        entry: dict[str, Any] = {"kv_bytes_by_context": {}}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for context in contexts_here:
            cache = steps.cache(module, context)
            out = steps.run(module, cache, context)
            if compile_start is not None and "compile_s" not in entry:
                if device == "cuda":
                    torch.cuda.synchronize()
                entry["compile_s"] = time.perf_counter() - compile_start
            logits[(family, context)] = out.float().cpu()
            if compiled:
                entry.setdefault("check_by_context", {})[str(context)] = _check(family, context, logits, references, dtype)

            def step():
                with torch.no_grad():
                    return steps.run(module, cache, context)

            seconds = timer.time_graph(step) if compiled else timer.time_callable(step)
            if args.profile:
                entry.setdefault("profile_by_context", {})[str(context)] = _profile_kernels(step, device, args.profile)
            entry.setdefault("decode_step_us_by_context", {})[str(context)] = seconds * 1e6
            entry["kv_bytes_by_context"][str(context)] = _kv_bytes(cache)
            if floor is not None:
                entry.setdefault("floor_by_context", {})[str(context)] = floor.of(family, context, seconds)
            step = cache = None  # free this context's cache before the next one
        last = str(contexts_here[-1])
        entry["decode_step_us"] = entry["decode_step_us_by_context"][last]
        entry["kv_bytes"] = entry["kv_bytes_by_context"][last]
        if compiled:
            entry["check"] = entry["check_by_context"][last]
        if floor is not None:
            entry["pct_of_floor"] = entry["floor_by_context"][last]["pct_of_floor"]
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
            + (f", compile {entry['compile_s']:.1f} s" if "compile_s" in entry else "")
            + (f", check {entry['check']['max_abs_diff']:.3g} (ok {entry['check']['ok']})" if "check" in entry else ""))
        return entry

    def compiled_variant(name: str, family: str, passes: list[str], contexts_here: list[int], placement=None):
        torch._dynamo.reset()
        model = fresh_model()
        config: dict[str, Any] = {"passes": passes}
        if "sparse_attention" in passes:
            config["sparse_attention"] = attn
        start = time.perf_counter()
        # dynamic=False: every context gets its own static graph (a decode graph per cache length).
        module = omni_passes.compile(model, config, placement=placement, dynamic=False)
        entry = measure(name, family, module, True, contexts_here, start)
        entry["report"] = module.omni.report()["passes"]
        variants[name] = entry
        checkpoint()
        del module, model
        if device == "cuda":
            torch.cuda.empty_cache()
        return entry

    variants["eager"] = measure("eager", "eager", fresh_model(), False, contexts, None)
    say("compiled ...")
    compiled_entry = compiled_variant("compiled", "compiled", [], all_contexts)
    latent_entry = None
    for kind in wanted:
        passes, per_context = VARIANT_PASSES[kind]
        if per_context:
            continue
        placement = None
        if kind == "dispatch-redundant":
            say(f"compiled+dispatch-redundant ({extra} extra slots per MoE layer) ...")
            placement = _hot_placement(fresh_model(), hf_config, device, prompt, extra)
        else:
            say(f"compiled+{kind} ...")
        here = all_contexts if kind == "latent" else contexts
        entry = compiled_variant(f"compiled+{kind}", f"compiled+{kind}", passes, here, placement=placement)
        if kind == "latent":
            latent_entry = entry
    sparse_available = _sparse_pass_available()
    for context in contexts:
        for kind in SPARSE_KINDS:
            if kind not in wanted:
                continue
            name = f"compiled+{kind}@{context}"
            if not sparse_available:
                variants[name] = {"skipped": "omni_passes.fx.sparse_attention is not available in this build"}
                continue
            say(f"{name} ...")
            compiled_variant(name, f"compiled+{kind}", VARIANT_PASSES[kind][0], [context])

    fraction = len(pattern) / num_layers
    _ratios_and_amdahl(variants, compiled_entry, contexts, short, fraction, ("sparse", "all"))
    if latent_entry is not None:
        _amdahl(variants, latent_entry, contexts, short, fraction, ("latent+sparse",), "amdahl_vs_latent")
    return {
        "device": device if device == "cpu" else torch.cuda.get_device_name(),
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "layers": num_layers,
        "batch": batch,
        "contexts": contexts,
        "short_context": short,
        "pattern": pattern,
        "sink": sink,
        "recent": recent,
        "redundant_slots": extra,
        "prefill_len": prefill_len,
        "torch": torch.__version__,
        "check_rule": CHECK_RULE,
        **({"floor": floor.describe(contexts)} if floor is not None else {}),
        "variants": variants,
    }


class DecodeSteps:
    """One decode step at the end of a static cache of ``context`` slots, on cache contents that
    every variant sees alike: random latent rows (seeded per context), not zeros, so numerics
    checks compare attention over real-looking data and timings do not run on zeros.

    transformers' static cache takes the step's position from its own write counter
    (``cumulative_length``, a device tensor each update advances), not from ``cache_position``:
    every step first sets that counter to ``context - 1``, so each (replayed) step writes the last
    slot and its query attends to all ``context`` keys. Without that, step n sat at position n:
    the mask allowed n + 1 keys, and replaying more steps than a short cache holds wrote past
    its end (the default CUDA invocation died with "index out of bounds: 0 <= tmp14 < 128").
    """

    def __init__(self, hf_config, step_ids: torch.Tensor, device: str, dtype: torch.dtype):
        self.hf_config, self.step_ids, self.device, self.dtype = hf_config, step_ids, device, dtype

    def cache(self, module, context: int):
        from transformers import StaticCache

        cache = StaticCache(config=self.hf_config, max_cache_len=context)
        eager = getattr(module, "_orig_mod", module)
        with torch.no_grad():  # transformers allocates a static cache on its first update: do it eagerly
            eager(input_ids=self.step_ids, past_key_values=cache, use_cache=True,
                  cache_position=torch.zeros(1, dtype=torch.long, device=self.device))
        generator = torch.Generator(device=self.device).manual_seed(context)
        for layer in getattr(cache, "layers", []):
            for tensor_name in ("keys", "values"):
                tensor = getattr(layer, tensor_name, None)
                if isinstance(tensor, torch.Tensor):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator, device=self.device, dtype=torch.float32))
        return cache

    def run(self, module, cache, context: int) -> torch.Tensor:
        position = torch.full((1,), context - 1, dtype=torch.long, device=self.device)
        for layer in getattr(cache, "layers", []):
            counter = getattr(layer, "cumulative_length", None)
            if isinstance(counter, torch.Tensor):
                counter.fill_(context - 1)
        with torch.no_grad():
            return module(input_ids=self.step_ids, past_key_values=cache, cache_position=position, use_cache=True).logits

    def logits(self, module, context: int) -> torch.Tensor:
        cache = self.cache(module, context)
        return self.run(module, cache, context).float().cpu()


# --------------------------------------------------------------------------- numerics check
CHECK_RULE = (numerics.RULE + " (omni_passes.numerics). Per context: pass_error = vs the same compiled graph "
              "without the pass (the variant's peer), compile_noise = that peer vs its eager reference (the masked "
              "eager for sparse peers). A variant with no peer in the run (sparse, whose function no compiled graph "
              "without the pass computes) is compared with the masked eager under the compiled variant's compile noise.")


def _check(family: str, context: int, logits: dict, references: dict, dtype: torch.dtype) -> dict[str, Any]:
    """The shared check rule (omni_passes.numerics) applied to one variant at one context."""
    kind = family.removeprefix("compiled+").removeprefix("compiled")
    out = logits[(family, context)]
    peer = "compiled" if family == "compiled" else PEERS.get(kind)
    if peer is not None and (peer, context) in logits:
        peer_kind = peer.removeprefix("compiled+").removeprefix("compiled")
        reference = references[context]["masked eager" if peer_kind in SPARSE_KINDS else "eager"]
        check = numerics.check_rewrite(out, logits[(peer, context)], reference, dtype)
        check["vs"] = peer
        return check
    ref_name = "masked eager" if kind in SPARSE_KINDS else "eager"
    reference = references[context][ref_name]
    noise = 0.0
    if ("compiled", context) in logits:
        noise = numerics.max_abs_diff(logits[("compiled", context)], references[context]["eager"])
    error = numerics.max_abs_diff(out, reference)
    tolerance = numerics.bound(noise, numerics.output_scale(reference), dtype)
    return {"max_abs_diff": error, "ok": error <= tolerance, "tolerance": tolerance, "pass_error": error,
            "compile_noise": noise, "vs_eager": error, "output_scale": numerics.output_scale(reference),
            "rule": numerics.RULE, "vs": ref_name}


# --------------------------------------------------------------------------- HBM floor (CUDA)
class StepFloor:
    """The bytes a decode step must move over the measured copy bandwidth.

    Bytes: every weight the step uses read once (all attention, dense-MLP, shared-expert and
    norm weights and the LM head; of the routed experts only those this batch selects, counted
    from the eager step's routing; B rows of the embedding), the latent cache rows each layer must
    read (all ``context`` rows; sink + recent in a variant's sparse pattern layers), the new
    cache row and the logits written. Bandwidth: a 1 GiB device-to-device copy, read + write
    bytes over time, median of 10, measured in the same run.
    """

    def __init__(self, weight_bytes: int, kv_row_bytes: int, out_bytes: int, copy_bytes_per_s: float,
                 num_layers: int, window: int, pattern: list[int]):
        self.weight_bytes, self.kv_row_bytes, self.out_bytes = weight_bytes, kv_row_bytes, out_bytes
        self.copy_bytes_per_s, self.num_layers, self.window, self.pattern = copy_bytes_per_s, num_layers, window, pattern

    @classmethod
    def measure(cls, model, steps: DecodeSteps, hf_config, batch, dtype, device, sink, recent, pattern):
        if device != "cuda":
            return None
        touched = _touched_experts(model, steps, context=2)
        itemsize = torch.empty((), dtype=dtype).element_size()
        weight_bytes = 0
        for name, param in model.named_parameters():
            nbytes = param.numel() * param.element_size()
            if "embed_tokens" in name:
                nbytes = batch * param.shape[-1] * param.element_size()
            elif ".experts." in name and param.dim() == 3:  # [E, ...] stacked routed experts
                layer = int(name.split("layers.")[1].split(".")[0])
                nbytes = nbytes // param.shape[0] * touched.get(layer, param.shape[0])
            weight_bytes += nbytes
        kv_row = batch * (hf_config.kv_lora_rank + hf_config.qk_rope_head_dim) * itemsize
        out_bytes = batch * hf_config.vocab_size * itemsize + hf_config.num_hidden_layers * kv_row
        return cls(weight_bytes, kv_row, out_bytes, _copy_bandwidth(), hf_config.num_hidden_layers,
                   sink + recent, pattern)

    def bytes(self, context: int, sparse: bool) -> int:
        rows = sum(min(self.window, context) if sparse and i in self.pattern else context for i in range(self.num_layers))
        return self.weight_bytes + rows * self.kv_row_bytes + self.out_bytes

    def of(self, family: str, context: int, seconds: float) -> dict[str, Any]:
        sparse = any(k in family for k in ("sparse", "all"))
        nbytes = self.bytes(context, sparse)
        floor_s = nbytes / self.copy_bytes_per_s
        return {"bytes": nbytes, "floor_us": floor_s * 1e6, "pct_of_floor": 100 * floor_s / seconds}

    def describe(self, contexts: list[int]) -> dict[str, Any]:
        return {"copy_tb_s": self.copy_bytes_per_s / 1e12, "weight_bytes": self.weight_bytes,
                "kv_row_bytes": self.kv_row_bytes,
                "by_context": {str(c): {"bytes_dense": self.bytes(c, False),
                                        "floor_us_dense": self.bytes(c, False) / self.copy_bytes_per_s * 1e6,
                                        "bytes_sparse": self.bytes(c, True),
                                        "floor_us_sparse": self.bytes(c, True) / self.copy_bytes_per_s * 1e6}
                               for c in contexts},
                "rule": StepFloor.__doc__.split("\n\n")[1].replace("\n    ", " ").strip()}


def _touched_experts(model, steps: DecodeSteps, context: int) -> dict[int, int]:
    """Decoder layer -> distinct routed experts one eager decode step of this batch selects."""
    seen: dict[int, int] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is None:
            continue

        def hook(_module, args, kwargs, index=index):
            ids = next((a for a in list(args) + list(kwargs.values())
                        if isinstance(a, torch.Tensor) and not a.is_floating_point()), None)
            if ids is not None:
                seen[index] = int(ids.unique().numel())

        hooks.append(experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        steps.logits(model, context)
    finally:
        for handle in hooks:
            handle.remove()
    return seen


def _copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (median of 10)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    samples = []
    for _ in range(10):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        samples.append(begin.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(samples)


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


def _ratios_and_amdahl(variants, compiled_entry, contexts, short, fraction, kinds) -> None:
    base = compiled_entry["decode_step_us_by_context"]
    for name, entry in variants.items():
        if "decode_step_us_by_context" not in entry:
            continue
        entry["ratio_vs_compiled"] = {c: us / base[c] for c, us in entry["decode_step_us_by_context"].items() if c in base}
        if "prefill_ms" in entry and "prefill_ms" in compiled_entry:
            entry["prefill_ratio_vs_compiled"] = entry["prefill_ms"] / compiled_entry["prefill_ms"]
    _amdahl(variants, compiled_entry, contexts, short, fraction, kinds, "amdahl")


def _amdahl(variants, base_entry, contexts, short, fraction, kinds, key) -> None:
    """Amdahl bound of compressing ``fraction`` of the layers over ``base_entry``: attention share
    f = (step(C) - step(C0)) / step(C), bound 1 / (1 - f * fraction)."""
    base = base_entry["decode_step_us_by_context"]
    for context in contexts:
        step_c, step_0 = base.get(str(context)), base.get(str(short))
        if step_c is None or step_0 is None:
            continue
        share = max(0.0, (step_c - step_0) / step_c)
        bound = 1.0 / (1.0 - share * fraction)
        for kind in kinds:
            entry = variants.get(f"compiled+{kind}@{context}")
            if entry and "decode_step_us" in entry:
                gain = step_c / entry["decode_step_us"]
                entry[key] = {"attention_share": share, "compressed_fraction": fraction, "bound_speedup": bound,
                              "measured_speedup": gain, "of_bound": (gain - 1) / (bound - 1) if bound > 1 else None,
                              "bound_step_us": step_c / bound}


def _table(result: dict) -> str:
    lines = [f"{'variant':<36}{'context':>8}{'decode (us)':>13}{'vs compiled':>12}{'% floor':>9}{'check':>18}"
             f"{'prefill (ms)':>13}{'compile (s)':>12}"]
    for name, entry in result["variants"].items():
        if "skipped" in entry:
            lines.append(f"{name:<36}  skipped: {entry['skipped']}")
            continue
        for context, us in entry["decode_step_us_by_context"].items():
            ratio = entry.get("ratio_vs_compiled", {}).get(context)
            floor = entry.get("floor_by_context", {}).get(context)
            check = entry.get("check_by_context", {}).get(context)
            check_text = f"{check['max_abs_diff']:.2g} {'ok' if check['ok'] else 'FAIL'}" if check else "-"
            pct = f"{floor['pct_of_floor']:.0f}" if floor else "-"
            prefill, compile_s = entry.get("prefill_ms"), entry.get("compile_s")
            lines.append(f"{name:<36}{context:>8}{us:>13.1f}{(f'{ratio:.3f}x' if ratio else '-'):>12}"
                         f"{pct:>9}{check_text:>18}"
                         f"{(f'{prefill:.2f}' if prefill is not None else '-'):>13}{(f'{compile_s:.1f}' if compile_s else '-'):>12}")
        for key, over in (("amdahl", "compiled"), ("amdahl_vs_latent", "compiled+latent")):
            if key in entry:
                a = entry[key]
                lines.append(f"{'':<36}  over {over}: attention share {a['attention_share']:.2f}, compressed "
                             f"{a['compressed_fraction']:.2f}: bound {a['bound_speedup']:.3f}x, measured "
                             f"{a['measured_speedup']:.3f}x ({100 * (a['of_bound'] or 0):.0f} % of the bound's gain)")
    if "floor" in result:
        f = result["floor"]
        lines.append(f"floor: copy bandwidth {f['copy_tb_s']:.2f} TB/s (read + write); "
                     + ", ".join(f"{c}: {v['floor_us_dense']:.0f} us dense / {v['floor_us_sparse']:.0f} us sparse"
                                 for c, v in f["by_context"].items()))
    return "\n".join(lines)


def _plot(result: dict, out_dir: Path) -> str:
    """Left: decode step per variant over context. Right: each variant at the longest context,
    with the step's HBM floor (CUDA) drawn across."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
    groups: dict[str, list[tuple[int, float]]] = {}
    for name, entry in result["variants"].items():
        for context, us in entry.get("decode_step_us_by_context", {}).items():
            groups.setdefault(name.split("@")[0], []).append((int(context), us))
    for name, points in groups.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (us)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    longest = str(max(result["contexts"]))
    names = [n for n, e in result["variants"].items() if longest in e.get("decode_step_us_by_context", {})]
    values = [result["variants"][n]["decode_step_us_by_context"][longest] for n in names]
    bars.barh(range(len(names)), values, color="tab:blue")
    bars.set_yticks(range(len(names)), [n.split("@")[0] for n in names], fontsize=8)
    bars.invert_yaxis()
    bars.set_xscale("log")
    bars.set_xlabel(f"decode step at {longest} tokens (us, log)")
    for i, v in enumerate(values):
        bars.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    floor = result.get("floor", {}).get("by_context", {}).get(longest)
    if floor:
        bars.axvline(floor["floor_us_dense"], color="tab:red", linestyle="--",
                     label=f"HBM floor {floor['floor_us_dense']:,.0f} us (dense KV)")
        bars.axvline(floor["floor_us_sparse"], color="tab:orange", linestyle=":",
                     label=f"HBM floor {floor['floor_us_sparse']:,.0f} us (sparse layers)")
        bars.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{result['shape']}, {result['layers']} layers, batch {result['batch']}, {result['dtype']}, "
                 f"on {result['device']}")
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
        write_json(args.out, result)
    if args.json:
        emit_json(result)
    else:
        print(_table(result))
    return 0
