"""Online least squares for the proxy's performance models (pure Python, a few features).

:class:`OnlineLinearFit` fits ``y ~ theta . x`` by exponentially weighted ridge regression:

    minimise  sum_k decay^(n-k) * (y_k - theta . x_k)^2  +  sum_j ridge_j * (theta_j - prior_j)^2

refitted after every ``refit_every``-th sample (and after each of the first 32; a k x k
solve, k <= 4 here: tens of microseconds in Python). The ridge term keeps
coefficients that the data cannot tell apart (features that did not vary yet) at their prior,
so a model fed only low-load samples still predicts with its prior slope instead of noise.
Coefficients flagged ``nonnegative`` are physical costs (seconds per sequence, per token): a
fit that makes one negative is redone with it pinned at 0.

It also tracks the spread of its own prediction errors (each sample is predicted *before* it
is learned), so callers can keep a margin of ``z * residual_std`` to a target.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """x with ``a x = b`` by Gaussian elimination with partial pivoting; None if singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        pivot, largest = col, abs(m[col][col])
        for r in range(col + 1, n):  # the first row of largest magnitude
            size = abs(m[r][col])
            if size > largest:
                pivot, largest = r, size
        if largest < 1e-300:
            return None
        m[col], m[pivot] = m[pivot], m[col]
        top = m[col]
        for r in range(col + 1, n):
            row = m[r]
            f = row[col] / top[col]
            if f:  # row minus f times the pivot row, from this column on
                row[col:] = [v - f * t for v, t in zip(row[col:], top[col:])]
    x = [0.0] * n
    for r in range(n - 1, -1, -1):
        x[r] = (m[r][n] - sum(m[r][c] * x[c] for c in range(r + 1, n))) / m[r][r]
    return x


class OnlineLinearFit:
    """Exponentially weighted ridge regression with a residual tracker (see module docstring)."""

    def __init__(self, prior: Sequence[float], ridge: Sequence[float], decay: float = 0.98,
                 nonnegative: Sequence[bool] | None = None, refit_every: int = 1):
        if len(prior) != len(ridge) or not prior:
            raise ValueError(f"prior and ridge must have the same non-zero length, got {len(prior)} and {len(ridge)}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        if any(r < 0 for r in ridge):
            raise ValueError(f"ridge strengths must not be negative, got {list(ridge)}")
        k = len(prior)
        self.prior = [float(p) for p in prior]
        self.ridge = [float(r) for r in ridge]
        self.decay = decay
        self.nonnegative = list(nonnegative) if nonnegative is not None else [False] * k
        if refit_every < 1:
            raise ValueError(f"refit_every must be at least 1, got {refit_every}")
        self.refit_every = refit_every
        self.theta = list(self.prior)
        self._xx = [[0.0] * k for _ in range(k)]
        self._xy = [0.0] * k
        self.weight = 0.0                  # sum of the samples' current weights
        self.samples = 0
        self._res_sq = 0.0                 # weighted sum of squared prediction errors
        self._res_w = 0.0

    def predict(self, x: Sequence[float]) -> float:
        total = 0.0
        for t, v in zip(self.theta, x):  # a plain loop: this runs per candidate per request
            total += t * v
        return total

    @property
    def residual_std(self) -> float:
        """Weighted RMS of the errors of predictions made before each sample was learned."""
        return math.sqrt(self._res_sq / self._res_w) if self._res_w > 0 else 0.0

    def observe(self, x: Sequence[float], y: float) -> None:
        if len(x) != len(self.theta):
            raise ValueError(f"expected {len(self.theta)} features, got {len(x)}")
        isfinite = math.isfinite
        if not isfinite(y):
            return
        for v in x:
            if not isfinite(v):
                return
        d = self.decay
        error = y - self.predict(x)
        if self.samples:  # the first prediction is the prior's: no evidence about the fit
            self._res_sq = self._res_sq * d + error * error
            self._res_w = self._res_w * d + 1.0
        xx = self._xx  # rows rebuilt whole: per element the same arithmetic as in place, fewer steps
        for i, xi in enumerate(x):
            xx[i] = [r * d + xi * xj for r, xj in zip(xx[i], x)]
        self._xy = [s * d + xi * y for s, xi in zip(self._xy, x)]
        self.weight = self.weight * d + 1.0
        self.samples += 1
        if self.samples <= 32 or self.samples % self.refit_every == 0:
            self._refit()

    def _refit(self) -> None:
        free = list(range(len(self.theta)))
        pinned: set[int] = set()
        while True:
            a = [[self._xx[i][j] + (self.ridge[i] if i == j else 0.0) for j in free] for i in free]
            b = [self._xy[i] + self.ridge[i] * self.prior[i] for i in free]
            x = solve(a, b)
            if x is None:
                return
            theta = [0.0] * len(self.theta)
            for i, v in zip(free, x):
                theta[i] = v
            negative = [i for i in free if self.nonnegative[i] and theta[i] < 0]
            if not negative:
                self.theta = theta
                return
            pinned.update(negative)
            free = [i for i in free if i not in pinned]


class ShrunkRatio:
    """How one member of a pool deviates from the pool's model: the exponentially weighted
    mean of ``observed / predicted``, shrunk toward 1 by ``prior_weight`` pseudo-samples (with
    ``decay`` 0.98 at most 50 samples count, so it moves at most 50/70 of the way). Noise
    between like instances then does not make the scheduler treat them as different, while a
    slower instance still shows as such after tens of samples."""

    def __init__(self, prior_weight: float = 20.0, decay: float = 0.98, clip: float = 5.0):
        self.prior_weight = prior_weight
        self.decay = decay
        self.clip = clip
        self._sum = 0.0
        self._weight = 0.0

    def observe(self, observed: float, predicted: float) -> None:
        if not (predicted > 0 and observed >= 0 and math.isfinite(observed) and math.isfinite(predicted)):
            return
        r = min(self.clip, max(1.0 / self.clip, observed / predicted))
        self._sum = self._sum * self.decay + r
        self._weight = self._weight * self.decay + 1.0

    @property
    def value(self) -> float:
        return (self._sum + self.prior_weight) / (self._weight + self.prior_weight)
