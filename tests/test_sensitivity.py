"""Layer sensitivities: measured only on samples no certificate replays, exactly, stored and reused, and predictive."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest
import torch
from _studies import prepared, tiny_study
from scipy.stats import spearmanr

from approxtune import search, sensitivity
from approxtune.approximation import ApproximationConfig, LayerChoice, apply_approximation
from approxtune.cache import CacheError
from approxtune.data import Inputs
from approxtune.irs import IRSRun
from approxtune.locking import this_process
from approxtune.noise import Stream, sample_noise
from approxtune.sensitivity import Sensitivity, ensure_sensitivity, guide_positions, measure, measurement_key

LAYERS = ("conv1", "conv2", "fc1", "fc2")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sensitivity")
    text = tiny_study("sens", seed=5).replace("[search]\n", "[search]\nguide_samples = 6\n")
    with pytest.MonkeyPatch.context() as mp:
        study, model, inputs, cache, _ = prepared(root, text, mp)
    key = _key(study, cache)
    return root, study, model, inputs, cache, key, measure(model, inputs, cache, key)


def _key(study, cache):
    s = study.search
    return measurement_key(cache, LAYERS, s.precisions, s.prune, study.irs_settings, s.guide_samples)


@pytest.mark.parametrize(
    "irs", [{}, {"allocate": False}, {"mode": "max"}, {"mode": "gamma"}, {"n_tail": 60, "n_p": 90}]
)
def test_guide_positions_lie_beyond_every_sample_irs_replays(setup, irs):
    """The replay reaches the last sample before the guide positions (n_p = n - n_tail without allocation, n_p in the
    other modes) and never one of them."""
    _, study, model, inputs, cache, _, _ = setup
    study = dataclasses.replace(study, irs=dataclasses.replace(study.irs, **irs))
    stream, start = guide_positions(study.irs_settings, cache.meta.n, study.search.guide_samples)
    assert stream is Stream.ESTIMATION
    worst = ApproximationConfig({name: LayerChoice("int4", 0.5) for name in LAYERS})
    run = IRSRun(apply_approximation(model, worst), inputs, cache, study.irs_settings)
    assert run.counts.max() <= start < cache.meta.n
    if irs.get("allocate") is False or irs.get("mode"):
        assert run.counts.max() == start


def _recorded_ranges(monkeypatch) -> list:
    """The (stream, start, stop) of every noise range the measurement runs a model on, as it runs."""
    ranges = []
    original = sensitivity.predict_under_noise

    def recording(model, x, seeds, stream, start, stop, sigma, **kwargs):
        ranges.append((stream, start, stop))
        return original(model, x, seeds, stream, start, stop, sigma, **kwargs)

    monkeypatch.setattr(sensitivity, "predict_under_noise", recording)
    return ranges


def test_measure_reads_only_guide_positions(setup, monkeypatch):
    """The measurement runs f_lc only on guide positions, and f's cached classes elsewhere do not change it."""
    _, _, model, inputs, cache, key, measured = setup
    ranges = _recorded_ranges(monkeypatch)
    scrambled = np.array(cache.predictions)
    scrambled[:, : key["start"]] = (scrambled[:, : key["start"]] + 1) % 10  # every replayable class wrong
    again = measure(model, inputs, dataclasses.replace(cache, predictions=scrambled), key)
    assert {r for r in ranges} == {(Stream.ESTIMATION, key["start"], key["start"] + key["samples"])}
    assert np.array_equal(again.rows, measured.rows) and np.array_equal(again.q, measured.q)
    assert all(np.array_equal(again.lost[k], measured.lost[k]) for k in measured.lost)


def test_lost_samples_are_those_f_has_and_the_change_misses(setup):
    """Recomputed for one input and one choice from the noise itself: f = c_hat != f_lc on the guide samples."""
    _, _, model, inputs, cache, key, measured = setup
    choice = LayerChoice("fp32", 0.5)
    approx = apply_approximation(model, ApproximationConfig({"fc2": choice}))
    start, m = key["start"], key["samples"]
    lost_any = False
    for j, row in enumerate(measured.rows):
        noise = sample_noise(
            cache.seed[row],
            Stream.ESTIMATION,
            start,
            start + m,
            (1, 8, 8),
            cache.meta.sigma,
            cache.meta.block_size,
        )
        with torch.inference_mode():
            classes = approx(inputs.x[row] + noise).argmax(1).numpy()
        f_has = np.asarray(cache.predictions[row, start : start + m]) == cache.c_hat[row]
        expected = f_has & (classes != cache.c_hat[row])
        assert np.array_equal(measured.lost[("fc2", choice)][j], expected)
        lost_any |= bool(expected.any())
    assert lost_any, "no loss among the inputs checked: the comparison would not see a wrong mask"
    with torch.inference_mode():
        assert np.array_equal(measured.clean[("fc2", choice)], approx(inputs.x).argmax(1).numpy())


