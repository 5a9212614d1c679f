"""Online ridge least squares and the shrunk ratio, against hand-computed values."""

import math
import random

import pytest

from scheduling.learn import OnlineLinearFit, ShrunkRatio, solve


def test_solve_and_singular():
    assert solve([[2.0, 1.0], [1.0, 3.0]], [3.0, 5.0]) == pytest.approx([0.8, 1.4])
    assert solve([[1.0, 2.0], [2.0, 4.0]], [1.0, 2.0]) is None


def test_recovers_a_three_feature_law_exactly():
    fit = OnlineLinearFit(prior=(0.0, 0.0, 0.0), ridge=(1e-9, 1e-9, 1e-9), decay=1.0)
    rng = random.Random(3)
    for _ in range(60):
        n, k = rng.uniform(1, 40), rng.uniform(0, 20)
        fit.observe((1.0, n, k), 0.025 + 0.0015 * n + 0.004 * k)
    assert fit.theta == pytest.approx([0.025, 0.0015, 0.004], rel=1e-6)
    assert fit.predict((1.0, 30.0, 10.0)) == pytest.approx(0.025 + 0.045 + 0.04, rel=1e-6)


def test_ridge_keeps_an_unvaried_feature_at_its_prior():
    # feature 2 is always 0: the data cannot say anything about it
    fit = OnlineLinearFit(prior=(0.0, 0.0, 7.0), ridge=(1e-9, 1e-9, 1.0), decay=1.0)
    for n in range(1, 30):
        fit.observe((1.0, float(n), 0.0), 0.01 + 0.002 * n)
    assert fit.theta[2] == pytest.approx(7.0)
    assert fit.theta[:2] == pytest.approx([0.01, 0.002], rel=1e-6)


def test_one_sample_hand_computed():
    # one sample x=(1, 2), y=1, ridge 1 on both toward prior (0, 0):
    # (xx^T + I) theta = x y  ->  [[2, 2], [2, 5]] theta = [1, 2]  ->  theta = (1/6, 1/3)
    fit = OnlineLinearFit(prior=(0.0, 0.0), ridge=(1.0, 1.0), decay=1.0)
    fit.observe((1.0, 2.0), 1.0)
    assert fit.theta == pytest.approx([1 / 6, 1 / 3])


def test_nonnegative_coefficients_are_pinned_not_negative():
    # y falls with x: an unconstrained fit gives slope -1; a cost cannot be negative
    fit = OnlineLinearFit(prior=(0.0, 0.0), ridge=(1e-9, 1e-9), decay=1.0, nonnegative=(True, True))
    for x in range(10):
        fit.observe((1.0, float(x)), 10.0 - x)
    assert fit.theta[1] == 0.0
    assert fit.theta[0] == pytest.approx(5.5)  # the mean of y once the slope is pinned


def test_forgetting_follows_a_change():
    fit = OnlineLinearFit(prior=(0.0,), ridge=(1e-9,), decay=0.9)
    for _ in range(100):
        fit.observe((1.0,), 1.0)
    for _ in range(100):
        fit.observe((1.0,), 3.0)
    assert fit.theta[0] == pytest.approx(3.0, abs=1e-3)


def test_residual_std_is_the_spread_of_prior_predictions():
    fit = OnlineLinearFit(prior=(0.0,), ridge=(1e-9,), decay=1.0)
    # constant model; samples alternate 1, 3: after the first, each is predicted by the mean so far
    ys = [1.0, 3.0, 1.0, 3.0]
    errors = []
    for y in ys:
        if fit.samples:
            errors.append(y - fit.predict((1.0,)))
        fit.observe((1.0,), y)
    assert fit.residual_std == pytest.approx(math.sqrt(sum(e * e for e in errors) / len(errors)))


def test_bad_arguments():
    with pytest.raises(ValueError, match="same non-zero length"):
        OnlineLinearFit(prior=(0.0,), ridge=(1.0, 1.0))
    with pytest.raises(ValueError, match="decay"):
        OnlineLinearFit(prior=(0.0,), ridge=(1.0,), decay=0.0)
    with pytest.raises(ValueError, match="expected 1 features"):
        OnlineLinearFit(prior=(0.0,), ridge=(1.0,)).observe((1.0, 2.0), 1.0)


def test_shrunk_ratio_hand_computed():
    r = ShrunkRatio(prior_weight=20.0, decay=1.0)
    assert r.value == 1.0
    for _ in range(20):
        r.observe(2.0, 1.0)  # twice as slow as predicted, 20 times
    assert r.value == pytest.approx((20 * 2.0 + 20) / (20 + 20))  # 1.5: half way
    r.observe(100.0, 1.0)  # clipped to 5
    assert r.value == pytest.approx((40 + 5.0 + 20) / 41)
    r.observe(1.0, 0.0)  # no prediction: ignored
    assert r.value == pytest.approx(65 / 41)
