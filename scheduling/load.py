"""Per-instance load as the proxy sees it, and the performance models learned from it.

The proxy knows what it sent and what came back, so load is counted from its own traffic:

* ``running``: requests dispatched to the instance and not finished;
* ``prefill_tokens``: uncached prompt tokens sent for prefill whose prefill has not finished
  (prefill instances: until the response; collocated/decode-only: until the first token);
* ``kv_tokens``: KV-cache tokens of running requests (prompt + tokens generated so far), the
  decode-side footprint.

Each instance also keeps time integrals of ``running`` and ``kv_tokens`` and a running total
of the prefill tokens it finished, so a request that completes can say what load it saw
*over its own decode phase* (means over that window), which is what its TPOT depends on.

Two models are learned per *role* (all prefill, all decode, all collocated instances share
them: like instances should look alike, and noise in per-instance fits made identical
instances look different), each instance keeping only a shrunk ratio of what it shows to what
the shared model predicts (``scheduling.learn.ShrunkRatio``). They are fed by the policy's
observation hooks (``scheduling.policies.Policy.on_*``), never by whole non-streaming
latencies:

* :class:`PrefillTimeModel`: time from dispatch to the first token (or to a PD prefill's
  answer) = ``a + b * queued``, where ``queued`` is the prefill work on the instance when the
  request was sent, its own uncached tokens included; so the fit absorbs queueing and the
  decode steps interleaved with prefill chunks.
* :class:`DecodeTimeModel`: a request's TPOT = ``c0 + c1 * n + c2 * kv/1e3 + c3 * p/1e2``
  with ``n`` and ``kv`` its decode window's mean running requests and KV tokens, and ``p`` the
  prefill tokens the instance finished in that window per output token (prefill chunks make
  decode steps longer). This is an engine's step-time law (fixed cost, per sequence, per KV
  token read, per prompt token computed) seen through the SLO's own metric.
"""

from __future__ import annotations

import math

from .learn import OnlineLinearFit, ShrunkRatio


class PrefillTimeModel:
    """Online fit of ``seconds = intercept + slope * tokens`` (forgetting factor ``decay``).

    Until observations spread over at least ``min_spread`` tokens (weighted standard deviation)
    the slope stays at its prior (or last fitted) value and only the intercept is fitted, so a
    run of same-sized requests cannot produce a meaningless slope. ``residual_std`` is the
    spread of its errors, each sample predicted before it was learned.
    """

    def __init__(self, intercept: float = 0.02, slope: float = 5e-5, decay: float = 0.98, min_spread: float = 32.0):
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self.decay = decay
        self.min_spread = min_spread
        self.intercept, self.slope = intercept, slope
        self._sums = [0.0] * 5  # weighted sums of 1, x, y, xx, xy over observations
        self._res = [0.0, 0.0]  # weighted sum of squared prediction errors, and of weights
        self.observations = 0
        self._loaded_fit = OnlineLinearFit(prior=(intercept, slope * TOKENS_SCALE, 0.0), ridge=(1e-6, 0.5, 0.5),
                                           decay=decay, nonnegative=(True, True, True), refit_every=4)

    def observe(self, tokens: float, seconds: float) -> None:
        if seconds < 0 or tokens < 0 or not math.isfinite(seconds):
            return
        x, y = float(tokens), float(seconds)
        d = self.decay
        if self.observations:
            error = y - self.predict(x)
            self._res[0] = self._res[0] * d + error * error
            self._res[1] = self._res[1] * d + 1.0
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

    # -- with the decode load counted -----------------------------------------------------------
    # In a collocated engine (and a prefill engine batching several prompts) the prompt's chunks
    # share steps with the running requests, so the same queued work takes longer on a busier
    # instance. Beside the plain fit, ``seconds = a + b * tokens + c * tokens * running`` is
    # fitted on the same samples (running: requests on the instance when the request was
    # sent, its own included); it predicts once it has seen ``LOADED_MIN`` samples.
    @staticmethod
    def loaded_features(tokens: float, running: float) -> tuple[float, float, float]:
        x = max(0.0, tokens) / TOKENS_SCALE
        return (1.0, x, x * max(0.0, running) / RUNNING_SCALE)

    def observe_loaded(self, tokens: float, running: float, seconds: float) -> None:
        """A sample with the instance's running requests at dispatch (also feeds ``observe``)."""
        if seconds >= 0 and tokens >= 0 and math.isfinite(seconds):
            self._loaded_fit.observe(self.loaded_features(tokens, running), seconds)
        self.observe(tokens, seconds)

    def predict_loaded(self, tokens: float, running: float) -> float:
        """Seconds to the first token with ``tokens`` queued on an instance running ``running``
        requests (the plain prediction until the loaded fit has its samples)."""
        fit = self._loaded_fit
        if fit.samples < LOADED_MIN:
            return self.predict(tokens)
        return max(self.intercept, fit.predict(self.loaded_features(tokens, running)))

    @property
    def residual_std(self) -> float:
        return math.sqrt(self._res[0] / self._res[1]) if self._res[1] > 0 else 0.0