def test_cost_and_rows(setup):
    _, _, _, inputs, cache, key, measured = setup
    variants = len(LAYERS) * (4 + 5)  # 4 precisions besides fp32, 5 pruning amounts above 0
    assert len(measured.lost) == variants
    assert measured.samples == variants * (len(measured.rows) * key["samples"] + len(inputs))
    assert set(measured.rows) <= set(np.flatnonzero(cache.c_hat == cache.label))


def test_stored_beside_the_cache_reused_and_remeasured_when_the_key_changes(setup):
    root, study, model, inputs, cache, key, measured = setup
    cache_path = root / study.cache_path("search")
    first, fresh = ensure_sensitivity(cache_path, key, lambda: measure(model, inputs, cache, key))
    assert fresh and sensitivity.sensitivity_path(cache_path, key).parent == cache_path.parent
    again, fresh = ensure_sensitivity(cache_path, key, lambda: measure(model, inputs, cache, key))
    assert not fresh and again.seconds == first.seconds
    assert all(np.array_equal(again.lost[k], measured.lost[k]) for k in measured.lost)
    assert all(np.array_equal(again.clean[k], measured.clean[k]) for k in measured.clean)
    other = {**key, "samples": key["samples"] - 1}
    _, fresh = ensure_sensitivity(cache_path, other, lambda: measure(model, inputs, cache, other))
    assert fresh
    # A file under this key's name that holds another measurement (copied by hand, say) is not trusted.
    path = sensitivity.sensitivity_path(cache_path, key)
    path.write_text(sensitivity.sensitivity_path(cache_path, other).read_text())
    _, fresh = ensure_sensitivity(cache_path, key, lambda: measure(model, inputs, cache, key))
    assert fresh
    sensitivity.sensitivity_path(cache_path, key).write_text("{not json")
    _, fresh = ensure_sensitivity(cache_path, key, lambda: measure(model, inputs, cache, key))
    assert fresh


def test_the_measurement_holds_a_lock_that_others_wait_on_and_leaves_no_files(setup, tmp_path):
    *_, key, measured = setup
    cache_path = tmp_path / "base-search.cache"
    lock = sensitivity.sensitivity_path(cache_path, key).with_name(
        sensitivity.sensitivity_path(cache_path, key).name + ".lock"
    )
    holders = []

    def measure_now():
        holders.append(lock.read_text())
        return measured

    _, fresh = ensure_sensitivity(cache_path, key, measure_now)
    assert fresh and holders == [this_process()], "measured while holding the lock, which names this process"
    assert sorted(p.name for p in tmp_path.iterdir()) == [sensitivity.sensitivity_path(cache_path, key).name]


@pytest.mark.parametrize("text", ["[1, 2]", '{"format_version": 1}', "{not json"])
def test_a_file_that_is_not_a_measurement_is_measured_again(setup, tmp_path, text):
    *_, key, measured = setup
    cache_path = tmp_path / "base-search.cache"
    sensitivity.sensitivity_path(cache_path, key).write_text(text)
    result, fresh = ensure_sensitivity(cache_path, key, lambda: measured)
    assert fresh and result is measured
    assert Sensitivity.from_json(sensitivity.sensitivity_path(cache_path, key).read_text()).key == key


def test_what_a_killed_measurement_left_is_removed(setup, tmp_path):
    *_, key, measured = setup
    cache_path = tmp_path / "base-search.cache"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = sensitivity.sensitivity_path(cache_path, key)
    host = this_process().rpartition(":")[0]
    left = path.with_name(f"{path.name}.tmp-{host}-{dead.pid}")
    left.write_text("half")
    ensure_sensitivity(cache_path, key, lambda: measured)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_json_round_trip(setup):
    *_, measured = setup
    back = Sensitivity.from_json(measured.to_json())
    assert back.key == measured.key and back.samples == measured.samples
    assert np.array_equal(back.base_clean, measured.base_clean) and np.array_equal(back.q, measured.q)
    for k in measured.lost:
        assert np.array_equal(back.lost[k], measured.lost[k]) and np.array_equal(back.clean[k], measured.clean[k])


