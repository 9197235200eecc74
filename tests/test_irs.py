"""IRS certification against a cache: replay exactness, branch rules, confidence accounting, skipped inputs."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from _mutants import mutant
from test_soundness import assert_sound, coverage
from torch import nn

from approxtune import irs as irs_mod
from approxtune.cache import CacheError, CertifySettings, build_base_cache
from approxtune.data import Inputs
from approxtune.irs import IRSRun, IRSSettings, Mode, Zeta, certify_irs, estimate_zeta, replay, signed_room, signed_zeta
from approxtune.statistics import betting_lower_bound, lower_confidence_bound, radius, upper_confidence_bound

N, N_P, SIGMA, ALPHA = 600, 200, 0.5, 0.001


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.rand(30, 1, 4, 4, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:5] = (y[:5] + 1) % 3  # five inputs whose label g gets wrong
    inputs = Inputs(x, y, np.arange(30))
    settings = CertifySettings(sigma=SIGMA, n0=32, n=N, alpha=ALPHA, seed=0, block_size=16)  # not the default 64
    cache = build_base_cache(model, inputs, tmp_path_factory.mktemp("irs") / "c", settings)
    return model, inputs, cache


def perturbed(model, scale):
    p = __import__("copy").deepcopy(model)
    with torch.no_grad():
        p[1].weight.add_(scale * torch.randn(p[1].weight.shape, generator=torch.Generator().manual_seed(5)))
    return p


def test_replaying_f_itself_reproduces_the_cached_predictions_exactly(base):
    model, inputs, cache = base
    rows = np.arange(len(cache))
    preds = replay(model, inputs, cache, rows, N, batch_size=77)
    assert np.array_equal(preds, cache.predictions)
    zeta = estimate_zeta(model, inputs, cache, N_P, 0.001)
    np.testing.assert_allclose(zeta, 1 - 0.001 ** (1 / N_P))  # the zero-disagreement floor


def test_replay_and_estimate_zeta_refuse_too_many_samples_and_report_progress(base):
    model, inputs, cache = base
    with pytest.raises(ValueError, match=f"n_p = {N + 1} exceeds the cache's n = {N}: IRS can only replay cached"):
        replay(model, inputs, cache, np.arange(3), N + 1)
    seen = []
    replay(model, inputs, cache, np.arange(3), 50, progress=seen.append)
    assert sum(seen) == 150
    seen.clear()
    estimate_zeta(model, inputs, cache, 50, 0.001, progress=seen.append, batch_size=7)
    assert sum(seen) == 50 * len(cache) and max(seen) < 7 + 16


def test_signed_room_keeps_every_radius_finite(base):
    """The signed zeta's floor -(1 - p_a) / 2: p_a - zeta stays below 1 however many gains f^p has."""
    _, _, cache = base
    rows = np.arange(len(cache))
    np.testing.assert_array_equal(signed_room(cache, rows), (1.0 - cache.p_a) / 2.0)
    gains = np.ones((len(rows), N_P), dtype=np.int8)  # f^p has c_hat on every sample where f had not: all gains
    zeta = signed_zeta(gains, N_P, N_P, 0.001, room=signed_room(cache, rows))
    reach = 1.0 - 2.0 * (1.0 + irs_mod.SIGNED_REACH) / 2.0  # -SIGNED_REACH, where the betting bound stops
    np.testing.assert_allclose(zeta, np.maximum(-(1.0 - cache.p_a) / 2.0, reach), atol=1e-6)
    assert np.all(cache.p_a - zeta < 1.0) and np.any(cache.p_a > 0.75), "the floor must bind somewhere"
    # Without a room the signed zeta is never negative; from a prefix it is the bound of the values seen so far.
    assert np.all(signed_zeta(gains, N_P, N_P, 0.001) == 0.0)
    net = np.where(np.arange(N_P) % 7 == 0, -1, 0)[None, :].astype(np.int8)
    from_prefix = 1.0 - 2.0 * betting_lower_bound((net + 1.0) / 2.0, 40, N_P, 0.001, top=0.5625)
    np.testing.assert_array_equal(signed_zeta(net, 40, N_P, 0.001, room=1.0), from_prefix)


