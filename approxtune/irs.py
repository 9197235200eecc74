"""Incremental Randomized Smoothing (Ugare et al., ICLR 2024): certify g^p from the cache of g.

For an input whose cached certificate predicts its label (``c_hat == label``, ``p_a > 1/2``), IRS replays the first
``n_p`` cached estimation samples through the approximation f^p and, on those same forward passes, computes

* the disagreement bound ``zeta = UpperConfidenceBound(#{f^p != f}, n_p, 1 - alpha_zeta)`` (Algorithm 3); by
  Theorems 2-4, ``P(f^p(x + eps) = c_hat) >= p_a - zeta`` unless the base bound (level ``alpha``) or the zeta bound
  (level ``alpha_zeta``) failed, giving the *zeta radius* ``sigma * Phi^-1(p_a - zeta)``;
* the direct bound ``p_d = LowerConfidenceBound(#{f^p = c_hat}, n_p, 1 - alpha_d)`` on f^p's own counts, giving the
  *direct radius* ``sigma * Phi^-1(p_d)``, wrong only if that bound (level ``alpha_d``) failed.

Modes (both report their true confidence ``1 - (alpha + alpha_zeta + alpha_d)`` by the union bound):

* ``"max"`` (default): the larger of the two radii.  It can be wrong only if one of the three bounds failed.
* ``"gamma"``: the paper's Algorithm 2: the zeta radius when the cached ``p_a < gamma``, the direct radius otherwise
  (the paper runs the direct bound at ``alpha + alpha_zeta``; set ``alpha_d`` to that to reproduce it).  The branch is
  chosen from ``p_a``, which was computed on the very samples that are replayed, so the paper's stated
  ``1 - (alpha + alpha_zeta)`` does not follow from Theorem 4; we report the union bound.

Inputs where g abstained or predicted another class get radius 0 and cost no samples: no zeta can turn them into a
certificate of the true label.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from torch import nn

from approxtune.cache import BaseCache
from approxtune.certification import DEFAULT_BATCH_SIZE, Progress, predict_under_noise
from approxtune.noise import Stream
from approxtune.statistics import acr, certified_accuracy, lower_confidence_bound, radius, upper_confidence_bound

__all__ = ["IRSResult", "IRSSettings", "Mode", "certify_irs", "estimate_zeta", "replay"]


class Mode(StrEnum):
    MAX = "max"
    GAMMA = "gamma"


@dataclass(frozen=True)
class IRSSettings:
    """``n_p`` replayed samples per input; levels of the zeta and direct bounds; branch rule."""

    n_p: int
    alpha_zeta: float = 0.0005
    alpha_d: float = 0.0005
    mode: Mode = Mode.MAX
    gamma: float = 0.99

    def __post_init__(self) -> None:
        if self.n_p < 1:
            raise ValueError(f"n_p must be at least 1, got {self.n_p}")
        for name in ("alpha_zeta", "alpha_d"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must lie in (0, 0.5), got {getattr(self, name)}")
        if not 0.5 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0.5, 1], got {self.gamma}")
        object.__setattr__(self, "mode", Mode(self.mode))

    def total_alpha(self, alpha: float) -> float:
        """Probability bound on a wrong IRS certificate, given the base certificate's ``alpha`` (union bound)."""
        return alpha + self.alpha_zeta + self.alpha_d


@dataclass
class IRSResult:
    """Per-input IRS outcome for the cache's inputs, plus the confidence it holds at.

    ``radius``: certified radius counted for ACR (0 unless the cache predicts the label and a branch certifies);
    ``evaluated``: inputs that were replayed; ``disagreements``: #{f^p != f} among the ``n_p`` replayed samples;
    ``zeta``: upper bound on P(f^p != f) (NaN where not evaluated); ``direct_count``: #{f^p = c_hat};
    ``direct_won``: the direct radius was the one reported and was positive.
    """

    radius: np.ndarray
    evaluated: np.ndarray
    disagreements: np.ndarray
    zeta: np.ndarray
    direct_count: np.ndarray
    direct_won: np.ndarray
    n_p: int
    alpha: float

    @property
    def acr(self) -> float:
        return acr(self.radius)

    @property
    def samples(self) -> int:
        return int(self.evaluated.sum()) * self.n_p

    @property
    def mean_zeta(self) -> float:
        return float(np.nanmean(self.zeta)) if self.evaluated.any() else float("nan")

    @property
    def direct_share(self) -> float:
        """Share of the evaluated inputs whose reported radius came from the direct bound."""
        return float(self.direct_won[self.evaluated].mean()) if self.evaluated.any() else 0.0

    def certified_accuracy(self, r: float) -> float:
        return certified_accuracy(self.radius, r)


