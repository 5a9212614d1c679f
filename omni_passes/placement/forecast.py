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


def _shares(loads: np.ndarray) -> np.ndarray:
    """``[..., L, E]`` loads as each layer's expert shares (a layer with no tokens: zeros)."""
    total = loads.sum(axis=-1, keepdims=True)
    return np.divide(loads, total, out=np.zeros_like(loads), where=total > 0)


def forecast_loads(
    series: np.ndarray, half_lives: tuple[float | None, ...] = HALF_LIVES, holdout: int | None = None
) -> tuple[np.ndarray, float | None]:
    """Load to plan for, from per-step loads: an exponentially weighted mean whose half-life
    (in steps) is the one that best predicts the newest ``holdout`` steps from the steps
    before them (a backtest; L1 error of each layer's expert shares, summed over layers).

    The backtest compares shares, not token counts: balancedness is scale-free per layer, and
    steps differ in size by orders of magnitude in serving (a prefill chunk of 8192 tokens next
    to decode steps of 64). On absolute counts the newest decode steps predict the held-out
    decode steps' *size* best, so a half-life of 2 steps won and the plan followed three decode
    steps' sampling noise (vLLM CUDA, DeepSeek-V2-Lite, batch 64: online rebalancing stalled at
    balancedness 0.91 where a plan on the window sum reached 0.997).

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
    layers = series.shape[1:]
    predicted = _shares((weights @ fit).reshape(len(half_lives), *layers))
    errors = np.abs(predicted - _shares(target.reshape(layers))).sum(axis=(1, 2))
    chosen = half_lives[int(errors.argmin())]
    forecast = _ema_weights(steps, chosen).astype(np.float32) @ flat
    return forecast.astype(np.float64).reshape(series.shape[1:]) * steps, chosen
