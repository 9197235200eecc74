"""The search objective and its racing: a stopped trial could not have reached the front, nothing else changes."""

import dataclasses

import numpy as np
import optuna
import pytest
import torch
from _mutants import mutant
from _studies import prepared, tiny_study

from approxtune import search, statistics, trials
from approxtune.approximation import apply_approximation
from approxtune.irs import IRSRun

TRIALS = 14


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny digits study whose IRS mode takes the zeta branch everywhere (gamma = 1), so racing bounds are tight."""
    text = tiny_study("race", seed=3).replace("[irs]\n", "[irs]\nmode = 'gamma'\ngamma = 1.0\n")
    with pytest.MonkeyPatch.context() as mp:
        return prepared(tmp_path_factory.mktemp("search"), text, mp)


def _with(study, race=None, **constraints):
    search_section = study.search
    if race is not None:
        search_section = dataclasses.replace(search_section, race=race)
    if constraints:
        search_section = dataclasses.replace(
            search_section, constraints=dataclasses.replace(search_section.constraints, **constraints)
        )
    return dataclasses.replace(study, search=search_section)


def _run(setup, study, params=None, n_trials=TRIALS):
    """Run ``n_trials`` in memory: ``params`` enqueued in order (else a seeded random sampler); returns the study."""
    _, model, inputs, cache, base_accuracy = setup
    optuna_study = optuna.create_study(
        directions=list(search.DIRECTIONS), sampler=optuna.samplers.RandomSampler(seed=7)
    )
    for p in params or ():
        optuna_study.enqueue_trial(p)
    objective = search.make_objective(study, model, inputs, cache, base_accuracy, "cpu")
    optuna_study.optimize(objective, n_trials=n_trials)
    return optuna_study


def _uniform(precision):
    """Trial params of one precision on every layer, no pruning."""
    return {
        f"{layer}.{key}": value
        for layer in ("conv1", "conv2", "fc1", "fc2")
        for key, value in (("precision", precision), ("prune", 0.0))
    }


def test_constraint_violation_limits_are_inclusive(setup):
    study = _with(setup[0], max_accuracy_drop=0.25, max_size_ratio=0.5)
    assert search.constraint_violation(study, 0.75, 1000, (0.1, 0.5, 500)) is None  # both exactly at their limits
    assert "accuracy drop 0.260" in search.constraint_violation(study, 0.76, 1000, (0.1, 0.5, 500))
    assert "size ratio 0.501" in search.constraint_violation(study, 0.75, 1000, (0.1, 0.5, 501))
    assert search.constraint_violation(study, 0.75, 1000, (0.1, 0.9, 100)) is None  # size, not accuracy, in [2]


def test_dominates():
    assert search.dominates((0.5, 0.9, 100), (0.4, 0.9, 100))
    assert not search.dominates((0.5, 0.8, 100), (0.5, 0.9, 100))  # lower accuracy: never dominates
    assert search.dominates((0.5, 0.9, 100), (0.5, 0.8, 100))
    assert search.dominates((0.5, 0.9, 100), (0.5, 0.9, 101))
    assert not search.dominates((0.5, 0.9, 100), (0.5, 0.9, 100))  # equal values: neither dominates
    assert not search.dominates((0.5, 0.9, 100), (0.6, 0.8, 50))
    assert not search.dominates((0.5, 0.9, 100), (0.4, 0.9, 99))


def test_racing_stops_only_dominated_trials_and_keeps_every_certificate_and_the_front(setup):
    study = setup[0]
    plain = _run(setup, _with(study, race=[]))
    order = [t.params for t in plain.trials]
    raced = _run(setup, _with(study, race=[0.25, 0.5, 0.75]), params=order)

    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in plain.trials)
    stopped = [t for t in raced.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert stopped, "racing stopped no trial: the test would not see a wrong stop"
    assert len(stopped) < TRIALS
    for before, after in zip(plain.trials, raced.trials, strict=True):
        assert before.params == after.params
        if after.state == optuna.trial.TrialState.COMPLETE:
            assert after.values == before.values  # the same samples, the same certificate
            assert after.user_attrs["samples"] == before.user_attrs["samples"]
            continue
        attrs = after.user_attrs
        # The bound held: the full run would have reached at most the upper ACR it was stopped with...
        assert attrs["upper_acr"] >= before.values[0]
        assert (attrs["accuracy"], attrs["size_bytes"]) == (before.user_attrs["accuracy"], before.values[2])
        assert attrs["samples"] < before.user_attrs["samples"]
        # ...and the trial named as its dominator, complete before it, dominates its full values too.
        rival = raced.trials[int(attrs["stopped"].removeprefix("dominated by trial "))]
        assert rival.number < after.number and rival.state == optuna.trial.TrialState.COMPLETE
        assert search.dominates(tuple(rival.values), tuple(before.values))
    assert _front_numbers(raced) == _front_numbers(plain)
    saved = 1 - sum(t.user_attrs["samples"] for t in raced.trials) / sum(t.user_attrs["samples"] for t in plain.trials)
    print(f"racing: {len(stopped)} of {TRIALS} trials stopped, {saved:.0%} of the samples saved")


def _front_numbers(optuna_study):
    """The trials on the front, by number: a tied trial that racing dropped is missing here, not hidden by its twin."""
    return {t.number for t in trials.front(optuna_study)}


def _one_layer(layer, precision):
    """Trial params: ``precision`` on ``layer``, fp32 elsewhere, no pruning."""
    params = _uniform("fp32")
    params[f"{layer}.precision"] = precision
    return params


TIES = [_one_layer("fc1", "fp16"), _one_layer("fc1", "bf16")]
"""fp16 or bf16 weights in the largest layer lose nothing here: the two trials tie (same ACR, accuracy and size) on
the front."""


def tied_trials_after_racing(setup):
    """``(plain, raced)``: the tied trials of :data:`TIES` run without and with racing.

    At n_p = 64 the sum of this cache's radii divided by the input count is one float step below their mean, which is
    how the final ACR averages them: a bound that averaged the other way stopped a trial for its identical twin.
    """
    study = dataclasses.replace(setup[0], irs=dataclasses.replace(setup[0].irs, n_p=64))
    plain = _run(setup, _with(study, race=[]), params=TIES, n_trials=len(TIES))
    raced = _run(setup, _with(study, race=[0.25, 0.5, 0.75]), params=TIES, n_trials=len(TIES))
    return plain, raced


def test_tied_front_trials_all_survive_racing(setup):
    """Every tied front trial is still on the front with racing: none is stopped for a twin with identical values."""
    plain, raced = tied_trials_after_racing(setup)
    values = [tuple(t.values) for t in plain.trials]
    ties = {t.number for t in plain.trials if values.count(tuple(t.values)) > 1}
    assert len(ties) == len(TIES) and ties == _front_numbers(plain), "the test needs tied trials on the front"
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in raced.trials), [
        t.user_attrs.get("stopped") for t in raced.trials
    ]
    assert _front_numbers(raced) == _front_numbers(plain)


def test_a_bound_averaged_otherwise_than_the_acr_is_caught(setup, monkeypatch):
    """Mutant: upper_acr sums the evaluated inputs' radii and divides (the final ACR is a mean over all inputs)."""
    bad = mutant(
        IRSRun.upper_acr,
        "return acr(self._all_inputs(optimistic))",
        "return float(optimistic.sum() / len(self.cache))",
    )
    monkeypatch.setattr(IRSRun, "upper_acr", bad)
    plain, raced = tied_trials_after_racing(setup)
    assert _front_numbers(raced) < _front_numbers(plain)


