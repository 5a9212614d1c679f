"""One `bench graph` run, step by step:

    1. references   eager model: eager logits per context, masked eager per sparse context,
                    the HBM floor (CUDA)
    2. build        each variant compiled (one static graph per context), its logits checked
                    (check.py), its steps made ready to time (a CUDA graph per context on CUDA)
    3. time         each variant in interleaved rounds against its bases (compiled; also
                    compiled+latent for latent+sparse), then freed: at most the bases and one
                    variant are alive at once, so large shapes fit on one GPU
    4. exactness    a bf16 run's verdict: every variant again in float32, not timed
                    (exactness.py); the bf16 comparisons stay as each variant's drift
    5. summarise    medians, per-round ratios with their spread, Amdahl bounds, floors
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from omni_passes.bench.graph import check as checks
from omni_passes.bench.graph import exactness, report
from omni_passes.bench.graph.cli import Settings, settings
from omni_passes.bench.graph.floor import StepFloor
from omni_passes.bench.graph.model import DecodeSteps, hot_placement, kv_bytes
from omni_passes.bench.graph.timing import StepTimer, paired_ratios, profile_kernels, time_group
from omni_passes.bench.graph.variants import MASKED_PEER
from omni_passes.cli.common import say, write_json

TIMING_RULE = ("Each variant is timed in interleaved rounds with its bases (compiled; compiled+latent for "
               "latent+sparse): per round every step runs once, the order rotated, after one dropped warm-up "
               "round; a ratio is taken per round between steps of the same round and reported as its median with "
               "quartiles (q1, q3), min and max over the rounds. Steps are medians over the rounds.")


@dataclass
class Variant:
    """A built variant: its module, its steps ready to time ("decode@C", "prefill"), its entry."""

    name: str
    module: Any
    timers: dict[str, StepTimer] = field(default_factory=dict)
    entry: dict[str, Any] = field(default_factory=dict)

    def close(self) -> None:
        for timer in self.timers.values():
            timer.close()
        self.timers.clear()
        self.module = None


class Bench:
    """The state one run shares across its steps: settings, the decode inputs, the logits of
    every compiled graph (for the checks), and every timing sample taken."""

    def __init__(self, s: Settings):
        self.s = s
        generator = torch.Generator().manual_seed(0)
        config = s.hf_config
        self.prompt = torch.randint(0, config.vocab_size, (1, s.prefill_len or 1), generator=generator).to(s.device)
        self.step_ids = torch.randint(0, config.vocab_size, (s.batch, 1), generator=generator).to(s.device)
        self.steps = DecodeSteps(config, self.step_ids, s.device, s.dtype)
        self.logits: dict[tuple[str, int], torch.Tensor] = {}
        self.references: dict[int, dict[str, torch.Tensor]] = {}
        self.samples: dict[tuple[str, str], list[float]] = {}
        self.variants: dict[str, dict[str, Any]] = {}
        self.planned: list[exactness.Planned] = []  # every compiled variant, for the float32 verdict

    def fresh_model(self, dtype: torch.dtype | None = None):
        from omni_passes.models import build_model

        return build_model(self.s.hf_config, dtype=dtype or self.s.dtype, device=self.s.device, seed=0)

    def compile(self, model, passes: list[str], placement=None):
        import omni_passes

        config: dict[str, Any] = {"passes": passes}
        if "sparse_attention" in passes:
            config["sparse_attention"] = self.s.window
        # dynamic=False: every context gets its own static graph (a decode graph per cache length).
        return omni_passes.compile(model, config, placement=placement, dynamic=False)

    def checkpoint(self) -> None:
        """Long GPU runs: keep what is measured so far on disk (--out) as it comes."""
        if self.s.out:
            write_json(self.s.out, {"partial": True, "shape": self.s.shape, "variants": self.variants})


# --------------------------------------------------------------------------- 1. references
def references(bench: Bench, eager) -> StepFloor | None:
    """Eager logits at every context, masked eager at the sparse contexts; the floor (CUDA)."""
    s = bench.s
    bench.references = checks.reference_logits(eager, bench.steps, s.all_contexts, s.window if s.windowed else None,
                                               s.contexts)
    return StepFloor.measure(eager, bench.steps, s.hf_config, s.batch, s.dtype, s.device, s.sink, s.recent, s.pattern)


# --------------------------------------------------------------------------- 2. build
def build(bench: Bench, name: str, module, contexts: list[int], compiled: bool, compile_start: float | None) -> Variant:
    """Run ``module`` once per context (compiling it), check its logits, make its steps ready."""
    s = bench.s
    variant = Variant(name, module)
    entry = variant.entry
    entry["kv_bytes_by_context"] = {}
    if s.device == "cuda":
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for context in contexts:
        cache = bench.steps.cache(module, context)
        out = bench.steps.run(module, cache, context)
        if compile_start is not None and "compile_s" not in entry:
            if s.device == "cuda":
                torch.cuda.synchronize()
            entry["compile_s"] = time.perf_counter() - compile_start
        if compiled:
            bench.logits[(name.split("@")[0], context)] = out.float().cpu()
            entry.setdefault("check_by_context", {})[str(context)] = checks.check_variant(
                name, context, bench.logits, bench.references, s.dtype)

        def step(cache=cache, context=context):
            with torch.no_grad():
                return bench.steps.run(module, cache, context)

        if s.profile:
            entry.setdefault("profile_by_context", {})[str(context)] = profile_kernels(step, s.device, s.profile)
        variant.timers[f"decode@{context}"] = StepTimer(step, s.device, s.steps, graph=compiled)
        entry["kv_bytes_by_context"][str(context)] = kv_bytes(cache)
    if compiled:
        entry["check"] = entry["check_by_context"][str(contexts[-1])]
        if exactness.needed(s):
            exactness.as_drift(entry, s.dtype)
    entry["kv_bytes"] = entry["kv_bytes_by_context"][str(contexts[-1])]
    if s.device == "cuda":  # this variant's own memory (the bases alive beside it not counted)
        entry["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - allocated
    if s.prefill_len:
        def prefill():
            with torch.no_grad():
                return module(input_ids=bench.prompt, use_cache=False).logits

        prefill()  # compiles the prefill shape for compiled variants
        variant.timers["prefill"] = StepTimer(prefill, s.device, 1, graph=False)
    return variant


def build_compiled(bench: Bench, name: str, passes: list[str], contexts: list[int], placement=None) -> Variant:
    model = bench.fresh_model()
    bench.planned.append((name, list(contexts), lambda m: bench.compile(m, passes, placement)))
    start = time.perf_counter()
    module = bench.compile(model, passes, placement)
    variant = build(bench, name, module, contexts, True, start)
    variant.entry["report"] = module.omni.report()["passes"]
    return variant


def masked_peer(bench: Bench, context: int) -> None:
    """``compiled+masked`` logits at ``context`` (check only, not timed)."""
    out = checks.masked_peer_logits(bench.fresh_model(), lambda m: bench.compile(m, []), bench.steps, [context],
                                    bench.s.window)
    bench.logits[(MASKED_PEER, context)] = out[context]


# --------------------------------------------------------------------------- 3. time
def time_against(bench: Bench, variant: Variant, bases: list[Variant], every_base_step: bool = False) -> None:
    """Interleaved rounds of ``variant`` with each base's matching steps (``every_base_step``:
    all of the bases' steps); per-round ratios of the variant to each base."""
    timers = {(variant.name, what): t for what, t in variant.timers.items()}
    for base in bases:
        timers.update({(base.name, what): t for what, t in base.timers.items()
                       if every_base_step or what in variant.timers})
    samples = time_group(timers, bench.s.rounds)
    for key, values in samples.items():
        bench.samples.setdefault(key, []).extend(values)
    variant.entry["ratios"] = {base.name: paired_ratios(samples, variant.name, base.name) for base in bases}


