"""Unit tests of approxtune.statistics: one-sided Clopper–Pearson and betting bounds, Cohen's radius, ACR, certified
accuracy."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from _mutants import mutant
from scipy.stats import binomtest, norm
from test_soundness import Coverage, assert_flagged, assert_sound, coverage

from approxtune.statistics import (
    BET_CAP,
    acr,
    betting_lower_bound,
    certified_accuracy,
    certified_accuracy_curve,
    lower_confidence_bound,
    radius,
    upper_confidence_bound,
)

# (k, n) pairs: edges, small n, large n, k near 0 and near n.
KN = [(k, n) for n in (1, 2, 5, 10, 37, 100, 1000) for k in sorted({0, 1, n // 3, n // 2, n - 1, n}) if 0 <= k <= n]
ALPHAS = [0.001, 0.01, 0.05, 0.2, 0.45]


def scipy_one_sided(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided ``alpha`` bounds = the ends of scipy's exact two-sided interval at confidence ``1 - 2 alpha``."""
    ci = binomtest(k, n).proportion_ci(confidence_level=1.0 - 2.0 * alpha, method="exact")
    return ci.low, ci.high


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bounds_match_scipy_exact_interval_at_twice_the_level(alpha: float) -> None:
    for k, n in KN:
        low, high = scipy_one_sided(k, n, alpha)
        assert float(lower_confidence_bound(k, n, alpha)) == pytest.approx(low, rel=1e-9, abs=1e-12), (k, n)
        assert float(upper_confidence_bound(k, n, alpha)) == pytest.approx(high, rel=1e-9, abs=1e-12), (k, n)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_bounds_are_not_the_two_sided_ends_at_the_same_level(alpha: float) -> None:
    """The one-sided bound is strictly tighter than the same-level two-sided interval's end (0 < k < n)."""
    k, n = 30, 100
    ci = binomtest(k, n).proportion_ci(confidence_level=1.0 - alpha, method="exact")
    assert float(lower_confidence_bound(k, n, alpha)) > ci.low
    assert float(upper_confidence_bound(k, n, alpha)) < ci.high


@pytest.mark.parametrize("n", [1, 2, 10, 100, 10_000])
@pytest.mark.parametrize("alpha", [0.001, 0.05, 0.3])
def test_exact_edges(n: int, alpha: float) -> None:
    # k = 0: the lower bound is 0 and the upper bound solves (1 - p)^n = alpha.
    assert float(lower_confidence_bound(0, n, alpha)) == 0.0
    assert float(upper_confidence_bound(0, n, alpha)) == pytest.approx(1.0 - alpha ** (1.0 / n), rel=1e-10)
    # k = n: the upper bound is 1 and the lower bound solves p^n = alpha.
    assert float(upper_confidence_bound(n, n, alpha)) == 1.0
    assert float(lower_confidence_bound(n, n, alpha)) == pytest.approx(alpha ** (1.0 / n), rel=1e-10)


def test_floor_quoted_in_the_design_notes() -> None:
    """Zero disagreements in n_p samples still give zeta = 1 - alpha_zeta^(1/n_p) ~ ln(1/alpha_zeta)/n_p."""
    assert float(upper_confidence_bound(0, 100, 0.001)) == pytest.approx(0.0667, abs=5e-4)
    assert float(upper_confidence_bound(0, 1000, 0.001)) == pytest.approx(0.00688, abs=5e-5)


def test_bounds_bracket_the_estimate_and_are_monotone() -> None:
    n = 50
    k = np.arange(n + 1)
    lo = lower_confidence_bound(k, n, 0.05)
    hi = upper_confidence_bound(k, n, 0.05)
    assert np.all(lo <= k / n) and np.all(hi >= k / n)
    assert np.all(np.diff(lo) > 0) and np.all(np.diff(hi) > 0)
    assert np.all((lo >= 0) & (hi <= 1))
    # A smaller alpha (more confidence) gives a wider bound.
    assert np.all(lower_confidence_bound(k, n, 0.01) <= lo) and np.all(upper_confidence_bound(k, n, 0.01) >= hi)