def test_signed_zeta_coverage():
    """The signed zeta against the true P(f = c) - P(f^p = c): 20,000 sequences of 100 replayed samples with losses 4 %
    and gains 2 %, alpha_zeta = 0.1; a zeta off in its scale or its sign misses far more often."""
    u = np.random.default_rng(11).random((20_000, 100))
    net = np.where(u < 0.04, -1, np.where(u < 0.06, 1, 0)).astype(np.int8)
    zeta = signed_zeta(net, 100, 100, 0.1, room=0.05)
    c = coverage("signed zeta, losses 4 %, gains 2 %, n = 100", zeta < 0.04 - 0.02, 0.1)
    assert_sound(c)
    assert c.rate > 0.02, "not vacuous"


def test_irs_of_f_itself(base):
    model, inputs, cache = base
    settings = IRSSettings(n_p=N_P, alpha_zeta=0.001, alpha_d=0.001, mode=Mode.MAX)
    result = certify_irs(model, inputs, cache, settings)
    ok = cache.certified
    assert np.array_equal(result.evaluated, ok)
    assert result.samples == ok.sum() * N_P
    assert np.all(result.radius[~ok] == 0)
    assert np.all(result.disagreements == 0)
    floor = 1 - 0.001 ** (1 / N_P)
    expected_zeta = radius(cache.p_a[ok] - floor, SIGMA)
    expected_direct = radius(
        lower_confidence_bound(cache.predictions[ok, :N_P].__eq__(cache.c_hat[ok, None]).sum(1), N_P, 0.001), SIGMA
    )
    np.testing.assert_allclose(result.radius[ok], np.maximum(expected_zeta, expected_direct))
    won = (expected_direct > expected_zeta) & (np.maximum(expected_zeta, expected_direct) > 0)
    np.testing.assert_array_equal(result.direct_won[ok], won)
    assert won.any() and (~won & (result.radius[ok] > 0)).any(), "both branches must certify some input here"
    assert np.all(expected_zeta <= cache.radius[ok]), "the zeta radius never beats the base certificate"
    assert result.alpha == pytest.approx(ALPHA + 0.002)


@pytest.mark.parametrize("rule", list(Zeta))
def test_irs_of_an_approximation_matches_the_definition(base, rule):
    model, inputs, cache = base
    approx = perturbed(model, 0.3)
    settings = IRSSettings(n_p=N_P, alpha_zeta=0.0005, alpha_d=0.0005, mode=Mode.MAX, zeta=rule)
    result = certify_irs(approx, inputs, cache, settings, batch_size=50)
    rows = np.flatnonzero(cache.certified)
    preds = replay(approx, inputs, cache, rows, N_P)
    f_preds = np.asarray(cache.predictions[rows, :N_P])
    c_hat = cache.c_hat[rows, None]
    dis = (preds != f_preds).sum(1)
    losses = ((f_preds == c_hat) & (preds != c_hat)).sum(1)
    assert dis.sum() > 0, "the perturbation must change some predictions for this test to mean anything"
    assert np.all(losses <= dis) and np.any(losses < dis), "some disagreements must not be losses of c_hat"
    assert np.array_equal(result.disagreements[rows], dis)
    assert np.array_equal(result.losses[rows], losses)
    if rule is Zeta.SIGNED:  # the betting bound on the replayed samples in replay order (staged in IRSRun)
        room = signed_room(cache, rows)
        zeta = signed_zeta((preds == c_hat).astype(np.int8) - (f_preds == c_hat), N_P, N_P, 0.0005, room=room)
        assert np.all(zeta >= -room) and np.any(zeta < 0) and np.all(cache.p_a[rows] - zeta < 1)
        assert np.any(zeta < upper_confidence_bound(losses, N_P, 0.0005))
    else:
        zeta = upper_confidence_bound(losses if rule is Zeta.LOSS else dis, N_P, 0.0005)
    np.testing.assert_allclose(result.zeta[rows], zeta)
    np.testing.assert_allclose(estimate_zeta(approx, inputs, cache, N_P, 0.0005, rule)[rows], zeta)
    r_zeta = radius(cache.p_a[rows] - zeta, SIGMA)
    r_direct = radius(lower_confidence_bound((preds == c_hat).sum(1), N_P, 0.0005), SIGMA)
    np.testing.assert_allclose(result.radius[rows], np.maximum(r_zeta, r_direct))
    np.testing.assert_array_equal(result.direct_won[rows], (r_direct > r_zeta) & (np.maximum(r_zeta, r_direct) > 0))
    assert 0 <= result.direct_share <= 1 and np.isnan(result.zeta[~cache.certified]).all()
    assert result.alpha == pytest.approx(ALPHA + 0.001), "counting losses costs no confidence"


