"""Triton: sink+recent MLA decode straight from vLLM's paged latent cache (imported lazily).

``paged_sink_recent_mla_decode`` takes what a vLLM MLA backend's ``forward_mqa`` receives
(absorbed ``q_nope`` and ``q_pe``, the layer's ``kv_cache [num_blocks, block_size, R + Dr]``, the
decode block table and seq_lens, the softmax scale) and returns what it returns: the latent
output ``[T, H, R]`` in q's dtype (vLLM multiplies it by W_UV afterwards) and, on request, the
log-sum-exp ``[T, H]`` (natural log). Semantics and the reference: ``kernels.paged_mla_reference``.

Split kernel, one program per (query token, split, head block):
  * The visible rows of a token are numbered 0..n_vis-1 ("virtual" index v): v < n_sink is
    position v, the rest are positions r_start + v - n_sink. The virtual range is cut into
    ``num_splits`` chunks; a program walks its chunk BLOCK_N rows at a time, maps each row to
    its position, the position to ``(block_table[b, pos // block_size], pos % block_size)``
    and loads the 576 values of that row once: [:R] is the key's latent part and the value,
    [R:] the rope key. No gather copy, and rows that cross blocks or the sink/recent seam
    need no special case.
  * The heads of the head block are the M dimension of ``tl.dot``:
    s = q[:, :R]·k^T + q[:, R:]·k_pe^T  ([BLOCK_H, BLOCK_N]), online softmax, acc += p·k[:, :R].
    All heads of a request share the rows (MQA), so a program holding BLOCK_H heads reads
    each row once for all of them. BLOCK_H is all heads up to 64; at 128 heads two programs
    (64 heads each, adjacent program ids so they run together and the second read hits L2)
    share a split, because a [128, 512] fp32 accumulator does not fit one program's registers
    (256 KB; an SM has 256 KB of registers in all).
  * num_splits is chosen on the host from the batch shape and sink + recent only, never from
    lengths: the grid is fixed by the batch, the kernels read lengths on the device, nothing
    syncs, and the launch can be captured in a CUDA graph and replayed with new seq_lens,
    block tables and queries. Splits (or whole rows) that see nothing write zeros and -inf.
With one split the split kernel writes the output itself; otherwise it writes fp32 partial
outputs and base-2 log-sum-exps, and a combine kernel (one program per token and head) merges
them.

varlen (``query_start_loc`` given): token t finds its request by binary search over
query_start_loc on the device, so a batch may carry several query tokens per request (vLLM's
FLASH_ATTN_MLA sends short extends down the decode path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.paged_mla_reference import validate_paged_mla_args

__all__ = ["PagedMLAConfig", "launch_config", "paged_sink_recent_mla_decode", "decode_bytes", "decode_flops"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------- kernels
@triton.jit
def _paged_mla_split_kernel(
    QN, QP, KV, BT, SEQ, QSL, OUT, LSE, PART, PLSE,
    sqn_t, sqn_h, sqp_t, sqp_h,
    skv_blk, skv_slot, sbt_b,
    so_t, so_h, sl_t, sl_h,
    sp_t, sp_s, sp_h, spl_t, spl_s,
    num_heads, num_reqs, max_blocks, num_splits, search_steps,
    sink, recent, chunk, qk_scale,
    PAGE: tl.constexpr, R: tl.constexpr, DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, NUM_HB: tl.constexpr,
    VARLEN: tl.constexpr, DIRECT: tl.constexpr, WRITE_LSE: tl.constexpr, IEEE: tl.constexpr,
):
    # Head blocks vary fastest: the programs that share a split's rows run side by side.
    pid = tl.program_id(0)
    hb = pid % NUM_HB
    rest = pid // NUM_HB
    split = rest % num_splits
    tok = rest // num_splits

    if VARLEN:
        # The request of this token: the largest b with query_start_loc[b] <= tok.
        lo = tok * 0
        hi = lo + num_reqs
        for _ in range(search_steps):
            mid = (lo + hi) // 2
            go = tl.load(QSL + mid) <= tok
            lo = tl.where(go, mid, lo)
            hi = tl.where(go, hi, mid)
        b = lo
        length = tl.load(SEQ + b).to(tl.int32) - (tl.load(QSL + b + 1).to(tl.int32) - 1 - tok)
        length = tl.where(tok < tl.load(QSL + num_reqs), length, 0)  # padding tokens see nothing
    else:
        b = tok
        length = tl.load(SEQ + b).to(tl.int32)
    # Never read past the block table row (vLLM keeps lengths within it; this keeps bad input in bounds).
    length = tl.minimum(tl.maximum(length, 0), max_blocks * PAGE)

    # Visible rows: positions [0, n_sink) then [r_start, length).
    n_sink = tl.minimum(sink, length)
    r_start = tl.maximum(sink, length - recent)
    n_vis = n_sink + tl.maximum(length - r_start, 0)
    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, n_vis)

    tok64 = tok.to(tl.int64)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    heads64 = heads.to(tl.int64)
    offs_r = tl.arange(0, R)
    offs_e = tl.arange(0, DR)
    q = tl.load(QN + tok64 * sqn_t + heads64[:, None] * sqn_h + offs_r[None, :], mask=head_ok[:, None], other=0.0)
    qe = tl.load(QP + tok64 * sqp_t + heads64[:, None] * sqp_h + offs_e[None, :], mask=head_ok[:, None], other=0.0)
    bt_row = BT + b.to(tl.int64) * sbt_b

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, R], tl.float32)
    for v in range(v_begin, v_end, BLOCK_N):
        offs_v = v + tl.arange(0, BLOCK_N)
        valid = offs_v < v_end
        pos = tl.where(offs_v < n_sink, offs_v, r_start + offs_v - n_sink)
        blk = tl.load(bt_row + pos // PAGE, mask=valid, other=0).to(tl.int64)
        row = KV + blk * skv_blk + (pos % PAGE).to(tl.int64) * skv_slot
        k = tl.load(row[:, None] + offs_r[None, :], mask=valid[:, None], other=0.0)        # [BLOCK_N, R]
        ke = tl.load(row[:, None] + R + offs_e[None, :], mask=valid[:, None], other=0.0)  # [BLOCK_N, DR]
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            s += tl.dot(qe, tl.trans(ke), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            s += tl.dot(qe, tl.trans(ke))
        # Each tile holds at least one visible row, so m_new is finite and exp2(-inf - m_new) = 0.
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(k.dtype), k)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    if DIRECT:
        o_ptr = OUT + tok64 * so_t + heads64[:, None] * so_h + offs_r[None, :]
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=head_ok[:, None])
        if WRITE_LSE:
            tl.store(LSE + tok64 * sl_t + heads64 * sl_h, lse2 * 0.6931471805599453, mask=head_ok)
    else:
        # Every split writes, also an empty one (zeros, -inf): the combine never reads stale memory.
        base = tok64 * sp_t + split * sp_s
        tl.store(PART + base + heads64[:, None] * sp_h + offs_r[None, :], out, mask=head_ok[:, None])
        tl.store(PLSE + tok64 * spl_t + split * spl_s + heads64, lse2, mask=head_ok)


@triton.jit
def _paged_mla_combine_kernel(
    PART, PLSE, OUT, LSE,
    sp_t, sp_s, sp_h, spl_t, spl_s,
    so_t, so_h, sl_t, sl_h,
    num_heads, num_splits,
    R: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    # One (token, head) per program: many small programs, so that a small batch still spreads
    # the partial reads over every SM.
    pid = tl.program_id(0)
    h = (pid % num_heads).to(tl.int64)
    tok64 = (pid // num_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_r = tl.arange(0, R)
    lse_all = tl.load(PLSE + tok64 * spl_t + offs_s * spl_s + h, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse_all, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    den = tl.sum(tl.exp2(lse_all - m), 0)
    acc = tl.zeros([R], tl.float32)
    for s in range(num_splits):
        w = tl.exp2(tl.load(PLSE + tok64 * spl_t + s * spl_s + h) - m)
        acc += w * tl.load(PART + tok64 * sp_t + s * sp_s + h * sp_h + offs_r)
    out = acc / tl.where(den > 0, den, 1.0)
    tl.store(OUT + tok64 * so_t + h * so_h + offs_r, out.to(OUT.dtype.element_ty))
    if WRITE_LSE:
        lse = tl.where(den > 0, m + tl.log2(tl.where(den > 0, den, 1.0)), float("-inf")) * 0.6931471805599453
        tl.store(LSE + tok64 * sl_t + h * sl_h, lse)


# --------------------------------------------------------------------------- launch parameters
def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # interpreter runs: an H100's count keeps the split choice as on the GPU
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


@dataclass(frozen=True)
class PagedMLAConfig:
    """One launch: ``block_h`` heads per program (the tl.dot M; ``head_blocks`` programs per
    split), ``block_n`` rows per step, ``num_splits`` chunks of ``chunk`` visible rows each (a
    multiple of block_n)."""
    block_h: int
    head_blocks: int
    block_n: int
    num_splits: int
    chunk: int
    num_warps: int
    num_stages: int


def launch_config(num_tokens: int, num_heads: int, latent_dim: int, dtype: torch.dtype, sink: int, recent: int,
                  num_sms: int, **override) -> PagedMLAConfig:
    """Launch parameters from shapes and the (static) window only; ``override`` (bench, tuning,
    tests) wins: keys ``block_h block_n num_splits num_warps num_stages programs_per_sm``.

    Defaults, from sm_90 compiles (Triton 3.6, bf16, R 512 + Dr 64; ptxas -v) and reasoning; the
    sweep of ``omni_passes.bench.attn_paged`` times them on the GPU:
      * block_h holds all heads up to 64: one program reads a row once for every head. At 128
        heads a [128, 512] fp32 accumulator does not fit one program (block_h 128: 262 KB of
        shared memory, over the 227 KB limit, and 2.8 KB of spills).
      * block_h 16 (mma.sync): block_n 32, 4 warps: 206 registers, 56 KB shared, no spills
        (block_n 64 with 4 warps spills). The [block_n, 576] tile is copied asynchronously into
        one buffer and read into registers, so the next tile's copy overlaps this one's math.
      * block_h 64 (wgmma, q in shared memory): block_n 32, 8 warps: 242 registers, 147 KB
        shared (two tile buffers), no spills; 4 warps would spill the [64, 512] accumulator.
        Triton lays a chained q·k dot on all 8 warps along M, so with M = 64 both warpgroups
        compute the scores (p·v is split between them): about 1.5x the ideal tensor work.
      * num_splits fills about ``programs_per_sm`` programs per SM (1 at 64-head blocks,
        compute-heavy; 2 otherwise), with at least two block_n steps per program (the copy of
        one overlaps the math of the other): splits cost a partial output ([block_h, R] fp32
        per split, L2-resident until the combine) and a second kernel, too few leave SMs idle.
    """
    wide = dtype == torch.float32
    block_h = int(override.get("block_h", min(max(16, _next_pow2(num_heads)), 16 if wide else 64)))
    if not (_pow2(block_h) and block_h >= 16):
        raise ValueError(f"block_h must be a power of two >= 16, got {block_h}")
    block_n = int(override.get("block_n", 16 if wide else 32))
    if not (_pow2(block_n) and block_n >= 16):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")
    head_blocks = _cdiv(num_heads, block_h)
    visible_max = max(1, sink + recent)
    items = max(1, num_tokens * head_blocks)
    splits = override.get("num_splits")
    if splits is None:  # about programs_per_sm programs per SM, at least two steps per program
        per_sm = override.get("programs_per_sm", 1.0 if block_h >= 64 else 2.0)
        splits = min(round(per_sm * num_sms / items), _cdiv(visible_max, 2 * block_n))
    splits = max(1, min(int(splits), _cdiv(visible_max, block_n)))
    chunk = _cdiv(_cdiv(visible_max, splits), block_n) * block_n  # a whole number of steps per split
    splits = _cdiv(visible_max, chunk)
    num_warps = int(override.get("num_warps", 8 if block_h >= 32 and latent_dim >= 256 else 4))
    return PagedMLAConfig(block_h=block_h, head_blocks=head_blocks, block_n=block_n, num_splits=splits, chunk=chunk,
                          num_warps=num_warps, num_stages=int(override.get("num_stages", 2)))


# --------------------------------------------------------------------------- entry
def paged_sink_recent_mla_decode(
    q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, block_table: torch.Tensor,
    seq_lens: torch.Tensor, sink: int, recent: int, scale: float, *,
    query_start_loc: torch.Tensor | None = None, out: torch.Tensor | None = None, return_lse: bool = False,
    num_splits: int | None = None, **override,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Absorbed MLA decode over each query's sink + recent rows of the paged latent cache.

    q_nope          [T, H, R]  q_nope·W_UK (any strides, unit along R: vLLM passes a
                               transposed view of its [H, T, R] bmm output)
    q_pe            [T, H, Dr] rope part of the query
    kv_cache        [num_blocks, block_size, R + Dr] one layer's cache (block stride free)
    block_table     [B, max_blocks] int32 (vLLM's decode block table)
    seq_lens        [B] int32, lengths including the current token(s)
    sink, recent    the window (python ints, fixed per layer)
    scale           softmax scale (vLLM's ``impl.scale``)
    query_start_loc [B + 1] int32 or None (one token per request, T = B)
    out             optional [T, H, R] in q's dtype, unit stride along R
    -> (out [T, H, R] in q's dtype, lse [T, H] float32 natural log or None), the pair a vLLM
    MLA ``forward_mqa`` returns. Graph-capturable: no host sync, the grid depends on T, H and
    the window only. R and Dr must be powers of two >= 16 (DeepSeek: 512, 64).
    """
    validate_paged_mla_args(q_nope, q_pe, kv_cache, block_table, seq_lens, sink, recent, query_start_loc)
    if q_nope.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"paged_sink_recent_mla_decode: needs CUDA tensors (got {q_nope.device}); on CPU use "
                         f"kernels.paged_mla_reference, or Triton's interpreter (TRITON_INTERPRET=1)")
    T, H, R = q_nope.shape
    DR = q_pe.shape[-1]
    if not (_pow2(R) and R >= 16 and _pow2(DR) and DR >= 16):
        raise ValueError(f"paged_sink_recent_mla_decode: R ({R}) and Dr ({DR}) must be powers of two >= 16")
    if out is None:
        out = torch.empty(T, H, R, device=q_nope.device, dtype=q_nope.dtype)
    elif tuple(out.shape) != (T, H, R) or out.dtype != q_nope.dtype or (out.numel() and out.stride(-1) != 1):
        raise ValueError(f"paged_sink_recent_mla_decode: out must be [T, H, R] = {[T, H, R]} {q_nope.dtype} with unit "
                         f"stride along R, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
    lse = torch.empty(T, H, device=q_nope.device, dtype=torch.float32) if return_lse else None
    if T == 0 or H == 0:
        return out, lse
    if block_table.shape[0] == 0:  # varlen batch of padding tokens only (a shape, not data: capturable)
        out.zero_()
        if lse is not None:
            lse.fill_(float("-inf"))
        return out, lse
    if num_splits is not None:
        override["num_splits"] = num_splits
    cfg = launch_config(T, H, R, q_nope.dtype, sink, recent, _sm_count(q_nope.device), **override)
    direct = cfg.num_splits == 1
    lse_arg = lse if lse is not None else out  # never written without WRITE_LSE
    sl = lse.stride() if lse is not None else (0, 0)
    if direct:
        part, plse = out, out  # unused
        sp, spl = (0, 0, 0), (0, 0)
    else:
        part = torch.empty(T, cfg.num_splits, H, R, device=q_nope.device, dtype=torch.float32)
        plse = torch.empty(T, cfg.num_splits, H, device=q_nope.device, dtype=torch.float32)
        sp, spl = part.stride()[:3], plse.stride()[:2]
    varlen = query_start_loc is not None
    B = block_table.shape[0]
    _paged_mla_split_kernel[(T * cfg.num_splits * cfg.head_blocks,)](
        q_nope, q_pe, kv_cache, block_table, seq_lens, query_start_loc if varlen else seq_lens,
        out, lse_arg, part, plse,
        q_nope.stride(0), q_nope.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), block_table.stride(0),
        out.stride(0), out.stride(1), *sl,
        *sp, *spl,
        H, B, block_table.shape[1], cfg.num_splits, max(1, B.bit_length()),
        sink, recent, cfg.chunk, scale * _LOG2E,
        PAGE=kv_cache.shape[1], R=R, DR=DR, BLOCK_H=cfg.block_h, BLOCK_N=cfg.block_n, NUM_HB=cfg.head_blocks,
        VARLEN=varlen, DIRECT=direct, WRITE_LSE=lse is not None, IEEE=q_nope.dtype == torch.float32,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not direct:
        _paged_mla_combine_kernel[(T * H,)](
            part, plse, out, lse_arg,
            *sp, *spl,
            out.stride(0), out.stride(1), *sl,
            H, cfg.num_splits,
            R=R, BLOCK_S=max(2, _next_pow2(cfg.num_splits)), WRITE_LSE=lse is not None, num_warps=4,
        )
    return out, lse


def decode_bytes(num_tokens: int, num_heads: int, visible_rows: int, latent_dim: int, rope_dim: int,
                 itemsize: int) -> int:
    """The fewest bytes one decode step moves: each visible latent row once (per token), q in,
    the latent output out."""
    row = latent_dim + rope_dim
    return itemsize * (num_tokens * visible_rows * row + num_tokens * num_heads * (row + latent_dim))


def decode_flops(num_tokens: int, num_heads: int, visible_rows: int, latent_dim: int, rope_dim: int) -> int:
    """Multiply-adds x 2 of q·k (R + Dr) and p·v (R) over the visible rows, every head."""
    return 2 * num_tokens * num_heads * visible_rows * (2 * latent_dim + rope_dim)

