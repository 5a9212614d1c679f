"""What sending one request to one instance now would do, from the instance's learned models.

Pure functions over :class:`scheduling.load.InstanceLoad`; the ``omni`` policy decides with
them. Symbols (per instance): ``Q`` queued prefill tokens, ``n`` running requests, ``K`` KV
tokens, ``rate`` prefill tokens/s it finishes; for the request: ``u`` uncached prompt tokens
there, ``p`` prompt tokens.

* TTFT  = prefill model at ``Q + u`` (dispatch -> first token, queueing included);
* TPOT  = decode model at ``n + 1``, ``K + p`` and the instance's prefill rate (plus ``u``
  spread over the rate window when the request is prefilled there);
* the TPOT capacity is the largest ``n`` whose predicted TPOT, plus a margin of ``z`` times
  the model's own error spread, stays within the target.

An instance that has not observed enough yet borrows the model of the instance that has
observed the most (instances of one deployment run on like hardware), so the first requests
on a fresh instance are not predicted from the prior alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .load import RATE_WINDOW_S, DecodeTimeModel, InstanceLoad, PrefillTimeModel
from .slo import SLOTarget

MIN_OWN_OBSERVATIONS = 4


def prefill_model_of(load: InstanceLoad, loads: Mapping[str, InstanceLoad]) -> PrefillTimeModel:
    if load.model.observations >= MIN_OWN_OBSERVATIONS:
        return load.model
    best = max(loads.values(), key=lambda l: l.model.observations, default=load)
    return best.model if best.model.observations > load.model.observations else load.model


def decode_model_of(load: InstanceLoad, loads: Mapping[str, InstanceLoad]) -> DecodeTimeModel:
    if load.decode.observations >= MIN_OWN_OBSERVATIONS:
        return load.decode
    best = max(loads.values(), key=lambda l: l.decode.observations, default=load)
    return best.decode if best.decode.observations > load.decode.observations else load.decode


@dataclass(frozen=True)
class Forecast:
    """One instance's predicted outcome for one request."""

    instance: str
    matched_blocks: int
    uncached: int          # prompt tokens the instance would compute (0: KV comes from a prefill)
    ttft_s: float          # dispatch -> first token (prefill part; 0 when nothing is prefilled)
    tpot_s: float          # TPOT with the request added
    ttft_ok: bool          # within the TTFT share the policy allows for this stage
    tpot_ok: bool          # within the TPOT target with margin (an idle instance always is)


def forecast(load: InstanceLoad, loads: Mapping[str, InstanceLoad], *, prompt_tokens: int, uncached: int,
             matched_blocks: int, now: float, slo: SLOTarget, ttft_budget_s: float, margin_z: float) -> Forecast:
    """Predict TTFT and TPOT of a request (``uncached`` = 0: its KV arrives from a prefill)."""
    pm = prefill_model_of(load, loads)
    dm = decode_model_of(load, loads)
    if uncached > 0:
        ttft = pm.predict(load.prefill_tokens + uncached)
        ttft_ok = load.prefill_tokens == 0 or ttft + margin_z * pm.residual_std <= ttft_budget_s
    else:
        ttft, ttft_ok = 0.0, True
    rate = load.prefill_rate(now) + uncached / RATE_WINDOW_S
    tpot = dm.predict(load.running + 1, load.kv_tokens + prompt_tokens, rate)
    tpot_ok = load.running == 0 or tpot + margin_z * dm.residual_std <= slo.tpot or unattainable(dm, slo, margin_z)
    return Forecast(load.instance, matched_blocks, uncached, ttft, tpot, ttft_ok, tpot_ok)


def unattainable(dm: DecodeTimeModel, slo: SLOTarget, margin_z: float) -> bool:
    """The TPOT target is missed even by one sequence alone: no load level meets it, so load
    is not limited by it (the policy then only balances)."""
    return dm.step_seconds(1, 0) + margin_z * dm.residual_std > slo.tpot


def tpot_capacity(load: InstanceLoad, loads: Mapping[str, InstanceLoad], slo: SLOTarget, margin_z: float,
                  now: float, limit: int = 4096) -> int | None:
    """Most running requests the instance serves within the TPOT target at its current mean
    context per request and prefill rate (None: unlimited, the target cannot be met anyway)."""
    dm = decode_model_of(load, loads)
    if unattainable(dm, slo, margin_z):
        return None
    context = load.kv_tokens / load.running if load.running else 0.0
    rate = load.prefill_rate(now)
    lo, hi = 1, limit
    if dm.predict(hi, hi * context, rate) + margin_z * dm.residual_std <= slo.tpot:
        return None
    while lo + 1 < hi:  # predicted TPOT grows with n: bisect for the last n within target
        mid = (lo + hi) // 2
        if dm.predict(mid, mid * context, rate) + margin_z * dm.residual_std <= slo.tpot:
            lo = mid
        else:
            hi = mid
    return lo


def placement_cost(load: InstanceLoad, loads: Mapping[str, InstanceLoad], *, prompt_tokens: int, uncached: int,
                   output_tokens: int, ttft_s: float) -> float:
    """Seconds of latency the whole instance accrues from taking the request (lower is better).

    With the decode model's step law ``s(n, K) = c0 + c1 n + c2 K``: the request decodes
    ``output_tokens`` steps of ``s(n + 1, K + p)``; each of the ``n`` requests already there
    gets ``c1 + c2 p`` longer steps while they overlap (taken as the request's whole output);
    its prefill (``uncached`` tokens at ``d`` seconds each) stalls all ``n + 1``; and its own
    first token waits ``ttft_s``. Cached prefixes lower the third term, load the first two: the
    balance between cache affinity and load balance follows from learned costs, not a knob.
    """
    dm = decode_model_of(load, loads)
    n, kv = load.running, load.kv_tokens
    step_with = dm.step_seconds(n + 1, kv + prompt_tokens)
    slowdown = dm.step_seconds(n + 1, kv + prompt_tokens) - dm.step_seconds(n, kv)
    prefill = max(dm.prefill_seconds_per_token(), prefill_model_of(load, loads).slope) * uncached
    return output_tokens * (step_with + n * slowdown) + (n + 1) * prefill + ttft_s
