"""Triton kernels for ``omni::sparse_attention`` on CUDA (imported lazily: needs triton).

Decode (Sq = 1), flash-decoding style:
  * Each (batch row, kv head, block of query heads) sees at most ``sink + recent`` keys:
    positions ``[0, n_sink)`` then ``[r_start, r_end)``. The kernel numbers those visible keys
    0..n_vis-1 ("virtual" index t) and maps t back to a cache row
    (``t < n_sink ? t : r_start + t - n_sink``), so it reads the sink and recent rows straight
    from the cache, no gather copy, and any split of the virtual range is balanced.
  * The virtual range is cut into ``num_splits`` equal chunks (a host-side choice from
    sink + recent only, so the grid is static and CUDA-graph safe); each program keeps an
    online softmax over its chunk and writes a partial output plus its log-sum-exp; a second
    small kernel merges the splits. With one split the first kernel writes the output itself.
  * MHA (one query head per kv head) multiplies on CUDA cores; GQA/MQA/MLA put the query
    heads of one kv head into the M dimension of ``tl.dot`` (tensor cores).
  * Head dims: values ``DV`` (a power of two, 16..512) and an optional extra key part
    ``D_EXTRA = D - DV`` (a power of two): QK = q[:DV]·k[:DV] + q[DV:]·k[DV:]. That covers
    MHA/GQA 64/128 (D_EXTRA = 0), DeepSeek's non-absorbed 192/128, and absorbed MLA 576/512
    where ``V_FROM_K`` reuses the loaded latent rows as values (each row read once).

Prefill (Sq > 1), flash-attention forward with block skipping: a block of queries visits
only key blocks in ``[0, sink)`` and ``[min p - recent + 1, max p]`` of its rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, v_from_k: bool = False) -> bool:
    """Whether the Triton kernels cover this call (else the caller uses the torch path)."""
    if q.device.type != "cuda" or q.dtype not in _SUPPORTED_DTYPES:
        return False
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return False  # the kernels assume unit stride along the head dim (16-byte loads)
    d, dv = q.shape[-1], v.shape[-1]
    extra = d - dv
    if not (_pow2(dv) and 16 <= dv <= 512):
        return False
    if extra != 0 and not (_pow2(extra) and 16 <= extra <= dv):
        return False
    if q.shape[2] > 1 and (dv > 256 or v_from_k):
        return False  # prefill tiles keep [BLOCK_M, DV] fp32 in registers
    return True


# --------------------------------------------------------------------------- shared block step
@triton.jit
def _online_softmax_step(m_i, l_i, acc, s, visible, v, USE_DOT: tl.constexpr, IEEE: tl.constexpr):
    """Fold one block of scores into the running max/sum/accumulator.

    s [M, N] scores already in log2 units, visible [M, N] (or broadcastable), v [N, DV].
    Rows with nothing visible so far keep m = -inf and contribute nothing (no NaN).
    """
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if USE_DOT:
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :].to(tl.float32), axis=1)
    return m_new, l_i, acc


@triton.jit
def _scores(q, qe, k, ke, qk_scale, USE_DOT: tl.constexpr, D_EXTRA: tl.constexpr,
            IEEE: tl.constexpr):
    """q [M, DV] (+ qe [M, D_EXTRA]) against k [N, DV] (+ ke): scores [M, N] * qk_scale."""
    if USE_DOT:
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if D_EXTRA > 0:
            if IEEE:
                s += tl.dot(qe, tl.trans(ke), input_precision="ieee")
            else:
                s += tl.dot(qe, tl.trans(ke))
    else:
        s = tl.sum(q[:, None, :].to(tl.float32) * k[None, :, :].to(tl.float32), axis=2)
        if D_EXTRA > 0:
            s += tl.sum(qe[:, None, :].to(tl.float32) * ke[None, :, :].to(tl.float32), axis=2)
    return s * qk_scale


# --------------------------------------------------------------------------- decode
@triton.jit
def _decode_split_kernel(
    Q, K, KE, V, POS, OUT, LSE,
    sq_b, sq_h,
    sk_b, sk_h, sk_n,
    se_b, se_h, se_n,
    sv_b, sv_h, sv_n,
    sp_b,
    so_b, so_h, so_s,
    sl_b, sl_h, sl_s,
    num_kv_heads, num_keys, sink, recent, chunk, qk_scale,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, D_EXTRA: tl.constexpr, V_FROM_K: tl.constexpr,
    USE_DOT: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
):
    NUM_HEAD_BLOCKS: tl.constexpr = (GROUP + BLOCK_G - 1) // BLOCK_G
    pid = tl.program_id(0)
    split = tl.program_id(1)
    head_block = pid % NUM_HEAD_BLOCKS
    row = pid // NUM_HEAD_BLOCKS
    kv_head = row % num_kv_heads
    b = (row // num_kv_heads).to(tl.int64)

    # The visible keys of this row: [0, n_sink) then [r_start, r_end).
    p = tl.load(POS + b * sp_b).to(tl.int32)
    n_sink = tl.maximum(tl.minimum(tl.minimum(sink, p + 1), num_keys), 0)
    r_start = tl.maximum(tl.maximum(sink, p - recent + 1), 0)
    r_end = tl.minimum(p + 1, num_keys)
    n_vis = n_sink + tl.maximum(r_end - r_start, 0)
    t_begin = split * chunk
    t_end = tl.minimum(t_begin + chunk, n_vis)

    local = head_block * BLOCK_G + tl.arange(0, BLOCK_G)
    head_ok = local < GROUP
    heads = (kv_head * GROUP + local).to(tl.int64)
    offs_d = tl.arange(0, DV)
    q_base = Q + b * sq_b + heads[:, None] * sq_h
    q = tl.load(q_base + offs_d[None, :], mask=head_ok[:, None], other=0.0)
    if D_EXTRA > 0:
        offs_e = DV + tl.arange(0, D_EXTRA)
        qe = tl.load(q_base + offs_e[None, :], mask=head_ok[:, None], other=0.0)
    else:
        offs_e = offs_d
        qe = q
    k_base = K + b * sk_b + kv_head.to(tl.int64) * sk_h
    ke_base = KE + b * se_b + kv_head.to(tl.int64) * se_h
    v_base = V + b * sv_b + kv_head.to(tl.int64) * sv_h

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, DV], tl.float32)
    for t in range(t_begin, t_end, BLOCK_N):
        offs_t = t + tl.arange(0, BLOCK_N)
        valid = offs_t < t_end
        pos = tl.where(offs_t < n_sink, offs_t, r_start + offs_t - n_sink).to(tl.int64)
        # Issue the K and V loads back to back so both are in flight before any math.
        k = tl.load(k_base + pos[:, None] * sk_n + offs_d[None, :], mask=valid[:, None], other=0.0)
        if V_FROM_K:
            v = k
        else:
            v = tl.load(v_base + pos[:, None] * sv_n + offs_d[None, :], mask=valid[:, None], other=0.0)
        if D_EXTRA > 0:
            offs_x = tl.arange(0, D_EXTRA)
            ke = tl.load(ke_base + pos[:, None] * se_n + offs_x[None, :], mask=valid[:, None], other=0.0)
        else:
            ke = k
        s = _scores(q, qe, k, ke, qk_scale, USE_DOT, D_EXTRA, IEEE)
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, valid[None, :], v, USE_DOT, IEEE)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_ptr = OUT + b * so_b + heads[:, None] * so_h + offs_d[None, :]
    if DIRECT:
        tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=head_ok[:, None])
    else:
        tl.store(o_ptr + split * so_s, out, mask=head_ok[:, None])
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(LSE + b * sl_b + heads * sl_h + split * sl_s, lse, mask=head_ok)


@triton.jit
def _decode_combine_kernel(
    PART, LSE, OUT,
    sp_b, sp_h, sp_s,
    sl_b, sl_h, sl_s,
    so_b, so_h,
    num_heads, num_splits,
    DV: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_heads).to(tl.int64)
    h = (pid % num_heads).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, DV)
    s_ok = offs_s < num_splits
    lse = tl.load(LSE + b * sl_b + h * sl_h + offs_s * sl_s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    part = tl.load(PART + b * sp_b + h * sp_h + offs_s[:, None] * sp_s + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    num = tl.sum(w[:, None] * part, 0)
    den = tl.sum(w, 0)
    out = num / tl.where(den > 0, den, 1.0)
    tl.store(OUT + b * so_b + h * so_h + offs_d, out.to(OUT.dtype.element_ty))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def decode_config(batch: int, kv_heads: int, group: int, dv: int, d_extra: int, num_keys: int,
                  sink: int, recent: int, num_sms: int, **override) -> dict:
    """Launch parameters for the decode kernel; ``override`` (bench/tuning/tests) wins.

    Query heads of one kv head go into the M dimension of ``tl.dot`` (padded to 16: measured
    faster than the CUDA-core path even for MHA, where 15 of 16 rows are padding). Work items
    = batch * kv_heads * head_blocks; the sink + recent range of each is split so the grid has
    about ``programs_per_sm`` programs per SM (more splits cost partial-output traffic and a
    merge; fewer leave SMs idle).
    """
    use_dot = bool(override.get("use_dot", True))
    block_g = override.get("block_g", min(max(16, _next_pow2(group)), 16 if dv >= 512 else 64)) if use_dot else 1
    block_n = override.get("block_n", 128 if dv <= 128 else 64)  # tuned on the H100, docs/attn.md
    visible_max = min(sink, num_keys) + min(recent, num_keys)
    head_blocks = -(-group // block_g)
    items = batch * kv_heads * head_blocks
    max_splits = max(1, -(-visible_max // block_n))
    splits = override.get("num_splits")
    if splits is None:
        splits = round(override.get("programs_per_sm", 1.5) * num_sms / items)
    splits = max(1, min(int(splits), max_splits))
    chunk = -(-(-(-visible_max // splits)) // block_n) * block_n
    splits = max(1, -(-visible_max // chunk))
    num_warps = override.get("num_warps", 8 if dv >= 512 else 4)
    return dict(use_dot=use_dot, block_g=block_g, block_n=block_n, num_splits=splits, chunk=chunk,
                head_blocks=head_blocks, num_warps=num_warps,
                num_stages=override.get("num_stages", 2))


def sparse_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                  sink: int, recent: int, scale: float, v_from_k: bool = False,
                  k_extra: torch.Tensor | None = None, **override) -> torch.Tensor:
    """Decode: q [B, Hq, 1, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> [B, Hq, 1, Dv].

    ``k_extra`` [B, Hkv, Sk, D - Dv]: the key's last D - Dv dims live in another tensor (MLA's
    rope key beside the latent); k then holds only the first Dv dims.
    """
    B, Hq, _, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    if k_extra is None:
        k_extra = k[..., Dv:] if D > Dv else k
    group = Hq // Hkv
    cfg = decode_config(B, Hkv, group, Dv, D - Dv, Sk, sink, recent, _sm_count(q.device), **override)
    out = torch.empty(B, Hq, 1, Dv, device=q.device, dtype=q.dtype)
    splits = cfg["num_splits"]
    direct = splits == 1
    if direct:
        part, lse = out, out  # lse unused
        so = (out.stride(0), out.stride(1), 0)
        sl = (0, 0, 0)
    else:
        part = torch.empty(B, Hq, splits, Dv, device=q.device, dtype=torch.float32)
        lse = torch.empty(B, Hq, splits, device=q.device, dtype=torch.float32)
        so, sl = part.stride()[:3], lse.stride()
    grid = (B * Hkv * cfg["head_blocks"], splits)
    _decode_split_kernel[grid](
        q, k, k_extra, v, q_pos, part, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        k_extra.stride(0), k_extra.stride(1), k_extra.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        q_pos.stride(0),
        *so, *sl,
        Hkv, Sk, sink, recent, cfg["chunk"], scale * _LOG2E,
        GROUP=group, BLOCK_G=cfg["block_g"], BLOCK_N=cfg["block_n"], DV=Dv, D_EXTRA=D - Dv,
        V_FROM_K=v_from_k, USE_DOT=cfg["use_dot"], DIRECT=direct, IEEE=q.dtype == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not direct:
        _decode_combine_kernel[(B * Hq,)](
            part, lse, out,
            *part.stride()[:3], *lse.stride(),
            out.stride(0), out.stride(1),
            Hq, splits, DV=Dv, BLOCK_S=_next_pow2(splits), num_warps=4 if Dv <= 128 else 8,
        )
    return out


# --------------------------------------------------------------------------- prefill
@triton.jit
def _prefill_kernel(
    Q, K, V, POS, OUT,
    sq_b, sq_h, sq_s,
    sk_b, sk_h, sk_n,
    sv_b, sv_h, sv_n,
    sp_b, sp_s,
    so_b, so_h, so_s,
    num_queries, num_heads, num_keys, sink, recent, qk_scale,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DV: tl.constexpr, D_EXTRA: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = pid_bh % num_heads
    kv_head = (h // GROUP).to(tl.int64)
    h = h.to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < num_queries
    p = tl.load(POS + b * sp_b + offs_m * sp_s, mask=m_ok, other=-1).to(tl.int32)
    p_max = tl.max(p, 0)
    p_min = tl.min(tl.where(m_ok, p, 2147483647), 0)

    offs_d = tl.arange(0, DV)
    q_base = Q + b * sq_b + h * sq_h + offs_m[:, None] * sq_s
    q = tl.load(q_base + offs_d[None, :], mask=m_ok[:, None], other=0.0)
    if D_EXTRA > 0:
        offs_e = DV + tl.arange(0, D_EXTRA)
        qe = tl.load(q_base + offs_e[None, :], mask=m_ok[:, None], other=0.0)
    else:
        offs_e = offs_d
        qe = q
    k_base = K + b * sk_b + kv_head * sk_h
    v_base = V + b * sv_b + kv_head * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV], tl.float32)

    # Sink keys [0, min(sink, max p + 1, Sk)).
    sink_end = tl.minimum(tl.minimum(sink, p_max + 1), num_keys)
    for start in range(0, sink_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sink_end
        kp = offs_n.to(tl.int64)
        k = tl.load(k_base + kp[:, None] * sk_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if D_EXTRA > 0:
            ke = tl.load(k_base + kp[:, None] * sk_n + offs_e[None, :], mask=n_ok[:, None], other=0.0)
        else:
            ke = k
        v = tl.load(v_base + kp[:, None] * sv_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _scores(q, qe, k, ke, qk_scale, True, D_EXTRA, IEEE)
        visible = (offs_n[None, :] <= p[:, None]) & n_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, visible, v, True, IEEE)

    # Recent keys: the union of the rows' windows, [max(sink, min p - recent + 1), max p].
    lo = tl.maximum(tl.maximum(sink, p_min - recent + 1), 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(p_max + 1, num_keys)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = (offs_n < hi) & (offs_n >= sink)
        kp = offs_n.to(tl.int64)
        k = tl.load(k_base + kp[:, None] * sk_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        if D_EXTRA > 0:
            ke = tl.load(k_base + kp[:, None] * sk_n + offs_e[None, :], mask=n_ok[:, None], other=0.0)
        else:
            ke = k
        v = tl.load(v_base + kp[:, None] * sv_n + offs_d[None, :], mask=n_ok[:, None], other=0.0)
        s = _scores(q, qe, k, ke, qk_scale, True, D_EXTRA, IEEE)
        visible = (offs_n[None, :] <= p[:, None]) & (offs_n[None, :] > p[:, None] - recent) & n_ok[None, :]
        m_i, l_i, acc = _online_softmax_step(m_i, l_i, acc, s, visible, v, True, IEEE)

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptr = OUT + b * so_b + h * so_h + offs_m[:, None] * so_s + offs_d[None, :]
    tl.store(o_ptr, out.to(OUT.dtype.element_ty), mask=m_ok[:, None])


def prefill_config(num_queries: int, dv: int, **override) -> dict:
    block_m = override.get("block_m", 16 if num_queries <= 16 else (64 if dv > 128 else 128))
    return dict(block_m=block_m, block_n=override.get("block_n", 64),
                num_warps=override.get("num_warps", 4 if block_m <= 64 else 8),
                num_stages=override.get("num_stages", 2))


def sparse_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                   sink: int, recent: int, scale: float, **override) -> torch.Tensor:
    """Prefill: q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv]."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    cfg = prefill_config(Sq, Dv, **override)
    out = torch.empty(B, Hq, Sq, Dv, device=q.device, dtype=q.dtype)
    grid = (triton.cdiv(Sq, cfg["block_m"]), B * Hq)
    _prefill_kernel[grid](
        q, k, v, q_pos, out,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *q_pos.stride(), *out.stride()[:3],
        Sq, Hq, Sk, sink, recent, scale * _LOG2E,
        GROUP=Hq // Hkv, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], DV=Dv, D_EXTRA=D - Dv,
        IEEE=q.dtype == torch.float32, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


def sparse_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                            sink: int, recent: int, scale: float, v_from_k: bool = False,
                            **override) -> torch.Tensor:
    """Entry used by the op's CUDA kernel: decode kernel for Sq = 1, prefill kernel otherwise."""
    if q.shape[2] == 1:
        return sparse_decode(q, k, v, q_pos, sink, recent, scale, v_from_k=v_from_k, **override)
    return sparse_prefill(q, k, v, q_pos, sink, recent, scale, **override)


