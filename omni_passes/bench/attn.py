"""`omni-passes bench attn`: sink+recent decode attention, our kernel against its peers.

Decode (one query per sequence, every sequence at the end of a cache of ``context`` slots):
  ours          omni::sparse_attention / omni::sparse_attention_mla_decode (Triton on CUDA)
  sdpa_dense    SDPA over the whole cache (what an uncompressed layer costs)
  flex          FlexAttention with a sink+window block mask (compiled)
  sdpa_gathered SDPA over sink+recent tokens gathered beforehand (gather not timed)
for MHA/GQA (``--batch --heads --kv-heads --head-dim``) and absorbed-MLA shapes
(latent 512 + rope 64, ``--mla-heads``), at each ``--contexts``.

On CUDA every call is replayed from a CUDA graph. "cold" rotates over several copies of the
cache so that the bytes a call touches are not already in L2 (50 MB on an H100: the 33.5 MB a
sparse MHA step reads would fit); "hot" replays on one copy (as the project's anchor figures were
taken). Achieved bandwidth = the fewest bytes the method must read (visible K/V rows, q,
output) over time, against ``--peak-tbs`` (3.35 TB/s, H100 SXM HBM3).

Prefill (``--prefill-lengths``): our Triton prefill kernel vs FlexAttention vs SDPA with a
dense boolean mask vs causal flash SDPA (dense, for scale).

On CPU (``--device cpu``) everything runs eagerly at small sizes, no graphs (for CI).
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from typing import Callable

import torch

from omni_passes.bench import attn_latent
from omni_passes.bench.measure import (
    cold_copies, device_ceilings, error_text, method_label, parse_tune, rel_err, time_cpu, time_cuda_graph,
)
from omni_passes.cli.common import UserError, emit_json, say

METHODS = ("ours", "sdpa_dense", "flex", "sdpa_gathered")
MLA_LATENT, MLA_ROPE = 512, 64
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                        help="cuda (CUDA graphs, full sizes) or cpu (eager, small sizes); auto picks cuda if present")
    parser.add_argument("--contexts", type=int, nargs="+", default=None,
                        help="cache lengths (default cuda: 4096 32768 131072; cpu: 1024 4096)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default cuda 16, cpu 2)")
    parser.add_argument("--heads", type=int, default=16, help="query heads of the MHA/GQA case")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads of the MHA/GQA case (default: --heads)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--mla-heads", type=int, nargs="*", default=None,
                        help="query heads of the MLA cases, latent 512 + rope 64 (default cuda: 16 128; cpu: 16); "
                             "give no value to skip MLA")
    parser.add_argument("--sink", type=int, default=128)
    parser.add_argument("--recent", type=int, default=384)
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default cuda bf16, cpu fp32")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--cases", nargs="+", choices=("mha", "mla", "latent"), default=["mha", "mla"],
                        help="which decode shapes to run (mha covers GQA when --kv-heads < --heads; latent: MLA "
                             "attention on a two-part latent cache, dense and sink+recent, vs torch.compile'd peers "
                             "and transformers' expansion, with the copy-bandwidth and FLOPs floors)")
    parser.add_argument("--cache-state", choices=("cold", "hot", "both"), default="both",
                        help="CUDA: rotate caches so L2 is cold, reuse one (hot), or both")
    parser.add_argument("--prefill-lengths", type=int, nargs="*", default=None,
                        help="prefill sequence lengths, batch 1 (default cuda: 4096 16384; cpu: 256); none to skip")
    parser.add_argument("--tune", nargs="*", default=[], metavar="KEY=V[,KEY=V]",
                        help="tuning (CUDA): also time our decode kernel with these launch overrides, e.g. "
                             "num_splits=4 block_n=32,num_warps=8 (keys of triton_sparse_attention.decode_config)")
    parser.add_argument("--peak-tbs", type=float, default=3.35, help="memory bandwidth roofline, TB/s")
    parser.add_argument("--mem-budget-gb", type=float, default=40.0,
                        help="GPU memory the rotating cache copies may take")
    parser.add_argument("--iters", type=int, default=20, help="timed repetitions (graph replays on CUDA)")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    parser.add_argument("--plot", metavar="DIR", default=None, help="write PNG plots to DIR")


# --------------------------------------------------------------------------- cases
def visible_tokens(context: int, sink: int, recent: int) -> int:
    """Keys a query at the last position of a cache of ``context`` slots sees."""
    n_sink = min(sink, context)
    return n_sink + min(recent, context - n_sink)


def decode_bytes(kind: str, batch: int, q_heads: int, kv_heads: int, head_dim: int, v_dim: int,
                 tokens: int, dtype: torch.dtype) -> int:
    """The fewest bytes a decode step must move: K/V rows of ``tokens`` keys (MLA: one latent
    row serves as key and value), q in, output out."""
    row = head_dim if kind == "mla" else head_dim + v_dim
    item = torch.empty((), dtype=dtype).element_size()
    return item * (batch * kv_heads * tokens * row + batch * q_heads * (head_dim + v_dim))


class DecodeCase:
    """One attention shape at one context: tensors (one or more cache copies) and methods."""

    def __init__(self, kind, batch, q_heads, kv_heads, head_dim, v_dim, context, sink, recent, dtype, device, copies):
        self.kind, self.batch, self.q_heads, self.kv_heads = kind, batch, q_heads, kv_heads
        self.head_dim, self.v_dim, self.context = head_dim, v_dim, context
        self.sink, self.recent, self.dtype, self.device = sink, recent, dtype, device
        self.scale = 1.0 / math.sqrt(192 if kind == "mla" else head_dim)  # DeepSeek: qk_nope + rope
        self.visible = visible_tokens(context, sink, recent)
        self.q_pos = torch.full((batch, 1), context - 1, dtype=torch.int64, device=device)
        self.q = torch.randn(batch, q_heads, 1, head_dim, dtype=dtype, device=device)
        self.sets = [self._cache() for _ in range(copies)]
        idx = torch.cat([torch.arange(min(sink, context)),
                         torch.arange(context - (self.visible - min(sink, context)), context)]).to(device)
        self.gathered = [(k.index_select(2, idx).contiguous(), v.index_select(2, idx).contiguous())
                         for k, v in ((s["k"], s["v"]) for s in self.sets)]

    def _cache(self):
        if self.kind == "mla":
            kv = torch.randn(self.batch, self.context, self.head_dim, dtype=self.dtype, device=self.device)
            k = kv.unsqueeze(1)
            return {"kv": kv, "k": k, "v": k[..., :self.v_dim]}
        k = torch.randn(self.batch, self.kv_heads, self.context, self.head_dim, dtype=self.dtype, device=self.device)
        v = torch.randn(self.batch, self.kv_heads, self.context, self.v_dim, dtype=self.dtype, device=self.device)
        return {"k": k, "v": v}

    def bytes(self, dense: bool) -> int:
        return decode_bytes(self.kind, self.batch, self.q_heads, self.kv_heads, self.head_dim, self.v_dim,
                            self.context if dense else self.visible, self.dtype)

    def calls(self, method: str, flex_fn, **override) -> list[Callable[[], torch.Tensor]]:
        q, pos, s, r, scale = self.q, self.q_pos, self.sink, self.recent, self.scale
        gqa = self.q_heads != self.kv_heads
        sdpa = torch.nn.functional.scaled_dot_product_attention
        out = []
        for cache, (kg, vg) in zip(self.sets, self.gathered):
            k, v = cache["k"], cache["v"]
            if method == "ours" and override:
                from kernels import triton_sparse_attention as tsa

                fn = (lambda k=k, v=v: tsa.sparse_attention_triton(q, k, v, pos, s, r, scale,
                                                                   v_from_k=self.kind == "mla", **override))
            elif method == "ours" and self.kind == "mla":
                fn = lambda kv=cache["kv"]: torch.ops.omni.sparse_attention_mla_decode(q, kv, pos, s, r, scale, self.v_dim)
            elif method == "ours":
                fn = lambda k=k, v=v: torch.ops.omni.sparse_attention(q, k, v, pos, s, r, scale)
            elif method in ("sdpa_dense", "sdpa_gathered"):
                kk, vv = (k, v) if method == "sdpa_dense" else (kg, vg)
                if self.kind == "mla":  # one latent head: fold the query heads into the query axis
                    fn = lambda kk=kk, vv=vv: sdpa(q.transpose(1, 2), kk, vv, scale=scale).transpose(1, 2)
                else:
                    fn = lambda kk=kk, vv=vv: sdpa(q, kk, vv, scale=scale, enable_gqa=gqa)
            elif method == "flex":
                fn = lambda k=k, v=v: flex_fn(q, k, v, scale=scale, enable_gqa=gqa or self.kind == "mla")
            else:
                raise UserError(f"unknown method {method!r}")
            out.append(fn)
        return out

    def reference(self) -> torch.Tensor:
        from kernels.sparse_attention import sparse_attention_torch

        c = self.sets[0]  # the gather path upcasts only the gathered rows (no fp32 copy of the cache)
        return sparse_attention_torch(self.q.float(), c["k"], c["v"], self.q_pos,
                                      self.sink, self.recent, self.scale, path="gather")


def _flex_for(case: DecodeCase, compiled: bool):
    """FlexAttention with a block mask built once for this case's positions (not timed)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    pos, sink, recent = case.q_pos[:, 0], case.sink, case.recent

    def sink_window(b, h, q_idx, kv_idx):
        p = pos[b]
        return (kv_idx <= p) & ((kv_idx < sink) | (kv_idx > p - recent))

    mask = create_block_mask(sink_window, B=case.batch, H=None, Q_LEN=1, KV_LEN=case.context,
                             device=case.device)
    fn = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention
    return lambda q, k, v, **kw: fn(q, k, v, block_mask=mask, **kw)


