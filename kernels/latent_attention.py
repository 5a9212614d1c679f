"""Attention on the cached MLA latent (DeepSeek-V2/V3 decode), as a ``torch.library`` op.

DeepSeek's MLA caches, per token, one latent row ``c`` (``kv_lora_rank`` R = 512) and one rope
key ``k_pe`` (Dr = 64) shared by all heads. Head h's key is ``[W_UK[h] c, k_pe]`` and its value
``W_UV[h] c``. Absorbing ``W_UK`` into the query (``q_lat[h] = W_UK[h]^T q_nope[h]``) makes
every head attend to the same latent rows (multi-query attention with key dim R + Dr), and the
output in latent space is brought back through ``W_UV`` afterwards. The op is that core:

    omni::latent_attention(Tensor q, Tensor kv_c, Tensor k_pe, Tensor q_pos,
                           float scale, int sink, int recent) -> Tensor
        q     [B, H, Sq, R + Dr]  absorbed query, rope part last
        kv_c  [B, Sk, R]          cached latent: the first R key dims and the value
        k_pe  [B, Sk, Dr]         cached rope key
        q_pos [B, Sq] int64/int32 query positions; key index j holds position j
        -> [B, H, Sq, R] in q's dtype: softmax(scale * (q[:R]·kv_c + q[R:]·k_pe)) · kv_c

    Visible keys of a query at position p: ``[0, sink) ∪ (p − recent, p]`` (sink + recent, as
    ``omni::sparse_attention``), or all of ``[0, p]`` with ``sink = 0, recent = -1`` (dense).
    Keys after p are never visible (causality and the unfilled tail of a static cache). A
    query that sees no key returns zeros.

kv_c and k_pe may be views with any strides except along the last dim (unit stride): a
combined ``[B, Sk, R + Dr]`` cache passes as ``kv[..., :R]`` and ``kv[..., R:]``, transformers'
two-tensor static cache as its two tensors.

Implementations: ``latent_attention_reference`` (dense mask, float32; the tests' reference);
``latent_attention_torch`` (CPU, and the CUDA fallback: gathers only the visible rows for
sink + recent, query chunks for the dense case); on CUDA with Sq = 1 the Triton split-KV decode
kernel of ``kernels.triton_sparse_attention``, which reads each visible latent row once and
uses it as key and value.
"""

from __future__ import annotations

import torch

from kernels.sparse_attention import _attend, _visible_key_index, sparse_attention_mask

__all__ = ["latent_attention", "latent_attention_reference", "latent_attention_torch",
           "validate_latent_attention_args", "DENSE"]

DENSE = (0, -1)  # (sink, recent) of dense causal attention
_OP = "omni::latent_attention"
# Dense torch path: queries per chunk, so the [B, H, chunk, Sk] fp32 scores stay bounded.
_DENSE_QUERY_CHUNK = 64


def validate_latent_attention_args(q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor,
                                   q_pos: torch.Tensor, sink: int, recent: int, op: str = _OP) -> None:
    """Raise ``ValueError`` naming the bad argument. Shapes only: positions are data."""
    if (sink, recent) != DENSE:
        if not isinstance(sink, int) or sink < 0:
            raise ValueError(f"{op}: sink must be an int >= 0, got {sink!r}")
        if not isinstance(recent, int) or recent < 1:
            raise ValueError(f"{op}: recent must be an int >= 1 (or sink=0, recent=-1 for dense), got {recent!r}")
    if q.dim() != 4:
        raise ValueError(f"{op}: q must be 4-D [B, H, Sq, R + Dr], got shape {tuple(q.shape)}")
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D [B, Sk, D] (one latent head), got shape {tuple(t.shape)}")
    for name, t in (("q", q), ("kv_c", kv_c), ("k_pe", k_pe)):
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be floating point, got {t.dtype}")
        if t.dtype != q.dtype:
            raise ValueError(f"{op}: q, kv_c, k_pe must share a dtype, got {q.dtype}, {kv_c.dtype}, {k_pe.dtype}")
        if t.device != q.device:
            raise ValueError(f"{op}: all tensors must be on one device, got q {q.device}, {name} {t.device}")
    B, _, Sq, D = q.shape
    R, Dr = kv_c.shape[-1], k_pe.shape[-1]
    if kv_c.shape[0] != B or k_pe.shape[0] != B:
        raise ValueError(f"{op}: batch sizes differ: q {B}, kv_c {kv_c.shape[0]}, k_pe {k_pe.shape[0]}")
    if k_pe.shape[1] != kv_c.shape[1]:
        raise ValueError(f"{op}: kv_c has {kv_c.shape[1]} cached tokens but k_pe {k_pe.shape[1]}")
    if D != R + Dr:
        raise ValueError(f"{op}: q's last dim {D} != kv_c's {R} + k_pe's {Dr}")
    if q_pos.dim() != 2 or tuple(q_pos.shape) != (B, Sq):
        raise ValueError(f"{op}: q_pos must have shape [B, Sq] = [{B}, {Sq}], got {tuple(q_pos.shape)}")
    if q_pos.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{op}: q_pos must be int64 or int32, got {q_pos.dtype}")
    if q_pos.device != q.device:
        raise ValueError(f"{op}: q_pos is on {q_pos.device}, q on {q.device}")


def _window(sink: int, recent: int, num_keys: int) -> tuple[int, int]:
    """(sink, recent) as the sparse kernels take them; dense = no sink, a window of the cache."""
    return (0, max(num_keys, 1)) if (sink, recent) == DENSE else (sink, recent)