def supports_latent(q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> bool:
    """Whether ``latent_decode`` covers these ``omni::latent_attention`` inputs."""
    if q.device.type != "cuda" or q.dtype not in _SUPPORTED_DTYPES:
        return False
    if q.stride(-1) != 1 or kv_c.stride(-1) != 1 or k_pe.stride(-1) != 1:
        return False
    r, dr = kv_c.shape[-1], k_pe.shape[-1]
    return _pow2(r) and 16 <= r <= 512 and _pow2(dr) and 16 <= dr <= r


def latent_decode(q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, q_pos: torch.Tensor,
                  sink: int, recent: int, scale: float, **override) -> torch.Tensor:
    """Absorbed MLA decode on a two-part cache: q [B, H, 1, R + Dr], kv_c [B, Sk, R] (key part
    and value), k_pe [B, Sk, Dr] -> [B, H, 1, R]. One latent head (MQA): each visible row of
    kv_c and k_pe is read once. Dense attention is ``sink = 0, recent = Sk``."""
    k = kv_c.unsqueeze(1)
    # ~2 programs per SM: 177.6 us vs 212 us at 1.5 (dense, B16 H16, 32k, H200; docs/graph.md)
    override.setdefault("programs_per_sm", 2)
    if q.shape[1] >= 64 and min(sink, kv_c.shape[1]) + min(recent, kv_c.shape[1]) > 4096:
        override.setdefault("block_g", 64)  # 128 heads, dense 16k: 315 us vs 557 us with 16 (H200)
    if q.dtype == torch.float32 and kv_c.shape[-1] >= 512:
        override.setdefault("block_n", 32)  # fp32 tiles: two stages of 64 rows exceed shared memory
    return sparse_decode(q, k, k, q_pos, sink, recent, scale, v_from_k=True, k_extra=k_pe.unsqueeze(1), **override)


def bytes_min_decode(batch: int, q_heads: int, kv_heads: int, d: int, dv: int, visible: int,
                     itemsize: int, v_from_k: bool = False) -> int:
    """The fewest bytes a decode step must move: visible K (+V) rows, q in, output out."""
    row = d if v_from_k else d + dv
    return itemsize * (batch * kv_heads * visible * row + batch * q_heads * (d + dv))


__all__ = ["supports", "supports_latent", "sparse_attention_triton", "sparse_decode", "latent_decode",
           "sparse_prefill", "decode_config", "prefill_config", "bytes_min_decode"]