def finish(bench: Bench, variant: Variant, floor: StepFloor | None) -> None:
    """Medians of every sample of ``variant`` into its entry; the entry joins the results."""
    entry = variant.entry
    for what in variant.timers:
        values = bench.samples[(variant.name, what)]
        if what == "prefill":
            entry["prefill_ms"] = statistics.median(values) * 1e3
            continue
        context = what.split("@")[1]
        seconds = statistics.median(values)
        entry.setdefault("decode_step_us_by_context", {})[context] = seconds * 1e6
        entry.setdefault("decode_step_us_rounds_by_context", {})[context] = [v * 1e6 for v in values]
        if floor is not None:
            entry.setdefault("floor_by_context", {})[context] = floor.of(variant.name, int(context), seconds)
    by_context = entry["decode_step_us_by_context"]
    entry["decode_step_us"] = by_context[max(by_context, key=int)]
    if floor is not None:
        entry["pct_of_floor"] = entry["floor_by_context"][max(by_context, key=int)]["pct_of_floor"]
    vs_compiled = entry.get("ratios", {}).get("compiled", {})
    if vs_compiled:
        entry["ratio_vs_compiled"] = {w.split("@")[1]: r["median"] for w, r in vs_compiled.items() if w != "prefill"}
        if "prefill" in vs_compiled:
            entry["prefill_ratio_vs_compiled"] = vs_compiled["prefill"]["median"]
    bench.variants[variant.name] = entry
    say(report.summary_line(variant.name, entry))
    bench.checkpoint()


