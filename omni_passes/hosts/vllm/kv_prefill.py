"""Sink+recent prefill: which cached rows a chunk reads, and the PyTorch ground truth.

A query at position p attends to keys [0, sink) ∪ (p − recent, p]. A prefill request brings new
tokens [C, C + L) (C = its cached context, 0 for a whole prompt) with their fresh q, k, v; the
context keys live in the paged cache, where a compressed layer keeps only the visible ones:
[0, min(sink, C)) ∪ [max(sink, C + 1 − recent), C) (``context_positions``), the rows every kept
block holds, never a freed one. The GPU computes the attention in one Triton pass over those
rows and the new keys (``kernels.triton_sink_recent_prefill``); here is what it must equal:

    sink_recent_prefill_reference   every visible key at once under the sink+recent causal
                                    mask, float32 (tests' ground truth)

Pure torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["context_positions", "sink_recent_prefill_reference"]

ContextKV = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def context_positions(context_len: int, sink: int, recent: int) -> torch.Tensor:
    """Cached positions some query of a chunk starting at ``context_len`` can see: [0, min(sink, C))
    then [max(sink, C + 1 − recent), C). int64 [n], ascending."""
    head = torch.arange(min(sink, context_len), dtype=torch.int64)
    tail = torch.arange(min(context_len, max(sink, context_len + 1 - recent)), context_len, dtype=torch.int64)
    return torch.cat([head, tail])


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
