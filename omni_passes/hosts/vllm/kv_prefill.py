"""Sink+recent prefill attention over the new tokens of a batch, exact, without reading freed KV.

A query at position p attends to keys [0, sink) ∪ (p − recent, p]. A prefill request brings new
tokens [C, C + L) (C = its cached context, 0 for a whole prompt) with their fresh q, k, v; the
context keys live in the paged cache, where a compressed layer keeps only the visible ones. The
keys of one query split into two disjoint sets::

    window   new keys j in (p − recent, p]                  one varlen call with a sliding window
                                                           (FA3 on the GPU: causal, window
                                                           (recent − 1, 0), the prefill kernel
                                                           vLLM uses anyway)
    side     context keys j < C with j < sink or j > p − recent,
             and new sink keys C <= j < sink with j <= p − recent
                                                           few keys (at most sink + recent − 1
                                                           per request): explicit mask, float32

Their union is exactly the sink+recent set, so merging the two partial softmaxes by their
log-sum-exp gives exact sink+recent attention (``merge_by_lse``). The side set of request r needs
only the context rows [0, min(sink, C)) ∪ [max(sink, C + 1 − recent), C): the rows every kept
block holds, never a freed one. A query whose side set is empty (p < recent without context)
keeps its window result as it is.

Pure torch, no vLLM: the host passes ``window_attention`` (FA3 there, ``window_attention_reference``
in CPU tests) and ``context_kv`` (reads and expands cached latent rows through its block table).
``sink_recent_prefill_reference`` attends over every visible key at once (tests' ground truth).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

__all__ = [
    "context_positions",
    "merge_by_lse",
    "side_attention",
    "sink_recent_prefill",
    "sink_recent_prefill_reference",
    "window_attention_reference",
]

# Largest scores tensor (elements) the side attention builds at once; queries go in chunks below it.
MAX_SCORES = 1 << 26

WindowAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
ContextKV = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def context_positions(context_len: int, sink: int, recent: int) -> torch.Tensor:
    """Cached positions some query of a chunk starting at ``context_len`` can see: [0, min(sink, C))
    then [max(sink, C + 1 − recent), C). int64 [n], ascending."""
    head = torch.arange(min(sink, context_len), dtype=torch.int64)
    tail = torch.arange(min(context_len, max(sink, context_len + 1 - recent)), context_len, dtype=torch.int64)
    return torch.cat([head, tail])


def side_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, key_pos: torch.Tensor,
                   from_context: torch.Tensor, first_position: int, sink: int, recent: int, scale: float,
                   max_scores: int = MAX_SCORES) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of one request's new queries over its side keys, float32.

    q [L, H, D] (queries at positions first_position + i), keys [n, H, D], values [n, H, Dv],
    key_pos [n] int64, from_context [n] bool (a cached key rather than a new one)
    -> (out [L, H, Dv] float32, lse [H, L] float32; -inf and zeros where no side key is visible).
    """
    L, H, _ = q.shape
    out = torch.zeros(L, H, values.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((H, L), float("-inf"), dtype=torch.float32, device=q.device)
    n = keys.shape[0]
    if n == 0 or L == 0:
        return out, lse
    k = keys.float().permute(1, 2, 0)                                   # [H, D, n]
    v = values.float().transpose(0, 1)                                  # [H, n, Dv]
    key_pos = key_pos.to(q.device)[None]
    from_context = from_context.to(q.device)[None]
    step = max(1, max_scores // (H * n))
    for a in range(0, L, step):
        b = min(L, a + step)
        q_pos = (first_position + torch.arange(a, b, device=q.device))[:, None]      # [Q, 1]
        visible = torch.where(from_context, (key_pos < sink) | (key_pos > q_pos - recent),
                              key_pos <= q_pos - recent)                              # [Q, n]
        scores = torch.matmul(q[a:b].float().transpose(0, 1), k) * scale            # [H, Q, n]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        part = torch.logsumexp(scores, dim=-1)                                      # [H, Q]
        weights = torch.exp(scores - torch.where(torch.isfinite(part), part, 0.0)[..., None])
        out[a:b] = torch.matmul(weights, v).transpose(0, 1)
        lse[:, a:b] = part
    return out, lse


def merge_by_lse(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> torch.Tensor:
    """Softmax attention over two disjoint key sets from their partial results.

    out_* [T, H, Dv], lse_* [H, T] (natural log; -inf for an empty set; not both) -> [T, H, Dv]
    float32.
    """
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isfinite(top), top, 0.0)
    wa = torch.exp(lse_a - top).transpose(0, 1)[..., None]              # [T, H, 1]
    wb = torch.exp(lse_b - top).transpose(0, 1)[..., None]
    return (out_a.float() * wa + out_b.float() * wb) / (wa + wb)


def sink_recent_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int],
                        context_lens: list[int], sink: int, recent: int, scale: float,
                        window_attention: WindowAttention, context_kv: ContextKV) -> torch.Tensor:
    """Exact sink+recent attention of the new tokens of P prefill requests.

    q, k [T, H, D], v [T, H, Dv]: the new tokens, request r at rows starts[r]:starts[r + 1]
    (host ints, starts[0] = 0) at positions context_lens[r] + i. ``window_attention(q, k, v)``
    -> (out [T, H, Dv], lse [H, T]) attends each query over the new keys of its request in
    (p − recent, p]. ``context_kv(r, positions [n])`` -> (k [n, H, D], v [n, H, Dv]) of request
    r's cached rows. -> [T, H, Dv] in v's dtype.
    """
    T, H, _ = q.shape
    out_w, lse_w = window_attention(q, k, v)
    if tuple(lse_w.shape) != (H, T):
        raise ValueError(f"window_attention must return lse [H, T] = {[H, T]}, got {tuple(lse_w.shape)}")
    out_s = torch.zeros(T, H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse_s = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    for r, context in enumerate(context_lens):
        start, end = starts[r], starts[r + 1]
        new_sink = max(0, min(sink, context + end - start) - context)   # new keys below sink: C .. C + m − 1
        cached = context_positions(context, sink, recent)
        # Without context, a query sees a new sink key outside its window only from p = recent on.
        first = 0 if cached.numel() else max(0, recent - context)
        if first >= end - start or cached.numel() + new_sink == 0:
            continue
        k_ctx, v_ctx = context_kv(r, cached) if cached.numel() else (k[:0], v[:0])
        keys = torch.cat([k_ctx.to(k.dtype), k[start:start + new_sink]])
        values = torch.cat([v_ctx.to(v.dtype), v[start:start + new_sink]])
        key_pos = torch.cat([cached, torch.arange(context, context + new_sink, dtype=torch.int64)])
        from_context = torch.arange(key_pos.numel()) < cached.numel()
        o, lse = side_attention(q[start + first:end], keys, values, key_pos, from_context, context + first,
                                sink, recent, scale)
        out_s[start + first:end] = o
        lse_s[:, start + first:end] = lse
    return merge_by_lse(out_w, lse_w, out_s, lse_s).to(v.dtype)


# FA3's sliding window (vLLM 0.26's build, H100, head dims 192 / 128, varlen) matched masked
# attention at window_size [127, 0] and differed by 5.2e-2 (relative, against 1e-2 for bf16 rounding)
# at [383, 0], where this module's merge with the PyTorch window instead of FA3's matched to 3.7e-7
# (tests/gpu/vllm/test_sink_recent_kv_cuda.py, 2026-12-07). Until the edge is found, FA3 runs the
# window only where it was seen right; longer windows take ``window_attention_chunked``.
FA3_WINDOW_MAX_RECENT = 128


def fa3_window_usable(recent: int) -> bool:
    """Whether the prefill may run a ``recent``-token window through FA3 (see above)."""
    return recent <= FA3_WINDOW_MAX_RECENT


def window_attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], recent: int,
                             scale: float, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The same as ``window_attention_reference`` in float32 with memory bounded by ``block``
    queries at a time (their keys: the block and the ``recent − 1`` before it): the fallback
    where FA3's sliding window is not available. -> (out [T, H, Dv] float32, lse [H, T])."""
    T, H, _ = q.shape
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    for start, end in itertools.pairwise(starts):
        for a in range(start, end, block):
            b = min(end, a + block)
            lo = max(start, a - recent + 1)
            qi = torch.arange(a, b, device=q.device)[:, None]
            ki = torch.arange(lo, b, device=q.device)[None]
            visible = (ki <= qi) & (ki > qi - recent)
            scores = torch.matmul(q[a:b].float().transpose(0, 1), k[lo:b].float().permute(1, 2, 0)) * scale
            scores = scores.masked_fill(~visible[None], float("-inf"))
            lse[:, a:b] = torch.logsumexp(scores, dim=-1)
            out[a:b] = torch.matmul(torch.softmax(scores, dim=-1), v[lo:b].float().transpose(0, 1)).transpose(0, 1)
    return out, lse


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int], recent: int,
                               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """What the GPU's FA3 call computes: per request, causal attention over its new keys within
    (p − recent, p]. q, k [T, H, D], v [T, H, Dv] -> (out [T, H, Dv] float32, lse [H, T])."""
    T, H, _ = q.shape
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((H, T), float("-inf"), dtype=torch.float32, device=q.device)
    for start, end in itertools.pairwise(starts):
        i = torch.arange(end - start, device=q.device)
        visible = (i[None] <= i[:, None]) & (i[None] > i[:, None] - recent)
        scores = torch.matmul(q[start:end].float().transpose(0, 1), k[start:end].float().permute(1, 2, 0)) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        lse[:, start:end] = torch.logsumexp(scores, dim=-1)
        out[start:end] = torch.matmul(torch.softmax(scores, dim=-1), v[start:end].float().transpose(0, 1)).transpose(0, 1)
    return out, lse


