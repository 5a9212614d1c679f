"""Per-instance load as the proxy sees it, and a prefill-time model learned from latencies.

The proxy knows what it sent and what came back, so load is counted from its own traffic:

* ``running``: requests dispatched to the instance and not finished;
* ``prefill_tokens``: uncached prompt tokens sent for prefill whose prefill has not finished
  (prefill instances: until the response; collocated/decode-only: until the first token);
* ``kv_tokens``: KV-cache tokens of running requests (prompt + tokens generated so far), the
  decode-side footprint.

:class:`PrefillTimeModel` fits ``latency = a + b * tokens`` by exponentially weighted least
squares, where ``tokens`` is the prefill work queued on the instance when the request was sent
(its own uncached tokens included), so the fit absorbs queueing inside the engine. It predicts
when the work now queued on an instance would finish.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class PrefillTimeModel:
    """Online fit of ``seconds = intercept + slope * tokens`` (forgetting factor ``decay``).

    Until observations spread over at least ``min_spread`` tokens (weighted standard deviation)
    the slope stays at its prior (or last fitted) value and only the intercept is fitted, so a
    run of same-sized requests cannot produce a meaningless slope.
    """

    def __init__(self, intercept: float = 0.02, slope: float = 5e-5, decay: float = 0.98, min_spread: float = 32.0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.min_spread = min_spread
        self.intercept, self.slope = intercept, slope
        self._sums = [0.0] * 5  # weighted sums of 1, x, y, xx, xy over observations
        self.observations = 0

    def observe(self, tokens: float, seconds: float) -> None:
        if seconds < 0 or tokens < 0:
            return
        x, y = float(tokens), float(seconds)
        d = self.decay
        s = self._sums
        s[0] = s[0] * d + 1.0
        s[1] = s[1] * d + x
        s[2] = s[2] * d + y
        s[3] = s[3] * d + x * x
        s[4] = s[4] * d + x * y
        self.observations += 1
        w, sx, sy, sxx, sxy = s
        var = sxx / w - (sx / w) ** 2
        if var >= self.min_spread**2:
            slope = (sxy / w - (sx / w) * (sy / w)) / var
            if slope > 0:
                self.slope = slope
        self.intercept = max(0.0, (sy - self.slope * sx) / w)

    def predict(self, tokens: float) -> float:
        return self.intercept + self.slope * max(0.0, tokens)


@dataclass
class InstanceLoad:
    """Counters of one instance (all from the proxy's own traffic)."""

    instance: str
    role: str
    running: int = 0
    prefill_tokens: int = 0
    kv_tokens: int = 0
    dispatched: int = 0
    model: PrefillTimeModel = field(default_factory=PrefillTimeModel)

    def predicted_prefill_finish(self, extra_tokens: int, now: float) -> float:
        """When the prefill work queued here plus ``extra_tokens`` would be done."""
        return now + self.model.predict(self.prefill_tokens + extra_tokens)


class Ticket:
    """What one request took from one instance; ``release`` gives it all back exactly once."""

    __slots__ = ("load", "prefill_tokens", "kv_tokens", "queued_at_dispatch", "sent_at", "_prefill_open", "_open")

    def __init__(self, load: InstanceLoad, prefill_tokens: int, kv_tokens: int, now: float):
        self.load = load
        self.prefill_tokens = prefill_tokens
        self.kv_tokens = kv_tokens
        self.sent_at = now
        load.running += 1
        load.dispatched += 1
        load.prefill_tokens += prefill_tokens
        load.kv_tokens += kv_tokens
        self.queued_at_dispatch = load.prefill_tokens
        self._prefill_open = prefill_tokens > 0
        self._open = True

    @property
    def instance(self) -> str:
        return self.load.instance

    def prefill_done(self, now: float, observe: bool = True) -> None:
        """The prefill part finished (response or first token): its tokens leave the queue."""
        if not self._prefill_open:
            return
        self._prefill_open = False
        self.load.prefill_tokens -= self.prefill_tokens
        if observe:
            self.load.model.observe(self.queued_at_dispatch, now - self.sent_at)

    def grow(self, tokens: int) -> None:
        """Tokens generated: the request's KV footprint grows."""
        if self._open and tokens > 0:
            self.kv_tokens += tokens
            self.load.kv_tokens += tokens

    def release(self) -> None:
        if not self._open:
            return
        self.prefill_done(0.0, observe=False)
        self._open = False
        self.load.running -= 1
        self.load.kv_tokens -= self.kv_tokens


class LoadModel:
    """Loads of all instances, keyed by instance id (its URL)."""

    def __init__(self, prior_intercept: float = 0.02, prior_slope: float = 5e-5):
        self.instances: dict[str, InstanceLoad] = {}
        self._prior = (prior_intercept, prior_slope)

    def add(self, instance: str, role: str) -> InstanceLoad:
        load = self.instances.get(instance)
        if load is None:
            load = InstanceLoad(instance, role, model=PrefillTimeModel(*self._prior))
            self.instances[instance] = load
        else:
            load.role = role
        return load

    def remove(self, instance: str) -> None:
        self.instances.pop(instance, None)

    def __getitem__(self, instance: str) -> InstanceLoad:
        return self.instances[instance]

    def acquire(self, instance: str, prefill_tokens: int, kv_tokens: int, now: float) -> Ticket:
        return Ticket(self.instances[instance], prefill_tokens, kv_tokens, now)
