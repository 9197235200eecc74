"""Statistical soundness of the certificates against closed-form ground truth (issue 2, item 8).

A certificate's confidence statement is a claim about repetitions: over independent noise, the bound (p_A, zeta, the
IRS radius) is wrong with probability at most its level.  These tests repeat each certificate many times on a model
whose true probabilities are known in closed form and count how often it is wrong.

* Ground truth: a binary linear classifier ``f(x) = argmax(Wx + b)``.  With ``a = w_1 - w_0`` and Gaussian noise,
  ``P(f(x + sigma eps) = 1) = Phi(h)`` with ``h = (a.x + b_1 - b_0) / (sigma |a|)``.  For a second linear classifier
  f^p (f's weights moved along their quantization error, and a lower class-1 bias, so that it is noticeably
  worse), ``P(f != f^p)`` and the probability of a loss ``P(f = c, f^p != c)`` are bivariate-normal orthant
  probabilities with correlation ``rho = a.a_p / (|a| |a_p|)``; g^p's true radius for class c is
  ``sigma Phi^-1(P(f^p = c))``.  The engine checks run once for each thing zeta can count (losses, disagreements),
  each with its own f^p whose count sits at the worst case of the zeta bound; the signed rule (a betting bound on
  ``P(f = c) - P(f^p = c)``) is checked on the losses' f^p.
* Repetitions: the engine path certifies R copies of the same x in one call (each copy gets its own noise seed from
  ``input_seeds(run_seed, index)``, so the copies are independent repetitions); the binomial path draws counts with
  numpy and tests the bound functions alone, with many more repetitions.
* Power: a check can only detect an unsound bound if the sound one is wrong nearly as often as its level allows.
  Every true probability is put just beside a jump of the bound under test (the worst case over p, where a
  Clopper–Pearson bound is wrong with probability ~ its level), and the levels are large (0.1).
* The check: a sound bound's failure count over R independent repetitions is stochastically at most
  Binomial(R, level).  :func:`coverage` flags a count above the ``1 - FALSE_ALARM`` quantile of Binomial(R, level)
  (about level + 3.1 standard deviations), so a sound bound is flagged with probability below 1e-3 per check; the
  seeds are fixed, so CI is deterministic.  Every check also proves its power: a bound wrong 1.5 times as often as
  the level (or as the exact rate it is compared with) would be flagged with probability at least ``POWER``
  (:func:`assert_sound`, :func:`assert_matches_exact`).  The very same check is applied to deliberately wrong bounds
  (a bound at 1.5 and 2 times its level, a normal approximation near p = 1, IRS without zeta, IRS with the base bound
  at 1.5 alpha) and must flag each of them.
* Whole radii: the union bound over-counts (a radius is wrong only when the errors of its bounds add up past the
  truth), so a radius check judged only at the stated level would pass a radius wrong twice as often as it should.
  Where the IRS radius's miss rate has a closed form (modes ``max`` and ``gamma`` with Clopper-Pearson zeta, tail
  mode with fixed counts) it is computed exactly by summing over every outcome of the counts
  (:func:`exact_radius_miss`) and the observed rate must match it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from scipy.optimize import brentq
from scipy.special import gammaln, xlogy
from scipy.stats import binom, multivariate_normal, norm
from torch import nn

from approxtune.cache import BaseCache, CertifySettings, build_base_cache
from approxtune.data import Inputs
from approxtune.irs import IRSResult, IRSSettings, Zeta, certify_irs, estimate_zeta, replay, signed_room, signed_zeta
from approxtune.statistics import lower_confidence_bound, radius, upper_confidence_bound

FALSE_ALARM = 1e-3
"""Probability that the check flags a bound whose miscoverage is at most its level (per check)."""
POWER = 0.99
"""Probability with which every check must flag a bound wrong 1.5 times as often as it may be."""
VIOLATION = 1.5

Bound = Callable[[np.ndarray, int], np.ndarray]


# ---------------------------------------------------------------------------------------------------------------------
# The check


@dataclass(frozen=True)
class Coverage:
    """How often a bound was wrong in ``reps`` independent repetitions, judged against its stated ``level``."""

    name: str
    failures: int
    reps: int
    level: float
    expected: float | None = None  # exact miscoverage where it is known in closed form

    @property
    def rate(self) -> float:
        return self.failures / self.reps

    @property
    def p_value(self) -> float:
        """P(Binomial(reps, level) >= failures): how surprising the count is for a bound that is exactly at level."""
        return float(binom.sf(self.failures - 1, self.reps, self.level))

    @property
    def limit(self) -> int:
        """The largest failure count that the check accepts."""
        return int(binom.isf(FALSE_ALARM, self.reps, self.level))

    @property
    def sound(self) -> bool:
        return self.failures <= self.limit

    def power(self, rate: float) -> float:
        """Probability that the check flags a bound whose true miss rate is ``rate``."""
        return float(binom.sf(self.limit, self.reps, min(rate, 1.0)))

    def __str__(self) -> str:
        exp = "" if self.expected is None else f", exact {self.expected:.4f}"
        verdict = "sound" if self.sound else "FAILS"
        return (
            f"{self.name}: {self.failures}/{self.reps} = {self.rate:.4f} wrong vs level {self.level:.4f} "
            f"(accepts <= {self.limit}, p = {self.p_value:.2g}{exp}) -> {verdict}"
        )


def coverage(
    name: str, wrong: np.ndarray, level: float, expected: float | None = None, quiet: bool = False
) -> Coverage:
    """Judge the boolean per-repetition failure indicators ``wrong`` against ``level``."""
    wrong = np.asarray(wrong, dtype=bool)
    result = Coverage(name, int(wrong.sum()), wrong.size, float(level), expected)
    if not quiet:
        print(result)
    return result


def assert_sound(c: Coverage, powered: bool = True) -> None:
    """Within its level, by a check that would see a bound wrong 1.5 times as often as the level (unless the caller
    says why this one is only a sanity check: ``powered=False``)."""
    assert c.sound, str(c)
    assert c.power(VIOLATION * c.level) >= POWER or not powered, f"{c}: too few repetitions to see {VIOLATION} x"


def assert_flagged(c: Coverage) -> None:
    assert not c.sound, f"the check failed to flag a wrong bound: {c}"


def assert_matches_exact(c: Coverage, powered: bool = True) -> None:
    """The observed rate agrees with the exact miscoverage (two-sided binomial test at FALSE_ALARM).

    This is the check's power made explicit: the repetitions really are independent draws at the true probability,
    so a sound bound is wrong about as often as theory says, not less.
    """
    assert c.expected is not None
    lo, hi = exact_range(c)
    assert lo <= c.failures <= hi, f"{c}: exact miscoverage {c.expected:.4f} predicts {lo:.0f}..{hi:.0f} failures"
    power = binom.sf(hi, c.reps, min(VIOLATION * c.expected, 1.0))
    assert power >= POWER or not powered, f"{c}: too few repetitions to see {VIOLATION} x the exact rate"


def exact_range(c: Coverage) -> tuple[float, float]:
    """The failure counts that agree with the exact miscoverage (two-sided, FALSE_ALARM in all)."""
    return binom.ppf(FALSE_ALARM / 2, c.reps, c.expected), binom.isf(FALSE_ALARM / 2, c.reps, c.expected)


def assert_exceeds_exact(c: Coverage, exact: float) -> None:
    """Wrong more often than the exact miscoverage ``exact`` of the correct certificate allows."""
    hi = exact_range(dataclasses.replace(c, expected=exact))[1]
    assert c.failures > hi, f"the check failed to flag a wrong radius: {c} (the correct one allows <= {hi:.0f})"


def test_the_check_accepts_the_level_and_flags_an_excess() -> None:
    reps, level = 4000, 0.1
    sd = math.sqrt(reps * level * (1 - level))
    assert coverage("at level", np.arange(reps) < reps * level, level).sound
    assert coverage("never wrong", np.zeros(reps, bool), level).sound
    assert coverage("+2.5 sd", np.arange(reps) < reps * level + 2.5 * sd, level).sound
    assert not coverage("+4 sd", np.arange(reps) < reps * level + 4 * sd, level).sound
    assert not coverage("1.5 x the level", np.arange(reps) < 1.5 * reps * level, level).sound
    # The limit is the level plus about 3.1 binomial standard deviations.
    assert 2.9 * sd < coverage("limit", np.zeros(reps, bool), level).limit - reps * level < 3.3 * sd


CHECK_SIZES = [
    # (repetitions, level) of the checks in this file and tests/test_irs_tail.py, tests/test_statistics.py
    (20_000, 0.2),
    (20_000, 0.1),
    (20_000, 0.05),
    (20_000, 0.01),
    (4000, 0.1),
    (4000, 0.3),
    (1500, 0.1),  # the smallest conditional check (a branch of tail mode) that assert_sound accepts
]


@pytest.mark.parametrize(("reps", "level"), CHECK_SIZES)
def test_every_check_flags_one_and_a_half_times_its_level(reps: int, level: float) -> None:
    """Each check run on 200 simulated bounds wrong 1.5 times as often as the level flags at least 98 % of them, and
    at most 1 % of 200 bounds exactly at the level; assert_sound insists on the power it has."""
    rng = np.random.default_rng([reps, round(1e4 * level)])
    over = [coverage("1.5 x", rng.random(reps) < VIOLATION * level, level, quiet=True) for _ in range(200)]
    at = [coverage("at level", rng.random(reps) < level, level, quiet=True) for _ in range(200)]
    assert sum(not c.sound for c in over) >= 196 and sum(not c.sound for c in at) <= 2
    assert over[0].power(VIOLATION * level) >= POWER


# ---------------------------------------------------------------------------------------------------------------------
# Bounds: the library's, and deliberately wrong ones


def exact_miscoverage(bound: Bound, n: int, p: float, side: str) -> float:
    """Exact P(bound(K) is wrong) for K ~ Binomial(n, p): a lower bound above p, an upper bound below p."""
    k = np.arange(n + 1)
    b = bound(k, n)
    wrong = b > p if side == "lower" else b < p
    return float(binom.pmf(k, n, p)[wrong].sum())


def cp_lower(alpha: float) -> Bound:
    return lambda k, n: lower_confidence_bound(k, n, alpha)


def cp_upper(alpha: float) -> Bound:
    return lambda k, n: upper_confidence_bound(k, n, alpha)


def wald_lower(alpha: float) -> Bound:
    """Normal-approximation lower bound: wrong near p = 1 at small n (it says p >= 1 after n successes out of n)."""
    z = norm.ppf(1 - alpha)
    return lambda k, n: k / n - z * np.sqrt(k / n * (1 - k / n) / n)


def wald_upper(alpha: float) -> Bound:
    """Normal-approximation upper bound: zeta = 0 after zero disagreements."""
    z = norm.ppf(1 - alpha)
    return lambda k, n: k / n + z * np.sqrt(k / n * (1 - k / n) / n)


def worst_p(bound: Bound, n: int, target: float, side: str, eps: float = 1e-9) -> float:
    """The p near ``target`` just beside a jump of ``bound``: the worst case for it (miscoverage ~ its level).

    A lower bound is wrong when ``bound(K) > p``; just below a jump value ``bound(k*)`` that event is ``K >= k*``,
    whose probability at ``p = bound(k*)`` is exactly alpha for Clopper–Pearson.  Likewise above an upper bound's jump.
    """
    values = bound(np.arange(n + 1), n)
    values = values[(values > 0) & (values < 1)]
    v = values[np.argmin(np.abs(values - target))]
    return float(v - eps if side == "lower" else v + eps)


def worst_p_for_both(good: Bound, bad: Bound, n: int, target: float, side: str, eps: float) -> float:
    """A p near ``target`` that is (nearly) the worst case for two bounds at once.

    Candidates are the worst-case points of ``good`` within 0.03 of ``target``; the one whose distance to the next
    jump of ``bad`` (on the wrong side) is smallest wins.
    """
    k = np.arange(n + 1)
    gv, bv = good(k, n), bad(k, n)
    best, best_gap = None, math.inf
    for v in gv[np.abs(gv - target) < 0.03]:
        p = v - eps if side == "lower" else v + eps
        beyond = bv[bv > p] if side == "lower" else bv[bv < p]
        if not beyond.size:
            continue
        gap = beyond.min() - p if side == "lower" else p - beyond.max()
        if gap < best_gap:
            best, best_gap = float(p), gap
    assert best is not None
    return best


# ---------------------------------------------------------------------------------------------------------------------
# Binomial path: the bound functions alone, 20,000 repetitions each

BINOMIAL_REPS = 20_000

SOUND_CASES = [
    # (side, n, alpha, target p); p is then moved to the worst case of the Clopper-Pearson bound near the target
    ("lower", 100, 0.1, 0.9),
    ("lower", 20, 0.2, 0.7),
    ("lower", 1000, 0.05, 0.99),
    ("lower", 10_000, 0.01, 0.999),
    ("upper", 100, 0.1, 0.05),
    ("upper", 200, 0.2, 0.01),
    ("upper", 1000, 0.05, 0.003),
]


@pytest.mark.parametrize(("side", "n", "alpha", "target"), SOUND_CASES)
def test_clopper_pearson_coverage_binomial(side: str, n: int, alpha: float, target: float) -> None:
    bound = cp_lower(alpha) if side == "lower" else cp_upper(alpha)
    p = worst_p(bound, n, target, side)
    exact = exact_miscoverage(bound, n, p, side)
    assert 0.85 * alpha < exact <= alpha  # the worst case: a check at this p has power against an excess
    k = np.random.default_rng([n, round(1e6 * alpha), int(side == "upper"), 1]).binomial(n, p, size=BINOMIAL_REPS)
    b = bound(k, n)
    c = coverage(f"CP {side} n={n} p={p:.5f}", b > p if side == "lower" else b < p, alpha, exact)
    assert_sound(c)
    assert_matches_exact(c)


WRONG_CASES = [
    # (name, side, n, alpha, the wrong bound, p); the library's bound is judged on the same draws
    ("lower bound at 2 alpha", "lower", 100, 0.1, cp_lower(0.2), ("worst", 0.9)),
    ("upper bound at 2 alpha", "upper", 100, 0.1, cp_upper(0.2), ("worst", 0.05)),
    ("lower bound at 1.5 alpha", "lower", 100, 0.1, cp_lower(0.15), ("worst", 0.9)),
    ("upper bound at 1.5 alpha", "upper", 1000, 0.05, cp_upper(0.075), ("worst", 0.003)),
    ("Wald lower bound, n=30, p near 1", "lower", 30, 0.1, wald_lower(0.1), 0.97),
    ("Wald upper bound (zeta 0 after 0 disagreements)", "upper", 50, 0.1, wald_upper(0.1), 0.03),
]


@pytest.mark.parametrize(
    ("name", "side", "n", "alpha", "wrong_bound", "p"), WRONG_CASES, ids=[c[0] for c in WRONG_CASES]
)
def test_the_check_flags_wrong_bounds_binomial(name: str, side: str, n: int, alpha: float, wrong_bound, p) -> None:
    if isinstance(p, tuple):
        p = worst_p(wrong_bound, n, p[1], side)
    exact_wrong = exact_miscoverage(wrong_bound, n, p, side)
    assert exact_wrong > 1.4 * alpha  # the bound really is wrong here
    k = np.random.default_rng([n, round(1e6 * alpha), int(side == "upper"), 2]).binomial(n, p, size=BINOMIAL_REPS)

    def judge(label: str, bound: Bound) -> Coverage:
        b = bound(k, n)
        exact = exact_miscoverage(bound, n, p, side)
        return coverage(f"{label} n={n} p={p:.5f}", b > p if side == "lower" else b < p, alpha, exact)

    bad = judge(name, wrong_bound)
    assert_flagged(bad)
    assert_matches_exact(bad, powered=False)  # the draws are what the exact rate says: the flag is no fluke
    good = judge("library CP " + side, cp_lower(alpha) if side == "lower" else cp_upper(alpha))
    assert_sound(good)
    assert_matches_exact(good, powered=False)  # at the wrong bound's p, not the library's worst case


# ---------------------------------------------------------------------------------------------------------------------
# Engine path: build_base_cache (CERTIFY), estimate_zeta and certify_irs on linear classifiers

SHAPE = (1, 4, 4)
DIM = 16
SIGMA = 0.5
N0, N, N_P = 16, 200, 100
ALPHA = ALPHA_ZETA = ALPHA_D = 0.1
ENGINE_REPS = 4000
RUN_SEED = 1
QUANT_STEP = 0.5  # grid of the rounding error that f^p's weights move along (about 2 bits for these weights)
P_TARGET = 0.9  # P(f(x + eps) = 1), moved to a worst case of the base bound
ZETA_TARGET = 0.05  # what zeta counts (P(f^p != f) or P(f = 1 != f^p)), moved to a worst case of the zeta bound
EPS = 1e-5  # distance from the jumps: far above float32 rounding of the weights (~1e-8 in probability)


def linear_model(weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 2))
    with torch.no_grad():
        model[1].weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        model[1].bias.copy_(torch.as_tensor(bias, dtype=torch.float32))
    return model.eval()


def margin(model: nn.Module, x: np.ndarray) -> tuple[np.ndarray, float]:
    """``(u, h)``: class 1 iff ``u . eps > -h`` with ``|u| = 1``; ``P(class 1) = Phi(h)``.  From the float32 weights."""
    w = model[1].weight.detach().double().numpy()
    b = model[1].bias.detach().double().numpy()
    a = w[1] - w[0]
    norm_a = float(np.linalg.norm(a))
    return a / norm_a, float((a @ x + b[1] - b[0]) / (SIGMA * norm_a))


def both_class_one(h1: float, h2: float, rho: float) -> float:
    """P(Z1 <= h1, Z2 <= h2) for standard normals with correlation rho: the orthant where both models say 1."""
    return float(multivariate_normal(mean=[0.0, 0.0], cov=[[1.0, rho], [rho, 1.0]]).cdf([h1, h2]))


def disagreement(h1: float, h2: float, rho: float) -> float:
    """P(f != f^p) = P(f = 1) + P(f^p = 1) - 2 P(both 1)."""
    return norm.cdf(h1) + norm.cdf(h2) - 2.0 * both_class_one(h1, h2, rho)


def loss(h1: float, h2: float, rho: float) -> float:
    """P(f = 1, f^p = 0) = P(f = 1) - P(both 1): the samples on which f^p loses class 1."""
    return norm.cdf(h1) - both_class_one(h1, h2, rho)


@dataclass
class Truth:
    p_f: float  # P(f = 1)
    p_p: float  # P(f^p = 1)
    zeta: float  # P(f != f^p)
    both: float  # P(f = 1 = f^p)
    rho: float
    h_f: float
    h_p: float

    def prob_f(self, c: np.ndarray) -> np.ndarray:
        return np.where(c == 1, self.p_f, 1.0 - self.p_f)

    def prob_p(self, c: np.ndarray) -> np.ndarray:
        return np.where(c == 1, self.p_p, 1.0 - self.p_p)

    def counted(self, rule: Zeta, c: np.ndarray) -> np.ndarray:
        """What ``rule``'s zeta bounds from above: P(f != f^p), or P(f = c != f^p) for the class c."""
        if rule is Zeta.DISAGREEMENT:
            return np.full(np.shape(c), self.zeta)
        return np.where(c == 1, self.p_f - self.both, self.p_p - self.both)

    def radius_p(self, c: np.ndarray) -> np.ndarray:
        """g^p's true radius for class c (negative: g^p does not predict c at all)."""
        return SIGMA * norm.ppf(self.prob_p(c))