def sink_recent_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, starts: list[int],
                                  context_lens: list[int], sink: int, recent: int, scale: float,
                                  context_kv: ContextKV) -> torch.Tensor:
    """Every visible key at once, float32: the whole cached context (``context_kv`` of all
    positions [0, C)) then the new keys, under the sink+recent causal mask. -> [T, H, Dv] float32."""
    T, H, _ = q.shape
    out = torch.zeros(T, H, v.shape[-1], dtype=torch.float32, device=q.device)
    for r, context in enumerate(context_lens):
        start, end = starts[r], starts[r + 1]
        positions = torch.arange(context, dtype=torch.int64)
        k_ctx, v_ctx = context_kv(r, positions) if context else (k[:0], v[:0])
        keys = torch.cat([k_ctx.float(), k[start:end].float()])
        values = torch.cat([v_ctx.float(), v[start:end].float()])
        key_pos = torch.arange(context + end - start, device=q.device)
        q_pos = context + torch.arange(end - start, device=q.device)
        visible = (key_pos[None] <= q_pos[:, None]) & ((key_pos[None] < sink) | (key_pos[None] > q_pos[:, None] - recent))
        scores = torch.matmul(q[start:end].float().transpose(0, 1), keys.permute(1, 2, 0)) * scale
        scores = scores.masked_fill(~visible[None], float("-inf"))
        out[start:end] = torch.matmul(torch.softmax(scores, dim=-1), values.transpose(0, 1)).transpose(0, 1)
    return out