def test_vectorised_inputs_match_scalar_calls_and_broadcast() -> None:
    k = np.array([0, 3, 7, 10, 500])
    n = np.array([10, 10, 10, 10, 1000])
    lo = lower_confidence_bound(k, n, 0.01)
    hi = upper_confidence_bound(k, n, 0.01)
    assert lo.shape == hi.shape == (5,)
    for i in range(5):
        assert lo[i] == float(lower_confidence_bound(int(k[i]), int(n[i]), 0.01))
        assert hi[i] == float(upper_confidence_bound(int(k[i]), int(n[i]), 0.01))
    # A scalar n broadcasts against an array of counts, and a 2-D array keeps its shape.
    grid = np.array([[0, 1], [19, 20]])
    assert lower_confidence_bound(grid, 20, 0.1).shape == (2, 2)
    assert upper_confidence_bound(grid, 20, 0.1)[1, 1] == 1.0
    assert lower_confidence_bound(grid, 20, 0.1)[0, 0] == 0.0
    np.testing.assert_array_equal(lower_confidence_bound(k[:4], 10, 0.01), lo[:4])
    # Empty input gives an empty output.
    assert lower_confidence_bound(np.zeros(0), 10, 0.1).shape == (0,)


@pytest.mark.parametrize(
    ("k", "n", "alpha"),
    [
        (1, 10, 0.0),
        (1, 10, 1.0),
        (1, 10, -0.1),
        (1, 10, 1.5),
        (1, 10, float("nan")),
        (11, 10, 0.05),
        (-1, 10, 0.05),
        (0, 0, 0.05),
        (np.array([1, 11]), 10, 0.05),
    ],
)
def test_bad_bound_arguments_raise(k, n, alpha) -> None:
    bad_alpha = not 0.0 < alpha < 1.0  # NaN too
    match = r"alpha must lie in \(0, 1\)" if bad_alpha else r"need 0 <= k <= n and n >= 1"
    with pytest.raises(ValueError, match=match):
        lower_confidence_bound(k, n, alpha)
    with pytest.raises(ValueError, match=match):
        upper_confidence_bound(k, n, alpha)


def test_radius_is_sigma_times_probit_and_abstains_at_one_half() -> None:
    p = np.array([0.0, 0.3, 0.5, 0.5 + 1e-12, 0.6, 0.9, 0.99, 0.999])
    for sigma in (0.12, 0.25, 1.0):
        r = radius(p, sigma)
        assert r.shape == p.shape
        np.testing.assert_allclose(r[4:], sigma * norm.ppf(p[4:]), rtol=1e-12)
        np.testing.assert_array_equal(r[:3], 0.0)  # abstain: 0, never a negative radius
        assert 0.0 < r[3] < 1e-9
        assert np.all(r >= 0.0)
    assert float(radius(0.8413447460685429, 0.5)) == pytest.approx(0.5, rel=1e-9)  # Phi(1) -> sigma
    assert float(radius(0.5, 1.0)) == 0.0


@pytest.mark.parametrize("sigma", [0.0, -0.25])
def test_radius_rejects_non_positive_sigma(sigma: float) -> None:
    with pytest.raises(ValueError):
        radius(0.9, sigma)


def test_acr_counts_zeros() -> None:
    assert acr([0.0, 0.0, 1.0, 0.5]) == pytest.approx(0.375)
    assert acr([0.0, 0.0]) == 0.0
    assert acr([]) == 0.0
    assert isinstance(acr(np.array([0.25])), float)


def test_certified_accuracy_at_radius() -> None:
    radii = np.array([0.0, 0.0, 0.1, 0.25, 0.5, 1.0])
    # At r = 0 only inputs with a positive radius count (abstentions and wrong predictions are stored as 0).
    assert certified_accuracy(radii, 0.0) == pytest.approx(4 / 6)
    assert certified_accuracy(radii, 0.1) == pytest.approx(4 / 6)  # radius >= r is inclusive
    assert certified_accuracy(radii, 0.2) == pytest.approx(3 / 6)
    assert certified_accuracy(radii, 1.0) == pytest.approx(1 / 6)
    assert certified_accuracy(radii, 1.01) == 0.0
    assert certified_accuracy([], 0.0) == 0.0
    assert certified_accuracy(np.zeros(5), 0.0) == 0.0