def truth_of(f: nn.Module, fp: nn.Module, x: np.ndarray) -> Truth:
    u_f, h_f = margin(f, x)
    u_p, h_p = margin(fp, x)
    rho = float(u_f @ u_p)
    both = both_class_one(h_f, h_p, rho)
    return Truth(norm.cdf(h_f), norm.cdf(h_p), disagreement(h_f, h_p, rho), both, rho, h_f, h_p)


@dataclass
class Engine:
    x: np.ndarray  # the one input, flattened, float64 of its float32 value
    f: nn.Module
    fp: nn.Module
    truth: Truth
    inputs: Inputs
    cache: BaseCache
    rule: Zeta  # what zeta counts
    counted: np.ndarray  # zeta's count in the first N_P replayed samples, every repetition
    preds_p: np.ndarray  # f^p's classes on those samples
    zeta: np.ndarray  # estimate_zeta
    irs: dict[str, IRSResult]
    gamma: float


COUNTED = [Zeta.LOSS, Zeta.DISAGREEMENT]
"""The rules whose zeta is a Clopper-Pearson bound on a count (the signed rule's betting bound has tests of its own)."""


@pytest.fixture(scope="module", params=COUNTED, ids=[z.value for z in COUNTED])
def engine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _engine(tmp_path_factory, request.param)