def test_prediction_combines_single_changes(setup):
    _, study, _, _, _, _, measured = setup
    settings = study.irs_settings
    one = ApproximationConfig({"fc1": LayerChoice("int4", 0.3)})
    both = ApproximationConfig({"fc1": LayerChoice("int4", 0.3), "conv1": LayerChoice("int8", 0.0)})
    union = measured.lost[("fc1", LayerChoice("int4"))] | measured.lost[("fc1", LayerChoice("fp32", 0.3))]
    assert np.array_equal(measured.lost_by(one), union)
    assert np.array_equal(measured.lost_by(both), union | measured.lost[("conv1", LayerChoice("int8"))])
    _, accuracy = measured.predict(ApproximationConfig({"fc2": LayerChoice("fp32", 0.5)}), settings)
    assert accuracy == np.mean(measured.clean[("fc2", LayerChoice("fp32", 0.5))] == measured.labels)
    fp32_acr, fp32_accuracy = measured.predict(ApproximationConfig({}), settings)
    assert fp32_accuracy == measured.base_accuracy and fp32_acr >= measured.predict(both, settings)[0]


MID = """
[study]
name = "mid"
output_dir = "runs/mid"
seed = 2
[data]
search_inputs = 40
report_inputs = 20
[train]
epochs = 10
[certify]
n0 = 32
n = 1000
[irs]
n_p = 200
"""


@pytest.mark.slow
def test_predicted_acr_ranks_configurations_like_irs(tmp_path, monkeypatch):
    """On random configurations of a small digits study, predicted and certified ACR agree in rank (about 0.9)."""
    study, model, inputs, cache, _ = prepared(tmp_path, MID, monkeypatch)
    measured = measure(model, inputs, cache, _key(study, cache))
    rng = np.random.default_rng(0)
    predicted, certified = [], []
    for _ in range(16):
        choices = [
            LayerChoice(str(rng.choice(study.search.precisions)), float(rng.choice(study.search.prune))) for _ in LAYERS
        ]
        config = ApproximationConfig(dict(zip(LAYERS, choices, strict=True)))
        predicted.append(measured.predict(config, study.irs_settings)[0])
        certified.append(search.evaluate(model, config, inputs, cache, study).acr)
    assert spearmanr(predicted, certified).statistic > 0.7


def test_without_free_cached_samples_the_guide_draws_fresh_noise(setup, monkeypatch):
    """Mode max with n_p = n leaves no cached sample unreplayed: stream FRESH, f paid, the cache's classes unread."""
    _, study, model, inputs, cache, _, _ = setup
    study = dataclasses.replace(study, irs=dataclasses.replace(study.irs, mode="max", n_p=cache.meta.n))
    key = _key(study, cache)
    assert (key["stream"], key["start"]) == ("fresh", 0)
    ranges = _recorded_ranges(monkeypatch)
    measured = measure(model, inputs, cache, key)
    scrambled = (np.array(cache.predictions) + 1) % 10
    again = measure(model, inputs, dataclasses.replace(cache, predictions=scrambled), key)
    width = sensitivity.FRESH_F_SAMPLES
    assert set(ranges) == {(Stream.FRESH, 0, width), (Stream.FRESH, 0, key["samples"])}
    assert all(np.array_equal(again.lost[k], measured.lost[k]) for k in measured.lost)
    labelled = int(np.sum(cache.c_hat == cache.label))
    variants = len(measured.lost)
    assert measured.samples == variants * (len(measured.rows) * key["samples"] + len(inputs)) + labelled * width
    assert 0 < len(measured.rows) <= labelled


def test_inputs_other_than_the_caches_are_refused(setup):
    _, _, model, inputs, cache, key, _ = setup
    others = Inputs(inputs.x.flip(0), inputs.y.flip(0), inputs.index[::-1].copy())
    with pytest.raises(CacheError, match="not the ones this cache certified"):
        measure(model, others, cache, key)
