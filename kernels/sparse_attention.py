"""Sink + recent sparse attention (OmniAttn) as ``torch.library`` custom ops.

A query at absolute position ``p`` attends to the keys at positions
``[0, sink) ∪ (p - recent, p]`` and never to a key after ``p`` (causal). Key index ``j`` of
the cache holds position ``j`` (a dense cache or a prefill layout), so keys with ``j > p``
are masked: that covers causality and the unfilled tail of a static cache alike. A query
that sees no key at all (only possible with ``sink == 0`` and a position outside the cache,
or a negative padding position) returns zeros.

Ops (namespace ``omni``)::

    omni::sparse_attention(Tensor q, Tensor k, Tensor v, Tensor q_pos,
                           int sink, int recent, float scale) -> Tensor
        q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv], q_pos [B, Sq] (int64/int32),
        Hq a multiple of Hkv (MHA, GQA, MQA). Returns [B, Hq, Sq, Dv] in q's dtype.
        Serves prefill (Sq = many) and decode (Sq = 1 over a cache of Sk slots).

    omni::sparse_attention_mla_decode(Tensor q, Tensor kv, Tensor q_pos,
                                      int sink, int recent, float scale,
                                      int v_head_dim) -> Tensor
        DeepSeek's absorbed MLA: one latent KV per token shared by every head (MQA),
        q [B, H, Sq, Dk] (Dk = kv_lora_rank + rope = 512 + 64), kv [B, Sk, Dk],
        values = kv[..., :v_head_dim]. Returns [B, H, Sq, v_head_dim].
        A separate op (not ``sparse_attention`` with ``v`` a view of ``k``) because a view
        that aliases another input is not guaranteed to survive functionalization and
        inductor as a view; here the aliasing is explicit and the CUDA kernel reads every
        latent row once, using it as key and value.

Implementations: ``sparse_attention_reference`` (dense, explicit mask, float32 softmax; what the
tests compare against); a CPU/generic path that never builds an ``[Sq, Sk]`` mask (decode
gathers only the sink + recent keys, prefill works per query chunk on the key range that
chunk can see); on CUDA, Triton kernels from ``kernels.triton_sparse_attention``, imported on
first use, with the generic path as fallback for shapes the kernels do not cover.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "sparse_attention",
    "sparse_attention_mla_decode",
    "sparse_attention_mask",
    "sparse_attention_reference",
    "sparse_attention_torch",
    "validate_sparse_attention_args",
]

# Decode-like calls (few queries) gather the visible keys for every query at once; above
# this many queries per row the per-chunk path is cheaper in memory.
_GATHER_MAX_QUERIES = 16
# Query chunk of the prefill path: its mask is [chunk, sink + chunk + recent].
_PREFILL_CHUNK = 256


# --------------------------------------------------------------------------- validation
def validate_sparse_attention_args(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    sink: int,
    recent: int,
    op: str = "omni::sparse_attention",
) -> None:
    """Raise ``ValueError`` naming the bad argument. Shapes only: positions are data."""
    if not isinstance(sink, int) or sink < 0:
        raise ValueError(f"{op}: sink must be an int >= 0, got {sink!r}")
    if not isinstance(recent, int) or recent < 0:
        raise ValueError(f"{op}: recent must be an int >= 0, got {recent!r}")
    if sink + recent == 0:
        raise ValueError(f"{op}: sink + recent must be >= 1 (a query must see some key), got 0")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{op}: {name} must be 4-D [B, H, S, D], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    B, Hq, Sq, D = q.shape
    Bk, Hkv, Sk, Dk = k.shape
    Bv, Hv, Sv, _ = v.shape
    if Bk != B or Bv != B:
        raise ValueError(f"{op}: batch sizes differ: q {B}, k {Bk}, v {Bv}")
    if Dk != D:
        raise ValueError(f"{op}: q head dim {D} != k head dim {Dk}")
    if Hv != Hkv or Sv != Sk:
        raise ValueError(f"{op}: v shape {tuple(v.shape)} does not match k {tuple(k.shape)} in heads/length")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"{op}: query heads {Hq} must be a multiple of kv heads {Hkv}")
    if q_pos.dim() != 2 or tuple(q_pos.shape) != (B, Sq):
        raise ValueError(f"{op}: q_pos must have shape [B, Sq] = [{B}, {Sq}], got {tuple(q_pos.shape)}")
    if q_pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: q_pos must be int64 or int32, got {q_pos.dtype}")
    if q_pos.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError(f"{op}: all tensors must be on one device, got q {q.device}, k {k.device}, "
                         f"v {v.device}, q_pos {q_pos.device}")


def _validate_mla(q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor, sink: int, recent: int,
                  v_head_dim: int) -> None:
    op = "omni::sparse_attention_mla_decode"
    if kv.dim() != 3:
        raise ValueError(f"{op}: kv must be 3-D [B, Sk, Dk] (one latent head), got shape {tuple(kv.shape)}")
    if not isinstance(v_head_dim, int) or not 0 < v_head_dim <= kv.shape[-1]:
        raise ValueError(f"{op}: v_head_dim must be in [1, {kv.shape[-1]}], got {v_head_dim!r}")
    validate_sparse_attention_args(q, kv.unsqueeze(1), kv.unsqueeze(1)[..., :v_head_dim], q_pos,
                                   sink, recent, op=op)


# --------------------------------------------------------------------------- reference
def sparse_attention_mask(q_pos: torch.Tensor, num_keys: int, sink: int, recent: int) -> torch.Tensor:
    """Dense visibility mask. q_pos [B, Sq] -> bool [B, Sq, num_keys]; True = attend."""
    j = torch.arange(num_keys, device=q_pos.device)
    p = q_pos.to(torch.int64).unsqueeze(-1)
    return (j <= p) & ((j < sink) | (j > p - recent))


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
    sink: int, recent: int, scale: float,
) -> torch.Tensor:
    """Dense attention with the explicit sink+recent causal mask, float32 softmax.

    q [B, Hq, Sq, D], k [B, Hkv, Sk, D], v [B, Hkv, Sk, Dv] -> [B, Hq, Sq, Dv] (q's dtype).
    Rows with no visible key are zeros.
    """
    validate_sparse_attention_args(q, k, v, q_pos, sink, recent, op="sparse_attention_reference")
    group = q.shape[1] // k.shape[1]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = v.float().repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale
    mask = sparse_attention_mask(q_pos, k.shape[2], sink, recent).unsqueeze(1)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.matmul(probs, vf).to(q.dtype)


# --------------------------------------------------------------------------- generic path
def _attend(scores: torch.Tensor, visible: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim restricted to ``visible``, then weight ``values``.

    scores [..., L] float32, visible bool broadcastable to scores, values [..., L, Dv].
    Rows with nothing visible give zeros (no NaN).
    """
    scores = scores.masked_fill(~visible, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 on masked entries
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, values)
    return out / torch.where(total > 0, total, torch.ones_like(total))


def _visible_key_index(q_pos: torch.Tensor, num_keys: int, sink: int, recent: int):
    """Key indices each query may see, without a dense mask.

    q_pos [B, Sq] -> (index [B, Sq, W] int64 in [0, num_keys), valid [B, Sq, W] bool), where
    W = min(sink, Sk) + min(recent, Sk): the sink slots, then the last min(recent, Sk) slots
    ending at min(p, Sk - 1). Slots that the sink already covers are marked invalid so no key
    is counted twice.
    """
    p = q_pos.to(torch.int64).unsqueeze(-1)
    n_sink, n_recent = min(sink, num_keys), min(recent, num_keys)
    sink_idx = torch.arange(n_sink, device=q_pos.device).expand(*p.shape[:-1], n_sink)
    sink_ok = sink_idx <= p
    end = torch.clamp(p, max=num_keys - 1)
    rec_idx = end - (n_recent - 1) + torch.arange(n_recent, device=q_pos.device)
    rec_ok = (rec_idx >= sink) & (rec_idx > p - recent) & (rec_idx >= 0) & (rec_idx <= p)
    index = torch.cat([sink_idx, rec_idx], dim=-1).clamp(0, max(num_keys - 1, 0))
    return index, torch.cat([sink_ok, rec_ok], dim=-1)


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D], index [B, L] -> x[b, :, index[b]] as [B, H, L, D].

    A contiguous cache is read as rows of a [B*H*S, D] matrix (``index_select`` copies whole
    rows; ``torch.gather`` indexes element by element and was ~10x slower on CPU here).
    """
    B, H, S, D = x.shape
    if x.is_contiguous():
        rows = (torch.arange(B, device=x.device)[:, None, None] * (H * S)
                + torch.arange(H, device=x.device)[None, :, None] * S + index[:, None, :])
        return x.reshape(B * H * S, D).index_select(0, rows.reshape(-1)).reshape(B, H, -1, D)
    return torch.gather(x, 2, index[:, None, :, None].expand(B, H, index.shape[1], D))


def _gather_path(q, k, v, q_pos, sink, recent, scale, v_from_k: bool = False):
    """Few queries per row (decode): gather only the visible keys. Memory O(Sq * (sink+recent)).

    ``v_from_k``: v is k[..., :Dv] (absorbed MLA), so the gathered key rows serve as values.
    """
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    index, valid = _visible_key_index(q_pos, Sk, sink, recent)  # [B, Sq, W]
    W = index.shape[-1]
    kg = _gather_rows(k, index.reshape(B, Sq * W)).float().reshape(B, Hkv, Sq, W, D)
    if v_from_k:
        vg = kg[..., :Dv]
    else:
        vg = _gather_rows(v, index.reshape(B, Sq * W)).float().reshape(B, Hkv, Sq, W, Dv)
    # One small matmul per (b, kv head, query): [G, D] x [D, W].
    qg = q.float().reshape(B, Hkv, group, Sq, D).transpose(2, 3)  # [B, Hkv, Sq, G, D]
    scores = torch.matmul(qg, kg.transpose(-1, -2)) * scale  # [B, Hkv, Sq, G, W]
    out = _attend(scores, valid.reshape(B, 1, Sq, 1, W), vg)  # [B, Hkv, Sq, G, Dv]
    return out.transpose(2, 3).reshape(B, Hq, Sq, Dv).to(q.dtype)


def _chunked_path(q, k, v, q_pos, sink, recent, scale, chunk: int = _PREFILL_CHUNK):
    """Many queries per row (prefill): per row and query chunk, attend to the key range the
    chunk can see, [0, sink) and [min p - recent + 1, max p]. Mask size chunk x (sink + span)."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk, Dv = k.shape[1], k.shape[2], v.shape[-1]
    group = Hq // Hkv
    out = q.new_zeros(B, Hq, Sq, Dv)
    positions = q_pos.to(torch.int64)
    for b in range(B):
        for start in range(0, Sq, chunk):
            pos = positions[b, start:start + chunk]
            p_min, p_max = int(pos.min()), int(pos.max())
            if p_max < 0:
                continue  # nothing visible: zeros
            sink_end = min(sink, Sk, p_max + 1)
            lo = max(sink, p_min - recent + 1, 0)
            hi = min(p_max + 1, Sk)
            key_pos = torch.cat([torch.arange(sink_end, device=q.device),
                                 torch.arange(lo, max(hi, lo), device=q.device)])
            if key_pos.numel() == 0:
                continue
            keys = torch.cat([k[b, :, :sink_end], k[b, :, lo:max(hi, lo)]], dim=1).float()
            vals = torch.cat([v[b, :, :sink_end], v[b, :, lo:max(hi, lo)]], dim=1).float()
            p = pos.unsqueeze(-1)
            visible = (key_pos <= p) & ((key_pos < sink) | (key_pos > p - recent))  # [C, L]
            qc = q[b, :, start:start + chunk].float().reshape(Hkv, group, -1, D)
            scores = torch.matmul(qc, keys.unsqueeze(1).transpose(-1, -2)) * scale  # [Hkv,G,C,L]
            res = _attend(scores, visible, vals.unsqueeze(1))
            out[b, :, start:start + chunk] = res.reshape(Hq, -1, Dv).to(q.dtype)
    return out