def test_certify_irs_reports_progress_and_certified_accuracy(base):
    model, inputs, cache = base
    seen = []
    result = certify_irs(model, inputs, cache, IRSSettings(n_p=N_P, mode=Mode.MAX), progress=seen.append)
    assert sum(seen) == result.samples > 0
    radii = result.radius[result.radius > 0]
    assert result.certified_accuracy(float(np.median(radii))) == pytest.approx(
        (result.radius >= np.median(radii)).mean()
    )


def test_counting_losses_never_certifies_less(base):
    """Losses are a subset of the disagreements on every sample: the loss zeta is never larger, no radius smaller."""
    model, inputs, cache = base
    approx = perturbed(model, 0.3)
    by_rule = {
        rule: certify_irs(approx, inputs, cache, IRSSettings(n_p=N_P, mode=Mode.GAMMA, gamma=1.0, zeta=rule))
        for rule in Zeta
    }
    loss, paper = by_rule[Zeta.LOSS], by_rule[Zeta.DISAGREEMENT]
    ev = loss.evaluated
    assert np.array_equal(ev, paper.evaluated) and loss.alpha == paper.alpha
    assert np.all(loss.zeta[ev] <= paper.zeta[ev]) and np.all(loss.radius >= paper.radius)
    assert loss.acr > paper.acr


