"""`omni-passes bench attn --cases latent`: MLA decode attention on the cached latent.

One layer's decode attention in DeepSeek's dimensions (latent R = 512, rope Dr = 64, nope 128,
v 128), B sequences at the end of a cache of ``context`` slots, the cache held as transformers
holds it (latent and rope key in two tensors):

  latent_dense      omni::latent_attention, dense (ours: Triton split-KV on CUDA)
  latent_sparse     omni::latent_attention, sink + recent rows only (ours)
  absorbed_compiled the same absorbed attention written in torch, torch.compile'd (peer)
  expand_compiled   what transformers computes: kv_b_proj over every cached position, keys
                    assembled, SDPA; torch.compile'd (the form the latent pass removes)

Floors: bytes (the visible latent rows read once, q in, output out) over the copy bandwidth
measured in the same run, and FLOPs (2 B H rows (2R + Dr)) over a bf16 GEMM's rate measured
in the same run; ``pct_of_floor`` = max of the two over the measured time.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from omni_passes.bench.measure import cold_copies, error_text, method_label, rel_err

R, DR, DN, DV = 512, 64, 128, 128


class LatentCase:
    def __init__(self, batch, heads, context, sink, recent, dtype, device, copies):
        self.batch, self.heads, self.context, self.sink, self.recent = batch, heads, context, sink, recent
        self.dtype, self.device = dtype, device
        self.scale = 1.0 / math.sqrt(DN + DR)
        self.q = torch.randn(batch, heads, 1, R + DR, device=device, dtype=dtype)
        self.q_pos = torch.full((batch, 1), context - 1, dtype=torch.int64, device=device)
        self.sets = [(torch.randn(batch, context, R, device=device, dtype=dtype),
                      torch.randn(batch, context, DR, device=device, dtype=dtype)) for _ in range(copies)]
        self.visible = min(sink, context) + min(recent, max(0, context - sink))

    def rows(self, method: str) -> int:
        return self.visible if method == "latent_sparse" else self.context

    def bytes(self, method: str) -> int:
        item = torch.empty((), dtype=self.dtype).element_size()
        return item * (self.batch * self.rows(method) * (R + DR) + self.batch * self.heads * (R + DR + R))

    def flops(self, method: str) -> int:
        return 2 * self.batch * self.heads * self.rows(method) * (R + DR + R)

    def calls(self, method: str, **override) -> list[Callable[[], torch.Tensor]]:
        q, pos, scale = self.q, self.q_pos, self.scale
        if method in ("latent_dense", "latent_sparse"):
            window = (0, -1) if method == "latent_dense" else (self.sink, self.recent)
            if override:
                from kernels import triton_sparse_attention as tsa

                s, r = (0, self.context) if method == "latent_dense" else window
                return [lambda c=c, p=p: tsa.latent_decode(q, c, p, pos, s, r, scale, **override) for c, p in self.sets]
            return [lambda c=c, p=p: torch.ops.omni.latent_attention(q, c, p, pos, scale, *window) for c, p in self.sets]
        if method == "absorbed_compiled":
            fn = torch.compile(_absorbed, dynamic=False)
            return [lambda c=c, p=p: fn(q, c, p, scale) for c, p in self.sets]
        if method == "expand_compiled":
            w = torch.randn(self.heads * (DN + DV), R, device=self.device, dtype=self.dtype) / math.sqrt(R)
            qn = torch.randn(self.batch, self.heads, 1, DN + DR, device=self.device, dtype=self.dtype)
            fn = torch.compile(_expanded, dynamic=False)
            return [lambda c=c, p=p: fn(qn, c, p, w, scale) for c, p in self.sets]
        raise ValueError(f"unknown latent method {method!r}")

    def reference(self, method: str) -> torch.Tensor:
        from kernels.latent_attention import latent_attention_reference

        window = (0, -1) if method != "latent_sparse" else (self.sink, self.recent)
        c, p = self.sets[0]
        return latent_attention_reference(self.q, c, p, self.q_pos, self.scale, *window)


def _absorbed(q, kv_c, k_pe, scale):
    """Dense absorbed MLA attention in plain torch: q [B,H,1,R+Dr] on one latent head, the heads
    folded into the rows of one bmm per sequence (multi-query attention)."""
    B, H = q.shape[:2]
    rows = q.reshape(B, H, -1)
    scores = (torch.bmm(rows[..., :R], kv_c.transpose(1, 2)) + torch.bmm(rows[..., R:], k_pe.transpose(1, 2))) * scale
    return torch.bmm(torch.softmax(scores.float(), dim=-1).to(q.dtype), kv_c).view(B, H, 1, R)


def _expanded(q, kv_c, k_pe, w, scale):
    """transformers' form: expand every cached latent row through kv_b_proj, build keys, SDPA."""
    B, Sk, _ = kv_c.shape
    H = w.shape[0] // (DN + DV)
    kv = (kv_c @ w.t()).view(B, Sk, H, DN + DV).transpose(1, 2)
    k_nope, v = kv.split([DN, DV], dim=-1)
    k = torch.cat([k_nope, k_pe[:, None].expand(-1, H, -1, -1)], dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)


