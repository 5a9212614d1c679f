"""Load counters, decode-window integrals, prefill rate, and the learned models' feeding."""

import math

import pytest

from scheduling.load import DecodeTimeModel, LoadModel, PrefillTimeModel


def test_model_recovers_a_linear_law():
    model = PrefillTimeModel(intercept=1.0, slope=1.0)  # a bad prior
    for tokens in [100, 2000, 500, 8000, 3000, 50, 6000] * 20:
        model.observe(tokens, 0.01 + 2e-5 * tokens)
    assert model.intercept == pytest.approx(0.01, rel=0.05)
    assert model.slope == pytest.approx(2e-5, rel=0.05)
    assert model.predict(4000) == pytest.approx(0.09, rel=0.05)


def test_model_without_spread_keeps_slope_and_fits_intercept():
    model = PrefillTimeModel(intercept=0.0, slope=1e-4)
    for _ in range(50):
        model.observe(1000, 0.5)
    assert model.slope == pytest.approx(1e-4)
    assert model.predict(1000) == pytest.approx(0.5, rel=0.01)


def test_ticket_counts_and_releases_exactly_once_and_learns_nothing_itself():
    loads = LoadModel()
    loads.add("p", "prefill")
    t1 = loads.acquire("p", prefill_tokens=100, kv_tokens=120, now=0.0)
    t2 = loads.acquire("p", prefill_tokens=50, kv_tokens=50, now=0.0)
    load = loads["p"]
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (2, 150, 170)
    assert t2.queued_at_dispatch == 150
    t1.prefill_done(now=0.5)
    t1.prefill_done(now=0.9)  # only the first call counts
    assert load.prefill_tokens == 50 and t1.first_token_at == 0.5
    assert load.model.observations == 0  # bookkeeping only: learning is the policy hooks' job
    load.learn_prefill(t1)
    assert load.model.observations == 1
    t1.grow(10)
    assert load.kv_tokens == 180
    t1.release(1.0)
    t1.release(1.0)
    t1.grow(5)  # after release: ignored
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (1, 50, 50)
    t2.release(2.0)  # release without prefill_done also frees the queued tokens
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (0, 0, 0)
    assert load.prefilled == 100  # only t1's prefill finished


def test_decode_window_means_hand_computed():
    loads = LoadModel()
    load = loads.add("c", "collocated")
    a = loads.acquire("c", prefill_tokens=10, kv_tokens=100, now=0.0, max_tokens=5)
    a.prefill_done(1.0)                      # A's decode window starts at t=1
    b = loads.acquire("c", prefill_tokens=50, kv_tokens=200, now=2.0)
    b.prefill_done(3.0)                      # 50 prefill tokens finish inside A's window
    seconds, running, kv, prefilled = a.decode_window(5.0)
    # running 1 on [1, 2], 2 on [2, 5]: (1 + 6) / 4; KV 100 then 300: (100 + 900) / 4
    assert (seconds, running, kv, prefilled) == (4.0, 1.75, 250.0, 50)
    load.learn_decode(a, output_tokens=5, now=5.0)
    fit = load.decode.fit
    assert fit.samples == 1
    # the sample the model got: TPOT 4 s / 4 gaps, with n=1.75, kv=250, 50/4 prefill tokens per token
    assert fit.predict(DecodeTimeModel.features(1.75, 250.0, 12.5)) != fit.prior  # it moved
    assert a.decode_window(1.0) is None  # no window before its first token
    assert b.decode_window(3.0) is None


def test_prefill_rate_is_exponential_over_the_window():
    loads = LoadModel()
    load = loads.add("c", "collocated")
    t = loads.acquire("c", 50, 50, now=0.0)
    assert load.prefill_rate(0.0) == 0.0
    t.prefill_done(3.0)
    assert load.prefill_rate(3.0) == pytest.approx(50 / 5.0)
    assert load.prefill_rate(8.0) == pytest.approx(10.0 * math.exp(-1.0))


def test_models_are_shared_per_role_and_ratios_are_per_instance():
    loads = LoadModel()
    a, b = loads.add("a", "collocated"), loads.add("b", "collocated")
    p = loads.add("p", "prefill")
    assert a.model is b.model and a.decode is b.decode
    assert p.model is not a.model and p.decode is not a.decode
    # a runs twice as slow as b at the same load: the shared model sits between, a's ratio rises
    for k in range(200):
        for inst, tpot in (("a", 0.08), ("b", 0.04)):
            t = loads.acquire(inst, 0, 100, now=10.0 * k)
            t.prefill_done(10.0 * k + 1)
            loads[inst].learn_decode(t, output_tokens=11, now=10.0 * k + 1 + 10 * tpot)
            t.release(10.0 * k + 1 + 10 * tpot)
    # shrunk toward 1 (at most 50/70 of the way): 1.24 and 0.76 for a true 1.33 and 0.67
    assert a.decode_ratio.value > 1.2 and b.decode_ratio.value < 0.8
    assert a.decode_ratio.value / b.decode_ratio.value > 1.5
    loads.add("a", "prefill")  # re-registered in another role: takes that role's models
    assert a.model is p.model


def test_prefill_time_counts_the_decode_load_once_learned():
    import random

    from scheduling.load import LOADED_MIN, PrefillTimeModel

    m = PrefillTimeModel(intercept=0.02, slope=5e-5, decay=1.0)
    truth = lambda x, n: 0.01 + 1e-4 * x + 2e-6 * x * n  # noqa: E731  each running request slows prefill
    rng = random.Random(0)
    for k in range(LOADED_MIN - 1):
        x, n = rng.uniform(100, 2000), rng.randint(0, 30)
        m.observe_loaded(x, n, truth(x, n))
    assert m.predict_loaded(1000, 20) == m.predict(1000)  # too few samples yet: the plain fit
    for _ in range(300):
        x, n = rng.uniform(100, 2000), rng.randint(0, 30)
        m.observe_loaded(x, n, truth(x, n))
    assert m.predict_loaded(1000, 20) == pytest.approx(truth(1000, 20), rel=0.01)  # 0.15 s
    assert m.predict_loaded(1000, 0) == pytest.approx(truth(1000, 0), rel=0.02)    # 0.11 s
    assert m.observations == LOADED_MIN - 1 + 300  # the plain fit saw every sample too
