"""The settings of an IRS certificate and the confidence they give: one torch-free definition.

:class:`IRSSettings` holds what a trial's certificate depends on besides the base cache: the replayed samples
``n_p``, the levels ``alpha_zeta`` and ``alpha_d`` of the zeta and direct bounds, the branch rule (:class:`Mode`) and
what zeta counts (:class:`Zeta`); :meth:`IRSSettings.total_alpha` is the accounting, argued in :mod:`approxtune.irs`:

* ``max``: the larger of the zeta and the direct radius, wrong only if one of three bounds failed:
  ``alpha + alpha_zeta + alpha_d`` (union bound);
* ``gamma``: the paper's threshold on the cached ``p_a``: ``alpha_zeta + max(alpha, alpha_d)``;
* ``tail``: counts and branch decided from cached samples that are never replayed: ``alpha + max(alpha_zeta, alpha_d)``.

It imports no torch, so that reading a study file (:mod:`approxtune.config`) stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

__all__ = ["IRSSettings", "Mode", "Zeta"]


class Mode(StrEnum):
    MAX = "max"
    GAMMA = "gamma"
    TAIL = "tail"


class Zeta(StrEnum):
    """What the zeta bound bounds: losses of c_hat (``f = c_hat != f^p``), as in the paper all ``f^p != f``, or
    losses minus gains (``signed``, a betting bound on the net change of c_hat's frequency)."""

    LOSS = "loss"
    DISAGREEMENT = "disagreement"
    SIGNED = "signed"


@dataclass(frozen=True)
class IRSSettings:
    """``n_p`` replayed samples per input; levels of the zeta and direct bounds; branch rule; what zeta counts.

    Tail mode only: ``n_tail`` cached samples at the end of each input's ``n`` are reserved for decisions and never
    replayed (default ``n // 2``); ``allocate`` spreads the budget ``n_p x (inputs evaluated)`` over the inputs
    (otherwise every input gets ``n_p``); ``block`` is the allocation's step in samples; ``pilot`` tail samples per
    input are run through f^p first (paid from the budget) to estimate the disagreement the plausible radii expect.
    """

    n_p: int
    alpha_zeta: float = 0.001
    alpha_d: float = 0.001
    mode: Mode = Mode.TAIL
    gamma: float = 0.99
    n_tail: int | None = None
    allocate: bool = True
    block: int = 16
    pilot: int = 0
    zeta: Zeta = Zeta.LOSS

    def __post_init__(self) -> None:
        if self.n_p < 1:
            raise ValueError(f"n_p must be at least 1, got {self.n_p}")
        for name in ("alpha_zeta", "alpha_d"):
            if not 0.0 < getattr(self, name) < 0.5:
                raise ValueError(f"{name} must lie in (0, 0.5), got {getattr(self, name)}")
        if not 0.5 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0.5, 1], got {self.gamma}")
        if self.n_tail is not None and self.n_tail < 1:
            raise ValueError(f"n_tail must be at least 1, got {self.n_tail}")
        if self.block < 1:
            raise ValueError(f"block must be at least 1, got {self.block}")
        if self.pilot < 0:
            raise ValueError(f"pilot must be non-negative, got {self.pilot}")
        object.__setattr__(self, "mode", Mode(self.mode))
        object.__setattr__(self, "zeta", Zeta(self.zeta))

    def total_alpha(self, alpha: float) -> float:
        """Probability bound on a wrong IRS certificate, given the base certificate's ``alpha``.

        "max": the union bound ``alpha + alpha_zeta + alpha_d``; "gamma": ``alpha_zeta + max(alpha, alpha_d)`` (a
        threshold on the cached ``p_a``; see the module docstring); "tail": ``alpha + max(alpha_zeta, alpha_d)``
        (branch and count independent of the replayed samples).
        """
        if self.mode is Mode.TAIL:
            return alpha + max(self.alpha_zeta, self.alpha_d)
        if self.mode is Mode.GAMMA:
            return self.alpha_zeta + max(alpha, self.alpha_d)
        return alpha + self.alpha_zeta + self.alpha_d

    def tail_length(self, n: int) -> int:
        """``n_tail`` for a cache of ``n`` samples per input; checks that ``n_p`` stays out of the tail."""
        n_tail = n // 2 if self.n_tail is None else self.n_tail
        if not 1 <= n_tail < n:
            raise ValueError(f"n_tail = {n_tail} must lie in [1, n) for a cache of n = {n}")
        if self.n_p > n - n_tail:
            raise ValueError(
                f"n_p = {self.n_p} reaches into the tail: only the first n - n_tail = {n - n_tail} cached samples "
                "may be replayed when branches and counts are decided from the tail"
            )
        if self.pilot > n_tail or self.pilot >= self.n_p:
            raise ValueError(f"pilot = {self.pilot} must be below n_p = {self.n_p} and at most n_tail = {n_tail}")
        return n_tail