def measure_and_free(bench: Bench, variant: Variant, bases: list[Variant], floor, keep: bool = False,
                     every_base_step: bool = False) -> Variant:
    """Time ``variant`` against its bases, record it, and free it unless ``keep``."""
    time_against(bench, variant, bases, every_base_step)
    finish(bench, variant, floor)
    if not keep:
        variant.close()
        if bench.s.device == "cuda":
            torch.cuda.empty_cache()
    return variant


# --------------------------------------------------------------------------- the run
@contextlib.contextmanager
def dynamo_room(s: Settings) -> Iterator[None]:
    """Room in Dynamo's cache for every graph of the run, without ``torch._dynamo.reset()``
    between variants.

    All variants run the same ``forward`` code object; each compiled module adds its own cache
    entries (its backend is part of the guard), so alternating calls of live variants never
    recompile, and a freed variant's model is freed with it (its entries keep no weights). A
    reset between variants would instead make every live base recompile at its next Python call
    (every CPU step, every prefill). Past its default limit of 8 entries Dynamo stops compiling
    (the omni compile, fullgraph, then fails), so the limit is raised to what the run compiles
    (one graph per context, plus prefill, per variant) and restored after."""
    per_variant = len(s.all_contexts) + 1
    entries = 8 + per_variant * (3 + len(s.kinds)) + len(s.contexts) * (1 + 2 * len(s.kinds))
    if exactness.needed(s):  # every compiled graph again in float32 (exactness.py)
        entries *= 2
    config = torch._dynamo.config
    names = [n for n in ("recompile_limit", "cache_size_limit") if hasattr(config, n)]
    before = {n: getattr(config, n) for n in names}
    torch._dynamo.reset()
    for n in names:
        setattr(config, n, max(before[n], entries))
    try:
        yield
    finally:
        for n in names:
            setattr(config, n, before[n])
        torch._dynamo.reset()


def run(args: argparse.Namespace) -> dict[str, Any]:
    s = settings(args)
    with dynamo_room(s):
        return _run(s)