# scales that bring the models' features to O(1), so one ridge strength fits all
TOKENS_SCALE = 1e3
RUNNING_SCALE = 10.0
LOADED_MIN = 16
KV_SCALE = 1e3
PREFILL_SCALE = 1e2


class DecodeTimeModel:
    """TPOT of a request from the load of its decode window (module docstring).

    Starts at zero cost per feature except the prefill term, whose prior is the prefill-time
    prior (a prompt token computed in a decode step costs about what it costs in prefill): an
    instance that has shown nothing yet is not limited. ``ridge`` is in pseudo-samples at a
    typical feature value, so the prior yields as soon as the features have varied.
    """

    def __init__(self, prefill_slope_prior: float = 5e-5, decay: float = 0.98, ridge: float = 0.5):
        typical = (1.0, 10.0, 5.0, 2.0)  # n ~ 10 sequences, 5k KV tokens, 200 prompt tokens/step
        self.fit = OnlineLinearFit(
            prior=(0.0, 0.0, 0.0, prefill_slope_prior * PREFILL_SCALE),
            ridge=(1e-6,) + tuple(ridge * t * t for t in typical[1:]),
            decay=decay, nonnegative=(True, True, True, True), refit_every=4)

    @staticmethod
    def features(running: float, kv_tokens: float, prefill_per_token: float) -> tuple[float, ...]:
        return (1.0, running, kv_tokens / KV_SCALE, prefill_per_token / PREFILL_SCALE)

    def observe(self, running: float, kv_tokens: float, prefill_per_token: float, tpot: float) -> None:
        if tpot > 0:
            self.fit.observe(self.features(running, kv_tokens, prefill_per_token), tpot)

    def step_seconds(self, running: float, kv_tokens: float) -> float:
        """The decode step time without prefill chunks."""
        c = self.fit.theta
        return c[0] + c[1] * running + c[2] * kv_tokens / KV_SCALE

    def prefill_seconds_per_token(self) -> float:
        return self.fit.theta[3] / PREFILL_SCALE

    def predict(self, running: float, kv_tokens: float, prefill_tokens_per_s: float) -> float:
        """TPOT when prefill arrives at ``prefill_tokens_per_s``: a decode step of ``s`` seconds
        then also computes ``rate * tpot`` prompt tokens, so ``tpot = s / (1 - d * rate)``."""
        busy = self.prefill_seconds_per_token() * max(0.0, prefill_tokens_per_s)
        if busy >= 0.95:
            return math.inf
        return self.step_seconds(running, kv_tokens) / (1.0 - busy)

    @property
    def observations(self) -> int:
        return self.fit.samples

    @property
    def residual_std(self) -> float:
        return self.fit.residual_std

    def describe(self) -> dict[str, float]:
        c = self.fit.theta
        return {"step_s": c[0], "per_sequence_s": c[1], "per_kv_token_s": c[2] / KV_SCALE,
                "per_prefill_token_s": c[3] / PREFILL_SCALE, "residual_std_s": self.residual_std,
                "observations": self.observations}


