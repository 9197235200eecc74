"""What optuna-dashboard shows of a trial: per-layer attributes and a markdown note, read back through its JSON API."""

import dataclasses
import json

import optuna
import pytest
from _studies import prepared, tiny_study
from _wsgi import wsgi_get

from approxtune import dashboard, search
from approxtune.approximation import ApproximationConfig, LayerChoice
from approxtune.trials import RESULT_ATTR

LAYERS = ("conv1", "conv2", "fc1", "fc2")
BASE = {"acr": 0.4228, "accuracy": 0.96}


def _params(precision, prune=0.0, **layers):
    params = {f"{name}.{key}": value for name in LAYERS for key, value in (("precision", precision), ("prune", prune))}
    for name, (p, amount) in layers.items():
        params.update({f"{name}.precision": p, f"{name}.prune": amount})
    return params


def test_layer_attrs_name_every_layer_in_words():
    config = ApproximationConfig({"conv1": LayerChoice("int8"), "fc1": LayerChoice("int4", 0.2)})
    assert dashboard.layer_attrs(config) == {"layer conv1": "int8", "layer fc1": "int4, 20% pruned"}
    assert dashboard.layer_attrs(ApproximationConfig({"fc2": LayerChoice("fp16")}, global_prune=0.3)) == {
        "layer fc2": "fp16",
        "global prune": "30% of the weights of all layers together",
    }


ATTRS = {
    "acr": 0.3901,
    "accuracy": 0.955,
    "size_bytes": 39136,
    "size_ratio": 0.2556,
    "certified_accuracy": {"0.25": 0.83, "0.5": 0.7, "0.75": 0.41, "1": 0.0},
    "mean_zeta": 0.01234,
    "direct_share": 0.125,
    "confidence": 0.998,
    "samples": 80000,
    "seconds": 1.53,
    "same_as": None,
    "baseline": "int8",
    "config": {"layers": {"conv1": {"precision": "int8", "prune": 0.0}, "fc1": {"precision": "int4", "prune": 0.2}}},
}


def test_the_note_of_a_complete_trial_has_a_layer_table_and_the_certificate_numbers():
    note = dashboard.trial_note(3, ATTRS, BASE)
    lines = note.splitlines()
    assert lines[0] == "### Trial 3 · baseline `int8`"
    assert "**ACR 0.3901** (base model g: 0.4228) · **accuracy 0.9550** (g: 0.9600)" in note
    assert "**39,136 bytes** (25.6% of fp32)" in note
    assert "| `conv1` | int8 | – |" in lines and "| `fc1` | int4 | 20% |" in lines
    assert "| radius r | 0.25 | 0.5 | 0.75 | 1 |" in lines
    assert "| certified accuracy at r | 0.8300 | 0.7000 | 0.4100 | 0.0000 |" in lines
    assert "each radius holds with probability ≥ 0.998" in note
    assert "| forward passes | 80,000 |" in lines and "| feasible | yes |" in lines
    assert "Same configuration" not in note
    infeasible = dashboard.trial_note(3, {**ATTRS, "same_as": 1}, BASE, "size ratio 0.256 > max_size_ratio")
    assert "| feasible | no: size ratio 0.256 > max_size_ratio |" in infeasible.splitlines()
    assert "Same configuration as trial 1: its certificate" in infeasible


