"""Study files for a user's own model and data (``[model] factory``/``torchvision``, ``[data] loader``), end to end
through the command line, and every bad input of such a study: one line, exit 2, nothing written, before any work."""

from __future__ import annotations

import importlib
import itertools
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
import torchvision

from approxtune.cli import main

_names = itertools.count()

USER_CODE = """
import torch
from torch import nn
from sklearn.datasets import load_digits


class TinyMLP(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x):
        return self.body(x)


def make_mlp(hidden=32):
    return TinyMLP(hidden)


def make_nothing():
    return "a string"


not_callable = 42


def load_digits_flat(scale=16.0):
    digits = load_digits()
    return torch.tensor(digits.data / scale, dtype=torch.float32), torch.tensor(digits.target)


def load_broken():
    raise RuntimeError("the data server is down")
"""


def write_user_code(folder: Path) -> str:
    """Write the user's module next to the study file under a fresh name (modules are cached per process)."""
    name = f"user_code_{next(_names)}"
    (folder / f"{name}.py").write_text(USER_CODE)
    return name


def trained_state(module: str, folder: Path) -> Path:
    """Train the user's MLP with noise (a second) and save its state dict, as a user would."""
    import importlib
    import sys

    sys.path.insert(0, str(folder))
    try:
        code = importlib.import_module(module)
    finally:
        sys.path.remove(str(folder))
    torch.manual_seed(0)
    x, y = code.load_digits_flat()
    model = code.make_mlp(hidden=24)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(150):
        loss = torch.nn.functional.cross_entropy(model(x + 0.5 * torch.randn_like(x)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = folder / "mlp.pt"
    torch.save(model.state_dict(), path)
    return path


def study_text(module: str, **overrides: str) -> str:
    sections = {
        "model": f'factory = "{module}:make_mlp"\ncheckpoint = "{{folder}}/mlp.pt"\n[model.kwargs]\nhidden = 24',
        "data": f'dataset = "python"\nloader = "{module}:load_digits_flat"\nsearch_inputs = 30\nreport_inputs = 20',
        "certify": "n0 = 16\nn = 200",
        "irs": "n_p = 100",
        "search": "trials = 5",
    }
    sections.update(overrides)
    return "\n".join(f"[{name}]\n{body}" for name, body in sections.items()) + "\n"


@pytest.fixture(scope="module")
def user_study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    module = write_user_code(folder)
    trained_state(module, folder)
    return folder, module


def run(folder: Path, text: str, *args: str, monkeypatch) -> tuple[int, Path, Path]:
    """``approxtune COMMAND STUDY ARGS`` in a fresh working directory; returns the exit code, study file and folder."""
    number = next(_names)
    study = folder / f"s{number}.toml"
    study.write_text(text.replace("{folder}", str(folder)))
    work = folder / f"work{number}"
    work.mkdir()
    monkeypatch.chdir(work)
    return main([*args[:1], str(study), *args[1:]]), study, work


def test_factory_and_loader_study_end_to_end(user_study, monkeypatch, capsys):
    folder, module = user_study
    code, study, work = run(folder, study_text(module), "tune", monkeypatch=monkeypatch)
    assert code == 0, capsys.readouterr().err
    db = work / "runs" / study.stem / "study.db"
    trials = optuna.load_study(study_name=study.stem, storage=f"sqlite:///{db}").get_trials()
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) >= 3 and set(complete[0].user_attrs["config"]["layers"]) == {"body.0", "body.2"}
    assert max(t.values[0] for t in complete) > 0.1
    assert "Pareto front" in capsys.readouterr().out

    best = max(complete, key=lambda t: t.values[0])
    out = work / "exported"
    assert main(["export", str(study), "--trial", str(best.number), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == {
        "kind": "factory",
        "factory": f"{module}:make_mlp",
        "kwargs": {"hidden": 24},
        "folder": str(folder.resolve()),
    }
    # A fresh process elsewhere rebuilds the factory's model from the recorded folder: predictions equal f^p's.
    code = (  # load_model imports the factory from the recorded folder, which it puts on sys.path
        "import sys, approxtune; m = approxtune.load_model(sys.argv[1]);"
        f"from {module} import load_digits_flat; x, _ = load_digits_flat();"
        "print(type(m).__name__, m(x).argmax(1).tolist()[:300])"
    )
    done = subprocess.run([sys.executable, "-c", code, str(out)], cwd="/", capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    from approxtune.export import load_model

    x, _ = importlib.import_module(module).load_digits_flat()
    expected = load_model(out)(x).argmax(1).tolist()[:300]
    assert done.stdout.split(" ", 1) == ["TinyMLP", f"{expected}\n"]


@pytest.mark.slow
def test_torchvision_study_with_a_checkpoint(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10)
    full = torch.nn.Sequential(torch.nn.Identity(), net)  # keys 1.*: the layout of a model behind a normalisation
    torch.save({"state_dict": full.state_dict()}, tmp_path / "r18.pt")
    generator = np.random.default_rng(0)
    np.savez(tmp_path / "images.npz", x=generator.random((12, 3, 32, 32), np.float32), y=generator.integers(0, 10, 12))
    text = textwrap.dedent(f"""
        [model]
        torchvision = "resnet18"
        num_classes = 10
        mean = [0.5, 0.5, 0.5]
        std = [0.25, 0.25, 0.25]
        checkpoint = "{tmp_path / "r18.pt"}"
        [data]
        dataset = "tensors"
        root = "{tmp_path / "images.npz"}"
        search_inputs = 6
        report_inputs = 4
        [certify]
        n0 = 8
        n = 32
        batch_size = 64
        [irs]
        n_p = 16
        [search]
        trials = 2
    """)
    code, study, work = run(tmp_path, text, "tune", monkeypatch=monkeypatch)
    assert code == 0, capsys.readouterr().err
    trials = optuna.load_study(study_name=study.stem, storage=f"sqlite:///{work / 'runs' / study.stem / 'study.db'}")
    number = next(t.number for t in trials.trials if t.state == optuna.trial.TrialState.COMPLETE)
    assert main(["export", str(study), "--trial", str(number), "--out", "r18", "--runtime", "torch"]) == 0
    from approxtune.export import load_model

    rebuilt = load_model(work / "r18")  # torchvision's resnet18 behind the normalisation layer, rebuilt by name
    assert type(rebuilt[1]).__name__ == "ResNet" and rebuilt[1].fc.out_features == 10
    images = torch.from_numpy(np.load(tmp_path / "images.npz")["x"])
    program = torch.export.load(work / "r18" / "model.pt2").module()
    assert torch.equal(rebuilt(images).argmax(1), program(images).argmax(1))


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"model": 'factory = "no_such_module:make"'},
            r"model.factory = 'no_such_module:make': no module named 'no_such_module' "
            r"\(looked in .* and the Python path\)",
        ),
        ({"model": 'factory = "{module}:make_nothing"'}, r"returned a str, not a torch.nn.Module"),
        ({"model": 'factory = "{module}:not_callable"'}, r"model.factory = '.*:not_callable' is a int, not a callable"),
        ({"model": 'factory = "{module}:make_missing"'}, r"has no 'make_missing'"),
        (
            {"model": 'factory = "{module}:make_mlp"\ncheckpoint = "{folder}/mlp.pt"'},
            r"does not fit architecture '.*make_mlp': missing keys: 4 \(body.0.weight, body.0.bias, body.2.weight, "
            r"body.2.bias\); unexpected keys: 8",
        ),
        (
            {"model": 'torchvision = "resnet81"'},
            r"model.torchvision = 'resnet81' is not a torchvision classification architecture; did you mean 'resnet18'",
        ),
        ({"model": 'arch = "digits-cnn"\nfactory = "{module}:make_mlp"'}, "name the model one way only"),
        (
            {"data": 'dataset = "python"\nloader = "{module}:load_broken"'},
            "data.loader = '.*:load_broken' raised RuntimeError: the data server is down",
        ),
        ({"data": 'dataset = "python"'}, r'data.dataset = "python" needs data.loader'),
        (
            {"data": 'dataset = "python"\nloader = "{module}:load_digits_flat"\nsearch_inputs = 5000'},
            "has 1797 inputs, but data.report_inputs = 200 and data.search_inputs = 5000",
        ),
        (
            {"data": 'dataset = "python"\nloader = "{module}:load_digits_flat"\n[data.kwargs]\nscale = 0.0'},
            r"holds NaN or infinite values",
        ),
    ],
)
def test_bad_user_code_or_data_exits_2_with_one_line_and_writes_nothing(
    user_study, monkeypatch, capsys, overrides, message
):
    folder, module = user_study
    if "mlp.pt" in overrides.get("model", ""):  # a checkpoint of another architecture: the built-in digits CNN's
        from approxtune.models import DigitsCNN

        torch.save(DigitsCNN().state_dict(), folder / "cnn.pt")
        overrides = {"model": overrides["model"].replace("mlp.pt", "cnn.pt")}
    overrides = {k: v.replace("{module}", module) for k, v in overrides.items()}
    code, _, work = run(folder, study_text(module, **overrides), "tune", monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, " ".join(err.split())), err
    assert not any(work.iterdir()), "nothing written"