# prefill tokens per second are averaged over this many seconds (exponential)
RATE_WINDOW_S = 5.0


class InstanceLoad:
    """Counters of one instance (all from the proxy's own traffic), the learned models of its
    role (shared) and its own deviation from them."""

    def __init__(self, instance: str, role: str, model: PrefillTimeModel | None = None,
                 decode: DecodeTimeModel | None = None):
        self.instance = instance
        self.role = role
        self.running = 0
        self.prefill_tokens = 0
        self.kv_tokens = 0
        self.dispatched = 0
        self.model = model or PrefillTimeModel()
        self.decode = decode or DecodeTimeModel(self.model.slope)
        self.prefill_ratio = ShrunkRatio()
        self.decode_ratio = ShrunkRatio()
        # time integrals (advanced at every event that carries a time) and totals
        self.clock = -math.inf
        self.running_area = 0.0
        self.kv_area = 0.0
        self.prefilled = 0          # prefill tokens whose prefill finished, all time
        self._rate = 0.0            # prefill tokens/s, exponentially averaged
        self._rate_at = -math.inf

    def advance(self, now: float | None) -> None:
        """Bring the integrals up to ``now`` (the counters held since the last event)."""
        if now is None or now <= self.clock:
            return
        if math.isfinite(self.clock):
            dt = now - self.clock
            self.running_area += self.running * dt
            self.kv_area += self.kv_tokens * dt
        self.clock = now

    def prefill_rate(self, now: float) -> float:
        """Prefill tokens per second finished here, averaged over about ``RATE_WINDOW_S``."""
        if not math.isfinite(self._rate_at):
            return 0.0
        return self._rate * math.exp(-max(0.0, now - self._rate_at) / RATE_WINDOW_S)

    def _count_prefilled(self, tokens: int, now: float) -> None:
        self.prefilled += tokens
        self._rate = self.prefill_rate(now) + tokens / RATE_WINDOW_S
        self._rate_at = now

    def predicted_prefill_finish(self, extra_tokens: int, now: float) -> float:
        """When the prefill work queued here plus ``extra_tokens`` would be done."""
        return now + self.model.predict(self.prefill_tokens + extra_tokens)

    # -- learning (called through the policy's observation hooks) ----------------------------
    def learn_prefill(self, ticket: "Ticket") -> None:
        """The ticket's first token (or PD prefill answer) measured dispatch -> prefill done."""
        if ticket.first_token_at is not None and ticket.prefill_tokens > 0:
            seconds = ticket.first_token_at - ticket.sent_at
            if self.model.observations:
                self.prefill_ratio.observe(seconds, self.model.predict_loaded(ticket.queued_at_dispatch,
                                                                              ticket.running_at_dispatch))
            self.model.observe_loaded(ticket.queued_at_dispatch, ticket.running_at_dispatch, seconds)

    def learn_decode(self, ticket: "Ticket", output_tokens: int, now: float) -> None:
        """A stream ended cleanly: its TPOT against the load of its decode window."""
        window = ticket.decode_window(now)
        if window is None or output_tokens < 2:
            return
        seconds, running, kv, prefilled = window
        tpot, per_token = seconds / (output_tokens - 1), prefilled / (output_tokens - 1)
        if self.decode.observations:
            x = self.decode.features(running, kv, per_token)
            self.decode_ratio.observe(tpot, self.decode.fit.predict(x))
        self.decode.observe(running, kv, per_token, tpot)


