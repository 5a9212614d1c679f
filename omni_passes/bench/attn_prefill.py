"""Sink+recent prefill (kernels.triton_sink_recent_prefill) against dense FA3 and its FLOPs floor.

    omni-passes bench attn-prefill [--heads 16 128] [--chunks 16384] [--contexts 0 16384]
        [--sink 128] [--recent 384] [--rounds 10] [--tune KEY=V[,KEY=V] ...] [--json] [--out FILE]

One MLA layer's prefill attention in DeepSeek's head dims (q/k 128 + 64, v 128), bf16: a chunk
of ``chunk`` new tokens after ``context`` cached ones (vLLM's chunked prefill gives a 32k prompt
as two 16k chunks), the way each engine of ``bench vllm --kv`` computes it:

    dense      FA3 (vLLM's ``vllm_flash_attn``, version 3), causal over the cached keys + the new
               ones in one varlen call (bottom-right causal): every key of the past
    sink+recent the Triton kernel over the visible cached rows (at most sink + recent − 1) and
               the new keys: [0, sink) ∪ (p − recent, p] per query

Both take their inputs already up-projected (the up-projection of the new tokens costs both the
same; dense's of its whole context is not counted, which favours dense). Timed interleaved,
round by round (CUDA events, median per round), so the ratio holds on a busy machine. Floor:
each kernel's FLOPs (2·H·pairs·(Dqk + Dv), pairs = visible (query, key) pairs) over a bf16
8192³ GEMM's rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from omni_passes.bench.measure import error_text
from omni_passes.cli.common import UserError, publish, say

DN, DR, DV = 128, 64, 128  # DeepSeek's qk_nope, qk_rope, v head dims


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128], help="query heads (V2-Lite 16, V3 128)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[16384], help="new tokens per prefill chunk")
    parser.add_argument("--contexts", type=int, nargs="+", default=[0, 16384], help="cached tokens before the chunk")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=384)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds (median of 5 calls each)")
    parser.add_argument("--tune", nargs="*", default=[], metavar="KEY=V[,KEY=V]",
                        help="kernel launch variants (block_n, num_warps, num_stages), e.g. block_n=32,num_warps=8")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON document here")


def visible_pairs(chunk: int, context: int, sink: int, recent: int) -> int:
    """(query, key) pairs sink+recent attention scores for one chunk: each query at position p
    sees min(p + 1, recent) window keys plus the sink keys left of its window."""
    total = 0
    for p in range(context, context + chunk):
        window = min(p + 1, recent)
        total += window + max(0, min(sink, p + 1 - window))
    return total


def dense_pairs(chunk: int, context: int) -> int:
    """Pairs of causal attention over context + chunk for the chunk's queries."""
    return chunk * context + chunk * (chunk + 1) // 2


def launchable(variants: list[dict], run: Callable[..., torch.Tensor]) -> tuple[set[int], dict[int, str]]:
    """Which launch variants run (indices), and why each other one does not: a variant that
    cannot launch (shared memory over the limit, ...) is a result, not the end of the run. The
    default launch (variant 0) must run: the correctness check uses it."""
    launched, failed = set(), {}
    for i, tune in enumerate(variants):
        try:
            run(**tune)
            launched.add(i)
        except Exception as exc:  # noqa: BLE001  (reported in the row, with the variant)
            if i == 0:
                raise
            failed[i] = error_text(exc)
    return launched, failed


def _case(heads: int, chunk: int, context: int, sink: int, recent: int, device: torch.device):
    from kernels.triton_sink_recent_prefill import prefill_plan
    from omni_passes.hosts.vllm.kv_prefill import context_positions

    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.bfloat16)

    q, k, v = randn(chunk, heads, DN + DR), randn(chunk, heads, DN + DR), randn(chunk, heads, DV)
    k_past, v_past = randn(context, heads, DN + DR), randn(context, heads, DV)
    positions = context_positions(context, sink, recent).to(device)
    plan = prefill_plan([0, chunk], [context], [len(positions)], device)
    return q, k, v, k_past, v_past, k_past[positions], v_past[positions], plan


def _dense_fn(q, k, v, k_past, v_past):
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    keys, values = torch.cat([k_past, k]), torch.cat([v_past, v])
    cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
    cu_k = torch.tensor([0, keys.shape[0]], dtype=torch.int32, device=q.device)
    scale = (DN + DR) ** -0.5
    return lambda: flash_attn_varlen_func(q=q, k=keys, v=values, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                                          max_seqlen_q=q.shape[0], max_seqlen_k=keys.shape[0], softmax_scale=scale,
                                          causal=True, fa_version=3)


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise UserError("bench attn-prefill needs CUDA (the kernel is Triton for NVIDIA GPUs, the peer FA3)")
    if args.sink < 0 or args.recent < 1 or min(args.heads + args.chunks) < 1 or min(args.contexts) < 0:
        raise UserError("--sink >= 0, --recent >= 1, --heads and --chunks >= 1, --contexts >= 0")
    from omni_passes.bench.measure import gemm_flops, parse_tune

    device = torch.device("cuda")
    flops_per_s = gemm_flops(device)
    variants = [{}] + parse_tune(args.tune)
    rows = []
    for heads in args.heads:
        for chunk in args.chunks:
            for context in args.contexts:
                rows.append(_measure(heads, chunk, context, args.sink, args.recent, variants, args.rounds,
                                     flops_per_s, device))
                say(_line(rows[-1]))
                torch.cuda.empty_cache()
    import triton

    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "bf16_tflop_s": round(flops_per_s / 1e12, 1), "dims": {"qk_nope": DN, "qk_rope": DR, "v": DV},
            "rounds": args.rounds}
    return {"benchmark": "attn_prefill", "meta": meta, "results": rows}