def test_an_infeasible_candidate_stops_before_any_sample(setup):
    study = _with(setup[0], max_size_ratio=0.6)
    fp32, int8 = _uniform("fp32"), _uniform("int8")
    result = _run(setup, study, params=[fp32, int8], n_trials=2)
    stopped, complete = result.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and stopped.user_attrs["samples"] == 0
    assert "max_size_ratio" in stopped.user_attrs["stopped"] and stopped.user_attrs["race_stage"] == 0.0
    assert stopped.user_attrs["summary"] == search.ApproximationConfig.from_dict(stopped.user_attrs["config"]).summary()
    assert 0 <= stopped.user_attrs["seconds"] < 60
    assert complete.state == optuna.trial.TrialState.COMPLETE and complete.user_attrs["feasible"]
    # Without racing the same candidate runs in full and is recorded infeasible.
    plain = _run(setup, _with(study, race=[]), params=[fp32], n_trials=1)
    assert plain.trials[0].state == optuna.trial.TrialState.COMPLETE and not plain.trials[0].user_attrs["feasible"]


def test_evaluate_without_race_never_stops(setup):
    study, model, inputs, cache, _ = setup
    config = search.ApproximationConfig.from_dict(
        {"layers": {name: {"precision": "int4", "prune": 0.5} for name in ("conv1", "conv2", "fc1", "fc2")}}
    )
    result = search.evaluate(model, config, inputs, cache, study)
    plan = IRSRun(apply_approximation(model, config), inputs, cache, study.irs_settings)
    assert result.samples == int(plan.counts.sum()) > 0  # every planned sample, none stopped
    # What the trial records is its certificate's: confidence, ACR, certified accuracy, share of direct radii.
    certificate = plan.result()
    assert result.confidence == 1.0 - study.irs_settings.total_alpha(cache.meta.alpha)
    assert (result.acr, result.mean_zeta, result.direct_share) == (
        certificate.acr,
        certificate.mean_zeta,
        certificate.direct_share,
    )
    assert result.certified_accuracy == {f"{r:g}": certificate.certified_accuracy(r) for r in search.REPORT_RADII}
    assert 0 <= result.seconds < 60

    def always(upper):
        return "stop"

    with pytest.raises(search.Stopped) as stop:
        search.evaluate(model, config, inputs, cache, study, race=always)
    assert stop.value.samples == 0 and stop.value.upper[0] >= result.acr