def sparse_attention_torch(q, k, v, q_pos, sink: int, recent: int, scale: float,
                           path: str | None = None, v_from_k: bool = False) -> torch.Tensor:
    """The generic (CPU, and CUDA fallback) implementation; ``path`` forces "gather"/"chunked".

    Shapes as ``omni::sparse_attention``. The gather path has no host sync (CUDA-graph safe);
    the chunked path reads positions on the host. ``v_from_k``: v is a prefix view of k.
    """
    if path is None:
        path = "gather" if q.shape[2] <= _GATHER_MAX_QUERIES else "chunked"
    if path == "gather":
        return _gather_path(q, k, v, q_pos, sink, recent, scale, v_from_k=v_from_k)
    if path == "chunked":
        return _chunked_path(q, k, v, q_pos, sink, recent, scale)
    raise ValueError(f"sparse_attention_torch: unknown path {path!r} (gather, chunked)")


# --------------------------------------------------------------------------- the ops
@torch.library.custom_op("omni::sparse_attention", mutates_args=())
def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                     sink: int, recent: int, scale: float) -> torch.Tensor:
    """Sink + recent causal attention; see the module docstring for shapes."""
    validate_sparse_attention_args(q, k, v, q_pos, sink, recent)
    return sparse_attention_torch(q, k, v, q_pos, sink, recent, scale)