METHODS = ("latent_dense", "latent_sparse", "absorbed_compiled", "expand_compiled")


def run_latent(args, device, dtype, timer, l2_bytes, ceilings, tune: list[dict]) -> list[dict]:
    rows = []
    for heads in args.mla_heads:
        for ctx in args.contexts:
            case_bytes = 2 * args.batch * ctx * (R + DR)
            copies = 1 if device.type != "cuda" else cold_copies(
                2 * args.batch * min(ctx, args.sink + args.recent) * (R + DR), case_bytes,
                args.mem_budget_gb * 2**30, l2_bytes)
            case = LatentCase(args.batch, heads, ctx, args.sink, args.recent, dtype, device, copies)
            variants = [(m, {}) for m in METHODS] + [(m, o) for o in tune for m in ("latent_dense", "latent_sparse")]
            for method, override in variants:
                base = dict(case="latent", batch=args.batch, q_heads=heads, context=ctx, sink=args.sink,
                            recent=args.recent, method=method, dtype=str(dtype).replace("torch.", ""),
                            **({"override": override} if override else {}))
                expanded_bytes = 2 * args.batch * ctx * heads * (2 * DN + DR + DV)
                if method == "expand_compiled" and (device.type != "cuda" or expanded_bytes > 16 * 2**30):
                    continue  # the expanded keys would not fit (or take minutes on CPU)
                try:
                    calls = case.calls(method, **override)
                    out = calls[0]()
                    err = None if method == "expand_compiled" else rel_err(out, case.reference(method))
                    us = timer(calls, args.iters)
                    row = dict(base, cache="cold" if len(calls) > 1 else "hot", copies=len(calls), us=round(us, 2),
                               bytes=case.bytes(method), flops=case.flops(method),
                               rel_err=None if err is None else float(f"{err:.3g}"))
                    if ceilings:
                        bytes_us = case.bytes(method) / ceilings["copy_bytes_per_s"] * 1e6
                        flops_us = case.flops(method) / ceilings["bf16_flops_per_s"] * 1e6
                        row.update(floor_bytes_us=round(bytes_us, 2), floor_flops_us=round(flops_us, 2),
                                   pct_of_copy_bw=round(100 * bytes_us / us, 1),
                                   pct_of_floor=round(100 * max(bytes_us, flops_us) / us, 1))
                    rows.append(row)
                except Exception as exc:  # a peer that cannot run a shape is a result, not a crash
                    rows.append(dict(base, us=None, error=error_text(exc)))
            del case
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'heads':>5}{'ctx':>8}  {'method':<44}{'us':>10}{'% copy bw':>10}{'% floor':>9}{'rel_err':>10}"]
    for row in rows:
        name = method_label(row)
        us = "failed" if row["us"] is None else f"{row['us']:.1f}"
        lines.append(f"{row['q_heads']:>5}{row['context']:>8}  {name:<44}{us:>10}"
                     f"{row.get('pct_of_copy_bw', '-')!s:>10}{row.get('pct_of_floor', '-')!s:>9}"
                     f"{'' if row.get('rel_err') is None else format(row['rel_err'], '.1e'):>10}")
    return "\n".join(lines)