def test_a_study_from_before_irs_zeta_resumes_only_with_the_papers_zeta(setup):
    """Studies created before ``irs.zeta`` existed counted disagreements: resuming them with losses is refused."""
    study, model, _, cache, base_accuracy = setup
    attrs = search.study_attrs(study, cache, base_accuracy, model)
    assert attrs["irs_zeta"] == "loss"
    recorded = {k: v for k, v in attrs.items() if k != "irs_zeta"}
    with pytest.raises(search.StudyMismatchError, match="irs_zeta: study has 'disagreement', now 'loss'"):
        search._check_recorded(study, recorded, attrs)
    search._check_recorded(study, recorded, {**attrs, "irs_zeta": "disagreement"})


def test_a_study_of_a_format_1_cache_is_refused_with_a_request_for_a_new_study(setup):
    """Trials certified against format 1's noise must not share a front with trials of this noise."""
    study, model, _, cache, base_accuracy = setup
    attrs = search.study_attrs(study, cache, base_accuracy, model)
    assert attrs["cache_format"] == 2
    recorded = {k: v for k, v in attrs.items() if k != "cache_format"}  # as studies recorded before format 2
    recorded["cache_fingerprint"] = "of the format 1 cache"
    with pytest.raises(search.StudyMismatchError) as refused:
        search._check_recorded(study, recorded, attrs)
    message = " ".join(str(refused.value).split())
    assert "tuned against a base cache of format 1, whose noise this approxtune no longer draws" in message
    assert "cannot be mixed with new ones; tune a new study" in message
    assert "every worker must read the same cache" not in message


def test_a_repeated_configuration_takes_the_earlier_result_without_sampling(setup):
    """A repeat is the same f^p on the same cached noise: same values and attributes, no samples, ``same_as``."""
    study = _with(setup[0], race=[])
    fp32, int8 = _uniform("fp32"), _uniform("int8")
    first, other, again = _run(setup, study, params=[int8, fp32, int8], n_trials=3).trials
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in (first, other, again))
    assert first.user_attrs["same_as"] is None and first.user_attrs["samples"] > 0
    assert again.values == first.values and again.user_attrs["same_as"] == first.number
    assert again.user_attrs["samples"] == 0
    same = {k for k in first.user_attrs if k not in ("samples", "seconds", "same_as", "worker")}
    assert {k: again.user_attrs[k] for k in same} == {k: first.user_attrs[k] for k in same}
    assert again.constraints == first.constraints


def test_a_repeat_of_a_stopped_trial_stops_at_once(setup):
    study = _with(setup[0], max_size_ratio=0.6)
    fp32 = _uniform("fp32")
    first, again = _run(setup, study, params=[fp32, fp32], n_trials=2).trials
    assert first.state == again.state == optuna.trial.TrialState.PRUNED
    assert again.user_attrs["same_as"] == first.number and again.user_attrs["samples"] == 0
    assert again.user_attrs["stopped"].startswith(f"same configuration as trial {first.number}, which was stopped")
    # Without racing, a repeat of a stopped trial is certified in full: the user asked for every certificate.
    _, model, inputs, cache, base_accuracy = setup
    same_study = _run(setup, study, params=[fp32], n_trials=1)
    same_study.enqueue_trial(fp32)
    plain = search.make_objective(_with(study, race=[]), model, inputs, cache, base_accuracy, "cpu")
    same_study.optimize(plain, n_trials=1)
    stopped, full = same_study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED and full.state == optuna.trial.TrialState.COMPLETE
    assert full.user_attrs["same_as"] is None and full.user_attrs["samples"] > 0
    for key in ("race_stage", "summary", "upper_acr"):  # the stopped repeat records what its twin recorded
        assert again.user_attrs[key] == first.user_attrs[key]
    assert 0 <= again.user_attrs["seconds"] < 5
    # With racing on again, a third repeat takes the complete twin's certificate, not the stopped twin's stop.
    same_study.enqueue_trial(fp32)
    same_study.optimize(search.make_objective(study, model, inputs, cache, base_accuracy, "cpu"), n_trials=1)
    third = same_study.trials[2]
    assert third.state == optuna.trial.TrialState.COMPLETE and third.user_attrs["same_as"] == full.number
    assert third.values == full.values and third.user_attrs["samples"] == 0 and 0 <= third.user_attrs["seconds"] < 5


