"""Paged sink+recent MLA decode (kernels.triton_paged_mla) against its bytes and FLOPs floors.

    python -m omni_passes.bench.attn_paged [--heads 16 128] [--batches 16 64]
        [--contexts 8192 32768] [--block-size 16] [--sink 128] [--recent 384] [--sweep]
        [--tune KEY=V[,KEY=V] ...] [--iters 20] [--json] [--out FILE]

One MLA layer's decode attention in DeepSeek's dimensions (latent R = 512 + rope Dr = 64), the
cache paged as vLLM's FLASH_ATTN_MLA keeps it (``[num_blocks, block_size, 576]`` bf16, each
request's blocks scattered over the pool, queries in vLLM's layout), every request at the end
of a ``context``-token history. Each call is replayed from a CUDA graph; calls rotate over
several block tables whose visible blocks differ, so the rows a call reads are not already in
L2 (cold).

Floors, measured in the same run: bytes (each visible latent row once, q in, the latent output
out) over the device-to-device copy bandwidth (bytes read + written per second, 1 GiB), and
FLOPs (2·T·H·rows·(2R + Dr)) over a bf16 8192³ GEMM's rate. ``pct_of_copy_bw`` = bytes floor /
time, ``pct_of_floor`` = max(bytes floor, FLOPs floor) / time. Goals (issue 25): >= 80 % of
the copy bandwidth at 16 heads; within 2x of the floor (>= 50 %) at 128 heads. ``--sweep``
also times launch variants (splits, block sizes, warps, stages, head blocks) for each heads and
batch, at the last of ``--contexts`` (the kernel reads the same rows at any context).
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from omni_passes.cli.common import UserError, publish, say

R, DR = 512, 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--heads", type=int, nargs="+", default=[16, 128], help="query heads (DeepSeek-V3: 128)")
    parser.add_argument("--batches", type=int, nargs="+", default=[16, 64], help="requests per decode step")
    parser.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768], help="history length per request")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size (FLASH_ATTN_MLA: 16; FlashMLA: 64)")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=384)
    parser.add_argument("--sweep", action="store_true", help="also time the built-in launch variants")
    parser.add_argument("--tune", nargs="*", default=[], metavar="KEY=V[,KEY=V]",
                        help="extra launch variants (keys of triton_paged_mla.launch_config), e.g. num_splits=4 "
                             "block_n=32,num_warps=8")
    parser.add_argument("--iters", type=int, default=20, help="graph replays per sample")
    parser.add_argument("--mem-budget-gb", type=float, default=24.0, help="GPU memory the paged pool may take")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--out", metavar="FILE", help="also write the JSON document here")


def sweep_variants(heads: int) -> list[dict]:
    """Launch variants worth timing at this head count (the default is the empty dict). Each
    compiles within sm_90's limits without spills (block_h 128 would need 262 KB of shared
    memory; block_h 64 on 4 warps spills its accumulator)."""
    splits = [dict(num_splits=s) for s in (1, 2, 4, 8, 16)]
    if heads <= 16:
        return splits + [dict(block_n=16), dict(block_n=64, num_warps=8), dict(num_warps=8, num_stages=3)]
    return splits[:4] + [dict(block_n=64),
                         dict(block_h=32),                       # 4 programs per split, mma.sync
                         dict(block_h=16, num_warps=4)]          # the older kernel's per-head-block layout


def visible_rows(length: int, sink: int, recent: int) -> int:
    return min(sink, length) + max(0, length - max(sink, length - recent))


class PagedCase:
    """One decode step's tensors: a pool holding every request's whole history, ``copies``
    block tables (independent permutations of the pool: the visible blocks of one are mostly
    not those of another), queries as vLLM's MLA decode hands them over."""

    def __init__(self, heads, batch, context, block_size, sink, recent, copies, device, seed=0):
        self.heads, self.batch, self.context, self.sink, self.recent = heads, batch, context, sink, recent
        g = torch.Generator(device=device).manual_seed(seed)
        per_req = -(-context // block_size)
        self.num_blocks = 1 + batch * per_req
        self.kv = torch.randn(self.num_blocks, block_size, R + DR, generator=g, device=device).to(torch.bfloat16)
        self.tables = [(1 + torch.randperm(self.num_blocks - 1, generator=g, device=device)).view(batch, per_req)
                       .to(torch.int32) for _ in range(copies)]
        self.seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
        self.q_nope = torch.randn(heads, batch, R, generator=g, device=device).to(torch.bfloat16).transpose(0, 1)
        self.q_pe = torch.randn(batch, heads, 128 + DR, generator=g, device=device).to(torch.bfloat16)[..., 128:]
        self.scale = 1 / math.sqrt(128 + DR)
        self.rows = visible_rows(context, sink, recent)

    def calls(self, **override):
        from kernels.triton_paged_mla import paged_sink_recent_mla_decode as decode

        return [lambda bt=bt: decode(self.q_nope, self.q_pe, self.kv, bt, self.seq_lens, self.sink, self.recent,
                                     self.scale, **override)[0] for bt in self.tables]

    def rel_err(self, out: torch.Tensor) -> float:
        from kernels.paged_mla_reference import paged_sink_recent_mla_reference

        ref, _ = paged_sink_recent_mla_reference(self.q_nope, self.q_pe, self.kv, self.tables[0], self.seq_lens,
                                                 self.sink, self.recent, self.scale)
        return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def _row(case: PagedCase, override: dict, us: float, err: float, ceilings: dict) -> dict:
    from kernels.triton_paged_mla import decode_bytes, decode_flops, launch_config

    cfg = launch_config(case.batch, case.heads, R, torch.bfloat16, case.sink, case.recent,
                        torch.cuda.get_device_properties(0).multi_processor_count, **override)
    nbytes = decode_bytes(case.batch, case.heads, case.rows, R, DR, 2)
    flops = decode_flops(case.batch, case.heads, case.rows, R, DR)
    bytes_us = nbytes / ceilings["copy_bytes_per_s"] * 1e6
    flops_us = flops / ceilings["bf16_flops_per_s"] * 1e6
    pct_bw, pct_floor = 100 * bytes_us / us, 100 * max(bytes_us, flops_us) / us
    memory_goal = case.heads <= 16
    return dict(heads=case.heads, batch=case.batch, context=case.context, block_size=case.kv.shape[1],
                sink=case.sink, recent=case.recent, visible_rows=case.rows, copies=len(case.tables),
                override=override, launch=dict(block_h=cfg.block_h, head_blocks=cfg.head_blocks, block_n=cfg.block_n,
                                               num_splits=cfg.num_splits, chunk=cfg.chunk, num_warps=cfg.num_warps,
                                               num_stages=cfg.num_stages),
                us=round(us, 2), bytes=nbytes, flops=flops, gb_s=round(nbytes / us / 1e3, 1),
                tflop_s=round(flops / us / 1e6, 1), floor_bytes_us=round(bytes_us, 2),
                floor_flops_us=round(flops_us, 2), pct_of_copy_bw=round(pct_bw, 1), pct_of_floor=round(pct_floor, 1),
                goal=">= 80 % of copy bandwidth" if memory_goal else "within 2x of max(bytes, FLOPs) floor",
                goal_met=bool(pct_bw >= 80 if memory_goal else pct_floor >= 50), rel_err=float(f"{err:.3g}"),
                check_ok=bool(err < 2e-2))  # bf16 output against the fp32 reference


def run(args: argparse.Namespace) -> dict:
    if not torch.cuda.is_available():
        raise UserError("bench attn_paged needs CUDA (the kernel is Triton for NVIDIA GPUs)")
    for name in ("heads", "batches", "contexts"):
        if any(v < 1 for v in getattr(args, name)):
            raise UserError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.sink < 0 or args.recent < 1:
        raise UserError(f"--sink must be >= 0 and --recent >= 1, got {args.sink}, {args.recent}")
    from omni_passes.bench.measure import (
        device_ceilings,
        error_text,
        parse_tune,
        time_cuda_graph,
    )

    device = torch.device("cuda")
    ceilings = device_ceilings(device)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    extra = parse_tune(args.tune, {"programs_per_sm": float})
    rows = []
    for heads in args.heads:
        for batch in args.batches:
            for ctx in args.contexts:
                # the kernel reads the same rows at any context: sweep once per (heads, batch), at the last
                swept = args.sweep and ctx == args.contexts[-1]
                variants = [{}] + (sweep_variants(heads) if swept else []) + extra
                pool = batch * -(-ctx // args.block_size) * args.block_size * (R + DR) * 2
                if pool > args.mem_budget_gb * 2**30:
                    say(f"skip heads {heads} batch {batch} context {ctx}: pool {pool / 2**30:.1f} GiB > budget")
                    continue
                touched = batch * visible_rows(ctx, args.sink, args.recent) * (R + DR) * 2
                copies = max(1, min(32, math.ceil(3 * l2 / touched)))
                case = PagedCase(heads, batch, ctx, args.block_size, args.sink, args.recent, copies, device)
                for override in variants:
                    try:
                        calls = case.calls(**override)
                        err = case.rel_err(calls[0]())
                        row = _row(case, override, time_cuda_graph(calls, args.iters), err, ceilings)
                    except Exception as exc:  # a variant that cannot launch (shared memory, ...) is a result
                        row = dict(heads=heads, batch=batch, context=ctx, override=override, us=None,
                                   error=error_text(exc))
                    rows.append(row)
                    say(_line(row))
                del case
                torch.cuda.empty_cache()
    import triton

    meta = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "copy_tb_s": round(ceilings["copy_bytes_per_s"] / 1e12, 3),
            "bf16_tflop_s": round(ceilings["bf16_flops_per_s"] / 1e12, 1), "l2_bytes": l2, "cuda_graphs": True,
            "dtype": "bfloat16", "latent": R, "rope": DR}
    return {"benchmark": "attn_paged", "meta": meta, "results": rows, "best": _best(rows)}


def _best(rows: list[dict]) -> list[dict]:
    """The fastest variant of each case, with its default for comparison."""
    out = {}
    for row in rows:
        if row.get("us") is None:
            continue
        key = (row["heads"], row["batch"], row["context"])
        entry = out.setdefault(key, dict(heads=key[0], batch=key[1], context=key[2], default_us=None))
        if not row["override"]:
            entry.update(default_us=row["us"], default_pct_of_floor=row["pct_of_floor"],
                         default_pct_of_copy_bw=row["pct_of_copy_bw"], default_goal_met=row["goal_met"])
        if "best_us" not in entry or row["us"] < entry["best_us"]:
            entry.update(best_us=row["us"], best_override=row["override"], best_pct_of_floor=row["pct_of_floor"],
                         best_pct_of_copy_bw=row["pct_of_copy_bw"], best_goal_met=row["goal_met"])
    return list(out.values())


def _line(row: dict) -> str:
    head = f"H{row['heads']:<4} B{row['batch']:<4} ctx {row['context']:<6} {str(row['override'] or 'default'):<40}"
    if row.get("us") is None:
        return f"{head} failed: {row['error']}"
    return (f"{head} {row['us']:8.2f} us  {row['gb_s']:7.0f} GB/s  {row['tflop_s']:6.1f} TFLOP/s  "
            f"copy bw {row['pct_of_copy_bw']:5.1f} %  floor {row['pct_of_floor']:5.1f} %  "
            f"{'goal met' if row['goal_met'] else 'goal missed'}  rel_err {row['rel_err']:.1e}"
            f"{'' if row['check_ok'] else '  WRONG'}")


def _print(result: dict) -> None:
    meta = result["meta"]
    print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}: copy {meta['copy_tb_s']} TB/s, "
          f"bf16 GEMM {meta['bf16_tflop_s']} TFLOP/s")
    for row in result["results"]:
        print(_line(row))
    print("# best per case")
    for b in result["best"]:
        print(f"H{b['heads']:<4} B{b['batch']:<4} ctx {b['context']:<6} default {b['default_us']} us -> best "
              f"{b['best_us']} us {b['best_override'] or 'default'} (floor {b['best_pct_of_floor']} %, copy bw "
              f"{b['best_pct_of_copy_bw']} %, goal {'met' if b['best_goal_met'] else 'missed'})")


def main(args: argparse.Namespace) -> int:
    result = run(args)
    publish(result, args.out, args.json, _print)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
