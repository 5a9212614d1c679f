"""`omni-passes demo`: the main job on its embedded default (what `make demo` runs).

A tiny DeepSeek-V3 on CPU; its expert loads measured on a calibration batch; a placement
that gives the redundant slots to the hottest experts; the model compiled with the dispatch
pass on that placement; the pass report; a check against the eager model; and forward-step
times of eager vs compiled vs compiled + passes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from omni_passes.cli.common import emit_json, say, setup_logging
from omni_passes.placement.packing import replicate_hottest  # the replica-count rule's one home


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redundant-slots", type=int, default=8, help="extra slots per MoE layer (default 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20, help="timed forward steps per variant")
    parser.add_argument("--json", action="store_true")


def time_interleaved(variants: dict, inputs, repeats: int) -> dict[str, float]:
    """Median wall time of one forward step per variant, seconds. Variants take turns step
    by step, so machine noise (other processes) falls on all of them alike."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():
            fn(inputs)
            fn(inputs)
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn(inputs)
                samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(args: argparse.Namespace) -> int:
    setup_logging()
    import omni_passes
    from omni_passes.models import build_model, load_hf_config
    from omni_passes.placement.placement import Placement

    hf_config = load_hf_config("tiny")
    model = build_model(hf_config)
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, hf_config.vocab_size, (args.batch, args.seq_len), generator=generator)
    say(f"tiny DeepSeek-V3: {hf_config.num_hidden_layers} layers, {hf_config.n_routed_experts} routed experts, "
        f"top-{hf_config.num_experts_per_tok}, n_group {hf_config.n_group}; batch {args.batch}x{args.seq_len} on CPU")
    with torch.no_grad():
        reference = model(inputs).logits
    # Three copies of the same weights (same seed): the pass materialises slot weights into
    # its model, so eager and plain-compiled timings each get an untouched copy.
    eager_model, plain_model = build_model(hf_config), build_model(hf_config)

    say("compiling without passes (Inductor) ...")
    start = time.perf_counter()
    plain = omni_passes.compile(plain_model, {"passes": []})
    plain_s_compile = _first_call(plain, inputs, start)

    say("measuring expert loads (identity placement, load recording on) ...")
    probe = omni_passes.compile(model, {"passes": ["redundant_experts"]})
    with torch.no_grad():
        probe(inputs)
    loads = probe.omni.controller.take_load()
    torch._dynamo.reset()

    phy2log = replicate_hottest(loads, args.redundant_slots)
    placement = Placement(num_layers=phy2log.shape[0], num_logical_experts=phy2log.shape[1] - args.redundant_slots,
                          num_ranks=1, num_nodes=1, slots_per_rank=phy2log.shape[1], phy2log=phy2log)
    say(f"placement: {args.redundant_slots} redundant slots per MoE layer for the hottest experts; compiling with the pass ...")
    start = time.perf_counter()
    compiled = omni_passes.compile(model, {"passes": ["redundant_experts"]}, placement=placement)
    pass_s_compile = _first_call(compiled, inputs, start)
    with torch.no_grad():
        out = compiled(inputs).logits
    say(f"timing {args.repeats} interleaved forward steps per variant ...")
    times = time_interleaved({"eager": eager_model, "compiled": plain, "compiled+passes": compiled}, inputs, args.repeats)
    eager_s, plain_s, pass_s = times["eager"], times["compiled"], times["compiled+passes"]

    diff = float((out - reference).abs().max())
    ok = diff <= 1e-4
    report = compiled.omni.report()
    result = {
        **report,
        "placement": {"redundant_slots_per_layer": args.redundant_slots,
                      "replicated": {f"moe_layer_{i}": sorted(set(row[loads.shape[1]:].tolist())) for i, row in enumerate(phy2log)}},
        "check": {"max_abs_diff": diff, "ok": ok, "tolerance": 1e-4},
        "step_time_ms": {"eager": eager_s * 1e3, "compiled": plain_s * 1e3, "compiled+passes": pass_s * 1e3},
        "compile_s": {"compiled": plain_s_compile, "compiled+passes": pass_s_compile},
        "ratio_passes_vs_compiled": pass_s / plain_s,
    }
    if args.json:
        emit_json(result)
        return 0 if ok else 1
    rep = report["passes"]["redundant_experts"]
    print(f"pass redundant_experts: matched MoE layers {rep['matched_layers']}, skipped {rep['skipped'] or 'none'}")
    for layer, experts in result["placement"]["replicated"].items():
        print(f"  {layer}: extra replicas for experts {experts}")
    print(f"check vs eager: max abs diff {diff:.3g} -> {'ok' if ok else 'MISMATCH'}")
    print()
    print(f"{'variant':<18}{'step (ms)':>12}{'vs compiled':>14}{'compile (s)':>14}")
    rows = [("eager", eager_s, None), ("compiled", plain_s, plain_s_compile), ("compiled+passes", pass_s, pass_s_compile)]
    for name, seconds, compile_s in rows:
        compile_text = f"{compile_s:>14.1f}" if compile_s is not None else f"{'-':>14}"
        print(f"{name:<18}{seconds * 1e3:>12.3f}{seconds / plain_s:>13.3f}x{compile_text}")
    print("ok" if ok else "MISMATCH")
    return 0 if ok else 1


def _first_call(compiled, inputs, start: float) -> float:
    with torch.no_grad():
        compiled(inputs)
    return time.perf_counter() - start