class Ticket:
    """What one request took from one instance; ``release`` gives it all back exactly once."""

    __slots__ = ("load", "prefill_tokens", "kv_tokens", "max_tokens", "queued_at_dispatch", "running_at_dispatch", "sent_at",
                 "first_token_at", "_mark", "_prefill_open", "_open")

    def __init__(self, load: InstanceLoad, prefill_tokens: int, kv_tokens: int, now: float, max_tokens: int = 0):
        self.load = load
        self.prefill_tokens = prefill_tokens
        self.kv_tokens = kv_tokens
        self.max_tokens = max_tokens
        self.sent_at = now
        self.first_token_at: float | None = None
        self._mark: tuple[float, float, int] | None = None  # integrals at the first token
        load.advance(now)
        load.running += 1
        load.dispatched += 1
        load.prefill_tokens += prefill_tokens
        load.kv_tokens += kv_tokens
        self.queued_at_dispatch = load.prefill_tokens
        self.running_at_dispatch = load.running
        self._prefill_open = prefill_tokens > 0
        self._open = True

    @property
    def instance(self) -> str:
        return self.load.instance

    def prefill_done(self, now: float) -> None:
        """The prefill part finished (first token, or a PD prefill's answer): its tokens leave
        the queue and its decode window starts. Only the first call counts."""
        if self.first_token_at is not None or not self._open:
            return
        load = self.load
        load.advance(now)
        self.first_token_at = now
        if self._prefill_open:
            self._prefill_open = False
            load.prefill_tokens -= self.prefill_tokens
            load._count_prefilled(self.prefill_tokens, now)
        self._mark = (load.running_area, load.kv_area, load.prefilled)

    def decode_window(self, now: float) -> tuple[float, float, float, int] | None:
        """(seconds, mean running, mean KV tokens, prefill tokens finished) since the first
        token, or None before it."""
        if self._mark is None or now <= self.first_token_at:
            return None
        load = self.load
        load.advance(now)
        seconds = now - self.first_token_at
        running_area, kv_area, prefilled = self._mark
        return (seconds, (load.running_area - running_area) / seconds, (load.kv_area - kv_area) / seconds,
                load.prefilled - prefilled)

    def grow(self, tokens: int) -> None:
        """Tokens generated: the request's KV footprint grows."""
        if self._open and tokens > 0:
            self.kv_tokens += tokens
            self.load.kv_tokens += tokens

    def release(self, now: float | None = None) -> None:
        if not self._open:
            return
        load = self.load
        load.advance(now)
        if self._prefill_open:  # never reached its first token: the work is no longer queued
            self._prefill_open = False
            load.prefill_tokens -= self.prefill_tokens
        self._open = False
        load.running -= 1
        load.kv_tokens -= self.kv_tokens


class LoadModel:
    """Loads of all instances, keyed by instance id (its URL)."""

    def __init__(self, prior_intercept: float = 0.02, prior_slope: float = 5e-5):
        self.instances: dict[str, InstanceLoad] = {}
        self._prior = (prior_intercept, prior_slope)
        self.role_models: dict[str, tuple[PrefillTimeModel, DecodeTimeModel]] = {}

    def models_of(self, role: str) -> tuple[PrefillTimeModel, DecodeTimeModel]:
        """The prefill- and decode-time models every instance of ``role`` shares."""
        if role not in self.role_models:
            self.role_models[role] = (PrefillTimeModel(*self._prior), DecodeTimeModel(self._prior[1]))
        return self.role_models[role]

    def add(self, instance: str, role: str) -> InstanceLoad:
        load = self.instances.get(instance)
        model, decode = self.models_of(role)
        if load is None:
            load = InstanceLoad(instance, role, model=model, decode=decode)
            self.instances[instance] = load
        elif load.role != role:
            load.role, load.model, load.decode = role, model, decode
        return load

    def remove(self, instance: str) -> None:
        self.instances.pop(instance, None)

    def __getitem__(self, instance: str) -> InstanceLoad:
        return self.instances[instance]

    def acquire(self, instance: str, prefill_tokens: int, kv_tokens: int, now: float, max_tokens: int = 0) -> Ticket:
        return Ticket(self.instances[instance], prefill_tokens, kv_tokens, now, max_tokens)
