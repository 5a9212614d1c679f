"""Order of requests the proxy holds back because every instance is at its limit.

The ``omni`` policy serves held requests **shortest predicted first, with aging**: each held
request carries ``service_s``, the prefill seconds it is predicted to need (its uncached
tokens on the best-matching instance times that instance's learned seconds per token), and
the queue serves the smallest

    key = service_s - aging * waited_s

first (ties: earlier arrival). Short prompts overtake long ones, but only for a while.

**Starvation bound.** A request ``x`` that arrived after ``r`` can be served before ``r`` only
if ``key_x < key_r``, i.e. ``aging * (arrived_x - arrived_r) < service_r - service_x <=
service_r``: only requests arriving less than ``service_r / aging`` seconds after ``r`` can
ever overtake it. So ``r`` waits at most for the requests ahead of it when it arrived plus
those arriving within ``service_r / aging`` after it; everything later queues behind it.
(``tests/unit/test_scheduling_queue_order.py`` checks the bound on random queues.)

OmniInfer's own proxy weighs held prefill requests by length and waiting time normalised by
the maxima of the requests now held (:func:`prefill_weights`); kept for comparison. With that
normalisation a request with the longest prompt has weight at most ``0.2`` while a new short
one has up to ``0.8``: a stream of short requests can hold the longest one back without limit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LENGTH_WEIGHT = 0.8
WAIT_WEIGHT = 0.2
MIN_WAIT_NORM_S = 0.05


@dataclass(frozen=True)
class Held:
    """A request held in the proxy: prompt length, tokens it may generate, arrival time, and
    the service time a policy predicted for it (seconds)."""

    prompt_tokens: int
    max_tokens: int
    arrived: float
    service_s: float = 0.0


def aged_shortest_first(items: Sequence[Held], now: float, aging: float = 1.0) -> list[int]:
    """Indices of ``items`` by ``service_s - aging * (now - arrived)`` (ties: earlier first)."""
    if aging < 0:
        raise ValueError(f"aging must not be negative, got {aging}")
    return sorted(range(len(items)), key=lambda k: (items[k].service_s - aging * (now - items[k].arrived),
                                                    items[k].arrived))


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
    """OmniInfer's order: indices of ``items`` by weight (ties: earlier arrival first)."""
    weights = prefill_weights(items, now)
    return sorted(range(len(items)), key=lambda k: (-weights[k], items[k].arrived))


def decode_order(items: Sequence[Held], now: float = 0.0) -> list[int]:
    """OmniInfer's decode order: longest first (prompt + max_tokens; ties: earlier first; ``now`` unused)."""
    return sorted(range(len(items)), key=lambda k: (-(items[k].prompt_tokens + items[k].max_tokens), items[k].arrived))


def fifo_order(items: Sequence[Held], now: float = 0.0) -> list[int]:
    """Arrival order (``now`` unused: every order takes the same arguments)."""
    return sorted(range(len(items)), key=lambda k: items[k].arrived)