def test_certified_accuracy_curve() -> None:
    radii = np.array([0.0, 0.2, 0.4, 1.0])
    curve = certified_accuracy_curve(radii)
    assert len(curve) == 21
    assert curve[0] == (0.0, 0.75)  # r = 0 counts only radius > 0
    assert curve[-1] == (1.0, 0.25)
    rs = [r for r, _ in curve]
    accs = [a for _, a in curve]
    np.testing.assert_allclose(rs, np.linspace(0.0, 1.0, 21))
    assert np.all(np.diff(accs) <= 0)  # non-increasing
    for r, a in curve:
        assert a == certified_accuracy(radii, r)

    custom = certified_accuracy_curve(radii, grid=[0.0, 0.3, 2.0])
    assert custom == [(0.0, 0.75), (0.3, 0.5), (2.0, 0.0)]
    assert all(isinstance(r, float) and isinstance(a, float) for r, a in custom)

    empty = certified_accuracy_curve([])
    assert empty == [(0.0, 0.0)] * 21  # a grid from 0 to the largest radius, 0


def test_radius_of_bound_matches_textbook_example() -> None:
    """Cohen et al.: 100,000 samples all of class A, alpha = 0.001, sigma = 0.25 -> radius 0.25 * Phi^-1(0.001^1e-5)."""
    p = float(lower_confidence_bound(100_000, 100_000, 0.001))
    assert p == pytest.approx(math.exp(math.log(0.001) / 100_000), rel=1e-12)
    assert float(radius(p, 0.25)) == pytest.approx(0.25 * norm.ppf(p), rel=1e-12)
    assert 0.25 * 3.8 < float(radius(p, 0.25)) < 0.25 * 4.0


def test_counts_must_be_whole_numbers():
    with pytest.raises(ValueError, match="whole numbers"):
        lower_confidence_bound(2.5, 10, 0.1)
    with pytest.raises(ValueError, match="whole numbers"):
        upper_confidence_bound(2, 10.5, 0.1)


# ---------------------------------------------------------------------------------------------------------------------
# The betting bound on a mean of values in [0, 1]


def all_sequences(n: int) -> np.ndarray:
    """Every sequence of n values from {0, 1/2, 1}: 3^n rows."""
    digits = np.array(list(itertools.product(range(3), repeat=n)))
    return digits / 2.0


@pytest.mark.parametrize("alpha", [0.05, 0.2, 0.4])
@pytest.mark.parametrize("top", [0.5, 0.5625, 1.0])
def test_betting_bound_exact_coverage_by_enumeration(alpha: float, top: float) -> None:
    """Exact miscoverage over all 3^7 sequences of a three-point distribution, on a grid of its probabilities.

    The bound must be above the true mean with probability at most alpha (Ville's inequality); it never exceeds top,
    and it is not vacuous (it says something, and is wrong somewhere on the grid; at n = 7 it is conservative).
    """
    n = 7
    seqs = all_sequences(n)
    bound = betting_lower_bound(seqs, n, n, alpha, top=top)
    assert np.all((bound >= 0) & (bound <= top))
    k = (seqs * 2).astype(int)
    worst = 0.0
    for p0 in np.linspace(0.0, 1.0, 11):
        for p2 in np.linspace(0.0, 1.0 - p0, 11):
            probs = np.array([p0, 1.0 - p0 - p2, p2])
            prob_seq = np.prod(probs[k], axis=1)
            mean = 0.5 * probs[1] + probs[2]
            miss = float(prob_seq[bound > mean].sum())
            assert miss <= alpha + 1e-12, (probs, miss)
            worst = max(worst, miss)
    assert worst > 0 and bound.max() > 0.25 * top


def test_betting_bound_against_clopper_pearson_on_zeros_and_ones() -> None:
    """On 0/1 values it is a valid bound of the same order as Clopper-Pearson's (order-dependent, slightly wider)."""
    rng = np.random.default_rng(0)
    x = (rng.random((200, 400)) < 0.9).astype(float)
    bet = betting_lower_bound(x, 400, 400, 0.001)
    cp = lower_confidence_bound(x.sum(axis=1), 400, 0.001)
    assert np.all(bet <= x.mean(axis=1)) and np.median(cp - bet) < 0.03
    # The order matters: reversed sequences give other bounds, both valid.
    assert not np.array_equal(bet, betting_lower_bound(x[:, ::-1], 400, 400, 0.001))


