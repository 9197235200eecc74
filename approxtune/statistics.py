"""Binomial confidence bounds and certified-radius summaries.

Every bound here is a *one-sided* Clopper–Pearson bound (Clopper & Pearson, 1934): for ``k ~ Binomial(n, p)``,

* ``lower_confidence_bound(k, n, alpha)`` is the ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 when ``k = 0``),
  and ``P(p >= lower) >= 1 - alpha`` for every ``p``;
* ``upper_confidence_bound(k, n, alpha)`` is the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)`` (1 when ``k = n``),
  and ``P(p <= upper) >= 1 - alpha`` for every ``p``.

Both are exact (conservative) for every ``n``; they are *not* the two-sided interval, whose ends hold at ``alpha / 2``.

``betting_lower_bound`` bounds the mean of values in [0, 1] (not only 0/1) by betting (Waudby-Smith & Ramdas, 2024):
sound for every ``n`` by Ville's inequality, and as tight as the values' variance allows.

A certified radius follows Cohen et al. (2019): ``sigma * Phi^-1(p_lower)`` when ``p_lower > 1/2``, otherwise the
smoothed classifier abstains and the radius is 0.  The radius of an input also counts as 0 when the smoothed
prediction is not the input's label.  ACR is the mean radius over all evaluated inputs, zeros included.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import betaincinv, ndtri

__all__ = [
    "acr",
    "betting_lower_bound",
    "certified_accuracy",
    "certified_accuracy_curve",
    "lower_confidence_bound",
    "radius",
    "upper_confidence_bound",
]


def _check(k: ArrayLike, n: ArrayLike, alpha: float) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    k_arr = np.asarray(k, dtype=np.float64)
    n_arr = np.asarray(n, dtype=np.float64)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if np.any(n_arr < 1) or np.any(k_arr < 0) or np.any(k_arr > n_arr):
        raise ValueError("binomial bounds need 0 <= k <= n and n >= 1")
    if np.any(k_arr != np.round(k_arr)) or np.any(n_arr != np.round(n_arr)):
        raise ValueError("binomial bounds need whole numbers k and n")
    return np.broadcast_arrays(k_arr, n_arr)  # type: ignore[return-value]


def lower_confidence_bound(k: ArrayLike, n: ArrayLike, alpha: float) -> NDArray[np.float64]:
    """One-sided ``1 - alpha`` Clopper–Pearson lower bound on ``p`` from ``k`` successes in ``n`` trials."""
    k_arr, n_arr = _check(k, n, alpha)
    safe_k = np.maximum(k_arr, 1.0)
    out = betaincinv(safe_k, n_arr - safe_k + 1.0, alpha)  # the alpha quantile of Beta(k, n - k + 1)
    return np.where(k_arr == 0, 0.0, out)


def upper_confidence_bound(k: ArrayLike, n: ArrayLike, alpha: float) -> NDArray[np.float64]:
    """One-sided ``1 - alpha`` Clopper–Pearson upper bound on ``p`` from ``k`` successes in ``n`` trials."""
    k_arr, n_arr = _check(k, n, alpha)
    safe_k = np.minimum(k_arr, n_arr - 1.0)
    out = betaincinv(safe_k + 1.0, n_arr - safe_k, 1.0 - alpha)  # the 1 - alpha quantile of Beta(k + 1, n - k)
    return np.where(k_arr == n_arr, 1.0, out)


BET_CAP = 0.99
"""Largest stake, as a share of what keeps the capital positive: every factor is at least ``1 - BET_CAP``."""


def betting_lower_bound(
    x: ArrayLike,
    seen: ArrayLike,
    n: ArrayLike,
    alpha: float,
    *,
    top: float = 1.0,
    best: ArrayLike | None = None,
    steps: int = 32,
) -> NDArray[np.float64]:
    """One-sided ``1 - alpha`` lower bound on the mean ``mu`` of i.i.d. values in [0, 1], by betting; at most ``top``.

    Row ``i`` of ``x`` holds one sequence; its first ``seen[i]`` values are used, and ``n[i] >= seen[i]`` is the
    number of values the sequence will have in all (fixed in advance).  For a candidate mean ``m`` a gambler bets
    ``lambda_t >= 0`` on ``X_t > m`` and holds the capital ``K_t(m) = prod_{s <= t} (1 + lambda_s (X_s - m))``, with
    the predictable stake (Waudby-Smith & Ramdas, 2024, "hedged capital", one-sided)

        lambda_t = min(sqrt(2 ln(1/alpha) / (n v_{t-1})), BET_CAP / top),
        v_t = (1/4 + sum_{s <= t} (X_s - mu_s)^2) / (t + 1),  mu_t = (1/2 + sum_{s <= t} X_s) / (t + 1),

    which depends only on earlier values, so at ``m = mu`` the capital is a non-negative martingale of mean 1 (every
    factor is positive for ``m <= top``) and Ville's inequality gives ``P(max_t K_t(mu) >= 1/alpha) <= alpha``.  The
    bound is the largest ``m`` in [0, top] that the capital rejects (``max_t K_t(m) >= 1/alpha``; the capital falls
    as ``m`` rises, so bisection finds it from below in ``steps`` halvings): below ``mu`` with probability at least
    ``1 - alpha``.  It depends on the order of the values, not only on their counts.  ``top`` caps the stakes, so it
    must be fixed in advance, never read from the data (a bound clipped lower afterwards, by anything, stays sound).

    With ``best`` (the largest value each position ``seen[i] <= t < n[i]`` can still take), the result is instead an
    upper bound on the bound that all ``n[i]`` values will give, whatever they turn out to be: each missing factor is
    at most ``max(1, 1 + (BET_CAP / top) (best_t - m))``.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    xs = np.atleast_2d(np.asarray(x, dtype=np.float64))
    rows, width = xs.shape
    if not 0.0 < top <= 1.0:
        raise ValueError(f"top must lie in (0, 1], got {top}")
    seen_arr = np.broadcast_to(np.asarray(seen, dtype=np.int64), (rows,))
    n_arr = np.broadcast_to(np.asarray(n, dtype=np.int64), (rows,))
    if np.any(seen_arr < 0) or np.any(seen_arr > n_arr) or np.any(n_arr < 1) or np.any(n_arr > width):
        raise ValueError("betting_lower_bound needs 0 <= seen <= n <= the sequences' length and n >= 1")
    position = np.arange(width)[None, :]
    used = position < seen_arr[:, None]
    xs = np.where(used, xs, 0.0)
    if np.any(xs < 0.0) or np.any(xs > 1.0):
        raise ValueError("betting_lower_bound needs values in [0, 1]")
    t = np.arange(1, width + 1)
    mu = (0.5 + np.cumsum(xs, axis=1)) / (t + 1)
    var = (0.25 + np.cumsum(np.where(used, (xs - mu) ** 2, 0.0), axis=1)) / (t + 1)
    var_before = np.concatenate([np.full((rows, 1), 0.25), var[:, :-1]], axis=1)
    cap = BET_CAP / top
    threshold = np.log(1.0 / alpha)
    stake = np.where(used, np.minimum(np.sqrt(2.0 * threshold / (n_arr[:, None] * var_before)), cap), 0.0)
    best_values, best_counts = np.zeros(0), np.zeros((rows, 0))
    if best is not None:  # each missing value's best, as (distinct value, how many per row): a few columns
        missing = (position >= seen_arr[:, None]) & (position < n_arr[:, None])
        best_arr = np.broadcast_to(np.asarray(best, dtype=np.float64), xs.shape)
        best_values = np.unique(best_arr[missing])
        counted = [(missing & (best_arr == v)).sum(axis=1) for v in best_values]
        best_counts = np.array(counted, dtype=np.float64).reshape(len(best_values), rows).T
    last = int(seen_arr.max()) if rows else 0  # columns past every row's seen values hold no bet
    gain, cost = (stake * xs)[:, :last], stake[:, :last]
    lo, hi = np.zeros(rows), np.full(rows, float(top))
    for _ in range(steps):
        m = (lo + hi) / 2.0
        log_capital = np.cumsum(np.log1p(gain - cost * m[:, None]), axis=1)
        now = log_capital[:, -1] if last else np.zeros(rows)
        rest = best_counts * np.log1p(cap * np.maximum(best_values[None, :] - m[:, None], 0.0))
        score = np.maximum(log_capital.max(axis=1, initial=0.0), now + rest.sum(axis=1))
        rejected = score >= threshold
        lo, hi = np.where(rejected, m, lo), np.where(rejected, hi, m)
    return lo