def replay(
    model_p: nn.Module,
    x: torch.Tensor,
    cache: BaseCache,
    rows: np.ndarray,
    n_p: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """f^p's class on the first ``n_p`` cached estimation samples of the inputs ``rows`` (``x`` holds all inputs)."""
    if n_p > cache.meta.n:
        raise ValueError(f"n_p = {n_p} exceeds the cache's n = {cache.meta.n}: IRS can only replay cached samples")
    if len(x) != len(cache):
        raise ValueError(f"{len(x)} inputs given for a cache of {len(cache)} inputs")
    return predict_under_noise(
        model_p,
        x[torch.as_tensor(rows, dtype=torch.long)],
        cache.seed[rows],
        Stream.ESTIMATION,
        0,
        n_p,
        cache.meta.sigma,
        batch_size=batch_size,
        block_size=cache.meta.block_size,
        device=device,
        progress=progress,
    )


def _disagreements(preds_p: np.ndarray, cache: BaseCache, rows: np.ndarray, n_p: int) -> np.ndarray:
    return (preds_p != np.asarray(cache.predictions[rows, :n_p])).sum(axis=1)


def estimate_zeta(
    model_p: nn.Module,
    x: torch.Tensor,
    cache: BaseCache,
    n_p: int,
    alpha_zeta: float,
    **kwargs,
) -> np.ndarray:
    """Algorithm 3: ``zeta_x``, a ``1 - alpha_zeta`` upper bound on ``P(f^p(x + eps) != f(x + eps))``, every input."""
    rows = np.arange(len(cache))
    preds = replay(model_p, x, cache, rows, n_p, **kwargs)
    return upper_confidence_bound(_disagreements(preds, cache, rows, n_p), n_p, alpha_zeta)


def certify_irs(
    model_p: nn.Module,
    x: torch.Tensor,
    cache: BaseCache,
    settings: IRSSettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> IRSResult:
    """Certify the smoothed approximation g^p on the cache's inputs (``x``: the same inputs, in cache order)."""
    n_p, sigma = settings.n_p, cache.meta.sigma
    rows = np.flatnonzero(cache.certified)
    preds = replay(model_p, x, cache, rows, n_p, batch_size=batch_size, device=device, progress=progress)

    disagreements = _disagreements(preds, cache, rows, n_p)
    zeta = upper_confidence_bound(disagreements, n_p, settings.alpha_zeta) if len(rows) else np.zeros(0)
    r_zeta = radius(cache.p_a[rows] - zeta, sigma)
    direct_count = (preds == cache.c_hat[rows, None]).sum(axis=1)
    p_direct = lower_confidence_bound(direct_count, n_p, settings.alpha_d) if len(rows) else np.zeros(0)
    r_direct = radius(p_direct, sigma)
    use_direct = (r_direct > r_zeta) if settings.mode is Mode.MAX else (cache.p_a[rows] >= settings.gamma)
    chosen = np.where(use_direct, r_direct, r_zeta)

    n = len(cache)
    out = IRSResult(
        radius=np.zeros(n),
        evaluated=np.zeros(n, dtype=bool),
        disagreements=np.zeros(n, dtype=np.int64),
        zeta=np.full(n, np.nan),
        direct_count=np.zeros(n, dtype=np.int64),
        direct_won=np.zeros(n, dtype=bool),
        n_p=n_p,
        alpha=settings.total_alpha(cache.meta.alpha),
    )
    out.radius[rows] = chosen
    out.evaluated[rows] = True
    out.disagreements[rows] = disagreements
    out.zeta[rows] = zeta
    out.direct_count[rows] = direct_count
    out.direct_won[rows] = use_direct & (chosen > 0)
    return out
