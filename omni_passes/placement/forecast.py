"""Forecast: from a per-step load series, the load a placement should be planned for.

Ours (EPLB plans on the window sum): an exponentially weighted mean of the steps whose
half-life is picked by backtesting on the newest steps. Drifting hot spots make recent steps
the better predictor, noisy stable loads the long ones; the plain mean (``None``) is among the
candidates, so a stationary series plans on what EPLB plans on.

All functions are pure: numpy arrays in, new arrays out.
"""

from __future__ import annotations

import numpy as np

HALF_LIVES: tuple[float | None, ...] = (2.0, 5.0, 10.0, 20.0, 50.0, None)


def _ema_weights(steps: int, half_life: float | None) -> np.ndarray:
    """float64 ``[steps]`` summing to 1, newest last; ``None`` = uniform."""
    if half_life is None:
        return np.full(steps, 1.0 / steps)
    w = 0.5 ** ((steps - 1 - np.arange(steps)) / half_life)
    return w / w.sum()


def forecast_loads(
    series: np.ndarray, half_lives: tuple[float | None, ...] = HALF_LIVES, holdout: int | None = None
) -> tuple[np.ndarray, float | None]:
    """Load to plan for, from per-step loads: an exponentially weighted mean whose half-life
    (in steps) is the one that best predicts the newest ``holdout`` steps from the steps
    before them (a backtest; L1 error over all layers and experts).

    Drifting hot spots favour short half-lives, noisy stable loads long ones (``None`` is the
    plain mean, i.e. the window sum that EPLB plans on). One matrix product per pass.

    Args:
        series: float ``[T, L, E]`` loads per step, oldest first.
        holdout: steps held out for the backtest (default ``max(1, T // 5)``).

    Returns:
        (float64 ``[L, E]`` forecast scaled to ``T`` steps, i.e. in window-sum units; the
        half-life chosen). With fewer than 3 steps: the plain sum and ``None``.
    """
    steps = series.shape[0]
    flat = series.reshape(steps, -1).astype(np.float32)
    if steps < 3 or len(half_lives) == 1:
        chosen = half_lives[0] if len(half_lives) == 1 and steps >= 1 else None
        weights = _ema_weights(steps, chosen).astype(np.float32)
        return (weights @ flat).astype(np.float64).reshape(series.shape[1:]) * steps, chosen
    holdout = holdout or max(1, steps // 5)
    fit = flat[: steps - holdout]
    target = flat[steps - holdout :].mean(axis=0)
    weights = np.stack([_ema_weights(steps - holdout, h) for h in half_lives]).astype(np.float32)  # [C, T']
    errors = np.abs(weights @ fit - target).sum(axis=1)
    chosen = half_lives[int(errors.argmin())]
    forecast = _ema_weights(steps, chosen).astype(np.float32) @ flat
    return forecast.astype(np.float64).reshape(series.shape[1:]) * steps, chosen
