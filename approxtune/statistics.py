"""Binomial confidence bounds and certified-radius summaries.

Every bound here is a *one-sided* Clopper–Pearson bound (Clopper & Pearson, 1934): for ``k ~ Binomial(n, p)``,

* ``lower_confidence_bound(k, n, alpha)`` is the ``alpha`` quantile of ``Beta(k, n - k + 1)`` (0 when ``k = 0``),
  and ``P(p >= lower) >= 1 - alpha`` for every ``p``;
* ``upper_confidence_bound(k, n, alpha)`` is the ``1 - alpha`` quantile of ``Beta(k + 1, n - k)`` (1 when ``k = n``),
  and ``P(p <= upper) >= 1 - alpha`` for every ``p``.

Both are exact (conservative) for every ``n``; they are *not* the two-sided interval, whose ends hold at ``alpha / 2``.

A certified radius follows Cohen et al. (2019): ``sigma * Phi^-1(p_lower)`` when ``p_lower > 1/2``, otherwise the
smoothed classifier abstains and the radius is 0.  The radius of an input also counts as 0 when the smoothed
prediction is not the input's label.  ACR is the mean radius over all evaluated inputs, zeros included.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.stats import beta, norm

__all__ = [
    "acr",
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
    out = beta.ppf(alpha, safe_k, n_arr - safe_k + 1.0)
    return np.where(k_arr == 0, 0.0, out)


def upper_confidence_bound(k: ArrayLike, n: ArrayLike, alpha: float) -> NDArray[np.float64]:
    """One-sided ``1 - alpha`` Clopper–Pearson upper bound on ``p`` from ``k`` successes in ``n`` trials."""
    k_arr, n_arr = _check(k, n, alpha)
    safe_k = np.minimum(k_arr, n_arr - 1.0)
    out = beta.ppf(1.0 - alpha, safe_k + 1.0, n_arr - safe_k)
    return np.where(k_arr == n_arr, 1.0, out)


def radius(p_lower: ArrayLike, sigma: float) -> NDArray[np.float64]:
    """Cohen's radius ``sigma * Phi^-1(p_lower)``; 0 (abstain) where ``p_lower <= 1/2``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    p = np.asarray(p_lower, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        r = sigma * norm.ppf(np.clip(p, 0.5, 1.0))
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
