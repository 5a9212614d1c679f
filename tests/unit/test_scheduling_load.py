import pytest

from scheduling.load import LoadModel, PrefillTimeModel


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


def test_ticket_counts_and_releases_exactly_once():
    loads = LoadModel()
    loads.add("p", "prefill")
    t1 = loads.acquire("p", prefill_tokens=100, kv_tokens=120, now=0.0)
    t2 = loads.acquire("p", prefill_tokens=50, kv_tokens=50, now=0.0)
    load = loads["p"]
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (2, 150, 170)
    assert t2.queued_at_dispatch == 150
    t1.prefill_done(now=0.5)
    assert load.prefill_tokens == 50 and load.model.observations == 1
    t1.grow(10)
    assert load.kv_tokens == 180
    t1.release()
    t1.release()
    t1.grow(5)  # after release: ignored
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (1, 50, 50)
    t2.release()  # release without prefill_done also frees the queued tokens
    assert (load.running, load.prefill_tokens, load.kv_tokens) == (0, 0, 0)
    assert load.model.observations == 1


def test_predicted_finish_grows_with_queue():
    loads = LoadModel(prior_intercept=0.01, prior_slope=1e-4)
    load = loads.add("p", "prefill")
    assert load.predicted_prefill_finish(1000, now=5.0) == pytest.approx(5.11)
    loads.acquire("p", 1000, 1000, now=5.0)
    assert load.predicted_prefill_finish(1000, now=5.0) == pytest.approx(5.21)


def test_bad_decay():
    with pytest.raises(ValueError, match="decay"):
        PrefillTimeModel(decay=0)