def _flag(value: str) -> bool:
    return value.strip().lower() == "true"


def _parse_tune(items: list[str]) -> list[dict]:
    """``--tune``: ints, and ``use_dot`` true/false."""
    return parse_tune(items, {"use_dot": _flag})


def _decode_cases(args, device):
    kv_heads = args.kv_heads or args.heads
    if args.heads % kv_heads:
        raise UserError(f"--heads {args.heads} must be a multiple of --kv-heads {kv_heads}")
    cases = []
    if "mha" in args.cases:
        cases.append(("mha" if kv_heads == args.heads else "gqa", args.heads, kv_heads, args.head_dim, args.head_dim))
    if "mla" in args.cases:
        cases += [("mla", h, 1, MLA_LATENT + MLA_ROPE, MLA_LATENT) for h in args.mla_heads]
    return [(c, ctx) for c in cases for ctx in args.contexts]


def run_decode(args, device, dtype, timer, l2_bytes) -> list[dict]:
    rows = []
    failed: dict[tuple, str] = {}  # (case, heads, method) -> error: a peer that failed is not retried
    from tqdm import tqdm

    states = ["hot", "cold"] if args.cache_state == "both" else [args.cache_state]
    if device.type == "cpu":
        states = ["hot"]
    for (kind, hq, hkv, d, dv), ctx in tqdm(_decode_cases(args, device), desc="decode", file=sys.stderr):
        cache_bytes = decode_bytes(kind, args.batch, hq, hkv, d, dv, ctx, dtype)
        touched = decode_bytes(kind, args.batch, hq, hkv, d, dv, visible_tokens(ctx, args.sink, args.recent), dtype)
        copies = 1 if "cold" not in states else cold_copies(touched, cache_bytes, args.mem_budget_gb * 2**30, l2_bytes)
        case = DecodeCase(kind, args.batch, hq, hkv, d, dv, ctx, args.sink, args.recent, dtype, device, copies)
        ref = case.reference()
        variants = [(m, {}) for m in args.methods]
        variants += [("ours", o) for o in _parse_tune(args.tune)] if device.type == "cuda" else []
        for method, override in variants:
            base = dict(case=kind, batch=args.batch, q_heads=hq, kv_heads=hkv, head_dim=d, v_head_dim=dv,
                        context=ctx, sink=args.sink, recent=args.recent, method=method,
                        dtype=str(dtype).replace("torch.", ""), **({"override": override} if override else {}))
            key = (kind, hq, method, tuple(sorted(override.items())))
            if key in failed:
                rows.append(dict(base, cache=None, us=None, error=f"skipped: failed at a shorter context ({failed[key]})"))
                continue
            try:
                flex = _flex_for(case, compiled=device.type == "cuda") if method == "flex" else None
                calls = case.calls(method, flex, **override)
                out = calls[0]()
                err = None if method == "sdpa_dense" else rel_err(out, ref)
                for state in states:
                    used = calls if state == "cold" else calls[:1]
                    us = timer(used, args.iters)
                    nbytes = case.bytes(dense=method == "sdpa_dense")
                    tbs = nbytes / (us * 1e-6) / 1e12
                    rows.append(dict(base, cache=state, copies=len(used), us=round(us, 2), bytes=nbytes,
                                     tb_s=round(tbs, 3), roofline_pct=round(100 * tbs / args.peak_tbs, 1),
                                     rel_err=None if err is None else float(f"{err:.3g}")))
            except Exception as exc:  # a peer that cannot run a shape is a result, not a crash
                failed[key] = error_text(exc)
                say(f"{kind} ctx={ctx} {method}: failed: {failed[key]}")
                rows.append(dict(base, cache=None, us=None, error=failed[key]))
        # Drop every reference to this case's caches (the call closures hold them) before the next.
        del case, ref
        calls = flex = out = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_prefill(args, device, dtype, timer) -> list[dict]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    rows = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    hkv = args.kv_heads or args.heads
    s, r = args.sink, args.recent
    for length in args.prefill_lengths:
        q = torch.randn(1, args.heads, length, args.head_dim, dtype=dtype, device=device)
        k = torch.randn(1, hkv, length, args.head_dim, dtype=dtype, device=device)
        v = torch.randn(1, hkv, length, args.head_dim, dtype=dtype, device=device)
        pos = torch.arange(length, device=device)[None]
        scale = 1.0 / math.sqrt(args.head_dim)
        gqa = hkv != args.heads
        visible = sum(min(p + 1, s + r) for p in range(length))
        flops = 2 * args.heads * visible * 2 * args.head_dim

        def window(b, h, q_idx, kv_idx):
            return (kv_idx <= q_idx) & ((kv_idx < s) | (kv_idx > q_idx - r))

        methods = {
            "ours": lambda: torch.ops.omni.sparse_attention(q, k, v, pos, s, r, scale),
            "sdpa_causal_dense": lambda: sdpa(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa),
        }
        try:
            mask = create_block_mask(window, B=None, H=None, Q_LEN=length, KV_LEN=length, device=device)
            flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
            methods["flex"] = lambda: flex(q, k, v, block_mask=mask, scale=scale, enable_gqa=gqa)
        except Exception as exc:  # pragma: no cover - depends on the torch build
            say(f"prefill flex unavailable: {exc}")
        if length <= 32768:
            dense_mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            j = torch.arange(length, device=device)
            dense_mask &= (j[None, :] < s) | (j[None, :] > j[:, None] - r)
            methods["sdpa_masked"] = lambda: sdpa(q, k, v, attn_mask=dense_mask, scale=scale, enable_gqa=gqa)
        from kernels.sparse_attention import sparse_attention_torch

        ref = sparse_attention_torch(q.float(), k.float(), v.float(), pos, s, r, scale, path="chunked")
        for name, fn in methods.items():
            base = dict(phase="prefill", length=length, heads=args.heads, kv_heads=hkv, head_dim=args.head_dim,
                        sink=s, recent=r, method=name)
            try:
                out = fn()
                err = None if name == "sdpa_causal_dense" else rel_err(out, ref)
                us = timer([fn], max(3, args.iters // 4))
                rows.append(dict(base, us=round(us, 1), tflops=round(flops / (us * 1e-6) / 1e12, 1),
                                 rel_err=None if err is None else float(f"{err:.3g}")))
            except Exception as exc:
                say(f"prefill {length} {name}: failed: {error_text(exc)}")
                rows.append(dict(base, us=None, error=error_text(exc)))
        del q, k, v
        methods.clear()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- output

def _table(rows: list[dict]) -> str:
    lines = [f"{'case':<5}{'heads':>6}{'ctx':>8}  {'method':<30}{'cache':<6}{'us':>10}{'TB/s':>8}{'%roof':>7}{'rel_err':>10}"]
    for row in rows:
        if row.get("phase") == "prefill":
            continue
        name = method_label(row)
        us = "failed" if row["us"] is None else f"{row['us']:.1f}"
        lines.append(f"{row['case']:<5}{row['q_heads']:>6}{row['context']:>8}  {name:<30}{(row['cache'] or '-'):<6}"
                     f"{us:>10}{row.get('tb_s', 0) or 0:>8.2f}{row.get('roofline_pct', 0) or 0:>7.1f}"
                     f"{'' if row.get('rel_err') is None else format(row['rel_err'], '.1e'):>10}")
    pre = [r for r in rows if r.get("phase") == "prefill"]
    if pre:
        lines.append("")
        lines.append(f"{'prefill len':<12}  {'method':<18}{'us':>12}{'TFLOP/s':>9}")
        for row in pre:
            us = "failed" if row["us"] is None else f"{row['us']:.1f}"
            lines.append(f"{row['length']:<12}  {row['method']:<18}{us:>12}{row.get('tflops', 0) or 0:>9.1f}")
    return "\n".join(lines)


def _plot(rows: list[dict], directory: str) -> list[str]:
    import os

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(directory, exist_ok=True)
    decode = [r for r in rows if r.get("phase") != "prefill" and r["us"] is not None and not r.get("override")]
    keys = sorted({(r["case"], r["q_heads"]) for r in decode})
    if not keys:
        return []
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False)
    for ax, (case, heads) in zip(axes[0], keys):
        for method in METHODS:
            for state in ("cold", "hot"):
                pts = sorted((r["context"], r["us"]) for r in decode
                             if (r["case"], r["q_heads"], r["method"], r["cache"]) == (case, heads, method, state))
                if pts:
                    ax.plot(*zip(*pts), marker="o", linestyle="-" if state == "cold" else ":",
                            label=f"{method} ({state})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("µs per decode step")
        ax.set_title(f"{case}, {heads} heads")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path = os.path.join(directory, "attn_decode.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def main(args: argparse.Namespace) -> int:
    device_name = args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine (use --device cpu)")
    device = torch.device(device_name)
    on_cuda = device.type == "cuda"
    args.contexts = args.contexts or ([4096, 32768, 131072] if on_cuda else [1024, 4096])
    args.batch = args.batch or (16 if on_cuda else 2)
    if args.mla_heads is None:
        args.mla_heads = [16, 128] if on_cuda else [16]
    if args.prefill_lengths is None:
        args.prefill_lengths = [4096, 16384] if on_cuda else [256]
    dtype = _DTYPES[args.dtype or ("bf16" if on_cuda else "fp32")]
    for name in ("sink", "recent"):
        if getattr(args, name) < 0:
            raise UserError(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.sink + args.recent == 0:
        raise UserError("--sink + --recent must be >= 1")
    if any(c <= 0 for c in args.contexts):
        raise UserError(f"--contexts must be positive, got {args.contexts}")

    import kernels.sparse_attention  # noqa: F401  (registers the ops)

    torch.manual_seed(0)
    for knob in ("recompile_limit", "cache_size_limit"):  # one flex compile per shape
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 64)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if on_cuda else 0
    timer = time_cuda_graph if on_cuda else time_cpu
    rows = run_decode(args, device, dtype, timer, l2)
    ceilings = None
    if "latent" in args.cases:
        ceilings = device_ceilings(device) if on_cuda else None
        rows += attn_latent.run_latent(args, device, dtype, timer, l2, ceilings, _parse_tune(args.tune) if on_cuda else [])
    if args.prefill_lengths:
        rows += run_prefill(args, device, dtype, timer)

    meta = {"device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
            "torch": torch.__version__, "dtype": str(dtype).replace("torch.", ""),
            "peak_tb_s": args.peak_tbs, "l2_bytes": l2, "cuda_graphs": on_cuda,
            **({"copy_tb_s": ceilings["copy_bytes_per_s"] / 1e12, "bf16_tflop_s": ceilings["bf16_flops_per_s"] / 1e12}
               if ceilings else {})}
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        meta["triton"] = None
    plots = _plot([r for r in rows if r.get("case") != "latent"], args.plot) if args.plot else []
    table = _table([r for r in rows if r.get("case") != "latent"])
    if "latent" in args.cases:
        table += "\n\n" + attn_latent.table([r for r in rows if r.get("case") == "latent"])
    if args.json:
        say(table)
        emit_json({"benchmark": "attn", "meta": meta, "results": rows, "plots": plots})
    else:
        print(f"# {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, {meta['dtype']}")
        print(table)
        for p in plots:
            print(f"plot: {p}")
    return 0