def radius(p_lower: ArrayLike, sigma: float) -> NDArray[np.float64]:
    """Cohen's radius ``sigma * Phi^-1(p_lower)``; 0 (abstain) where ``p_lower <= 1/2``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        r = sigma * ndtri(np.clip(p, 0.5, 1.0))  # Phi^-1
    return np.where(p > 0.5, r, 0.0)


def acr(radii: ArrayLike) -> float:
    """Average certified radius: the mean over all inputs, abstentions and wrong predictions counted as 0."""
    r = np.asarray(radii, dtype=np.float64)
    return float(r.mean()) if r.size else 0.0


def certified_accuracy(radii: ArrayLike, r: float) -> float:
    """Fraction of inputs predicted correctly (radius > 0) with a certified radius of at least ``r``."""
    rad = np.asarray(radii, dtype=np.float64)
    if not rad.size:
        return 0.0
    return float(np.mean((rad > 0) & (rad >= r)))


def certified_accuracy_curve(radii: ArrayLike, grid: ArrayLike | None = None) -> list[tuple[float, float]]:
    """``(r, certified accuracy at r)`` for each ``r`` of ``grid`` (default: 0 to the largest radius, 21 points)."""
    rad = np.asarray(radii, dtype=np.float64)
    if grid is None:
        top = float(rad.max()) if rad.size else 0.0
        grid = np.linspace(0.0, top, 21)
    return [(float(r), certified_accuracy(rad, float(r))) for r in np.asarray(grid, dtype=np.float64)]