def completion_excess(bound, top: float) -> float:
    """How far the final bound of some completion of the unseen values exceeds ``bound(..., best=...)``, the upper
    bound on all of them (0 when it holds): the all-best completion and 20 random ones, 40 rows of 60 values."""
    rng = np.random.default_rng(1)
    rows, n, seen = 40, 60, 20
    best = np.where(rng.random((rows, n)) < 0.2, 1.0, 0.5)
    x = np.minimum(rng.choice([0.0, 0.5, 1.0], size=(rows, n), p=[0.1, 0.8, 0.1]), best)
    upper = bound(x, seen, n, 0.01, top=top, best=best)
    finals = [betting_lower_bound(x, n, n, 0.01, top=top)]
    finals.append(betting_lower_bound(np.where(np.arange(n) < seen, x, best), n, n, 0.01, top=top))
    for _ in range(20):
        rest = np.minimum(rng.choice([0.0, 0.5, 1.0], size=(rows, n)), best)
        finals.append(betting_lower_bound(np.where(np.arange(n) < seen, x, rest), n, n, 0.01, top=top))
    return float(np.max(np.array(finals) - upper[None, :], initial=0.0))


@pytest.mark.parametrize("top", [0.5, 0.5625, 1.0])  # 0.5625: the signed zeta's (1 + SIGNED_REACH) / 2
def test_betting_bound_with_best_bounds_every_completion(top: float) -> None:
    """With ``best``, the result bounds the final bound of every completion of the values not yet seen."""
    assert completion_excess(betting_lower_bound, top) <= 1e-12
    rng = np.random.default_rng(1)
    rows, n, seen = 40, 60, 20
    best = np.where(rng.random((rows, n)) < 0.2, 1.0, 0.5)
    x = np.minimum(rng.choice([0.0, 0.5, 1.0], size=(rows, n), p=[0.1, 0.8, 0.1]), best)
    # Seen in full, nothing is missing: the same bound.
    np.testing.assert_array_equal(
        betting_lower_bound(x, n, n, 0.01, top=top, best=best), betting_lower_bound(x, n, n, 0.01, top=top)
    )
    # Values past seen are ignored without best.
    np.testing.assert_array_equal(
        betting_lower_bound(x, seen, n, 0.01, top=top),
        betting_lower_bound(np.where(np.arange(n) < seen, x, 0.0), seen, n, 0.01, top=top),
    )


def test_an_optimistic_factor_below_one_is_caught() -> None:
    """Mutant: a missing value's factor 1 + (BET_CAP / top)(best - m) without its floor at 1 (for best < m the best
    completion bets nothing there; it cannot be forced to lose)."""
    bad = mutant(
        betting_lower_bound,
        "np.maximum(best_values[None, :] - m[:, None], 0.0)",
        "(best_values[None, :] - m[:, None])",
    )
    assert completion_excess(bad, 0.5625) > 1e-4


def betting_coverage(bound) -> Coverage:
    """The betting bound's miss rate where it is near its level: 20,000 sequences of 100 Bernoulli(0.9) values, alpha
    = 0.1 (the library bound misses about 0.09 of the time there)."""
    x = (np.random.default_rng(7).random((20_000, 100)) < 0.9).astype(float)
    return coverage("betting bound, Bernoulli(0.9), n = 100", bound(x, 100, 100, 0.1) > 0.9, 0.1)


def test_betting_bound_coverage_near_its_level() -> None:
    c = betting_coverage(betting_lower_bound)
    assert_sound(c)
    assert c.rate > 0.8 * c.level, "near its level, or the check could not see a bound that is too high"


def test_a_stake_that_reads_the_current_value_is_caught() -> None:
    """Mutant: the stake of value t computed from v_t, which includes X_t (not predictable): misses about 0.16."""
    bad = mutant(betting_lower_bound, "(n_arr[:, None] * var_before)", "(n_arr[:, None] * var)")
    assert_flagged(betting_coverage(bad))


def betting_by_definition(x, seen, n, alpha, top, best=None, steps=32) -> float:
    """The betting bound of one sequence, written out from its docstring one value at a time (no arrays)."""
    cap, threshold = BET_CAP / top, math.log(1.0 / alpha)
    lo, hi = 0.0, top
    for _ in range(steps):
        m = (lo + hi) / 2.0
        log_capital = best_log = 0.0
        total = squares = 0.0
        var_before = 0.25
        for t in range(1, seen + 1):
            value = float(x[t - 1])
            stake = min(math.sqrt(2.0 * threshold / (n * var_before)), cap)
            log_capital += math.log1p(stake * (value - m))
            best_log = max(best_log, log_capital)
            total += value
            squares += (value - (0.5 + total) / (t + 1)) ** 2
            var_before = (0.25 + squares) / (t + 1)
        score = best_log
        if best is not None:
            rest = sum(math.log1p(cap * max(float(best[t]) - m, 0.0)) for t in range(seen, n))
            score = max(best_log, log_capital + rest)
        lo, hi = (m, hi) if score >= threshold else (lo, m)
    return lo