def test_clean_accuracy_is_the_exact_count_over_the_total():
    """Two of three correct is 2/3 in float64, not float32's 0.6666666865348816."""

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 3).float()

    x = torch.tensor([0.0, 1.0, 2.0]).reshape(3, 1, 1, 1)
    inputs = search.Inputs(x=x, y=torch.tensor([0, 1, 0]), index=np.arange(3))
    accuracy = search.clean_accuracy(Fixed(), inputs)
    assert type(accuracy) is float and accuracy == 2 / 3


def test_a_complete_trial_records_its_exact_result_and_radii_and_shows_rounded_attributes(setup):
    study, model, inputs, cache, _ = setup
    trial = _run(setup, _with(study, race=[]), params=[_uniform("int4")], n_trials=1).trials[0]
    result = search.TrialResult.from_trial(trial)
    assert result.values == tuple(trial.values) and result.same_as is None
    config = search.ApproximationConfig.from_dict(trial.user_attrs["config"])
    exact = search.evaluate(model, config, inputs, cache, study)
    assert np.array_equal(result.radii, exact.radii) and np.array_equal(trials.trial_radii(trial), exact.radii)
    assert len(result.radii) == len(cache) and statistics.acr(result.radii) == trial.values[0]
    assert (result.size_ratio, result.certified_accuracy) == (exact.size_ratio, exact.certified_accuracy)
    attrs = trial.user_attrs
    assert attrs["accuracy"] == round(trial.values[1], 4) and attrs["acr"] == round(trial.values[0], 4)
    assert type(attrs["size_bytes"]) is int and attrs["size_bytes"] == trial.values[2]
    assert attrs["size_ratio"] == round(exact.size_ratio, 4)
    assert all(v == round(v, 4) for v in attrs["certified_accuracy"].values())
    assert {k: v for k, v in attrs.items() if k.startswith("layer ")} == {
        f"layer {name}": "int4" for name in ("conv1", "conv2", "fc1", "fc2")
    }


def test_a_repeat_records_the_earlier_trials_exact_result_and_radii(setup):
    study = _with(setup[0], race=[])
    pruned = {**_uniform("int8"), "fc1.prune": 0.3}
    first, again = _run(setup, study, params=[pruned, pruned], n_trials=2).trials
    a, b = search.TrialResult.from_trial(first), search.TrialResult.from_trial(again)
    assert b.same_as == first.number and b.samples == 0
    assert dataclasses.replace(b, samples=a.samples, seconds=a.seconds, same_as=None) == a
    assert np.array_equal(a.radii, b.radii)
    assert first.user_attrs["layer fc1"] == again.user_attrs["layer fc1"] == "int8, 30% pruned"


def test_a_stopped_trial_shows_its_upper_acr_rounded_up():
    stopped = search.Stopped("dominated by trial 1", 0.25, (0.123401, 0.9333333, 1000), 10, 0.123, "summary")
    attrs = stopped.to_attrs()
    assert (attrs["upper_acr"], attrs["accuracy"], attrs["size_bytes"], attrs["seconds"]) == (
        0.1235,
        0.9333,
        1000,
        0.12,
    )


def test_an_upper_bound_is_rounded_up_and_rounding_again_changes_nothing():
    rng = np.random.default_rng(0)
    for value in [*rng.uniform(0, 2, 1000), 0.1234, 0.12341, 0.99999, 0.0]:
        shown = search._rounded_up(float(value))
        assert shown >= value and shown - value < 1e-4 + 1e-12 and shown == round(shown, 4)
        assert search._rounded_up(shown) == shown
