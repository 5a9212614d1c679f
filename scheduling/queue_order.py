"""Order of requests the proxy holds back because every instance is at its limit.

OmniInfer's proxy weighs held prefill requests by prompt length and waiting time::

    weight = 0.8 * (max_len - len) / max_len + 0.2 * waited / max(max_waited, 50 ms)

(maxima over the requests now held) and serves the highest weight first: short prompts go
first, and waiting raises a long prompt's weight until it is served. Held decode requests go
longest first (prompt + max_tokens), so the largest KV footprints are placed while the most
room is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_WEIGHT = 0.8
WAIT_WEIGHT = 0.2
MIN_WAIT_NORM_S = 0.05


@dataclass(frozen=True)
class Held:
    """A request held in the proxy: its prompt length, tokens it may generate, arrival time."""

    prompt_tokens: int
    max_tokens: int
    arrived: float


def prefill_weights(items: Sequence[Held], now: float) -> list[float]:
    """OmniInfer's prefill weight of each item (higher is served first)."""
    if not items:
        return []
    max_len = max(1, max(i.prompt_tokens for i in items))
    max_wait = max(MIN_WAIT_NORM_S, max(now - i.arrived for i in items))
    return [
        LENGTH_WEIGHT * (max_len - i.prompt_tokens) / max_len + WAIT_WEIGHT * (now - i.arrived) / max_wait
        for i in items
    ]


def prefill_order(items: Sequence[Held], now: float) -> list[int]:
    """Indices of ``items`` in serving order (ties: earlier arrival first)."""
    weights = prefill_weights(items, now)
    return sorted(range(len(items)), key=lambda k: (-weights[k], items[k].arrived))


def decode_order(items: Sequence[Held]) -> list[int]:
    """Indices of ``items`` longest first (prompt + max_tokens; ties: earlier arrival first)."""
    return sorted(range(len(items)), key=lambda k: (-(items[k].prompt_tokens + items[k].max_tokens), items[k].arrived))


def fifo_order(items: Sequence[Held]) -> list[int]:
    return sorted(range(len(items)), key=lambda k: items[k].arrived)