@pytest.mark.parametrize("top", [0.5625, 1.0])
def test_betting_bound_follows_its_definition(top: float) -> None:
    """Sequences of 0, 1/2, 1 (and of uniform values) of other lengths, seen prefixes and levels, with and without the
    best completion: the vectorised bound is the one-value-at-a-time definition, bit for bit."""
    rng = np.random.default_rng(5)
    width = 50  # wider than every n: columns past n must play no part
    x = rng.choice([0.0, 0.5, 1.0], size=(12, width), p=[0.15, 0.6, 0.25])
    x[6:] = rng.random((6, width))
    seen = np.array([0, 1, 7, 20, 30, 30, 40, 3, 10, 25, 39, 40])
    n = np.array([5, 9, 30, 20, 30, 45, 40, 11, 17, 25, 40, 49])
    best = np.where(rng.random((12, width)) < 0.3, 1.0, 0.5)
    for alpha in (0.01, 0.2):
        plain = betting_lower_bound(x, seen, n, alpha, top=top)
        optimistic = betting_lower_bound(x, seen, n, alpha, top=top, best=best)
        for i in range(12):
            assert plain[i] == betting_by_definition(x[i], seen[i], n[i], alpha, top), (i, alpha)
            assert optimistic[i] == betting_by_definition(x[i], seen[i], n[i], alpha, top, best[i]), (i, alpha)
    assert betting_lower_bound(np.zeros((0, 5)), 0, 5, 0.1).shape == (0,)
    assert betting_lower_bound(np.ones((1, 1)), 1, 1, 0.2)[0] == betting_by_definition([1.0], 1, 1, 0.2, 1.0)


@pytest.mark.parametrize(
    ("x", "seen", "n", "alpha", "top", "match"),
    [
        ([[0.5, 1.5]], 2, 2, 0.1, 1.0, "needs values in \\[0, 1\\]"),
        ([[0.5, -0.5]], 2, 2, 0.1, 1.0, "needs values in \\[0, 1\\]"),
        ([[0.5, 0.5]], 3, 3, 0.1, 1.0, "needs 0 <= seen <= n <= the sequences' length and n >= 1"),
        ([[0.5, 0.5]], 2, 1, 0.1, 1.0, "seen <= n"),
        ([[0.5, 0.5]], -1, 2, 0.1, 1.0, "seen <= n"),
        ([[0.5, 0.5]], 0, 0, 0.1, 1.0, "n >= 1"),
        ([[0.5, 0.5]], 2, 2, 1.0, 1.0, "alpha"),
        ([[0.5, 0.5]], 2, 2, 0.0, 1.0, "alpha"),
        ([[0.5, 0.5]], 2, 2, 0.1, 0.0, "top"),
        ([[0.5, 0.5]], 2, 2, 0.1, 1.5, "top"),
    ],
)
def test_betting_bound_bad_arguments_raise(x, seen, n, alpha, top, match) -> None:
    with pytest.raises(ValueError, match=match):
        betting_lower_bound(x, seen, n, alpha, top=top)


def test_bounds_and_radii_are_scipy_stats_quantiles_bit_for_bit():
    """The bounds call scipy.special's inverse regularised incomplete beta and ndtri (light to import); they are
    exactly scipy.stats' beta.ppf and norm.ppf, so caches and certificates do not change by a bit."""
    from scipy.stats import beta, norm

    rng = np.random.default_rng(0)
    n = rng.integers(1, 100_000, 20_000)
    k = np.minimum(rng.integers(0, 100_000, 20_000), n)
    for alpha in (1e-4, 1e-3, 0.05, 0.3):
        safe = np.maximum(k, 1)
        expected_lower = np.where(k == 0, 0.0, beta.ppf(alpha, safe, n - safe + 1))
        assert np.array_equal(lower_confidence_bound(k, n, alpha), expected_lower)
        top = np.minimum(k, n - 1)
        expected_upper = np.where(k == n, 1.0, beta.ppf(1 - alpha, top + 1, n - top))
        assert np.array_equal(upper_confidence_bound(k, n, alpha), expected_upper)
    p = rng.uniform(0.5, 1, 20_000)
    assert np.array_equal(radius(p, 0.5), np.where(p > 0.5, 0.5 * norm.ppf(p), 0.0))
