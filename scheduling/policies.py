"""Routing policies: small classes behind one interface, chosen by name (:func:`make_policy`).

A policy answers, for one request and the instances now usable (healthy, breaker closed):

* ``choose_prefill``   which prefill instance (PD mode),
* ``choose_decode``    which decode instance (PD mode, and decode-only fallbacks),
* ``choose_collocated`` which instance (collocated mode),
* ``bypass_prefill``   whether a PD request skips prefill and goes straight to decode,
* ``held`` / ``hold_order`` how requests it declined are described and ordered while held.

Each ``choose_*`` returns a :class:`Choice`, or ``None`` when every candidate is over the
policy's limits: the proxy then holds the request and asks again, in the policy's queue order,
when load frees. Only ``omni`` has limits; the others always place a request when there is a
candidate. Policies are pure and synchronous: no I/O, time comes in through ``state.now``.

The proxy reports what it sees through hooks that do nothing by default (an
:class:`Observation` each): ``on_first_byte`` (a stream's first event), ``on_prefill_done``
(a PD prefill instance answered), ``on_complete`` (an attempt ended, ok or not, with token
counts when known). The observation carries the attempt's :class:`scheduling.load.Ticket`,
whose load integrals let a policy relate what it measured to the load the request saw;
``omni`` learns its per-role prefill- and decode-time models from them. A non-streaming
answer reaches only ``on_complete``: its whole latency measures neither prefill nor decode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from .load import InstanceLoad, LoadModel, Ticket
from .predict import Forecast, forecast, placement_cost, prefill_model_of, step_seconds, tpot_capacity
from .prefix_index import PrefixIndex
from .queue_order import Held, aged_shortest_first, fifo_order
from .slo import SLOTarget


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
    ticket: Ticket | None = None          # the load the attempt took (its counters and integrals)


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

    def turn(self, stage: str, candidates: Sequence[str]) -> str:
        """Plain rotation: the next candidate in turn for ``stage``."""
        position = self._next.get(stage, 0)
        self._next[stage] = position + 1
        return candidates[position % len(candidates)]


class Policy:
    name: ClassVar[str] = ""
    uses_prefix_index: ClassVar[bool] = False

    def __init__(self, **options: Any) -> None:
        if options:
            raise ValueError(f"policy {self.name!r} has no option(s) {', '.join(sorted(options))}")
        self._rotor = _Rotor()
        self.slo = SLOTarget()

    def set_slo(self, slo: SLOTarget) -> None:
        """The deployment's targets (``--slo``); policies that schedule against them use them."""
        self.slo = slo

    # -- holding -----------------------------------------------------------------------------
    def held(self, stage: str, req: RequestInfo, state: ClusterState) -> Held:
        """How a request declined at ``stage`` waits in the proxy (its queue entry)."""
        return Held(req.prompt_tokens, req.max_tokens, req.arrived)

    def hold_order(self, stage: str) -> Callable[[Sequence[Held], float], list[int]]:
        """Serving order of the requests held at ``stage``: ``order(items, now) -> indices``."""
        return fifo_order

    def choose_prefill(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        raise NotImplementedError

    def choose_decode(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        raise NotImplementedError

    def choose_collocated(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState) -> Choice | None:
        return self.choose_prefill(req, candidates, state)

    def bypass_prefill(self, req: RequestInfo, decode_candidates: Sequence[str], state: ClusterState,
                       prefill_candidates: Sequence[str] | None = None) -> bool:
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
        return Choice(self._rotor.turn(stage, candidates), "round_robin")

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
    """OmniInfer's scheduling against the deployment's SLO, with limits learned per instance.

    Every choice forecasts, per candidate, the request's TTFT and TPOT there
    (``scheduling.predict``: learned prefill-time and decode-time models, prefix matches):

    * **collocated**: the instance where the request adds the least predicted latency, in
      seconds, to itself and to the requests already there (``placement_cost``): its first
      token (queued prefill work plus its own *uncached* part, at the learned speed for that
      instance's decode load), its own decode time, the stall its uncached prefill puts on
      every request decoding there, and the per-step slowdown its decode puts on them. So a
      cached prefix wins exactly when the work it saves is worth more than the queue and the
      load in front of it, with every term learned from what the proxy observed; no band or
      share is configured. TPOT is kept low by the cost's decode terms (the forecast TPOT with
      the request added, and what its decode costs the others), not by a cut at the target:
      filtering out instances forecast over the target packed the others to its edge
      (docs/serving_bench.md, "What did not work").
    * **prefill** (PD): the earliest predicted prefill completion (queued work plus the
      uncached part of the prompt there, so a deep prefix match wins unless its instance is
      much busier), then the deepest match.
    * **delayed release** (prefill and collocated): a request goes to an instance only while
      its first token is forecast within ``ttft_share`` of the TTFT target (or the instance has
      nothing queued); otherwise it waits in the proxy, where the queue order applies and it
      can still go to whichever instance frees first.
    * **decode** (PD): the lowest predicted TPOT with the request added, among the instances
      that stay within the TPOT target (with a margin of ``margin`` times the model's error
      spread) if any do; then fewest KV tokens.
    * **bypass** (PD): the prompt is prefilled on a decode instance when the first token
      forecast there (its cached prefix counted) comes sooner than prefill + first decode step
      via the best prefill instance by more than the stall that prefill imposes on the
      requests decoding there (its compute time), and that decode instance stays within the
      TPOT target with the extra prefill work. So a congested prefill path or a prefix cached
      on the decode side sends requests straight to decode; an idle prefill instance keeps
      prompts off the decode instances. ``bypass_tokens`` = N > 0 replaces this by the fixed rule
      "at most N uncached tokens", 0 disables bypass.
    * **held requests** go shortest predicted prefill first, aged by ``aging`` seconds of
      priority per second waited (``scheduling.queue_order``: starvation bound).

    Learned capacity steers load; it never holds a request back by itself: holding whenever
    every instance was forecast over its TPOT capacity turned mild overload into a TTFT
    collapse in the benchmark (docs/serving_bench.md). ``prefill_max_tokens``,
    ``prefill_max_running`` and ``decode_max_running`` are optional hard caps (off by default)
    for operators who want admission control.
    """

    name = "omni"
    uses_prefix_index = True

    def __init__(self, ttft_share: float = 0.5, margin: float = 1.0, aging: float = 1.0,
                 bypass_tokens: int | None = None, prefill_max_tokens: int | None = None,
                 prefill_max_running: int | None = None, decode_max_running: int | None = None):
        super().__init__()
        if not 0 < float(ttft_share) <= 1:
            raise ValueError(f"ttft_share must be in (0, 1], got {ttft_share}")
        for key, value in (("margin", margin), ("aging", aging)):
            if float(value) < 0:
                raise ValueError(f"{key} must not be negative, got {value}")
        for key, value in (("bypass_tokens", bypass_tokens), ("prefill_max_tokens", prefill_max_tokens),
                           ("prefill_max_running", prefill_max_running), ("decode_max_running", decode_max_running)):
            if value is not None and int(value) < (0 if key == "bypass_tokens" else 1):
                raise ValueError(f"{key} must be {'>= 0' if key == 'bypass_tokens' else 'positive'}, got {value}")
        self.ttft_share = float(ttft_share)
        self.margin = float(margin)
        self.aging = float(aging)
        self.bypass_tokens = None if bypass_tokens is None else int(bypass_tokens)
        self.prefill_max_tokens = None if prefill_max_tokens is None else int(prefill_max_tokens)
        self.prefill_max_running = None if prefill_max_running is None else int(prefill_max_running)
        self.decode_max_running = None if decode_max_running is None else int(decode_max_running)
        self._bypassed: dict[str, str] = {}  # request id -> decode instance chosen by bypass_prefill

    def describe(self):
        return {"name": self.name, "slo": self.slo.to_dict(), "ttft_share": self.ttft_share, "margin": self.margin,
                "aging": self.aging,
                "bypass_tokens": self.bypass_tokens, "prefill_max_tokens": self.prefill_max_tokens,
                "prefill_max_running": self.prefill_max_running, "decode_max_running": self.decode_max_running}

    def describe_instance(self, load: InstanceLoad, state: ClusterState) -> dict[str, Any]:
        """What was learned about one instance, and the TPOT capacity that follows from it."""
        return {"prefill": {"intercept_s": load.model.intercept, "slope_s_per_token": load.model.slope,
                            "residual_std_s": load.model.residual_std, "observations": load.model.observations,
                            "ratio": load.prefill_ratio.value},
                "decode": {**load.decode.describe(), "ratio": load.decode_ratio.value},
                "tpot_capacity": tpot_capacity(load, state.loads.instances, self.slo, self.margin, state.now)}

    # -- forecasts ---------------------------------------------------------------------------
    def _forecasts(self, req: RequestInfo, candidates: Sequence[str], state: ClusterState,
                   prefilled_here: bool, tpot: bool = True) -> list[Forecast]:
        loads = state.loads.instances
        matches = _matches(req, candidates, state)
        budget = self.ttft_share * self.slo.ttft
        return [forecast(loads[i], loads, prompt_tokens=req.prompt_tokens,
                         uncached=uncached(req, matches[i], state.block_size) if prefilled_here else 0,
                         matched_blocks=matches[i], now=state.now, slo=self.slo, ttft_budget_s=budget,
                         margin_z=self.margin, tpot=tpot)
                for i in candidates]

    def _under_caps(self, load: InstanceLoad, stage: str) -> bool:
        if stage == "prefill":
            return ((self.prefill_max_tokens is None or load.prefill_tokens < self.prefill_max_tokens)
                    and (self.prefill_max_running is None or load.running < self.prefill_max_running))
        if stage == "collocated" and self.prefill_max_tokens is not None and load.prefill_tokens >= self.prefill_max_tokens:
            return False
        return self.decode_max_running is None or load.running < self.decode_max_running

    def _pick(self, stage: str, fcs: list[Forecast], state: ClusterState, key) -> Choice | None:
        loads = state.loads.instances
        fcs = [f for f in fcs if self._under_caps(loads[f.instance], stage)]
        if not fcs:
            return None
        by_name = {f.instance: f for f in fcs}
        best = by_name[self._rotor.pick(stage, list(by_name), lambda i: key(by_name[i], loads[i]))]
        return Choice(best.instance, "prefix" if best.matched_blocks else "load", best.matched_blocks)

    # -- choices -----------------------------------------------------------------------------
    def choose_collocated(self, req, candidates, state):
        fcs = [f for f in self._forecasts(req, candidates, state, True) if f.ttft_ok]
        if not fcs:
            return None  # every instance's prefill queue is full: wait for the first to free
        loads = state.loads.instances
        return self._pick("collocated", fcs, state,
                          lambda f, l: (placement_cost(f, l, loads, req.prompt_tokens, req.max_tokens), l.running,
                                        -f.matched_blocks))

    def choose_prefill(self, req, candidates, state):
        fcs = [f for f in self._forecasts(req, candidates, state, True, tpot=False) if f.ttft_ok]
        return self._pick("prefill", fcs, state, lambda f, l: (f.ttft_s, -f.matched_blocks, l.running))

    def choose_decode(self, req, candidates, state):
        local = self._bypassed.pop(req.request_id, None)
        if local is not None and local in candidates:  # bypassed: the prompt is prefilled there
            choice = self._pick("decode", self._forecasts(req, [local], state, True), state, lambda f, l: 0)
            if choice is not None:
                return choice
        fcs = self._forecasts(req, candidates, state, False)
        within = [f for f in fcs if f.tpot_ok]
        return self._pick("decode", within or fcs, state, lambda f, l: (f.tpot_s, l.kv_tokens, l.running))

    def bypass_prefill(self, req, decode_candidates, state, prefill_candidates: Sequence[str] | None = None):
        if not decode_candidates or self.bypass_tokens == 0:
            return False
        if self.bypass_tokens is not None:
            if req.prompt_tokens <= self.bypass_tokens:
                return True
            best = max(_matches(req, decode_candidates, state).values(), default=0)
            return uncached(req, best, state.block_size) <= self.bypass_tokens
        loads = state.loads.instances
        local = [f for f in self._forecasts(req, decode_candidates, state, True)
                 if f.tpot_ok and self._under_caps(loads[f.instance], "decode")]
        if not local:
            return False
        local_best = min(local, key=lambda f: (f.ttft_s, -f.matched_blocks))
        if prefill_candidates is None:
            prefill_candidates = [i for i, l in loads.items() if l.role == "prefill"]
        remote = self._forecasts(req, prefill_candidates, state, True, tpot=False)
        if remote:
            decode_step = min(step_seconds(loads[i], loads, loads[i].running + 1, loads[i].kv_tokens + req.prompt_tokens)
                              for i in decode_candidates)
            saved = min(f.ttft_s for f in remote) + decode_step - local_best.ttft_s
            # the prefill stalls every request decoding there for about its compute time
            stall = prefill_model_of(loads[local_best.instance], loads).slope * local_best.uncached
            if saved <= stall:
                return False
        self._bypassed[req.request_id] = local_best.instance
        if len(self._bypassed) > 4096:  # requests that never reached choose_decode (client gone)
            self._bypassed.pop(next(iter(self._bypassed)))
        return True

    # -- learning ----------------------------------------------------------------------------
    def on_first_byte(self, obs: Observation) -> None:
        """Dispatch -> first event measures prefill (queueing included) where it was computed."""
        if obs.ticket is not None:
            obs.ticket.prefill_done(obs.at)
            obs.ticket.load.learn_prefill(obs.ticket)

    def on_prefill_done(self, obs: Observation) -> None:
        """A PD prefill instance's answer measures its prefill."""
        self.on_first_byte(obs)

    def on_complete(self, obs: Observation) -> None:
        """A stream that ended cleanly measures TPOT against its decode window's load (a
        non-streaming answer has no window: its ticket's first token is its end)."""
        t = obs.ticket
        if t is not None and obs.ok and obs.completion_tokens:
            t.load.learn_decode(t, obs.completion_tokens, obs.at)

    # -- holding -----------------------------------------------------------------------------
    def held(self, stage, req, state):
        """Service estimate: prefill seconds of the uncached part on the best-matching instance
        of the stage (decode stage: 0, the KV is there, so the order is by waiting time)."""
        service = 0.0
        if stage != "decode":
            loads = state.loads.instances
            names = [i for i, l in loads.items() if l.role == stage] or list(loads)
            matches = _matches(req, names, state)
            best = max(names, key=lambda i: matches[i])
            model = prefill_model_of(loads[best], loads)
            service = model.slope * uncached(req, matches[best], state.block_size)
        return Held(req.prompt_tokens, req.max_tokens, req.arrived, service)

    def hold_order(self, stage):
        aging = self.aging
        return lambda items, now: aged_shortest_first(items, now, aging)


POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Omni, RoundRobin, LeastLoad, CacheAware)}


def make_policy(name: str, slo: SLOTarget | None = None, **options: Any) -> Policy:
    """The policy called ``name`` with ``options`` (unknown names or options are errors),
    scheduling against ``slo`` (default: :class:`SLOTarget`'s defaults)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
    try:
        policy = cls(**options)
    except TypeError as exc:
        raise ValueError(f"bad option for policy {name!r}: {exc}") from None
    if slo is not None:
        policy.set_slo(slo)
    return policy


def policy_options(name: str) -> list[str]:
    """Option names the policy ``name`` accepts."""
    import inspect

    params = inspect.signature(POLICIES[name].__init__).parameters
    return [p for p in params if p not in ("self", "options")]