@sparse_attention.register_fake
def _sparse_attention_fake(q, k, v, q_pos, sink, recent, scale):
    validate_sparse_attention_args(q, k, v, q_pos, sink, recent)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[-1])


@sparse_attention.register_kernel("cuda")
def _sparse_attention_cuda(q, k, v, q_pos, sink, recent, scale):
    validate_sparse_attention_args(q, k, v, q_pos, sink, recent)
    from kernels import triton_sparse_attention as tsa  # triton only on CUDA, on first use

    if tsa.supports(q, k, v, v_from_k=False):
        return tsa.sparse_attention_triton(q, k, v, q_pos, sink, recent, scale)
    return sparse_attention_torch(q, k, v, q_pos, sink, recent, scale)


@torch.library.custom_op("omni::sparse_attention_mla_decode", mutates_args=())
def sparse_attention_mla_decode(q: torch.Tensor, kv: torch.Tensor, q_pos: torch.Tensor,
                                sink: int, recent: int, scale: float,
                                v_head_dim: int) -> torch.Tensor:
    """Absorbed-MLA sparse attention: q [B, H, Sq, Dk], kv [B, Sk, Dk] -> [B, H, Sq, v_head_dim]."""
    _validate_mla(q, kv, q_pos, sink, recent, v_head_dim)
    k = kv.unsqueeze(1)
    return sparse_attention_torch(q, k, k[..., :v_head_dim], q_pos, sink, recent, scale, v_from_k=True)


@sparse_attention_mla_decode.register_fake
def _sparse_attention_mla_fake(q, kv, q_pos, sink, recent, scale, v_head_dim):
    _validate_mla(q, kv, q_pos, sink, recent, v_head_dim)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v_head_dim)


@sparse_attention_mla_decode.register_kernel("cuda")
def _sparse_attention_mla_cuda(q, kv, q_pos, sink, recent, scale, v_head_dim):
    _validate_mla(q, kv, q_pos, sink, recent, v_head_dim)
    from kernels import triton_sparse_attention as tsa

    k = kv.unsqueeze(1)
    v = k[..., :v_head_dim]
    if tsa.supports(q, k, v, v_from_k=True):
        return tsa.sparse_attention_triton(q, k, v, q_pos, sink, recent, scale, v_from_k=True)
    return sparse_attention_torch(q, k, v, q_pos, sink, recent, scale, v_from_k=True)


def default_scale(head_dim: int) -> float:
    """The usual 1/sqrt(head_dim) softmax scale."""
    return 1.0 / math.sqrt(head_dim)