def _measure(heads: int, chunk: int, context: int, sink: int, recent: int, variants: list[dict], rounds: int,
             flops_per_s: float, device: torch.device) -> dict:
    from kernels.triton_sink_recent_prefill import sink_recent_prefill_attention
    from omni_passes.bench.measure import interleaved_rounds, median_cuda_seconds, ratio_stats, rel_err
    from omni_passes.hosts.vllm.kv_prefill import sink_recent_prefill_reference

    q, k, v, k_past, v_past, k_ctx, v_ctx, plan = _case(heads, chunk, context, sink, recent, device)
    scale = (DN + DR) ** -0.5

    def ours(**tune):
        return sink_recent_prefill_attention(q, k, v, k_ctx, v_ctx, plan, sink, recent, scale, DN, **tune)

    launched, failed = launchable(variants, ours)
    timers = {f"sink_recent{i}": (lambda tune=tune: median_cuda_seconds(lambda: ours(**tune), 5))
              for i, tune in enumerate(variants) if i in launched}
    try:
        dense = _dense_fn(q, k, v, k_past, v_past)
        dense()
        timers["dense"] = lambda: median_cuda_seconds(dense, 5)
    except Exception as exc:  # noqa: BLE001  (no vLLM FA3 here: ours alone, said so)
        say(f"dense FA3 peer unavailable: {exc}")
    samples = interleaved_rounds(timers, rounds)
    # Exactness on the chunk's last queries (the float32 reference holds every score).
    check = min(chunk, 512 if heads <= 16 else 64)
    all_k, all_v = torch.cat([k_past, k]), torch.cat([v_past, v])
    ref = sink_recent_prefill_reference(q[-check:], k[-check:], v[-check:], [0, check], [context + chunk - check],
                                        sink, recent, scale, lambda r, p: (all_k[p.to(device)], all_v[p.to(device)]))
    err = rel_err(ours()[-check:].float(), ref)
    ours_flops = 2 * heads * visible_pairs(chunk, context, sink, recent) * (DN + DR + DV)
    dense_flops = 2 * heads * dense_pairs(chunk, context) * (DN + DR + DV)
    row = {"heads": heads, "chunk": chunk, "context": context, "sink": sink, "recent": recent,
           "rel_err": float(f"{err:.3g}"), "check_ok": err < 2e-2, "sink_recent": []}
    for i, tune in enumerate(variants):
        if i in failed:
            row["sink_recent"].append({"tune": tune, "us": None, "error": failed[i]})
            continue
        s = statistics.median(samples[f"sink_recent{i}"])
        entry = {"tune": tune, "us": round(s * 1e6, 1), "tflop_s": round(ours_flops / s / 1e12, 1),
                 "pct_of_flops_floor": round(100 * ours_flops / flops_per_s / s, 1)}
        if "dense" in samples:
            entry["speedup_over_dense"] = ratio_stats(samples["dense"], samples[f"sink_recent{i}"])
        row["sink_recent"].append(entry)
    if "dense" in samples:
        s = statistics.median(samples["dense"])
        row["dense"] = {"us": round(s * 1e6, 1), "tflop_s": round(dense_flops / s / 1e12, 1),
                        "pct_of_flops_floor": round(100 * dense_flops / flops_per_s / s, 1)}
    return row


def _line(row: dict) -> str:
    head = f"H{row['heads']:<4} chunk {row['chunk']:<6} ctx {row['context']:<6}"
    parts = []
    for e in row["sink_recent"]:
        if e["us"] is None:
            parts.append(f"sink+recent{e['tune']} failed: {e['error']}")
            continue
        ratio = e.get("speedup_over_dense")
        parts.append(f"sink+recent{e['tune'] or ''} {e['us']:.0f} us ({e['tflop_s']} TFLOP/s, {e['pct_of_flops_floor']} % "
                     f"of floor)" + (f" {ratio['median']:.2f}x faster than dense [{ratio['q1']:.2f}-{ratio['q3']:.2f}]"
                                     if ratio else ""))
    if "dense" in row:
        d = row["dense"]
        parts.append(f"dense FA3 {d['us']:.0f} us ({d['tflop_s']} TFLOP/s, {d['pct_of_flops_floor']} % of floor)")
    return f"{head} " + "; ".join(parts) + f"; rel_err {row['rel_err']:.1e}{'' if row['check_ok'] else ' WRONG'}"


def _print(result: dict) -> None:
    meta = result["meta"]
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}: bf16 GEMM "
          f"{meta['bf16_tflop_s']} TFLOP/s")
    for row in result["results"]:
        print(_line(row))


def main(args: argparse.Namespace) -> int:
    result = run(args)
    publish(result, args.out, args.json, _print)
    return 0 if all(r["check_ok"] for r in result["results"]) else 1

