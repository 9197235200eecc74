"""The guided sampler: exact sizes, proposals the objective accepts, no configuration twice, a better front than
blind samplers on the values it predicts; a user's own model; `tune` measures the sensitivities once, then reuses them.
"""

import dataclasses

import numpy as np
import optuna
import pytest
import torch
from _studies import prepared, tiny_study
from torch import nn

from approxtune import guided, search
from approxtune.approximation import ApproximationConfig, model_size_bytes
from approxtune.cache import CertifySettings, build_base_cache
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.data import digits_splits
from approxtune.hypervolume import study_hypervolume


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("guided")
    text = tiny_study("guided", seed=4).replace("[search]\n", "[search]\nsampler = 'guided'\n")
    with pytest.MonkeyPatch.context() as mp:
        study, model, inputs, cache, _ = prepared(root, text, mp)
        layers = search.searched_layers(study, model)
        guide, measured = guided.build_guide(study, model, inputs, cache, layers)
    assert measured
    return study, model, inputs, cache, layers, guide


def _random_keys(guide, count, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(j) for j in rng.integers(len(guide.choices), size=len(guide.layers))) for _ in range(count)]


def test_sizes_add_up_over_layers(setup):
    _, model, *_, guide = setup
    for key in _random_keys(guide, 25):
        assert guide.size(key) == model_size_bytes(model, guide.config(key))


def test_proposals_are_the_configurations_the_objective_builds_and_never_repeat(setup):
    study, _, _, _, layers, guide = setup
    sampler = guided.GuidedSampler(guide, seed=0)
    optuna_study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=sampler)
    search.enqueue_baselines(optuna_study, study, layers)
    proposed, built = [], []

    def objective(trial):
        config = search.suggest_config(trial, layers, study)
        built.append(config)
        key = guide.key(trial.params)
        proposed.append(key)
        return guide.predict(key)

    optuna_study.optimize(objective, n_trials=30)
    assert all(guide.config(k) == c for k, c in zip(proposed, built, strict=True))
    assert len(set(proposed)) == len(proposed) == 30


def test_a_running_trial_counts_as_taken(setup):
    """With several workers, a configuration another worker is certifying is not proposed again."""
    study, _, _, _, layers, guide = setup
    optuna_study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=guided.GuidedSampler(guide, seed=1))
    first, second = optuna_study.ask(), optuna_study.ask()
    assert search.suggest_config(first, layers, study) != search.suggest_config(second, layers, study)
    # Two trials choosing at the same moment: the later one leaves the best proposal to the earlier one.
    alone = guide.config(guide.propose([], set(), np.random.default_rng(0)))
    optuna_study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=guided.GuidedSampler(guide, seed=1))
    first, second = optuna_study.ask(), optuna_study.ask()
    later = search.suggest_config(second, layers, study)
    assert search.suggest_config(first, layers, study) == alone != later


def _front_after(guide, sampler, trials):
    """Hypervolume after ``trials`` trials whose values are the guide's predictions (a noiseless objective)."""
    optuna_study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=sampler)
    optuna_study.optimize(lambda trial: guide.predict(guide.key(_suggest(trial, guide))), n_trials=trials)
    values = [t.values for t in optuna_study.trials]
    return study_hypervolume(values, guide.base_acr, guide.fp32_size)


def _suggest(trial, guide):
    for name, distribution in guide.distributions().items():
        trial.suggest_categorical(name, distribution.choices)
    return trial.params


def test_on_its_own_predictions_the_guide_finds_a_better_front_than_blind_samplers(setup):
    *_, guide = setup
    trials = 20
    mine = _front_after(guide, guided.GuidedSampler(guide, seed=0), trials)
    for blind in (optuna.samplers.RandomSampler(seed=0), optuna.samplers.NSGAIISampler(population_size=10, seed=0)):
        assert mine > _front_after(guide, blind, trials)
    # The first proposal is the predicted-front configuration that alone dominates the most.
    pool = guide.predicted_front()
    best = max(pool, key=lambda k: study_hypervolume([guide.predict(k)], guide.base_acr, guide.fp32_size))
    assert guide.propose([], set(), np.random.default_rng(0)) == best


def test_a_guided_sampler_needs_its_guide(setup):
    study, *_ = setup
    with pytest.raises(ValueError, match="layer sensitivities"):
        search.make_sampler(study)


class UserNet(nn.Module):
    """A model approxtune does not ship: two convolutions of different shapes and a linear head, with a bias-free
    layer and a non-default padding."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=2, bias=False)
        self.mix = nn.Conv2d(6, 4, 5)
        self.head = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.head(torch.relu(self.mix(torch.relu(self.stem(x)))).flatten(1))


def test_a_users_model(tmp_path):
    """Sensitivities, exact sizes and guided trials certified by IRS for a model that is not built into approxtune."""
    torch.manual_seed(0)
    model = UserNet().eval()
    splits = digits_splits(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(60):  # a quick fit under noise, so that the smoothed model certifies something
        x = splits["train"].x + 0.25 * torch.randn_like(splits["train"].x)
        loss = nn.functional.cross_entropy(model(x), splits["train"].y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    inputs = splits["search"].head(24)
    path = tmp_path / "user.toml"
    path.write_text(
        f"[study]\noutput_dir = '{tmp_path}'\n[certify]\nsigma = 0.25\nn0 = 16\nn = 200\n[irs]\nn_p = 100\n"
        "[search]\nsampler = 'guided'\nguide_samples = 4\n"
    )
    study = load_study(path)
    cache = build_base_cache(model, inputs, tmp_path / "user.cache", CertifySettings(0.25, 16, 200, 0.001, seed=3))
    layers = search.searched_layers(study, model)
    assert layers == ["stem", "mix", "head"]
    guide, _ = guided.build_guide(study, model, inputs, cache, layers)
    assert len(guide.sensitivity.lost) == 3 * 9
    for key in _random_keys(guide, 10, seed=1):
        assert guide.size(key) == model_size_bytes(model, guide.config(key))
    optuna_study = optuna.create_study(
        directions=list(search.DIRECTIONS), sampler=search.make_sampler(study, guide=guide)
    )
    objective = search.make_objective(study, model, inputs, cache, search.clean_accuracy(model, inputs), "cpu")
    optuna_study.optimize(objective, n_trials=6)
    complete = [t for t in optuna_study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete and all(t.user_attrs["samples"] > 0 for t in complete)
    no_race = dataclasses.replace(study, search=dataclasses.replace(study.search, race=[]))
    for t in complete:  # racing and the guide change no certificate
        config = ApproximationConfig.from_dict(t.user_attrs["config"])
        assert search.evaluate(model, config, inputs, cache, no_race).values == tuple(t.values)


def test_tune_measures_the_sensitivities_once_and_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "g.toml"
    path.write_text(tiny_study("g", seed=2).replace("[search]\n", "[search]\nsampler = 'guided'\n"))
    assert main(["tune", str(path)]) == 0
    err = capsys.readouterr().err
    assert "Measured the layer sensitivities (36 single-layer choices" in err
    files = list((tmp_path / "runs" / "g").glob("*.sensitivity-*.json"))
    assert len(files) == 1
    path.write_text(path.read_text().replace("trials = 9", "trials = 11"))
    assert main(["tune", str(path)]) == 0
    assert "Reusing the layer sensitivities" in capsys.readouterr().err
    study = optuna.load_study(study_name="g", storage=f"sqlite:///{tmp_path / 'runs/g/study.db'}")
    configs = [t.user_attrs["summary"] for t in study.trials]
    assert len(configs) == 11 and len(set(configs)) == 11  # the guide never proposes a configuration twice