# --------------------------------------------------------------------------- reference
def latent_attention_reference(q, kv_c, k_pe, q_pos, scale: float, sink: int, recent: int) -> torch.Tensor:
    """Dense scores with the explicit visibility mask, float32 softmax. Shapes as the op."""
    validate_latent_attention_args(q, kv_c, k_pe, q_pos, sink, recent, op="latent_attention_reference")
    B, H, Sq, _ = q.shape
    s, r = _window(sink, recent, kv_c.shape[1])
    scores = _mqa_scores(q.float(), kv_c.float(), k_pe.float()) * scale  # [B, H, Sq, Sk]
    mask = sparse_attention_mask(q_pos, kv_c.shape[1], s, r)[:, None]  # [B, 1, Sq, Sk]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros_like(probs))
    return torch.bmm(probs.reshape(B, H * Sq, -1), kv_c.float()).reshape(B, H, Sq, -1).to(q.dtype)


def _mqa_scores(q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
    """q [B, H, Sq, R + Dr] against the one latent head: [B, H, Sq, Sk]. Heads are folded into
    the rows of one bmm per sequence (a broadcast matmul would copy the cache once per head)."""
    B, H, Sq, _ = q.shape
    R = kv_c.shape[-1]
    rows = q.reshape(B, H * Sq, -1)
    scores = torch.bmm(rows[..., :R], kv_c.transpose(1, 2)) + torch.bmm(rows[..., R:], k_pe.transpose(1, 2))
    return scores.reshape(B, H, Sq, -1)


# --------------------------------------------------------------------------- generic path
def _gathered(q, kv_c, k_pe, q_pos, scale, sink, recent):
    """Sink + recent: only the visible rows, [B, Sq, W] of them; memory O(Sq * W)."""
    B, H, Sq, _ = q.shape
    R = kv_c.shape[-1]
    index, valid = _visible_key_index(q_pos, kv_c.shape[1], sink, recent)  # [B, Sq, W]
    W = index.shape[-1]
    flat = index.reshape(B, Sq * W, 1)
    c = torch.gather(kv_c, 1, flat.expand(-1, -1, R)).float().reshape(B, 1, Sq, W, R)
    pe = torch.gather(k_pe, 1, flat.expand(-1, -1, k_pe.shape[-1])).float().reshape(B, 1, Sq, W, -1)
    qf = q.float().transpose(1, 2).reshape(B, 1, Sq, H, -1)  # heads as rows: [B, 1, Sq, H, D]
    scores = (qf[..., :R] @ c.transpose(-1, -2) + qf[..., R:] @ pe.transpose(-1, -2)) * scale  # [B, 1, Sq, H, W]
    out = _attend(scores, valid.reshape(B, 1, Sq, 1, W), c)  # [B, 1, Sq, H, R]
    return out.reshape(B, Sq, H, R).transpose(1, 2).to(q.dtype)


def _dense(q, kv_c, k_pe, q_pos, scale, chunk: int = _DENSE_QUERY_CHUNK):
    """Dense causal: all keys [0, p], scores per chunk of queries."""
    B, H = q.shape[:2]
    c, pe = kv_c.float(), k_pe.float()
    keys = torch.arange(c.shape[1], device=q.device)
    outs = []
    for start in range(0, q.shape[2], chunk):
        qc = q[:, :, start:start + chunk].float()
        scores = _mqa_scores(qc, c, pe) * scale  # [B, H, chunk, Sk]
        visible = (keys <= q_pos[:, start:start + chunk, None].to(torch.int64))[:, None]  # [B, 1, chunk, Sk]
        out = _attend(scores.reshape(B, 1, -1, scores.shape[-1]), visible.repeat(1, 1, H, 1), c[:, None])
        outs.append(out.reshape(B, H, -1, c.shape[-1]))
    return torch.cat(outs, dim=2).to(q.dtype)


def latent_attention_torch(q, kv_c, k_pe, q_pos, scale: float, sink: int, recent: int) -> torch.Tensor:
    """The generic implementation (CPU; CUDA shapes the kernel does not take). No host sync."""
    if (sink, recent) == DENSE:
        return _dense(q, kv_c, k_pe, q_pos, scale)
    return _gathered(q, kv_c, k_pe, q_pos, scale, sink, recent)


# --------------------------------------------------------------------------- the op
@torch.library.custom_op(_OP, mutates_args=())
def latent_attention(q: torch.Tensor, kv_c: torch.Tensor, k_pe: torch.Tensor, q_pos: torch.Tensor,
                     scale: float, sink: int, recent: int) -> torch.Tensor:
    """Attention of absorbed queries on the cached latent; see the module docstring."""
    validate_latent_attention_args(q, kv_c, k_pe, q_pos, sink, recent)
    return latent_attention_torch(q, kv_c, k_pe, q_pos, scale, sink, recent)


@latent_attention.register_fake
def _latent_attention_fake(q, kv_c, k_pe, q_pos, scale, sink, recent):
    validate_latent_attention_args(q, kv_c, k_pe, q_pos, sink, recent)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], kv_c.shape[-1])


@latent_attention.register_kernel("cuda")
def _latent_attention_cuda(q, kv_c, k_pe, q_pos, scale, sink, recent):
    validate_latent_attention_args(q, kv_c, k_pe, q_pos, sink, recent)
    from kernels import triton_sparse_attention as tsa  # triton only on CUDA, on first use

    if q.shape[2] == 1 and tsa.supports_latent(q, kv_c, k_pe):
        s, r = _window(sink, recent, kv_c.shape[1])
        return tsa.latent_decode(q, kv_c, k_pe, q_pos, s, r, scale)
    return latent_attention_torch(q, kv_c, k_pe, q_pos, scale, sink, recent)
