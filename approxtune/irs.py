"""Incremental Randomized Smoothing (Ugare et al., ICLR 2024): certify g^p from the cache of g.

For an input whose cached certificate predicts its label (``c_hat == label``, ``p_a > 1/2``), IRS replays the first
``n_p`` cached estimation samples through the approximation f^p and, on those same forward passes, computes

* the bound ``zeta`` on the probability that f^p loses c_hat where f had it, giving the *zeta radius*
  ``sigma * Phi^-1(p_a - zeta)``, wrong only if the base bound (level ``alpha``) or the zeta bound (level
  ``alpha_zeta``) failed (below);
* the direct bound ``p_d = LowerConfidenceBound(#{f^p = c_hat}, n_p, 1 - alpha_d)`` on f^p's own counts, giving the
  *direct radius* ``sigma * Phi^-1(p_d)``, wrong only if that bound (level ``alpha_d``) failed.

Modes:

* ``"max"``: the larger of the two radii.  It can be wrong only if one of the three bounds failed:
  confidence ``1 - (alpha + alpha_zeta + alpha_d)`` by the union bound.
* ``"gamma"``: the paper's Algorithm 2: the zeta radius when the cached ``p_a < gamma``, the direct radius otherwise.
  The branch is chosen from ``p_a``, which was computed on the very samples that are replayed, so Theorem 4 alone
  does not give the paper's ``1 - (alpha + alpha_zeta)``.  A threshold does: let p = P(f = c_hat).  If p < gamma,
  the direct branch is taken only when ``p_a >= gamma > p``, i.e. when the base bound failed (A), so a wrong radius
  needs A or Z (zeta bound failed): ``<= alpha + alpha_zeta``.  If p >= gamma, A forces ``p_a > p >= gamma`` and
  the direct branch, so the zeta branch is taken only when the base bound held and a wrong radius needs Z or D
  (direct bound failed): ``<= alpha_zeta + alpha_d``.  Hence confidence ``1 - (alpha_zeta + max(alpha, alpha_d))``:
  the paper's ``1 - (alpha + alpha_zeta)`` when ``alpha_d <= alpha`` (the paper runs the direct bound at
  ``alpha + alpha_zeta``, which gives ``1 - (alpha + 2 alpha_zeta)``; set ``alpha_d`` to that to reproduce it).
* ``"tail"`` (default): per-input sample counts and branches decided from the *tail* of the cache only (below);
  confidence ``1 - (alpha + max(alpha_zeta, alpha_d))``.  It certifies the most per sample of the three
  (benchmarks/RESULTS.md, benchmarks/study_results.md).

Every mode can run in stages (:class:`IRSRun`): the plan (inputs, counts, branches) is fixed before f^p sees a
replayed sample, and a run stopped early reports nothing, so racing candidates against each other costs no
confidence.

Inputs where g abstained or predicted another class get radius 0 and cost no samples: no zeta can turn them into a
certificate of the true label.

What zeta counts
----------------
The paper (Algorithm 3, Theorems 2-4) bounds the disagreement: ``zeta = UCB(#{f^p != f}, n_p, alpha_zeta)``, an
upper bound on ``P(f^p != f)``, and uses ``P(f^p = c_hat) >= P(f = c_hat) - P(f^p != f)``.  Only one kind of
disagreement can lower the probability of c_hat: a *loss*, a sample on which f predicts c_hat and f^p does not.  As
events, ``{f^p = c_hat}`` contains ``{f = c_hat}`` minus the losses ``{f = c_hat, f^p != c_hat}``, so

    P(f^p = c_hat) >= P(f = c_hat) - P(f = c_hat, f^p != c_hat) >= p_a - zeta_loss,
    zeta_loss = UCB(#{f = c_hat, f^p != c_hat}, n_p, alpha_zeta),

wrong only if the base bound (A) or the loss bound (Z, a Clopper-Pearson bound on the i.i.d. loss indicators, level
``alpha_zeta``) failed: the same events and the same confidence as the paper's zeta.  The losses are a subset of
the disagreements on every sample, and the bound is monotone in the count, so ``zeta_loss`` is never larger and the
zeta radius never smaller.  ``zeta = "loss"`` (default) counts losses, ``"disagreement"`` reproduces the paper.

``zeta = "signed"`` adds back the *gains* (f^p = c_hat where f had another class) without splitting ``alpha_zeta``.
With ``D = 1{f^p = c_hat} - 1{f = c_hat}`` on each sample, exactly

    P(f^p = c_hat) = P(f = c_hat) + E[D] >= p_a - zeta_signed,
    zeta_signed = max(-(1 - p_a) / 2, -LB(E[D])),

with ``LB`` a ``1 - alpha_zeta`` lower bound on the mean of the i.i.d. values ``D`` (in {-1, 0, 1}) computed by
betting (:func:`approxtune.statistics.betting_lower_bound` on ``(D + 1) / 2``, :func:`signed_zeta`), at most
``SIGNED_REACH`` = 1/8.  That reach is fixed in advance because it caps the bound's stakes, which must not read the
data; the floor ``-(1 - p_a) / 2``, which keeps ``p_a - zeta`` below 1 and every radius finite, may, since raising
an upper bound keeps it sound.  The radius is wrong only if the base bound (A) or that one bound (Z) failed, the
same events and confidence as the other rules.  A Clopper-Pearson
bound needs 0/1 values, so a count-based bound on losses minus gains would need two bounds and a split of
``alpha_zeta``, which costs more than the gains return (benchmarks/zeta_results.md).  The betting bound's width
follows the variance of D, so it wins where f^p both loses and gains c_hat on a few percent of the samples (pruned
models), and it is slightly wider than Clopper-Pearson where f^p never disagrees.  It reads the replayed values in
order: IRSRun keeps them, and racing's optimistic bound (:meth:`IRSRun.upper_acr`) must allow a gain on every
remaining sample where f misses c_hat, so it stops fewer trials than with the other rules.

Tail mode: decisions from samples that f^p never sees
------------------------------------------------------
The cache holds f's class on ``n`` i.i.d. estimation samples eps_1..eps_n of each input (c_hat comes from the
independent selection stream).  Split them into the *prefix* eps_1..eps_m, ``m = n - n_tail``, the only samples any
replay may touch, and the *tail* eps_{m+1}..eps_n, which f^p never sees.  For input i the tail gives
``q_i = #{f = c_hat on the tail} / n_tail``, an estimate of ``P(f = c_hat)``; from it alone (never from ``p_a``, which
is computed on all ``n`` samples, prefix included) we judge the radius each branch can *plausibly* reach with ``k``
samples, treating f's tail frequency as f^p's expected frequency of c_hat and zero disagreement as the expected one:

* direct: ``sigma Phi^-1(LCB(round(k q_i), k, alpha_d))``;
* zeta: ``sigma Phi^-1(p~_i - UCB(0, k, alpha_zeta))``, ``p~_i = LCB(round(n q_i), n, alpha)`` standing in for p_a.

The budget ``n_p x (inputs evaluated)`` is split by equalising the marginal plausible radius per sample (greedy in
blocks of ``block`` samples over the upper concave hull of each input's plausible-radius curve, capped at ``m``);
inputs whose plausible radius is 0 at every count get none.  Optionally (``pilot``) f^p first runs on the first
``pilot`` tail samples of each input (paid from the budget); what zeta counts there (losses or disagreements),
shrunk halfway to the pooled rate, gives the rate ``d_i`` and the drop of c_hat's frequency ``l_i`` that the
plausible radii expect (f^p's frequency ``q_i - l_i``, zeta ``UCB(round(k d_i), k, alpha_zeta)``) -- still samples
that no replay uses.  Each input then replays its own ``k_i <= m`` samples and reports the radius of the branch that
is plausibly larger at ``k_i``; IRS refuses any ``n_p`` or count reaching into the tail.

Why this costs nothing. Let A = {p_a > P(f = c_hat)} (probability <= alpha), Z_k = {zeta_k < P(what zeta counts)}
and D_k = {p_d,k > P(f^p = c_hat)}, zeta_k and p_d,k computed on f^p's and f's classes on eps_1..eps_k. Let T be
everything the decisions read: every input's tail and selection samples, f^p's classes on the pilot samples (part of
the tail), and (for the gate "g certifies the label", p_a > 1/2) the other inputs' caches. Given T, input i's prefix
samples are still i.i.d. N(0, sigma^2 I), so with (k_i, b_i) a function of T, P(Z_k_i | T) <= alpha_zeta and
P(D_k_i | T) <= alpha_d. The zeta branch can be wrong only under A or Z, the direct branch only under D, hence

    P(wrong) <= P(A) + E[1{b_i = zeta} P(Z | T)] + E[1{b_i = direct} P(D | T)]
            <= alpha + alpha_zeta P(zeta branch) + alpha_d P(direct branch) <= alpha + max(alpha_zeta, alpha_d).

A cannot be conditioned the same way (p_a reads the tail too, so A may fall entirely on the zeta branch), so alpha
is paid in full and the level is *not* max(alpha + alpha_zeta, alpha_d); but conditionally on either branch the
zeta/direct bounds keep their own levels (tests/test_irs_tail.py checks the direct one against its exact value).
Input i's own gate (p_a > 1/2) only *removes* certificates: on the event that i is evaluated its count and branch
equal those of a rule that reads T alone, and a subset of an event is no more likely. Had the branch read p_a or the
replayed prefix, {b = direct} would be correlated with D (p_a and f's prefix counts move with f^p's prefix counts)
and only the union bound ``alpha + alpha_zeta + alpha_d`` would remain (or, for a fixed-n_p threshold on p_a, the
finer max(alpha + alpha_zeta, alpha_zeta + alpha_d) of the design notes); a *count* chosen by looking at the
replayed samples (optional stopping) breaks even the union bound.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from approxtune.accounting import IRSSettings, Mode, Zeta
from approxtune.cache import BaseCache
from approxtune.certification import DEFAULT_BATCH_SIZE, Progress, predict_under_noise
from approxtune.data import Inputs
from approxtune.noise import Stream
from approxtune.statistics import (
    acr,
    betting_lower_bound,
    certified_accuracy,
    lower_confidence_bound,
    radius,
    upper_confidence_bound,
)

__all__ = [
    "IRSResult",
    "IRSRun",
    "IRSSettings",
    "Mode",
    "Zeta",
    "allocate_samples",
    "certify_irs",
    "estimate_zeta",
    "plausible_radii",
    "replay",
    "signed_room",
    "signed_zeta",
    "tail_frequency",
]


def zeta_count(preds_p: np.ndarray, preds_f: np.ndarray, c_hat: np.ndarray, rule: Zeta) -> np.ndarray:
    """The per-sample indicators that ``rule``'s zeta counts, from f^p's and f's classes on the same samples.

    ``signed`` counts the losses here too: that is the rate a tail-mode pilot feeds the plausible radii.
    """
    dis = preds_p != preds_f
    return dis if rule is Zeta.DISAGREEMENT else dis & (preds_f == c_hat[:, None])


SIGNED_REACH = 0.125
"""How far below 0 the signed zeta's betting bound may reach (fixed in advance: it caps the bound's stakes)."""


def signed_room(cache: BaseCache, rows: np.ndarray) -> np.ndarray:
    """How far below 0 the signed zeta of each input may go: ``(1 - p_a) / 2``, so that ``p_a - zeta < 1``."""
    return (1.0 - np.clip(cache.p_a[rows], 0.0, 1.0)) / 2.0


def signed_zeta(
    net: np.ndarray,
    seen: np.ndarray | int,
    counts: np.ndarray | int,
    alpha_zeta: float,
    f_hits: np.ndarray | None = None,
    room: np.ndarray | float = 0.0,
) -> np.ndarray:
    """``1 - alpha_zeta`` upper bound on ``P(f = c_hat) - P(f^p = c_hat)`` (losses minus gains), at least ``-room``.

    ``net`` holds ``1{f^p = c_hat} - 1{f = c_hat}`` (-1 a loss, +1 a gain, 0 otherwise) per replayed sample, in
    replay order; the first ``seen`` of each row's ``counts`` are used.  The bound is ``max(1 - 2 L, -room)`` with
    ``L`` the betting lower bound on the mean of ``(net + 1) / 2`` (values 0, 1/2, 1) up to ``(1 + SIGNED_REACH) / 2``,
    a range fixed in advance because it caps the stakes.  Zeta is negative (f^p has c_hat more often than f) by at
    most ``room`` (default 0; IRS passes ``(1 - p_a) / 2``, which keeps ``p_a - zeta`` below 1); that clip may read
    the data, since raising an upper bound keeps it sound.  With ``f_hits`` (``f = c_hat`` on every position, known
    from the cache) it is instead the smallest zeta the full ``counts`` could give: a sample not yet replayed is at
    best a gain where f misses c_hat and an agreement where f has it.
    """
    x = (np.asarray(net, dtype=np.float64) + 1.0) / 2.0
    best = None if f_hits is None else np.where(f_hits, 0.5, 1.0)
    top = (1.0 + SIGNED_REACH) / 2.0
    return np.maximum(1.0 - 2.0 * betting_lower_bound(x, seen, counts, alpha_zeta, top=top, best=best), -room)


@dataclass
class IRSResult:
    """Per-input IRS outcome for the cache's inputs, plus the confidence it holds at.

    ``radius``: certified radius counted for ACR (0 unless the cache predicts the label and a branch certifies);
    ``evaluated``: inputs that were replayed; ``disagreements``: #{f^p != f} among the replayed samples; ``losses``:
    #{f = c_hat != f^p} among them; ``zeta``: the zeta bound the settings chose (on the losses, the disagreements or
    losses minus gains; NaN where not evaluated); ``direct_count``: #{f^p = c_hat};
    ``direct_won``: the direct radius was the one reported and was positive; ``counts``: samples replayed per input
    (``n_p`` on evaluated inputs except in tail mode); ``branch_direct``: the branch chosen (True: direct) on evaluated
    inputs, whatever its radius; ``n_tail``: samples reserved for decisions (tail mode, else 0).
    """

    radius: np.ndarray
    evaluated: np.ndarray
    disagreements: np.ndarray
    zeta: np.ndarray
    direct_count: np.ndarray
    direct_won: np.ndarray
    n_p: int
    alpha: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    branch_direct: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    n_tail: int = 0
    pilot_samples: int = 0
    losses: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def acr(self) -> float:
        return acr(self.radius)

    @property
    def samples(self) -> int:
        if len(self.counts) == len(self.evaluated):
            return int(self.counts.sum()) + self.pilot_samples
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
    inputs: Inputs,
    cache: BaseCache,
    rows: np.ndarray,
    n_p: int,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> np.ndarray:
    """f^p's class on the first ``n_p`` cached estimation samples of the inputs ``rows`` of ``inputs`` (the cache's own
    inputs, in its order: anything else is refused)."""
    if n_p > cache.meta.n:
        raise ValueError(f"n_p = {n_p} exceeds the cache's n = {cache.meta.n}: IRS can only replay cached samples")
    cache.check_inputs(inputs)
    return predict_under_noise(
        model_p,
        inputs.x[torch.as_tensor(rows, dtype=torch.long)],
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


def estimate_zeta(
    model_p: nn.Module,
    inputs: Inputs,
    cache: BaseCache,
    n_p: int,
    alpha_zeta: float,
    rule: Zeta | str = Zeta.LOSS,
    **kwargs,
) -> np.ndarray:
    """``zeta_x`` of every input: a ``1 - alpha_zeta`` upper bound on what ``rule`` counts, from ``n_p`` samples.

    ``"loss"``: ``P(f(x + eps) = c_hat, f^p(x + eps) != c_hat)``; ``"disagreement"`` (the paper's Algorithm 3):
    ``P(f^p(x + eps) != f(x + eps))``; ``"signed"``: ``P(f = c_hat) - P(f^p = c_hat)``, at least
    ``-(1 - p_a) / 2`` and ``-SIGNED_REACH`` (:func:`signed_zeta`).
    """
    rows = np.arange(len(cache))
    preds = replay(model_p, inputs, cache, rows, n_p, **kwargs)
    preds_f, c_hat = np.asarray(cache.predictions[rows, :n_p]), cache.c_hat[rows, None]
    if Zeta(rule) is Zeta.SIGNED:
        net = (preds == c_hat).astype(np.int8) - (preds_f == c_hat)
        return signed_zeta(net, n_p, n_p, alpha_zeta, room=signed_room(cache, rows))
    counted = zeta_count(preds, preds_f, cache.c_hat[rows], Zeta(rule))
    return upper_confidence_bound(counted.sum(axis=1), n_p, alpha_zeta)


def tail_frequency(cache: BaseCache, rows: np.ndarray, n_tail: int) -> np.ndarray:
    """Share of the last ``n_tail`` cached samples of each input in ``rows`` on which f predicted ``c_hat``."""
    n = cache.meta.n
    if not 1 <= n_tail < n:
        raise ValueError(f"n_tail = {n_tail} must lie in [1, n) for a cache of n = {n}")
    if not len(rows):
        return np.zeros(0)
    tail = np.asarray(cache.predictions[rows, n - n_tail :])
    return (tail == cache.c_hat[rows, None]).sum(axis=1) / n_tail


def plausible_radii(
    q: np.ndarray,
    k: np.ndarray,
    *,
    n: int,
    alpha: float,
    alpha_zeta: float,
    alpha_d: float,
    sigma: float,
    d: np.ndarray | float = 0.0,
    drop: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(direct, zeta)`` radii plausibly reached with ``k`` replayed samples when f's tail frequency of c_hat is ``q``.

    direct: ``sigma Phi^-1(LCB(round(k q), k, alpha_d))`` (the expected count of c_hat, not the best case);
    zeta: ``sigma Phi^-1(LCB(round(n q), n, alpha) - UCB(0, k, alpha_zeta))`` (p_a as the tail predicts it, zeta at its
    zero-count floor).  With an expected rate ``d`` of what zeta counts and an expected drop of the frequency of c_hat
    from f to f^p ``drop`` (default ``d``; both from a pilot on tail samples), f^p's frequency of c_hat is taken as
    ``q - drop`` and zeta as ``UCB(round(k d), k, alpha_zeta)``.  Arguments broadcast; ``k >= 1``.
    """
    drop = d if drop is None else drop
    q, k, d, drop = np.broadcast_arrays(
        np.asarray(q, dtype=np.float64),
        np.asarray(k, dtype=np.int64),
        np.asarray(d, dtype=np.float64),
        np.asarray(drop, dtype=np.float64),
    )
    q_p = np.clip(q - drop, 0.0, 1.0)
    direct = radius(lower_confidence_bound(np.round(k * q_p), k, alpha_d), sigma)
    p_tilde = lower_confidence_bound(np.round(n * q), n, alpha)
    zeta = radius(p_tilde - upper_confidence_bound(np.round(k * np.clip(d, 0.0, 1.0)), k, alpha_zeta), sigma)
    return direct, zeta


def _upper_hull(ks: np.ndarray, rs: np.ndarray) -> list[tuple[int, float]]:
    """Vertices of the upper concave hull of ``(0, 0)`` and the points ``(ks, rs)``, up to the highest radius."""
    top = int(np.argmax(rs))
    hull: list[tuple[int, float]] = [(0, 0.0)]
    for k, r in zip(ks[: top + 1].tolist(), rs[: top + 1].tolist(), strict=True):
        while len(hull) >= 2:
            (k1, r1), (k2, r2) = hull[-2], hull[-1]
            if (r2 - r1) * (k - k1) <= (r - r1) * (k2 - k1):  # the middle point lies on or below the chord
                hull.pop()
            else:
                break
        hull.append((k, r))
    return hull


def allocate_samples(
    q: np.ndarray,
    budget: int,
    cap: int,
    *,
    n: int,
    alpha: float,
    alpha_zeta: float,
    alpha_d: float,
    sigma: float,
    block: int = 16,
    d: np.ndarray | float = 0.0,
    drop: np.ndarray | float | None = None,
) -> np.ndarray:
    """Per-input sample counts (each ``<= cap``) from the tail frequencies ``q`` alone, spending ``budget`` in all.

    Greedy in steps of ``block`` samples on the upper concave hull of each input's plausible radius
    ``max(plausible_radii(q, k))`` over ``k = block, 2 block, .., cap``: the next step always goes to the input whose
    plausible radius rises most per sample, which equalises the marginal radius per sample.  Inputs whose plausible
    radius is 0 at every count get nothing.  Budget left once every input's hull is exhausted is spread over the
    inputs that can be certified, up to ``cap``; so the counts sum to ``min(budget, cap x #certifiable)``.
    """
    q = np.asarray(q, dtype=np.float64)
    if budget < 0 or cap < 0 or block < 1:
        raise ValueError("budget and cap must be non-negative and block positive")
    counts = np.zeros(len(q), dtype=np.int64)
    if not len(q) or cap == 0 or budget == 0:
        return counts
    ks = np.arange(block, cap + 1, block, dtype=np.int64)
    if not len(ks) or ks[-1] != cap:
        ks = np.append(ks, cap)
    d = np.broadcast_to(np.asarray(d, dtype=np.float64), q.shape)
    drop = d if drop is None else np.broadcast_to(np.asarray(drop, dtype=np.float64), q.shape)
    direct, zeta = plausible_radii(
        q[:, None],
        ks[None, :],
        n=n,
        alpha=alpha,
        alpha_zeta=alpha_zeta,
        alpha_d=alpha_d,
        sigma=sigma,
        d=d[:, None],
        drop=drop[:, None],
    )
    curve = np.maximum(direct, zeta)
    useful = np.flatnonzero(curve.max(axis=1) > 0)
    hulls = {int(i): _upper_hull(ks, curve[i]) for i in useful}
    position = dict.fromkeys(hulls, 1)  # index of the hull vertex that the current segment ends at
    heap = []
    for i, hull in hulls.items():
        (k0, r0), (k1, r1) = hull[0], hull[1]
        heapq.heappush(heap, (-(r1 - r0) / (k1 - k0), i))
    left = int(budget)
    while heap and left > 0:
        _, i = heapq.heappop(heap)
        hull, j = hulls[i], position[i]
        step = min(block, hull[j][0] - int(counts[i]), left)
        counts[i] += step
        left -= step
        if counts[i] == hull[j][0]:
            j += 1
            position[i] = j
        if j < len(hull):
            (k0, r0), (k1, r1) = hull[j - 1], hull[j]
            heapq.heappush(heap, (-(r1 - r0) / (k1 - k0), i))
    while left > 0:  # every hull is exhausted: spread what is left over the certifiable inputs, up to cap
        room = useful[counts[useful] < cap]
        if not len(room):
            break
        for i in room:
            step = min(block, cap - int(counts[i]), left)
            counts[i] += step
            left -= step
            if left == 0:
                break
    return counts


def _tail_plan(
    model_p: nn.Module, inputs: Inputs, cache: BaseCache, settings: IRSSettings, **kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Tail mode's decisions, from the tail alone: ``(rows, counts, use_direct, n_tail, pilot samples spent)``.

    Without a pilot they depend on the cache and the settings only, so they are computed once per loaded cache
    (``cache.memo``; the arrays are read-only) and every trial of a study reuses them.
    """
    if settings.pilot:
        return _plan_from_tail(model_p, inputs, cache, settings, **kwargs)
    key = ("tail plan", settings)
    if key not in cache.memo:
        plan = _plan_from_tail(model_p, inputs, cache, settings, **kwargs)
        for array in plan[:3]:
            array.setflags(write=False)
        cache.memo[key] = plan
    return cache.memo[key]


def _plan_from_tail(
    model_p: nn.Module, inputs: Inputs, cache: BaseCache, settings: IRSSettings, **kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    n, sigma, alpha = cache.meta.n, cache.meta.sigma, cache.meta.alpha
    n_tail = settings.tail_length(n)
    prefix = n - n_tail
    gated = np.flatnonzero(cache.certified)
    q = tail_frequency(cache, gated, n_tail)
    levels = {"n": n, "alpha": alpha, "alpha_zeta": settings.alpha_zeta, "alpha_d": settings.alpha_d, "sigma": sigma}
    d = np.zeros(len(gated))
    drop = np.zeros(len(gated))
    pilot = settings.pilot if len(gated) else 0
    if pilot:  # f^p on the first `pilot` tail samples: never replayed, so the decisions stay independent of the prefix
        preds = predict_under_noise(
            model_p,
            inputs.x[torch.as_tensor(gated, dtype=torch.long)],
            cache.seed[gated],
            Stream.ESTIMATION,
            prefix,
            prefix + pilot,
            sigma,
            block_size=cache.meta.block_size,
            **kwargs,
        )
        f_pilot = np.asarray(cache.predictions[gated, prefix : prefix + pilot])
        counted = zeta_count(preds, f_pilot, cache.c_hat[gated], settings.zeta).sum(axis=1)
        lost = (f_pilot == cache.c_hat[gated, None]).sum(axis=1) - (preds == cache.c_hat[gated, None]).sum(axis=1)
        d = (counted + counted.mean()) / (2 * pilot)  # each shrunk halfway to the pooled rate
        drop = (lost + lost.mean()) / (2 * pilot)
    budget = max(0, (settings.n_p - pilot) * len(gated))
    if settings.allocate:
        counts = allocate_samples(q, budget, prefix, block=settings.block, d=d, drop=drop, **levels)
    else:
        counts = np.full(len(gated), settings.n_p - pilot, dtype=np.int64)
    if np.any(counts > prefix):  # never: allocate_samples caps at the prefix; kept as the guard the argument needs
        raise ValueError("a per-input count reaches into the tail")
    keep = counts > 0
    rows, counts, q, d, drop = gated[keep], counts[keep], q[keep], d[keep], drop[keep]
    plaus_direct, plaus_zeta = plausible_radii(q, np.maximum(counts, 1), d=d, drop=drop, **levels)
    return rows, counts, plaus_direct > plaus_zeta, n_tail, pilot * len(gated)


class IRSRun:
    """IRS certification of g^p in stages: a plan fixed before f^p sees a replayed sample, then replay in prefixes.

    The plan: the inputs evaluated (those whose cached certificate predicts the label and whose radius could be
    positive at all), each one's sample count
    (``n_p``, or tail mode's allocation) and, where the mode fixes it in advance, its branch ("gamma": the cached
    ``p_a >= gamma``; "tail": the plausible radii; "max" decides at the end).  :meth:`extend` replays the next samples
    of every input, so a run that is continued never evaluates a sample twice and ends, sample for sample, where
    :func:`certify_irs` ends.  :meth:`upper_acr` bounds the final ACR from what has been replayed so far (sound, not
    statistical: it holds for every outcome of the samples still to come).  Only :meth:`result`, on the full pre-set
    counts, is a certificate; stopping a run early (racing) reports nothing and so costs no confidence.
    """

    def __init__(
        self,
        model_p: nn.Module,
        inputs: Inputs,
        cache: BaseCache,
        settings: IRSSettings,
        *,
        batch_size: int = DEFAULT_BATCH_SIZE,
        device: torch.device | str | None = None,
        progress: Progress | None = None,
    ) -> None:
        cache.check_inputs(inputs)
        self.model_p, self.inputs, self.cache, self.settings = model_p, inputs, cache, settings
        self._kwargs = {"batch_size": batch_size, "device": device, "progress": progress}
        self.n_tail = self.pilot_samples = 0
        if settings.mode is Mode.TAIL:
            self.rows, self.counts, self.branch, self.n_tail, self.pilot_samples = _tail_plan(
                model_p, inputs, cache, settings, **self._kwargs
            )
        else:
            if settings.n_p > cache.meta.n:
                raise ValueError(
                    f"n_p = {settings.n_p} exceeds the cache's n = {cache.meta.n}: IRS can only replay cached samples"
                )
            self.rows = np.flatnonzero(cache.certified)
            self.counts = np.full(len(self.rows), settings.n_p, dtype=np.int64)
            self.branch = cache.p_a[self.rows] >= settings.gamma if settings.mode is Mode.GAMMA else None
        self.seen = np.zeros(len(self.rows), dtype=np.int64)
        self.disagreements = np.zeros(len(self.rows), dtype=np.int64)
        self.losses = np.zeros(len(self.rows), dtype=np.int64)
        self.hits = np.zeros(len(self.rows), dtype=np.int64)
        # signed zeta: 1{f^p = c_hat} - 1{f = c_hat} on every replayed sample, in order (the betting bound reads it),
        # and f = c_hat on every sample a row may replay (racing's optimistic bound reads it)
        width = int(self.counts.max()) if settings.zeta is Zeta.SIGNED and len(self.counts) else 0
        self.net = np.zeros((len(self.rows), width), dtype=np.int8)
        self.f_hits = np.asarray(cache.predictions[self.rows, :width]) == cache.c_hat[self.rows, None]
        # An input whose radius is 0 even at its best (every replayed sample agrees with f and predicts c_hat, or for
        # signed zeta is a gain wherever f misses c_hat) cannot be certified: it is not replayed, its radius stays 0.
        certifiable, _, _ = self._radii(self._zeta(optimistic=True), self.counts)
        keep = certifiable > 0
        self.rows, self.counts, self.net, self.f_hits = (
            a[keep] for a in (self.rows, self.counts, self.net, self.f_hits)
        )
        self.branch = None if self.branch is None else self.branch[keep]
        self.seen, self.disagreements, self.losses, self.hits = (
            a[keep] for a in (self.seen, self.disagreements, self.losses, self.hits)
        )

    @property
    def complete(self) -> bool:
        return bool(np.all(self.seen == self.counts))

    @property
    def samples(self) -> int:
        """Samples f^p has evaluated so far (pilot included)."""
        return int(self.seen.sum()) + self.pilot_samples

    def extend(self, fraction: float = 1.0) -> None:
        """Replay every input's samples up to ``fraction`` of its count, rounded up to whole noise blocks."""
        block = self.cache.meta.block_size
        target = np.minimum(self.counts, -(-np.ceil(self.counts * fraction).astype(np.int64) // block) * block)
        target = np.maximum(target, self.seen)
        active = np.flatnonzero(target > self.seen)
        if not len(active):
            return
        rows, start, stop = self.rows[active], self.seen[active], target[active]
        cache = self.cache
        preds = predict_under_noise(
            self.model_p,
            self.inputs.x[torch.as_tensor(rows, dtype=torch.long)],
            cache.seed[rows],
            Stream.ESTIMATION,
            start,
            stop,
            cache.meta.sigma,
            block_size=block,
            **self._kwargs,
        )
        lo, hi = int(start.min()), int(stop.max())
        width = preds.shape[1]
        cols = np.minimum((start - lo)[:, None] + np.arange(width)[None, :], hi - lo - 1)
        f_preds = np.take_along_axis(np.asarray(cache.predictions[rows, lo:hi]), cols, axis=1)
        used = np.arange(width)[None, :] < (stop - start)[:, None]
        c_hat = cache.c_hat[rows]
        self.disagreements[active] += (zeta_count(preds, f_preds, c_hat, Zeta.DISAGREEMENT) & used).sum(axis=1)
        self.losses[active] += (zeta_count(preds, f_preds, c_hat, Zeta.LOSS) & used).sum(axis=1)
        hit = preds == c_hat[:, None]
        self.hits[active] += (hit & used).sum(axis=1)
        if self.net.shape[1]:
            net = hit.astype(np.int8) - (f_preds == c_hat[:, None])
            where = np.broadcast_to(active[:, None], used.shape)[used], (start[:, None] + np.arange(width))[used]
            self.net[where] = net[used]
        self.seen[active] = stop

    @property
    def zeta_counts(self) -> np.ndarray:
        """What the zeta bound counts so far, per evaluated input (disagreements, or losses for the other rules)."""
        return self.disagreements if self.settings.zeta is Zeta.DISAGREEMENT else self.losses

    def _zeta(self, optimistic: bool = False) -> np.ndarray:
        """Every evaluated input's zeta on its full count, from what has been replayed; ``optimistic``: the smallest
        zeta any outcome of the samples not yet replayed could give (Clopper-Pearson: no further count; signed: a
        gain wherever f misses c_hat)."""
        s = self.settings
        if not len(self.rows):
            return np.zeros(0)
        if s.zeta is not Zeta.SIGNED:
            return upper_confidence_bound(self.zeta_counts, self.counts, s.alpha_zeta)
        f_hits = self.f_hits if optimistic else None
        return signed_zeta(
            self.net, self.seen, self.counts, s.alpha_zeta, f_hits, room=signed_room(self.cache, self.rows)
        )

    def _radii(self, zeta: np.ndarray, hits: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(radius, use_direct, zeta)`` of every evaluated input for the given zeta and hits on the full counts."""
        if not len(self.rows):
            return np.zeros(0), np.zeros(0, dtype=bool), np.zeros(0)
        sigma, s = self.cache.meta.sigma, self.settings
        r_zeta = radius(self.cache.p_a[self.rows] - zeta, sigma)
        r_direct = radius(lower_confidence_bound(hits, self.counts, s.alpha_d), sigma)
        use_direct = r_direct > r_zeta if self.branch is None else self.branch
        return np.where(use_direct, r_direct, r_zeta), use_direct, zeta

    def upper_acr(self) -> float:
        """An upper bound on the ACR :meth:`result` will report, whatever the samples not yet replayed show.

        Every radius grows with #{f^p = c_hat} and falls as zeta rises (Clopper-Pearson bounds are monotone in the
        count), so the radius reached with every remaining sample predicting c_hat and the smallest zeta they could
        give (:meth:`_zeta`) bounds it.  The radii are averaged exactly as :attr:`IRSResult.acr` averages them (over
        every input, zeros included; rounding is monotone), so the bound is never below the final ACR in floating
        point either, and equals it bit for bit when nothing is left to lose: a rival with identical values never
        dominates a trial that would tie it.
        """
        rest = self.counts - self.seen
        optimistic, _, _ = self._radii(self._zeta(optimistic=True), self.hits + rest)
        return acr(self._all_inputs(optimistic))

    def _all_inputs(self, radius: np.ndarray) -> np.ndarray:
        """Every cache input's radius (0 where not evaluated), from the evaluated inputs' ``radius``."""
        out = np.zeros(len(self.cache))
        out[self.rows] = radius
        return out

    def result(self) -> IRSResult:
        """Replay what is left and return the certificate (level ``settings.total_alpha(alpha)``)."""
        self.extend(1.0)
        chosen, use_direct, zeta = self._radii(self._zeta(), self.hits)
        s = self.settings
        out = _result(
            len(self.cache),
            s.n_p,
            s.total_alpha(self.cache.meta.alpha),
            self.rows,
            chosen,
            use_direct,
            self.disagreements,
            self.losses,
            zeta,
            self.hits,
            self.counts,
        )
        out.n_tail = self.n_tail
        out.pilot_samples = self.pilot_samples
        return out


def _result(
    n: int,
    n_p: int,
    alpha: float,
    rows: np.ndarray,
    radius: np.ndarray,
    use_direct: np.ndarray,
    disagreements: np.ndarray,
    losses: np.ndarray,
    zeta: np.ndarray,
    direct_count: np.ndarray,
    counts: np.ndarray | int,
) -> IRSResult:
    """An :class:`IRSResult` for ``n`` inputs holding the given per-row values at ``rows`` (evaluated inputs)."""
    out = IRSResult(
        radius=np.zeros(n),
        evaluated=np.zeros(n, dtype=bool),
        disagreements=np.zeros(n, dtype=np.int64),
        zeta=np.full(n, np.nan),
        direct_count=np.zeros(n, dtype=np.int64),
        direct_won=np.zeros(n, dtype=bool),
        n_p=n_p,
        alpha=alpha,
        counts=np.zeros(n, dtype=np.int64),
        branch_direct=np.zeros(n, dtype=bool),
        losses=np.zeros(n, dtype=np.int64),
    )
    out.radius[rows] = radius
    out.evaluated[rows] = True
    out.disagreements[rows] = disagreements
    out.losses[rows] = losses
    out.zeta[rows] = zeta
    out.direct_count[rows] = direct_count
    out.direct_won[rows] = use_direct & (radius > 0)
    out.counts[rows] = counts
    out.branch_direct[rows] = use_direct
    return out


def certify_irs(
    model_p: nn.Module,
    inputs: Inputs,
    cache: BaseCache,
    settings: IRSSettings,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> IRSResult:
    """Certify the smoothed approximation g^p on the cache's inputs (``inputs``: the cache's own, in its order)."""
    return IRSRun(model_p, inputs, cache, settings, batch_size=batch_size, device=device, progress=progress).result()