def test_the_note_of_a_stopped_trial_says_why_and_what_it_had_seen():
    attrs = {
        "stopped": "dominated by trial 2",
        "race_stage": 0.25,
        "upper_acr": 0.3125,
        "accuracy": 0.95,
        "size_bytes": 20000,
        "samples": 1200,
        "config": ATTRS["config"],
    }
    note = dashboard.trial_note(7, attrs, BASE)
    assert note.startswith("### Trial 7 · stopped by racing")
    assert "Stopped after 25.0% of its samples: dominated by trial 2." in note
    assert "Stopped before its first sample: x." in dashboard.trial_note(
        7, {**attrs, "race_stage": 0.0, "stopped": "x"}, BASE
    )
    assert "| best reachable ACR | ≤ 0.3125 (base model g: 0.4228) |" in note
    assert "| `fc1` | int4 | 20% |" in note and "Certificate" not in note


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """An in-memory study of a complete trial, its repeat and a trial stopped by racing, as optuna-dashboard's JSON
    API serves it."""
    from optuna_dashboard import wsgi

    with pytest.MonkeyPatch.context() as mp:
        study, model, inputs, cache, base_accuracy = prepared(
            tmp_path_factory.mktemp("dashboard"), tiny_study("dash", seed=5), mp
        )
    constraints = dataclasses.replace(study.search.constraints, max_size_ratio=0.5)  # fp32 is stopped at once
    study = dataclasses.replace(study, search=dataclasses.replace(study.search, constraints=constraints))
    storage = optuna.storages.InMemoryStorage()
    optuna_study = optuna.create_study(storage=storage, study_name="dash", directions=list(search.DIRECTIONS))
    int8 = _params("int8", fc1=("int4", 0.2))
    for params in (int8, int8, _params("fp32")):
        optuna_study.enqueue_trial(params)
    objective = search.make_objective(study, model, inputs, cache, base_accuracy, "cpu")
    optuna_study.optimize(objective, n_trials=3)
    app = wsgi(storage)
    study_id = json.loads(wsgi_get(app, "/api/studies"))["study_summaries"][0]["study_id"]
    detail = json.loads(wsgi_get(app, f"/api/studies/{study_id}", "after=0"))
    return optuna_study, {t["number"]: t for t in detail["trials"]}, float(cache.summary()["acr"])


def test_every_finished_trial_has_its_note_in_the_dashboard(served):
    optuna_study, trials, base_acr = served
    first, again, stopped = (trials[i] for i in range(3))
    assert [t.state for t in optuna_study.trials] == [optuna.trial.TrialState.COMPLETE] * 2 + [
        optuna.trial.TrialState.PRUNED
    ]
    exact = optuna_study.trials[0]
    body = first["note"]["body"]
    assert body.startswith("### Trial 0\n")
    assert f"**ACR {exact.values[0]:.4f}** (base model g: {base_acr:.4f})" in body
    assert "| `fc1` | int4 | 20% |" in body and "| `conv1` | int8 | – |" in body
    assert "Same configuration as trial 0" in again["note"]["body"]
    assert stopped["note"]["body"].startswith("### Trial 2 · stopped by racing")
    assert "max_size_ratio" in stopped["note"]["body"]


def test_the_dashboard_shows_attributes_rounded_to_what_they_mean(served):
    optuna_study, trials, _ = served
    exact = optuna_study.trials[0]
    for number in (0, 1):
        attrs = {a["key"]: a["value"] for a in trials[number]["user_attrs"]}
        assert attrs["accuracy"] == str(round(exact.values[1], 4)) and attrs["acr"] == str(round(exact.values[0], 4))
        assert attrs["size_bytes"] == str(int(exact.values[2])), "a size is a whole number of bytes"
        assert len(attrs["size_ratio"].split(".")[1]) <= 4 and len(attrs["seconds"].split(".")[1]) <= 2
        assert attrs["layer fc1"] == "int4, 20% pruned" and attrs["layer conv1"] == "int8"
        assert json.loads(attrs["certified_accuracy"]) == {
            r: round(a, 4) for r, a in search.TrialResult.from_trial(exact).certified_accuracy.items()
        }
    stopped = {a["key"]: a["value"] for a in trials[2]["user_attrs"]}
    assert stopped["layer conv1"] == "fp32" and stopped["size_bytes"].isdigit()
    assert not any(a["key"] == RESULT_ATTR for a in trials[0]["user_attrs"]), "the exact record is not shown"