def _run(s: Settings) -> dict[str, Any]:
    config = s.hf_config
    bench = Bench(s)
    say(f"bench graph: {s.shape} ({config.num_hidden_layers} layers, {config.n_routed_experts} experts "
        f"top-{config.num_experts_per_tok}), {s.dtype}, {s.device}, batch {s.batch}, contexts {s.contexts}, "
        f"pattern {s.pattern}, {s.rounds} rounds x {s.steps} steps")

    say("eager ...")
    eager_model = bench.fresh_model()
    floor = references(bench, eager_model)
    eager = build(bench, "eager", eager_model, s.contexts, False, None)
    say("compiled ...")
    compiled = build_compiled(bench, "compiled", [], s.all_contexts)
    # compiled's own steps (the short context too) are timed here; it joins every later group
    measure_and_free(bench, eager, [compiled], floor, every_base_step=True)
    del eager_model

    latent = None
    for kind in [k for k in s.kinds if not k.windowed]:
        placement = None
        if kind.name == "dispatch-redundant":
            say(f"compiled+dispatch-redundant ({s.extra_slots} extra slots per MoE layer) ...")
            placement = hot_placement(bench.fresh_model(), config, bench.prompt, s.extra_slots)
        else:
            say(f"compiled+{kind.name} ...")
        here = s.all_contexts if kind.name == "latent" else s.contexts
        variant = build_compiled(bench, f"compiled+{kind.name}", list(kind.passes), here, placement)
        keep = kind.name == "latent" and any(k.name == "latent+sparse" for k in s.kinds)
        measure_and_free(bench, variant, [compiled], floor, keep=keep)
        latent = variant if keep else latent

    windowed = [k for k in s.kinds if k.windowed]
    for context in s.contexts if windowed else []:
        if not _sparse_pass_available():
            for kind in windowed:
                bench.variants[f"compiled+{kind.name}@{context}"] = {
                    "skipped": "omni_passes.fx.sparse_attention is not available in this build"}
            continue
        say(f"{MASKED_PEER}@{context} (the sparse variants' peer, for the check) ...")
        masked_peer(bench, context)
        for kind in windowed:
            name = f"compiled+{kind.name}@{context}"
            say(f"{name} ...")
            variant = build_compiled(bench, name, list(kind.passes), [context])
            bases = [compiled] + ([latent] if kind.name == "latent+sparse" and latent is not None else [])
            measure_and_free(bench, variant, bases, floor)

    finish(bench, compiled, floor)
    bench.variants["compiled"]["ratio_vs_compiled"] = {str(c): 1.0 for c in s.all_contexts}
    _summarise(bench, latent)
    compiled.close()
    if latent is not None:
        latent.close()
    if exactness.needed(s):
        say(f"exactness: every variant again in float32 (the {s.dtype} comparisons above are drift) ...")
        verdicts = exactness.float32_checks(s, bench.step_ids, bench.planned, bench.fresh_model)
        for name, by_context in verdicts.items():
            exactness.set_verdict(bench.variants[name], by_context)
    return {
        "device": s.device if s.device == "cpu" else torch.cuda.get_device_name(),
        "shape": s.shape, "dtype": str(s.dtype).replace("torch.", ""), "layers": config.num_hidden_layers,
        "batch": s.batch, "contexts": s.contexts, "short_context": s.short, "pattern": s.pattern,
        "sink": s.sink, "recent": s.recent, "redundant_slots": s.extra_slots, "prefill_len": s.prefill_len,
        "rounds": s.rounds, "steps_per_round": s.steps, "torch": torch.__version__,
        "check_rule": checks.CHECK_RULE + (f" Verdict in float32 ({exactness.__name__}); the {s.dtype} comparisons "
                                           "are each variant's drift." if exactness.needed(s) else ""),
        "timing_rule": TIMING_RULE,
        "agreement_by_context": {str(c): checks.agreement(bench.logits, bench.references, c) for c in s.all_contexts},
        **({"floor": floor.describe(s.contexts)} if floor is not None else {}),
        "variants": _ordered(bench.variants, s),
    }


def _summarise(bench: Bench, latent: Variant | None) -> None:
    s = bench.s
    fraction = len(s.pattern) / s.hf_config.num_hidden_layers
    report.amdahl(bench.variants, "compiled", s.contexts, s.short, fraction, ("sparse", "all"), "amdahl")
    if latent is not None:
        report.amdahl(bench.variants, "compiled+latent", s.contexts, s.short, fraction, ("latent+sparse",),
                      "amdahl_vs_latent")


def _ordered(variants: dict[str, dict], s: Settings) -> dict[str, dict]:
    """eager, compiled, then the rest in the order they were measured."""
    head = [n for n in ("eager", "compiled") if n in variants]
    return {n: variants[n] for n in head + [n for n in variants if n not in head]}


def _sparse_pass_available() -> bool:
    try:
        from omni_passes.fx.sparse_attention import SparseAttentionPass  # noqa: F401
    except ImportError:
        return False
    return True