def _engine(tmp_path_factory: pytest.TempPathFactory, rule: Zeta) -> Engine:
    gen = torch.Generator().manual_seed(7)
    x_img = torch.rand(SHAPE, generator=gen)
    x = x_img.double().flatten().numpy()
    weight = (0.5 * torch.randn((2, DIM), generator=gen)).double().numpy()

    # f: the bias puts P(f = 1) just below a jump of both the alpha and the 2 alpha lower bound at n = N.
    p_f = worst_p_for_both(cp_lower(ALPHA), cp_lower(2 * ALPHA), N, P_TARGET, "lower", EPS)
    a = weight[1] - weight[0]
    bias = np.array([0.0, SIGMA * np.linalg.norm(a) * norm.ppf(p_f) - a @ x])
    f = linear_model(weight, bias)

    # f^p: f's weights moved t times their rounding error to a grid of QUANT_STEP (mimicking quantization), and a
    # new class-1 bias.  Two knobs, three targets met at once with P(f = 1):
    # * P(f^p = 1) just below a jump of the direct bound (alpha_d, N_P), lower than P(f = 1) by ~0.85 zeta;
    # * what zeta counts (P(f != f^p), or the loss P(f = 1 != f^p)) just above a jump of both the alpha_zeta and the
    #   2 alpha_zeta upper bound at N_P: solved for the correlation rho of the two boundaries (both fall as rho
    #   rises), then for t.
    zeta = worst_p_for_both(cp_upper(ALPHA_ZETA), cp_upper(2 * ALPHA_ZETA), N_P, ZETA_TARGET, "upper", EPS)
    u_f, h_f = margin(f, x)
    p_p = worst_p(cp_lower(ALPHA_D), N_P, norm.cdf(h_f) - 0.85 * zeta, "lower", EPS)
    h_p = float(norm.ppf(p_p))
    count = disagreement if rule is Zeta.DISAGREEMENT else loss
    rho = brentq(lambda r: count(h_f, h_p, r) - zeta, 0.0, 1.0 - 1e-9, xtol=1e-15)
    error = np.round(weight / QUANT_STEP) * QUANT_STEP - weight
    a_err = error[1] - error[0]

    def rho_at(t: float) -> float:
        a_p = a + t * a_err
        return float(u_f @ a_p / np.linalg.norm(a_p))

    ts = np.linspace(0.0, 10.0, 1001)
    beyond = np.flatnonzero([rho_at(t) < rho for t in ts])
    assert beyond.size, "the rounding error cannot turn the boundary far enough"
    t = brentq(lambda t: rho_at(t) - rho, ts[beyond[0] - 1], ts[beyond[0]], xtol=1e-15)
    weight_p = weight + t * error
    a_p = weight_p[1] - weight_p[0]
    bias_p = np.array([0.0, SIGMA * np.linalg.norm(a_p) * h_p - a_p @ x])
    fp = linear_model(weight_p, bias_p)
    truth = truth_of(f, fp, x)

    inputs = Inputs(
        x=x_img.expand(ENGINE_REPS, *SHAPE).clone(),
        y=torch.ones(ENGINE_REPS, dtype=torch.int64),
        index=np.arange(ENGINE_REPS, dtype=np.int64),
    )
    settings = CertifySettings(sigma=SIGMA, n0=N0, n=N, alpha=ALPHA, seed=RUN_SEED)
    cache = build_base_cache(f, inputs, tmp_path_factory.mktemp("soundness") / "cache", settings)
    rows = np.arange(ENGINE_REPS)
    preds_p = replay(fp, inputs, cache, rows, N_P)
    preds_f = np.asarray(cache.predictions[:, :N_P])
    counted = preds_p != preds_f
    if rule is Zeta.LOSS:
        counted &= preds_f == cache.c_hat[:, None]
    counted = counted.sum(axis=1)
    zeta_hat = estimate_zeta(fp, inputs, cache, N_P, ALPHA_ZETA, rule)

    # gamma between the two branches: the cached p_A of a typical repetition, so that both are taken often.
    gamma = float(lower_confidence_bound(round(N * truth.p_f), N, ALPHA))
    irs = {
        mode: certify_irs(
            fp,
            inputs,
            cache,
            IRSSettings(n_p=N_P, alpha_zeta=ALPHA_ZETA, alpha_d=ALPHA_D, mode=mode, gamma=gamma, zeta=rule),
        )
        for mode in ("max", "gamma")
    }
    print(
        f"truth ({rule.value}): P(f=1) = {truth.p_f:.6f}, P(f^p=1) = {truth.p_p:.6f}, P(f!=f^p) = {truth.zeta:.6f}, "
        f"P(f=1!=f^p) = {truth.p_f - truth.both:.6f}, rho = {truth.rho:.5f}, t = {t:.3f}, gamma = {gamma:.5f}"
    )
    return Engine(x, f, fp, truth, inputs, cache, rule, counted, preds_p, zeta_hat, irs, gamma)