def test_gamma_mode_switches_on_cached_p_a(base):
    model, inputs, cache = base
    approx = perturbed(model, 0.3)
    rows = np.flatnonzero(cache.certified)
    gamma = float(np.sort(cache.p_a[rows])[len(rows) // 2])  # a cached p_a itself: p_a >= gamma is inclusive
    settings = IRSSettings(n_p=N_P, alpha_zeta=0.001, alpha_d=0.002, mode=Mode.GAMMA, gamma=gamma, zeta="disagreement")
    result = certify_irs(approx, inputs, cache, settings)
    preds = replay(approx, inputs, cache, rows, N_P)
    zeta = upper_confidence_bound((preds != cache.predictions[rows, :N_P]).sum(1), N_P, 0.001)
    r_zeta = radius(cache.p_a[rows] - zeta, SIGMA)
    r_direct = radius(lower_confidence_bound((preds == cache.c_hat[rows, None]).sum(1), N_P, 0.002), SIGMA)
    high = cache.p_a[rows] >= gamma
    assert high.any() and (~high).any() and np.any(cache.p_a[rows] == gamma)
    np.testing.assert_allclose(result.radius[rows], np.where(high, r_direct, r_zeta))
    np.testing.assert_array_equal(result.branch_direct[rows], high)
    np.testing.assert_array_equal(result.direct_won[rows], high & (result.radius[rows] > 0))
    # With 10 samples the direct branch often certifies nothing: it did not "win" there.
    few = certify_irs(approx, inputs, cache, dataclasses.replace(settings, n_p=10))
    np.testing.assert_array_equal(few.direct_won[rows], high & (few.radius[rows] > 0))
    assert np.any(high & (few.radius[rows] == 0))
    # The threshold argument: max(alpha + alpha_zeta, alpha_zeta + alpha_d), not the union bound 0.004, and not the
    # paper's alpha + alpha_zeta = 0.002 either, since alpha_d > alpha here.
    assert result.alpha == pytest.approx(0.001 + max(ALPHA, 0.002))
    assert IRSSettings(n_p=1, mode=Mode.GAMMA, alpha_zeta=0.001, alpha_d=ALPHA).total_alpha(ALPHA) == ALPHA + 0.001


def test_defaults_are_tail_mode_at_total_level_alpha_plus_0_001():
    settings = IRSSettings(n_p=N_P)
    assert (settings.mode, settings.zeta, settings.alpha_zeta, settings.alpha_d) == (Mode.TAIL, Zeta.LOSS, 0.001, 0.001)
    assert settings.total_alpha(ALPHA) == pytest.approx(ALPHA + 0.001)


def test_bad_settings(base):
    model, inputs, cache = base
    with pytest.raises(ValueError, match="exceeds the cache's n"):
        certify_irs(model, inputs, cache, IRSSettings(n_p=N + 1, mode=Mode.MAX))
    with pytest.raises(ValueError, match="alpha_zeta"):
        IRSSettings(n_p=10, alpha_zeta=0.5)
    with pytest.raises(ValueError, match="n_p"):
        IRSSettings(n_p=0)
    with pytest.raises(ValueError, match="gamma"):
        IRSSettings(n_p=10, gamma=0.4)
    with pytest.raises(ValueError, match="inputs given"):
        certify_irs(model, inputs.head(3), cache, IRSSettings(n_p=10))
    for bad, match in [
        ({"alpha_zeta": 0.0}, r"alpha_zeta must lie in \(0, 0\.5\), got 0\.0"),
        ({"alpha_d": 0.0}, "alpha_d must lie in"),
        ({"gamma": 0.5}, r"gamma must lie in \(0\.5, 1\], got 0\.5"),
        ({"gamma": 1.01}, "gamma must lie in"),
        ({"n_tail": 0}, "n_tail must be at least 1, got 0"),
        ({"block": 0}, "block must be at least 1, got 0"),
        ({"pilot": -1}, "pilot must be non-negative, got -1"),
    ]:
        with pytest.raises(ValueError, match=match):
            IRSSettings(n_p=10, **bad)
    IRSSettings(n_p=1, gamma=1.0, n_tail=1, block=1, pilot=0)  # every limit is inclusive where it says so


@pytest.mark.parametrize("mode", list(Mode))
def test_inputs_in_another_order_are_refused(base, mode):
    """Replaying the cache with inputs in another order would pair each input with another input's noise and cached
    predictions: every entry point refuses inputs whose fingerprint is not the cache's."""
    model, inputs, cache = base
    order = np.roll(np.arange(len(inputs)), 1)
    swapped = Inputs(inputs.x[order], inputs.y[order], inputs.index[order])
    settings = IRSSettings(n_p=N_P, mode=mode)
    calls = [
        lambda: certify_irs(model, swapped, cache, settings),
        lambda: IRSRun(model, swapped, cache, settings),
        lambda: replay(model, swapped, cache, np.arange(3), N_P),
        lambda: estimate_zeta(model, swapped, cache, N_P, 0.001),
    ]
    for call in calls:
        with pytest.raises(CacheError, match="not the ones this cache certified"):
            call()
    relabelled = Inputs(inputs.x, inputs.y.roll(1), inputs.index)
    with pytest.raises(CacheError, match="not the ones this cache certified"):
        certify_irs(model, relabelled, cache, settings)


def test_no_certified_input_gives_zero_radii_without_sampling(base):
    model, inputs, cache = base
    empty = dataclasses.replace(cache, c_hat=(cache.label + 1) % 3)
    result = certify_irs(model, inputs, empty, IRSSettings(n_p=N_P))
    assert result.samples == 0 and result.acr == 0.0 and not result.evaluated.any()


@pytest.mark.parametrize(
    "settings",
    [
        IRSSettings(n_p=N_P, mode=Mode.MAX),
        IRSSettings(n_p=N_P, mode=Mode.GAMMA, gamma=0.9),
        IRSSettings(n_p=N_P, mode=Mode.TAIL, alpha_zeta=0.001, alpha_d=0.001, pilot=16, block=8),
        IRSSettings(n_p=N_P, mode=Mode.MAX, zeta=Zeta.SIGNED),
        IRSSettings(n_p=N_P, mode=Mode.TAIL, alpha_zeta=0.001, alpha_d=0.001, pilot=16, block=8, zeta=Zeta.SIGNED),
    ],
    ids=["max", "gamma", "tail", "max-signed", "tail-signed"],
)
def test_staged_run_ends_where_one_shot_ends_and_its_upper_bound_holds(base, settings):
    """IRSRun in stages: certify_irs's certificate, no sample twice, upper_acr >= the final ACR at every stage."""
    model, inputs, cache = base
    approx = perturbed(model, 0.3)
    one_shot = certify_irs(approx, inputs, cache, settings)
    evaluated = []
    run = IRSRun(approx, inputs, cache, settings, progress=evaluated.append)
    bounds = [run.upper_acr()]
    for fraction in (0.1, 0.3, 0.3, 0.6):
        run.extend(fraction)
        assert np.all((run.seen % cache.meta.block_size == 0) | (run.seen == run.counts))  # whole noise blocks
        bounds.append(run.upper_acr())
    staged = run.result()
    assert run.complete and sum(evaluated) == staged.samples == one_shot.samples  # no sample evaluated twice
    np.testing.assert_array_equal(staged.radius, one_shot.radius)
    np.testing.assert_array_equal(staged.disagreements, one_shot.disagreements)
    np.testing.assert_array_equal(staged.direct_count, one_shot.direct_count)
    assert staged.alpha == one_shot.alpha
    assert all(b >= staged.acr for b in bounds)
    assert all(a >= b for a, b in itertools.pairwise(bounds))  # more samples seen: a tighter bound
    assert bounds[0] > staged.acr  # the perturbation costs radius that the bound before any sample cannot see
    assert run.upper_acr() == staged.acr, "finished: the bound is the ACR, bit for bit"
    np.testing.assert_array_equal(staged.zeta, one_shot.zeta)


def test_a_staged_replay_reads_each_inputs_own_samples_whatever_the_others_ranges(base):
    """extend() replays one range per input in one call; an input ahead of the others (a later start, a shorter range)
    is compared with f on its own cached samples."""
    model, inputs, cache = base
    approx = perturbed(model, 0.3)
    run = IRSRun(approx, inputs, cache, IRSSettings(n_p=N_P, mode=Mode.MAX))
    rows = run.rows
    run.seen = np.where(np.arange(len(rows)) % 3 == 0, 176, 16)  # a third of the inputs far ahead of the rest
    run.extend(1.0)
    full = replay(approx, inputs, cache, rows, N_P)
    f, c_hat = np.asarray(cache.predictions[rows, :N_P]), cache.c_hat[rows, None]
    later = np.arange(N_P)[None, :] >= np.where(np.arange(len(rows)) % 3 == 0, 176, 16)[:, None]
    np.testing.assert_array_equal(run.losses, ((f == c_hat) & (full != c_hat) & later).sum(axis=1))
    np.testing.assert_array_equal(run.disagreements, ((f != full) & later).sum(axis=1))
    np.testing.assert_array_equal(run.hits, ((full == c_hat) & later).sum(axis=1))


def test_signed_runs_know_where_f_has_c_hat(base):
    """Racing's signed bound allows a gain only where f misses c_hat: what it reads is f's class on every sample."""
    model, inputs, cache = base
    run = IRSRun(model, inputs, cache, IRSSettings(n_p=N_P, mode=Mode.MAX, zeta=Zeta.SIGNED))
    expected = np.asarray(cache.predictions[run.rows, :N_P]) == cache.c_hat[run.rows, None]
    np.testing.assert_array_equal(run.f_hits, expected)
    assert expected.any() and not expected.all()


def test_upper_acr_is_reached_when_every_remaining_sample_agrees(base):
    """The bound is tight: for f itself (no disagreement, every sample as cached) it is the final ACR at every stage."""
    model, inputs, cache = base
    run = IRSRun(model, inputs, cache, IRSSettings(n_p=N_P))
    start = run.upper_acr()
    final = run.result().acr
    # f agrees with itself, but predicts c_hat only where it did on the cached samples: the bound assumes c_hat on
    # every remaining sample, so it may exceed the direct radius; the zeta radius it reaches exactly.
    assert start >= final
    zeta_only = IRSRun(model, inputs, cache, IRSSettings(n_p=N_P, mode=Mode.GAMMA, gamma=1.0))
    assert zeta_only.upper_acr() == zeta_only.result().acr, "bit for bit: a twin must never dominate it"


def _gaining_run(tmp_path_factory):
    """A cache of f, P(f = 1) about 0.75, and f^p with a higher class-1 bias (about 0.97): f^p's class-1 region holds
    f's, so f^p never loses c_hat and gains it on about a fifth of the samples; the signed zeta is negative."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].weight[1, 0] = 1.0
        model[1].bias.copy_(torch.tensor([0.0, 0.34]))
    x = torch.zeros(12, 1, 4, 4)
    inputs = Inputs(x, torch.ones(12, dtype=torch.int64), np.arange(12))
    settings = CertifySettings(sigma=0.5, n0=32, n=N, alpha=ALPHA, seed=4)
    cache = build_base_cache(model, inputs, tmp_path_factory.mktemp("gains") / "c", settings)
    better = __import__("copy").deepcopy(model)
    with torch.no_grad():
        better[1].bias[1] = 0.95
    return better, inputs, cache


def stage_bounds_minus_final(model_p, inputs, cache, settings):
    """upper_acr at every racing stage minus the final ACR (a sound bound: never negative)."""
    run = IRSRun(model_p, inputs, cache, settings)
    bounds = [run.upper_acr()]
    for fraction in (0.125, 0.25, 0.5, 0.75):
        run.extend(fraction)
        bounds.append(run.upper_acr())
    return np.array(bounds) - run.result().acr


SIGNED_RACE = [
    IRSSettings(n_p=N_P, mode=Mode.GAMMA, gamma=1.0, zeta=Zeta.SIGNED),
    IRSSettings(n_p=N_P, mode=Mode.MAX, zeta=Zeta.SIGNED),
]


@pytest.mark.parametrize("settings", SIGNED_RACE, ids=["zeta-branch", "max"])
def test_the_signed_bound_allows_for_gains_on_the_samples_still_to_come(tmp_path_factory, settings):
    model_p, inputs, cache = _gaining_run(tmp_path_factory)
    result = certify_irs(model_p, inputs, cache, settings)
    assert result.evaluated.all() and np.all(result.zeta < 0) and result.acr > cache.summary()["acr"]
    assert np.all(stage_bounds_minus_final(model_p, inputs, cache, settings) >= 0)


def test_a_signed_bound_that_ignores_gains_is_caught(tmp_path_factory, monkeypatch):
    """Mutant: racing's optimistic signed zeta takes every sample still to come as at best an agreement."""
    bad = mutant(signed_zeta, "np.where(f_hits, 0.5, 1.0)", "np.where(f_hits, 0.5, 0.5)")
    monkeypatch.setattr(irs_mod, "signed_zeta", bad)
    model_p, inputs, cache = _gaining_run(tmp_path_factory)
    assert np.any(stage_bounds_minus_final(model_p, inputs, cache, SIGNED_RACE[0]) < 0)
