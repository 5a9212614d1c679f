"""Routing policies: small classes behind one interface, chosen by name (:func:`make_policy`).

A policy answers, for one request and the instances now usable (healthy, breaker closed):

* ``choose_prefill``   which prefill instance (PD mode),
* ``choose_decode``    which decode instance (PD mode, and decode-only fallbacks),
* ``choose_collocated`` which instance (collocated mode),
* ``bypass_prefill``   whether a PD request skips prefill and goes straight to decode.

Each ``choose_*`` returns a :class:`Choice`, or ``None`` when every candidate is over the
policy's limits: the proxy then holds the request and asks again, in the policy's queue order,
when load frees. Only ``omni`` has limits; the others always place a request when there is a
candidate. Policies are pure and synchronous: no I/O, time comes in through ``state.now``.

The proxy reports what it sees through hooks that do nothing by default (an
:class:`Observation` each): ``on_first_byte`` (a stream's first event), ``on_prefill_done``
(a PD prefill instance answered), ``on_complete`` (an attempt ended, ok or not, with token
counts when known).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .load import InstanceLoad, LoadModel
from .prefix_index import PrefixIndex


@dataclass(frozen=True)
class RequestInfo:
    """What routing needs to know about a request."""

    request_id: str
    prompt_tokens: int
    max_tokens: int
    block_keys: Sequence[int] = ()
    arrived: float = 0.0


@dataclass
class ClusterState:
    loads: LoadModel
    index: PrefixIndex | None
    block_size: int
    now: float


@dataclass(frozen=True)
class Observation:
    """What the proxy saw of one attempt of a request on an instance (times on ``state.now``'s clock)."""

    request: RequestInfo
    instance: str
    stage: str                 # "prefill", "decode" or "collocated"
    sent_at: float             # when the attempt was sent
    at: float                  # when this was observed
    ok: bool = True
    prompt_tokens: int | None = None      # from the instance's usage, when it reported one
    completion_tokens: int | None = None  # usage, else the stream's chunks


@dataclass(frozen=True)
class Choice:
    instance: str
    reason: str  # "prefix", "load", "round_robin", "balance"
    matched_blocks: int = 0

    def uncached_tokens(self, req: RequestInfo, block_size: int) -> int:
        return uncached(req, self.matched_blocks, block_size)


def uncached(req: RequestInfo, matched_blocks: int, block_size: int) -> int:
    """Prompt tokens an engine must compute given ``matched_blocks`` cached (at least one)."""
    return max(1, req.prompt_tokens - matched_blocks * block_size)


def _matches(req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> dict[str, int]:
    if state.index is None or not req.block_keys:
        return dict.fromkeys(candidates, 0)
    return state.index.match(req.block_keys, candidates)


class _Rotor:
    """Tie-breaking that rotates, so equal instances share work instead of the first taking all."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def pick(self, stage: str, candidates: Sequence[str], key: Callable[[str], Any]) -> str:
        start = self._next.get(stage, 0) % len(candidates)
        order = list(candidates[start:]) + list(candidates[:start])
        best = min(order, key=key)  # min keeps the first of equals: the rotation decides ties
        self._next[stage] = candidates.index(best) + 1
        return best


class Policy:
    name: ClassVar[str] = ""
    uses_prefix_index: ClassVar[bool] = False
    queue_order: ClassVar[str] = "fifo"  # how held requests are ordered: "fifo" or "omni"

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"policy {self.name!r} has no option(s) {', '.join(sorted(options))}")
        self._rotor = _Rotor()

    def choose_prefill(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        raise NotImplementedError

    def choose_decode(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        raise NotImplementedError

    def choose_collocated(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        return self.choose_prefill(req, candidates, state)

    def bypass_prefill(self, req: RequestInfo, decode_candidates: Sequence[str], state: ClusterState) -> bool:
        return False

    def on_first_byte(self, obs: Observation) -> None:
        """A stream's first event came from ``obs.instance``."""

    def on_prefill_done(self, obs: Observation) -> None:
        """A PD prefill instance answered (``obs.at - obs.sent_at``: its prefill time)."""

    def on_complete(self, obs: Observation) -> None:
        """An attempt ended (``obs.ok``), with the token counts the proxy saw."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}


class RoundRobin(Policy):
    """Each stage cycles through its candidates; no load or cache information."""

    name = "round_robin"

    def _next(self, stage: str, candidates: Sequence[str]) -> Choice | None:
        if not candidates:
            return None
        position = self._rotor._next.get(stage, 0)
        self._rotor._next[stage] = position + 1
        return Choice(candidates[position % len(candidates)], "round_robin")

    def choose_prefill(self, req, candidates, state):
        return self._next("prefill", candidates)

    def choose_decode(self, req, candidates, state):
        return self._next("decode", candidates)

    def choose_collocated(self, req, candidates, state):
        return self._next("collocated", candidates)


class LeastLoad(Policy):
    """Fewest outstanding tokens: queued prefill tokens (prefill), KV tokens (decode), both
    (collocated); ties by running requests, then rotation."""

    name = "least_load"

    def _pick(self, stage, candidates, state, tokens: Callable[[InstanceLoad], int]) -> Choice | None:
        if not candidates:
            return None
        loads = state.loads.instances
        best = self._rotor.pick(stage, candidates, lambda i: (tokens(loads[i]), loads[i].running))
        return Choice(best, "load")

    def choose_prefill(self, req, candidates, state):
        return self._pick("prefill", candidates, state, lambda l: l.prefill_tokens)

    def choose_decode(self, req, candidates, state):
        return self._pick("decode", candidates, state, lambda l: l.kv_tokens)

    def choose_collocated(self, req, candidates, state):
        return self._pick("collocated", candidates, state, lambda l: l.prefill_tokens + l.kv_tokens)


class CacheAware(Policy):
    """Prefix affinity unless load is out of balance (the rule SGLang's and vLLM's routers use).

    Load is running requests. If ``max - min > balance_abs`` and ``max > balance_rel * min`` the
    least loaded instance wins. Otherwise the instance with the longest cached prefix wins when
    it covers at least ``cache_threshold`` of the prompt, else the least loaded one. Decode
    choices (PD mode) are least loaded.
    """

    name = "cache_aware"
    uses_prefix_index = True

    def __init__(self, cache_threshold: float = 0.3, balance_abs: int = 64, balance_rel: float = 1.5):
        super().__init__()
        self.cache_threshold = float(cache_threshold)
        self.balance_abs = int(balance_abs)
        self.balance_rel = float(balance_rel)

    def describe(self):
        return {"name": self.name, "cache_threshold": self.cache_threshold,
                "balance_abs": self.balance_abs, "balance_rel": self.balance_rel}

    def _least(self, stage, candidates, state) -> Choice:
        loads = state.loads.instances
        return Choice(self._rotor.pick(stage, candidates, lambda i: loads[i].running), "balance")

    def _cache_or_balance(self, stage, req, candidates, state) -> Choice | None:
        if not candidates:
            return None
        loads = state.loads.instances
        running = [loads[i].running for i in candidates]
        hi, lo = max(running), min(running)
        if hi - lo > self.balance_abs and hi > self.balance_rel * lo:
            return self._least(stage, candidates, state)
        matches = _matches(req, candidates, state)
        best = self._rotor.pick(stage + "/cache", candidates, lambda i: (-matches[i], loads[i].running))
        ratio = matches[best] * state.block_size / max(1, req.prompt_tokens)
        if matches[best] > 0 and ratio >= self.cache_threshold:
            return Choice(best, "prefix", matches[best])
        choice = self._least(stage, candidates, state)
        return Choice(choice.instance, "load", matches[choice.instance])

    def choose_prefill(self, req, candidates, state):
        return self._cache_or_balance("prefill", req, candidates, state)

    def choose_collocated(self, req, candidates, state):
        return self._cache_or_balance("collocated", req, candidates, state)

    def choose_decode(self, req, candidates, state):
        return self._least("decode", candidates, state) if candidates else None


class Omni(Policy):
    """OmniInfer's scheduling.

    Prefill: skip instances over their limits (``prefill_max_tokens`` queued prefill tokens or
    ``prefill_max_running`` requests); among the rest the deepest prefix match wins, ties go to
    the earliest predicted prefill finish (learned prefill-time model), then fewest queued
    tokens, then fewest running. With no match anywhere: fewest queued tokens (rotating ties).
    Decode: fewest KV tokens among instances with fewer than ``decode_max_running`` requests.
    Collocated: the prefill rule, with both limits. When every candidate is over its limits the
    request is held in the proxy (prefill: short prompts first, aged by waiting time; decode:
    longest first; see ``scheduling.queue_order``).
    PD bypass: a prompt with at most ``bypass_tokens`` tokens not cached on a decode instance
    skips prefill (0 disables).
    """

    name = "omni"
    uses_prefix_index = True
    queue_order = "omni"

    def __init__(
        self,
        prefill_max_tokens: int = 32768,
        prefill_max_running: int = 32,
        decode_max_running: int = 256,
        bypass_tokens: int = 128,
    ):
        super().__init__()
        self.prefill_max_tokens = int(prefill_max_tokens)
        self.prefill_max_running = int(prefill_max_running)
        self.decode_max_running = int(decode_max_running)
        self.bypass_tokens = int(bypass_tokens)

    def describe(self):
        return {"name": self.name, "prefill_max_tokens": self.prefill_max_tokens,
                "prefill_max_running": self.prefill_max_running,
                "decode_max_running": self.decode_max_running, "bypass_tokens": self.bypass_tokens}

    def _prefill_like(self, stage, req, candidates, state, max_running: int) -> Choice | None:
        loads = state.loads.instances
        eligible = [
            i for i in candidates
            if loads[i].prefill_tokens < self.prefill_max_tokens and loads[i].running < max_running
        ]
        if not eligible:
            return None
        matches = _matches(req, eligible, state)
        bs, now = state.block_size, state.now

        def rank(i: str):
            load = loads[i]
            finish = load.predicted_prefill_finish(uncached(req, matches[i], bs), now)
            return (-matches[i], finish, load.prefill_tokens, load.running, load.kv_tokens)

        best = self._rotor.pick(stage, eligible, rank)
        if matches[best] > 0:
            return Choice(best, "prefix", matches[best])
        best = self._rotor.pick(stage, eligible, lambda i: (loads[i].prefill_tokens, loads[i].kv_tokens, loads[i].running))
        return Choice(best, "load", 0)

    def choose_prefill(self, req, candidates, state):
        return self._prefill_like("prefill", req, candidates, state, self.prefill_max_running)

    def choose_collocated(self, req, candidates, state):
        return self._prefill_like("collocated", req, candidates, state, self.decode_max_running)

    def choose_decode(self, req, candidates, state):
        loads = state.loads.instances
        eligible = [i for i in candidates if loads[i].running < self.decode_max_running]
        if not eligible:
            return None
        best = self._rotor.pick("decode", eligible, lambda i: (loads[i].kv_tokens, loads[i].running))
        matched = _matches(req, [best], state)[best] if req.block_keys else 0
        return Choice(best, "load", matched)

    def bypass_prefill(self, req, decode_candidates, state):
        if self.bypass_tokens <= 0 or not decode_candidates:
            return False
        if req.prompt_tokens <= self.bypass_tokens:
            return True
        best = max(_matches(req, decode_candidates, state).values(), default=0)
        return uncached(req, best, state.block_size) <= self.bypass_tokens


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Omni, RoundRobin, LeastLoad, CacheAware)}


def make_policy(name: str, **options: Any) -> Policy:
    """The policy called ``name`` with ``options`` (unknown names or options are errors)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    try:
        return cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad option for policy {name!r}: {exc}") from None


def policy_options(name: str) -> list[str]:
    """Option names the policy ``name`` accepts."""
    import inspect

    params = inspect.signature(POLICIES[name].__init__).parameters
    return [p for p in params if p not in ("self", "options")]