@pytest.mark.slow
def test_ground_truth_matches_monte_carlo(engine: Engine) -> None:
    """The closed forms against 10^6 independent numpy draws, and against the engine's own pooled samples."""
    t = engine.truth
    w = engine.f[1].weight.detach().double().numpy()
    b = engine.f[1].bias.detach().double().numpy()
    wp = engine.fp[1].weight.detach().double().numpy()
    bp = engine.fp[1].bias.detach().double().numpy()

    # The bivariate-normal orthant from scipy against a one-dimensional integral of the conditional normal.
    s = math.sqrt(1.0 - t.rho**2)
    integral, _ = quad(lambda z: norm.pdf(z) * norm.cdf((t.h_p - t.rho * z) / s), -np.inf, t.h_f, epsabs=1e-13)
    assert both_class_one(t.h_f, t.h_p, t.rho) == pytest.approx(integral, abs=1e-9)

    rng = np.random.default_rng(11)
    total, hits_f, hits_p, hits_d, hits_l = 1_000_000, 0, 0, 0, 0
    for _ in range(4):
        z = engine.x + SIGMA * rng.standard_normal((total // 4, DIM))
        cf = (z @ w.T + b).argmax(axis=1)
        cp = (z @ wp.T + bp).argmax(axis=1)
        hits_f += int((cf == 1).sum())
        hits_p += int((cp == 1).sum())
        hits_d += int((cf != cp).sum())
        hits_l += int(((cf == 1) & (cp != 1)).sum())

    def close(hits: int, count: int, p: float) -> bool:
        return abs(hits / count - p) <= 5.0 * math.sqrt(p * (1 - p) / count)

    assert close(hits_f, total, t.p_f), (hits_f / total, t.p_f)
    assert close(hits_p, total, t.p_p), (hits_p / total, t.p_p)
    assert close(hits_d, total, t.zeta), (hits_d / total, t.zeta)
    assert close(hits_l, total, t.p_f - t.both), (hits_l / total, t.p_f - t.both)

    # The engine's float32 noise and forward passes, pooled over all repetitions (independent seeds).
    preds = np.asarray(engine.cache.predictions)
    assert close(int((preds == 1).sum()), preds.size, t.p_f)
    assert close(int((engine.preds_p == 1).sum()), engine.preds_p.size, t.p_p)
    truth_counted = float(t.counted(engine.rule, np.ones(1))[0])
    ones = engine.cache.c_hat == 1  # the repetitions whose c_hat is class 1 (almost all)
    assert close(int(engine.counted[ones].sum()), int(ones.sum()) * N_P, truth_counted)
    # f^p is noticeably worse than f.
    assert t.p_f - t.p_p > 0.5 * t.zeta


@pytest.mark.slow
def test_cohen_certify_lower_bound_coverage(engine: Engine) -> None:
    """(a) CERTIFY's p_A against the true P(f = c_hat), level alpha; the same counts at 2 alpha must be flagged."""
    cache, t = engine.cache, engine.truth
    np.testing.assert_array_equal(cache.p_a, lower_confidence_bound(cache.count, N, ALPHA))
    assert cache.predictions.shape == (ENGINE_REPS, N)
    true_p = t.prob_f(cache.c_hat)

    # Exact miscoverage: c_hat is 1 unless the n0 selection samples give class 1 at most half the time (argmax
    # takes the first class on a tie).
    p_select_0 = float(binom.cdf(N0 // 2, N0, t.p_f))

    def exact(alpha: float) -> float:
        return (1 - p_select_0) * exact_miscoverage(cp_lower(alpha), N, t.p_f, "lower") + p_select_0 * (
            exact_miscoverage(cp_lower(alpha), N, 1 - t.p_f, "lower")
        )

    assert exact(ALPHA) > 0.85 * ALPHA and exact(2 * ALPHA) > 1.5 * ALPHA  # both near their worst case
    good = coverage("engine p_A (CERTIFY)", cache.p_a > true_p, ALPHA, exact(ALPHA))
    assert_sound(good)
    assert_matches_exact(good)
    wrong_p = lower_confidence_bound(cache.count, N, 2 * ALPHA)
    bad = coverage("engine p_A at 2 alpha (wrong)", wrong_p > true_p, ALPHA, exact(2 * ALPHA))
    assert_flagged(bad)
    assert_matches_exact(bad)


@pytest.mark.slow
def test_zeta_coverage(engine: Engine) -> None:
    """(b) estimate_zeta against the true probability of what it counts, level alpha_zeta; at 2 alpha_zeta it fails.

    Loss rule: counting the gains (f != c_hat = f^p) instead of the losses must be flagged too.
    """
    t, cache = engine.truth, engine.cache
    np.testing.assert_array_equal(engine.zeta, upper_confidence_bound(engine.counted, N_P, ALPHA_ZETA))
    truth = t.counted(engine.rule, cache.c_hat)
    ones = cache.c_hat == 1
    exact = exact_miscoverage(cp_upper(ALPHA_ZETA), N_P, float(truth[ones][0]), "upper")
    exact_2 = exact_miscoverage(cp_upper(2 * ALPHA_ZETA), N_P, float(truth[ones][0]), "upper")
    assert exact > 0.85 * ALPHA_ZETA and exact_2 > 1.5 * ALPHA_ZETA
    name = f"engine zeta (estimate_zeta, {engine.rule.value})"
    good = coverage(name, engine.zeta[ones] < truth[ones], ALPHA_ZETA, exact)
    assert_sound(good)
    assert_matches_exact(good)
    assert_sound(coverage(name + ", every repetition", engine.zeta < truth, ALPHA_ZETA))
    wrong = upper_confidence_bound(engine.counted, N_P, 2 * ALPHA_ZETA)
    bad = coverage(f"{name} at 2 alpha_zeta (wrong)", wrong[ones] < truth[ones], ALPHA_ZETA, exact_2)
    assert_flagged(bad)
    assert_matches_exact(bad)
    if engine.rule is Zeta.LOSS:
        preds_f = np.asarray(cache.predictions[:, :N_P])
        gains = ((preds_f != cache.c_hat[:, None]) & (engine.preds_p == cache.c_hat[:, None])).sum(axis=1)
        assert_flagged(
            coverage("zeta on the gains (wrong)", upper_confidence_bound(gains, N_P, ALPHA_ZETA) < truth, ALPHA_ZETA)
        )
    # IRS computes the same counts and bounds on the inputs it evaluates.
    for res in engine.irs.values():
        ev = res.evaluated
        counts = res.losses if engine.rule is Zeta.LOSS else res.disagreements
        np.testing.assert_array_equal(counts[ev], engine.counted[ev])
        np.testing.assert_array_equal(res.zeta[ev], engine.zeta[ev])


def radius_wrong(reported: np.ndarray, true_radius: np.ndarray) -> np.ndarray:
    """A certificate is wrong when it claims a positive radius larger than g^p's true radius for c_hat."""
    return (reported > 0) & (reported > true_radius)


Branch = Callable[[np.ndarray, int], np.ndarray | None]
"""``(p_a, k) ->`` where the direct radius is reported (None: the larger of the two radii), from the cached ``p_a``
and the number ``k`` of f's class-1 samples among the cached samples that are not replayed."""


def exact_radius_miss(
    truth: Truth,
    rule: Zeta,
    branch: Branch,
    *,
    n0: int,
    n: int,
    n_p: int,
    alpha: float,
    alpha_zeta: float,
    alpha_d: float,
    sigma: float = SIGMA,
) -> float:
    """P(one repetition's IRS radius is wrong), exactly: the sum over every outcome of the counts it depends on.

    c_hat is 1 (the label) unless the n0 selection samples give class 1 at most n0 / 2 times (then the radius is 0).
    The n_p replayed samples fall into (f, f^p) = (1, 1), (1, 0), (0, 1), (0, 0) with the probabilities the truth
    gives, counts (a, b, c, d) from a multinomial; f gives class 1 on k ~ Binomial(n - n_p, P(f = 1)) of the others.
    Then p_a = LCB(a + b + k, n, alpha), zeta = UCB(b, or b + c for disagreements, n_p, alpha_zeta) and p_d =
    LCB(a + c, n_p, alpha_d); the radius is reported where p_a > 1/2, from the branch ``branch`` picks, and it is
    wrong when it exceeds g^p's true radius.  As the engine computes them, in the same floating point.
    """
    p = np.array([truth.both, truth.p_f - truth.both, truth.p_p - truth.both])
    p = np.append(p, 1.0 - p.sum())
    a, b, c = (g.ravel() for g in np.meshgrid(*[np.arange(n_p + 1)] * 3, indexing="ij"))
    keep = a + b + c <= n_p
    counts = np.stack([a[keep], b[keep], c[keep], n_p - (a + b + c)[keep]])
    log_prob = gammaln(n_p + 1) - gammaln(counts + 1).sum(axis=0) + xlogy(counts, p[:, None]).sum(axis=0)
    prob = np.exp(log_prob)
    a, b, c = counts[:3]
    p_a_of = lower_confidence_bound(np.arange(n + 1), n, alpha)
    zeta_of = upper_confidence_bound(np.arange(n_p + 1), n_p, alpha_zeta)
    r_zeta_of = radius(p_a_of[:, None] - zeta_of[None, :], sigma)  # by (count, what zeta counts)
    counted = b if rule is Zeta.LOSS else b + c
    r_direct = radius(lower_confidence_bound(a + c, n_p, alpha_d), sigma)
    true_radius = sigma * norm.ppf(truth.p_p)
    rest = np.arange(n - n_p + 1)
    miss = 0.0
    for k, p_k in zip(rest, binom.pmf(rest, n - n_p, truth.p_f), strict=True):
        count = a + b + k
        p_a, r_zeta = p_a_of[count], r_zeta_of[count, counted]
        direct = branch(p_a, int(k))
        reported = np.where(r_direct > r_zeta if direct is None else direct, r_direct, r_zeta)
        miss += p_k * prob[(p_a > 0.5) & radius_wrong(reported, true_radius)].sum()
    return float(binom.sf(n0 // 2, n0, truth.p_f) * miss)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["max", "gamma"])
def test_irs_radius_coverage(engine: Engine, mode: str) -> None:
    """(c) The IRS radius against g^p's true radius sigma Phi^-1(P(f^p = c_hat)), at the level IRSResult states.

    Leaving zeta out (reporting g's radius for g^p) must be flagged by the same check.
    """
    cache, t, res = engine.cache, engine.truth, engine.irs[mode]
    stated = res.alpha
    union = ALPHA + ALPHA_ZETA + ALPHA_D
    # gamma: the threshold argument of irs.py, max(alpha + alpha_zeta, alpha_zeta + alpha_d)
    assert stated == pytest.approx(union if mode == "max" else ALPHA_ZETA + max(ALPHA, ALPHA_D))
    true_radius = t.radius_p(cache.c_hat)
    evaluated = res.evaluated
    assert evaluated.mean() > 0.9  # the certificates are not vacuous: almost every repetition is certified
    assert np.all(res.radius[~evaluated] == 0)

    branch: Branch = (lambda p_a, k: None) if mode == "max" else (lambda p_a, k: p_a >= engine.gamma)

    def exact(alpha_d: float = ALPHA_D) -> float:
        levels = {"n0": N0, "n": N, "n_p": N_P, "alpha": ALPHA, "alpha_zeta": ALPHA_ZETA, "alpha_d": alpha_d}
        return exact_radius_miss(t, engine.rule, branch, **levels)

    # Judged at the stated level, and against its exact miss rate, well below it (the union bound over-counts): a
    # radius wrong 1.5 times as often as it should be would pass the first check, never the second.
    wrong = radius_wrong(res.radius, true_radius)
    c = coverage(f"engine IRS radius, mode {mode}", wrong, stated, exact())
    assert_sound(c)
    assert_matches_exact(c)
    # Wrong: the same certificate with its direct bound at 2 alpha_d, which makes the radius wrong about 1.6 times as
    # often here (the base and zeta bounds at 2 alpha move this radius's miss rate by less than 8 %: it errs mostly on
    # the direct branch, whose bound sits at its worst case; their own checks above flag them).
    hits = (engine.preds_p == cache.c_hat[:, None]).sum(axis=1)
    r_direct_2 = radius(lower_confidence_bound(hits, N_P, 2 * ALPHA_D), SIGMA)
    r_zeta_all = radius(cache.p_a - engine.zeta, SIGMA)
    direct_2 = r_direct_2 > r_zeta_all if mode == "max" else cache.p_a >= engine.gamma
    r_2 = np.where(cache.certified, np.where(direct_2, r_direct_2, r_zeta_all), 0.0)
    assert exact(2 * ALPHA_D) > VIOLATION * c.expected
    loose = coverage(
        f"IRS radius, mode {mode}, direct bound at 2 alpha_d (wrong)", radius_wrong(r_2, true_radius), stated
    )
    assert_exceeds_exact(loose, c.expected)
    assert_matches_exact(dataclasses.replace(loose, expected=exact(2 * ALPHA_D)), powered=False)

    # The reported radius is the one the mode prescribes.
    r_zeta = radius(cache.p_a - np.nan_to_num(res.zeta), SIGMA)
    r_direct = radius(lower_confidence_bound(res.direct_count, N_P, ALPHA_D), SIGMA)
    took_direct = evaluated & ((r_direct > r_zeta) if mode == "max" else (cache.p_a >= engine.gamma))
    np.testing.assert_array_equal(res.radius[evaluated], np.where(took_direct, r_direct, r_zeta)[evaluated])
    np.testing.assert_array_equal(res.direct_won, took_direct & (res.radius > 0))
    assert 0.05 < took_direct[evaluated].mean() < 0.95  # both branches are exercised
    print(f"  by branch: direct {wrong[took_direct].mean():.4f}, zeta {wrong[evaluated & ~took_direct].mean():.4f}")

    # The direct bound on f^p's own counts, level alpha_d, on the evaluated inputs (where IRS computed it); P(f^p = 1)
    # sits at its worst case.  (In "max" mode every failure of it is a radius failure, so the radius above is wrong
    # about alpha_d of the time: well inside the union bound, which is all that the stated level claims.)
    exact_d = exact_miscoverage(cp_lower(ALPHA_D), N_P, t.p_p, "lower")
    assert exact_d > 0.85 * ALPHA_D
    p_direct = lower_confidence_bound(res.direct_count[evaluated], N_P, ALPHA_D)
    d = coverage("engine direct bound p_d", p_direct > t.prob_p(cache.c_hat[evaluated]), ALPHA_D, exact_d)
    assert_sound(d)
    assert_matches_exact(d)

    # Wrong: IRS without zeta, i.e. g's own radius sigma Phi^-1(p_A) claimed for g^p.
    no_zeta = np.where(cache.certified, cache.radius, 0.0)
    assert_flagged(coverage("IRS radius without zeta (wrong)", radius_wrong(no_zeta, true_radius), stated))


@pytest.fixture(scope="module")
def loss_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    return _engine(tmp_path_factory, Zeta.LOSS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["max", "gamma", "tail"])
def test_signed_zeta_and_radius_coverage(loss_engine: Engine, mode: str) -> None:
    """(d) The signed zeta (betting bound on losses minus gains) against the true ``P(f = c) - P(f^p = c)``, level
    alpha_zeta, and the IRS radius with it at the level IRSResult states; its point estimate must be flagged."""
    e = loss_engine
    t, cache = e.truth, e.cache
    truth = t.prob_f(cache.c_hat) - t.prob_p(cache.c_hat)
    zeta = estimate_zeta(e.fp, e.inputs, cache, N_P, ALPHA_ZETA, Zeta.SIGNED)
    assert np.all(zeta >= -(1 - cache.p_a) / 2)
    assert_sound(coverage("engine zeta (signed, betting)", zeta < truth, ALPHA_ZETA))
    c_hat = cache.c_hat[:, None]
    net = (e.preds_p == c_hat).astype(float) - (np.asarray(cache.predictions[:, :N_P]) == c_hat)
    assert_flagged(coverage("signed point estimate (wrong)", -net.mean(axis=1) < truth, ALPHA_ZETA))
    # The check has the power to see a bound at twice its level: the betting bound is wrong nearly alpha of the time.
    at_2 = signed_zeta(net.astype(np.int8), N_P, N_P, 2 * ALPHA_ZETA, room=signed_room(cache, np.arange(len(cache))))
    assert_flagged(coverage("signed zeta at 2 alpha_zeta (wrong)", at_2 < truth, ALPHA_ZETA))

    settings = IRSSettings(
        n_p=N_P, alpha_zeta=ALPHA_ZETA, alpha_d=ALPHA_D, mode=mode, gamma=e.gamma, zeta=Zeta.SIGNED, allocate=False
    )
    res = certify_irs(e.fp, e.inputs, cache, settings)
    assert res.alpha == pytest.approx(settings.total_alpha(ALPHA))
    assert res.evaluated.mean() > 0.9
    if mode != "tail":  # tail mode replays the same first N_P samples: its zeta is the one estimate_zeta computed
        np.testing.assert_array_equal(res.zeta[res.evaluated], zeta[res.evaluated])
    wrong = radius_wrong(res.radius, t.radius_p(cache.c_hat))
    assert_sound(coverage(f"engine IRS radius, mode {mode}, signed zeta", wrong, res.alpha))
