"""What sending one request to one instance now would do, from the instance's learned models.

Pure functions over :class:`scheduling.load.InstanceLoad`; the ``omni`` policy decides with
them. Symbols (per instance): ``Q`` queued prefill tokens, ``n`` running requests, ``K`` KV
tokens, ``rate`` prefill tokens/s it finishes; for the request: ``u`` uncached prompt tokens
there, ``p`` prompt tokens.

* TTFT  = prefill model at ``Q + u`` (dispatch -> first token, queueing included);
* TPOT  = decode model at ``n + 1``, ``K + p`` and the instance's prefill rate (plus ``u``
  spread over the rate window when the request is prefilled there);
* the TPOT capacity is the largest ``n`` whose predicted TPOT, plus a margin of ``z`` times
  the model's own error spread, stays within the target;
* the placement cost is the latency a placement adds, the request's own and its co-runners'
  (:func:`placement_cost`).

The prefill time counts the instance's decode load when the learned model has seen enough of
it (``PrefillTimeModel.predict_loaded``): the same queued work takes longer where more
requests are decoding in the same steps.

Models are shared by the instances of a role, each instance scaling the prediction by its
own shrunk ratio (``scheduling.load``). A role that has observed too little yet (decode
instances see prefills only when bypassed) borrows the model of the role that has observed
the most, so its first requests are not predicted from the prior alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from .load import KV_SCALE, RATE_WINDOW_S, DecodeTimeModel, InstanceLoad, PrefillTimeModel
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


def step_seconds(load: InstanceLoad, loads: Mapping[str, InstanceLoad], running: float, kv_tokens: float) -> float:
    """Predicted decode step time (no prefill chunks) at that load."""
    return decode_model_of(load, loads).step_seconds(running, kv_tokens) * load.decode_ratio.value


class Forecast(NamedTuple):
    """One instance's predicted outcome for one request (a tuple: made per candidate per request)."""

    instance: str
    matched_blocks: int
    uncached: int          # prompt tokens the instance would compute (0: KV comes from a prefill)
    ttft_s: float          # dispatch -> first token (prefill part; 0 when nothing is prefilled)
    tpot_s: float          # TPOT with the request added
    ttft_ok: bool          # within the TTFT share the policy allows for this stage
    tpot_ok: bool          # within the TPOT target with margin (an idle instance always is)


def forecast(load: InstanceLoad, loads: Mapping[str, InstanceLoad], *, prompt_tokens: int, uncached: int,
             matched_blocks: int, now: float, slo: SLOTarget, ttft_budget_s: float, margin_z: float,
             tpot: bool = True) -> Forecast:
    """Predict TTFT and TPOT of a request (``uncached`` = 0: its KV arrives from a prefill;
    ``tpot`` False: TTFT only, the TPOT fields are NaN and True)."""
    # each model looked up once: this runs per candidate per request. TTFT: dispatch -> first
    # token with the queued prefill and this prompt's uncached part, the request running too;
    # TPOT: one decode step with it added, at the instance's prefill rate plus its own.
    if uncached > 0:
        pm = prefill_model_of(load, loads)
        ttft = pm.predict_loaded(load.prefill_tokens + uncached, load.running + 1) * load.prefill_ratio.value
        ttft_ok = load.prefill_tokens == 0 or ttft + margin_z * pm.residual_std <= ttft_budget_s
    else:
        ttft, ttft_ok = 0.0, True
    if not tpot:
        return Forecast(load.instance, matched_blocks, uncached, ttft, math.nan, ttft_ok, True)
    dm = decode_model_of(load, loads)
    rate = load.prefill_rate(now) + uncached / RATE_WINDOW_S
    tpot_s = dm.predict(load.running + 1, load.kv_tokens + prompt_tokens, rate) * load.decode_ratio.value
    tpot_ok = load.running == 0 or tpot_s + margin_z * dm.residual_std <= slo.tpot or unattainable(dm, slo, margin_z)
    return Forecast(load.instance, matched_blocks, uncached, ttft, tpot_s, ttft_ok, tpot_ok)


def unattainable(dm: DecodeTimeModel, slo: SLOTarget, margin_z: float) -> bool:
    """The TPOT target is missed even by one sequence alone: no load level meets it, so load
    is not limited by it (the policy then only balances)."""
    return dm.step_seconds(1, 0) + margin_z * dm.residual_std > slo.tpot


def tpot_capacity(load: InstanceLoad, loads: Mapping[str, InstanceLoad], slo: SLOTarget, margin_z: float,
                  now: float, limit: int = 4096) -> int:
    """Most running requests the instance serves within the TPOT target, at its current mean
    context per request and prefill rate: the largest ``n`` with

        ratio * (c0 + n * (c1 + c2 * context)) / (1 - d * rate) + margin_z * error_std <= target

    (at least 1; ``limit`` when the model shows no cost per sequence yet).
    """
    dm = decode_model_of(load, loads)
    busy = dm.prefill_seconds_per_token() * load.prefill_rate(now)
    if busy >= 0.95:
        return 1
    context = load.kv_tokens / load.running if load.running else 0.0
    base = dm.step_seconds(0, 0)
    per_sequence = dm.step_seconds(1, context) - base
    allowed = (slo.tpot - margin_z * dm.residual_std) * (1.0 - busy) / load.decode_ratio.value
    if per_sequence <= 0:
        return limit
    return int(min(limit, max(1.0, (allowed - base) / per_sequence + 1e-9)))



def placement_cost(f: Forecast, load: InstanceLoad, loads: Mapping[str, InstanceLoad], prompt_tokens: int,
                   output_tokens: int) -> float:
    """Seconds of latency that placing the request on ``f.instance`` adds, summed over the request
    and the ``n`` requests running there (``f`` with TTFT and TPOT forecast):

        ttft + out * (tpot + n * (step(n + 1, K + p) - step(n, K))) + n * b * u

    its own first token and decode (``out`` = its output tokens), the per-step slowdown its decode
    puts on each co-runner for as many steps, and the stall of its uncached prefill (``u``
    tokens at ``b`` seconds each, the learned prefill slope) on each of them.
    """
    own = f.ttft_s + output_tokens * f.tpot_s
    n = load.running
    if not n:
        return own
    # step(n + 1, K + p) - step(n, K) of the linear step law: one sequence and p KV tokens more
    c = decode_model_of(load, loads).fit.theta
    slower = max(0.0, (c[1] + c[2] * prompt_tokens / KV_SCALE) * load.decode_ratio.value)
    stall = prefill_model_of(load, loads).slope * f.uncached
    return own + n * (output_tokens * slower + stall)
