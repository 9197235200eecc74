"""The Python API end to end with models and data that approxtune does not know: a small MLP on flattened digits
(tabular inputs), a 1-D convolutional net on synthetic signals (Conv1d), torchvision's ResNet-18 on random images."""

from __future__ import annotations

import json

import numpy as np
import optuna
import pytest
import torch
import torchvision
from sklearn.datasets import load_digits
from torch import nn

import approxtune
from approxtune.approximation import compressible_layers

SMALL = {"n0": 16, "n": 200, "n_p": 100, "search_inputs": 30, "report_inputs": 20, "trials": 5, "verbose": False}


class TinyMLP(nn.Module):
    """A user's own model: flattened 8x8 digits (64 features) -> 10 classes."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SignalNet(nn.Module):
    """A 1-D convolutional net on (N, 2, 32) signals."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 5, padding=2)
        self.head = nn.Linear(8 * 32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))


def digits_flat() -> tuple[torch.Tensor, torch.Tensor]:
    """The user's data: scikit-learn's digits as (1797, 64) float features in [0, 1] and integer labels."""
    digits = load_digits()
    return torch.tensor(digits.data / 16.0, dtype=torch.float32), torch.tensor(digits.target)


def trained_mlp(seed: int = 0, sigma: float = 0.5) -> TinyMLP:
    """A TinyMLP trained with Gaussian noise augmentation for a second."""
    torch.manual_seed(seed)
    x, y = digits_flat()
    model = TinyMLP()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(x + sigma * torch.randn_like(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def mlp() -> TinyMLP:
    return trained_mlp()


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, mlp):
    out = tmp_path_factory.mktemp("api") / "runs"
    result = approxtune.tune(mlp, digits_flat(), output_dir=str(out), name="mlp", **SMALL)
    return out, result


def test_tune_an_own_model_on_own_tabular_data(tuned, mlp):
    out, result = tuned
    assert isinstance(result, approxtune.TuneResult)
    finished = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    assert len(finished) == 5
    assert result.study.user_attrs["sigma"] == 0.5 and result.settings.data.dataset == "python"
    front = result.front
    assert front and {"trial", "acr", "accuracy", "size_bytes", "size_ratio", "config", "confidence"} <= set(front[0])
    assert front[0]["acr"] > 0.1, "a noise-trained MLP certifies digits"
    assert set(front[0]["config"]["layers"]) == {"body.0", "body.2"}, "layers by qualified name"
    assert result.study.user_attrs["base_accuracy"] > 0.8
    assert (out / "study.db").is_file() and any(out.glob("base-search-*.cache"))
    assert mlp.training is False and next(mlp.parameters()).requires_grad, "the user's model is left as it was"


def test_tune_again_continues_the_study_and_refuses_a_changed_model_or_data(tuned, mlp):
    out, _ = tuned
    more = approxtune.tune(mlp, digits_flat(), output_dir=str(out), name="mlp", **{**SMALL, "trials": 7})
    assert len(more.study.trials) >= 7
    caches = sorted(out.glob("base-*"))
    changed = trained_mlp(seed=1)
    with pytest.raises(approxtune.ApproxtuneError, match="tuned against another base certification"):
        approxtune.tune(changed, digits_flat(), output_dir=str(out), name="mlp", **SMALL)
    x, y = digits_flat()
    with pytest.raises(approxtune.ApproxtuneError, match="tuned against another base certification"):
        approxtune.tune(mlp, (x.flip(0), y.flip(0)), output_dir=str(out), name="mlp", **SMALL)
    with pytest.raises(approxtune.ApproxtuneError, match=r"n_p: study has 100, now 80"):
        approxtune.tune(mlp, (x, y), output_dir=str(out), name="mlp", **{**SMALL, "n_p": 80})
    assert sorted(out.glob("base-*")) == caches, "refused before certifying anything"


def test_settings_from_a_study_object_a_dict_or_keywords_are_one_definition(tmp_path):
    from_keywords = approxtune.Study.from_keywords(sigma=0.25, n_p=50, certify_batch_size=64, max_size_ratio=0.5)
    from_dict = approxtune.Study.from_dict(
        {
            "certify": {"sigma": 0.25, "batch_size": 64},
            "irs": {"n_p": 50},
            "search": {"constraints": {"max_size_ratio": 0.5}},
        }
    )
    file = tmp_path / "s.toml"
    file.write_text(
        "[certify]\nsigma = 0.25\nbatch_size = 64\n[irs]\nn_p = 50\n[search.constraints]\nmax_size_ratio = 0.5\n"
    )
    from_file = approxtune.load_study(file)
    assert from_keywords.to_dict() == from_dict.to_dict() == from_file.to_dict()
    on_top = approxtune.Study.from_keywords(from_file, trials=3)
    assert on_top.search.trials == 3 and on_top.certify.sigma == 0.25 and on_top.path == file
    with pytest.raises(approxtune.ApproxtuneError, match="'batch_size' is a key of several sections; say which: "):
        approxtune.Study.from_keywords(batch_size=8)
    with pytest.raises(approxtune.ApproxtuneError, match="unknown setting 'sigmma'; did you mean 'sigma'"):
        approxtune.Study.from_keywords(sigmma=0.5)
    with pytest.raises(approxtune.ApproxtuneError, match=r"certify\.sigma must be a finite number, got inf"):
        approxtune.Study.from_keywords(sigma=float("inf"))


def test_conv1d_signals_any_input_shape(tmp_path):
    """Inputs that are not images: (N, 2, 32) signals; Conv1d is compressible; noise goes where the model's input is."""
    torch.manual_seed(0)
    x = torch.randn(80, 2, 32)
    y = (x[:, 0, :16].mean(dim=1) > x[:, 1, 16:].mean(dim=1)).long() + (x[:, 0].std(dim=1) > 1.1).long()
    model = SignalNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(100):
        loss = nn.functional.cross_entropy(model(x + 0.25 * torch.randn_like(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert compressible_layers(model) == ["conv", "head"]
    settings = {**SMALL, "search_inputs": 20, "report_inputs": 10, "trials": 3}
    result = approxtune.tune(model, (x.numpy(), y.numpy()), sigma=0.25, output_dir=str(tmp_path / "sig"), **settings)
    trials = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert trials and all(set(t.user_attrs["config"]["layers"]) == {"conv", "head"} for t in trials)


def test_torchvision_resnet18_on_random_images_with_a_dataset(tmp_path):
    """A torchvision ResNet-18 (10 classes, random weights) on random 3x32x32 images given as a torch Dataset."""
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (12,), generator=generator)
    dataset = torch.utils.data.TensorDataset(images, labels)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    tiny = {"n0": 8, "n": 32, "n_p": 16, "search_inputs": 6, "report_inputs": 4, "trials": 2, "verbose": False}
    result = approxtune.tune(model, dataset, output_dir=str(tmp_path / "r18"), certify_batch_size=64, **tiny)
    trials = result.study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 2 and len(trials[0].user_attrs["config"]["layers"]) == len(compressible_layers(model))


def test_certify_alone(tmp_path, mlp):
    cert = approxtune.certify(mlp, digits_flat(), output_dir=str(tmp_path / "c"), **{**SMALL, "trials": 0})
    assert isinstance(cert, approxtune.Certification) and cert.built and len(cert.cache) == 30
    again = approxtune.certify(mlp, digits_flat(), output_dir=str(tmp_path / "c"), **{**SMALL, "trials": 0})
    assert not again.built and np.array_equal(again.cache.radius, cert.cache.radius)


def test_a_cache_the_disk_cannot_hold_is_refused_before_certifying(tmp_path, mlp):
    keywords = {**SMALL, "n": 10**12, "trials": 0}
    with pytest.raises(
        approxtune.ApproxtuneError,
        match=r"certifying 30 inputs with certify.n = 1,000,000,000,000 "
        r"makes a cache of 30.0 TB \(twice that while it is written\), but .* free",
    ):
        approxtune.certify(mlp, digits_flat(), output_dir=str(tmp_path / "big"), **keywords)
    assert not (tmp_path / "big").exists()


class NoLayers(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :10]


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x).squeeze(1)


class Binary(TinyMLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :2]


@pytest.mark.parametrize(
    ("model", "data", "keywords", "message"),
    [
        ("not a model", None, {}, "the model is a str, not a torch.nn.Module"),
        (NoLayers(), None, {}, "the model has no layer to compress: approxtune compresses the weights of nn.Conv1d"),
        (TinyMLP(), None, {"include": ["conv*"]}, "include pattern 'conv\\*' matches no compressible layer"),
        (
            Scalar(),
            None,
            {},
            r"logits \(N, classes\) with at least 2 classes; a batch of shape \(2, 64\) gave shape \(2,\)",
        ),
        (Binary(), None, {}, r"labels \[2, 3, 4, .*\] lie outside \[0, 2\): the model predicts 2 classes"),
        (TinyMLP(), "short_y", {}, "x has 1797 inputs but y has 10 labels; give one label per input"),
        (TinyMLP(), "nan", {}, r"holds NaN or infinite values \(rows \["),
        (
            TinyMLP(),
            None,
            {"search_inputs": 1790},
            "has 1797 inputs, but data.report_inputs = 20 and data.search_inputs",
        ),
        (TinyMLP(), "float_y", {}, "the labels y are not whole numbers"),
        (TinyMLP(), "strings", {}, "give \\(x, y\\) tensors or arrays, or a torch Dataset"),
        (TinyMLP(), None, {"factory": "nowhere_at_all:make"}, r"the model is given as an object and in \[model\]"),
    ],
)
def test_bad_model_or_data_raises_one_error_type_before_any_work(tmp_path, model, data, keywords, message):
    x, y = digits_flat()
    data = {
        None: (x, y),
        "short_y": (x, y[:10]),
        "nan": (torch.where(torch.arange(64) == 3, float("nan"), x), y),
        "float_y": (x, y.float() + 0.5),
        "strings": "digits.csv",
    }[data]
    out = tmp_path / "out"
    with pytest.raises(approxtune.ApproxtuneError, match=message):
        approxtune.tune(model, data, output_dir=str(out), **{**SMALL, **keywords})
    assert not out.exists(), "nothing written"


def test_export_an_own_model_and_load_it_back(tuned, tmp_path):
    _, result = tuned
    row = min(result.front, key=lambda r: r["size_bytes"])
    exported = result.export(trial=row["trial"], out=tmp_path / "mlp-export")
    config = json.loads((tmp_path / "mlp-export" / "config.json").read_text())
    assert config["architecture"] == {"kind": "module", "class": "test_api:TinyMLP"}
    assert config["input_shape"] == [64] and config["study_file"] is None
    rebuilt = approxtune.load_model(tmp_path / "mlp-export")  # TinyMLP() rebuilds it: its argument has a default
    x, y = digits_flat()
    assert isinstance(rebuilt, TinyMLP) and torch.equal(rebuilt(x), exported.model(x))
    held = exported.certificate["certificates"]
    assert {h["runtime"] for h in held} == {"onnxruntime", "torch"} and all(h["acr"] > 0 for h in held)
    check = approxtune.verify(tmp_path / "mlp-export", study=result.settings, data=(x, y))
    assert check.reproduced
    with pytest.raises(approxtune.ApproxtuneError, match=r"the report inputs of .* are not the ones"):
        approxtune.verify(tmp_path / "mlp-export", study=result.settings, data=(x.flip(0), y.flip(0)))
    config["architecture"]["class"] = "gone_module_y:TinyMLP"
    (tmp_path / "mlp-export" / "config.json").write_text(json.dumps(config))
    with pytest.raises(approxtune.ApproxtuneError, match=r"no module named 'gone_module_y'.*model=YourNet"):
        approxtune.load_model(tmp_path / "mlp-export")
