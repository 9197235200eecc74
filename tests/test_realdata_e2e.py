"""The command line end to end on real-data formats: ``certify``, ``tune`` (and ``export``) of a CIFAR-10 study.

Everything is written in the exact on-disk formats a user has: a ``cifar-10-batches-py/test_batch`` pickled as
Python 2 wrote it, a Cohen et al. ``checkpoint.pth.tar`` (``{'epoch', 'arch', 'state_dict', 'optimizer'}``) of a
randomly initialised ``cifar_resnet20``, and a ``.npz`` tensor file with a ``digits-cnn`` checkpoint written by
``save_checkpoint``.  Settings are tiny (n = 64) so that the whole module runs in seconds on one CPU thread; with
``certify.device = "auto"`` it runs on the GPU where there is one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from _realdata_formats import write_cifar10, write_cifar_batch

from approxtune.cache import load_cache
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.models import DigitsCNN, cifar_resnet20, load_checkpoint, save_checkpoint

pytestmark = pytest.mark.slow

CIFAR_IMAGES = 25
SEARCH, REPORT, SPLIT_SEED = 6, 4, 5

CIFAR_STUDY = """
[study]
name = "cifar-e2e"
output_dir = "runs/cifar-e2e"
seed = 3
[model]
arch = "cifar_resnet20"
checkpoint = "{checkpoint}"
[data]
dataset = "cifar10"
root = "{root}"
split_seed = {split_seed}
search_inputs = {search}
report_inputs = {report}
[certify]
sigma = 0.5
n0 = 8
n = 64
alpha = 0.001
batch_size = 128
device = "auto"
[irs]
n_p = 32
[search]
trials = 2
baselines = false
precisions = ["fp32", "int8"]
prune = [0.0]
"""


def _expected(total: int, split_seed: int, report: int, search: int) -> dict[str, list[int]]:
    """Report: the first ``report`` of a seeded permutation of the dataset; search: the next ``search``; sorted."""
    order = np.random.default_rng(split_seed).permutation(total)
    return {"report": sorted(order[:report].tolist()), "search": sorted(order[report : report + search].tolist())}


def _cohen_checkpoint(path: Path) -> Path:
    """A random cifar_resnet20, saved as Cohen et al.'s code/train.py saves ``checkpoint.pth.tar``."""
    torch.manual_seed(0)
    model = cifar_resnet20()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    model(torch.rand(2, 3, 32, 32)).sum().backward()
    optimizer.step()  # the optimizer state then holds momentum buffers, as a real checkpoint's does
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "epoch": 90,
        "arch": "cifar_resnet20",
        "state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(state, path)
    return path


def _cifar10_labelled_by(root: Path, model: torch.nn.Module) -> tuple[np.ndarray, list[int]]:
    """``root/cifar-10-batches-py/test_batch`` of random images, each labelled with ``model``'s class for it.

    A random model is right on about a tenth of randomly labelled images, and may then certify none of a handful of
    search inputs; labelling by its own predictions gives IRS certified inputs to work on.
    """
    data, _ = write_cifar10(root, {"test_batch": CIFAR_IMAGES})["test_batch"]
    with torch.inference_mode():
        labels = model(torch.from_numpy(data.reshape(-1, 3, 32, 32)).float() / 255).argmax(1).tolist()
    write_cifar_batch(root / "cifar-10-batches-py" / "test_batch", data, labels)  # Python 2's pickle, as released
    return data, labels


@pytest.fixture(scope="module")
def cifar_run(tmp_path_factory):
    """Write CIFAR-10 + a Cohen checkpoint, then run certify (both splits) and tune in a fresh working directory."""
    root = tmp_path_factory.mktemp("cifar-e2e")
    checkpoint = _cohen_checkpoint(root / "models" / "cifar10" / "resnet20" / "noise_0.50" / "checkpoint.pth.tar")
    written = _cifar10_labelled_by(root / "data", load_checkpoint(checkpoint, "cifar_resnet20"))
    study_file = root / "work" / "cifar.toml"
    study_file.parent.mkdir()
    study_file.write_text(
        CIFAR_STUDY.format(
            checkpoint=checkpoint, root=root / "data", split_seed=SPLIT_SEED, search=SEARCH, report=REPORT
        )
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(study_file.parent)
        assert main(["certify", "cifar.toml"]) == 0
        assert main(["certify", "cifar.toml", "--split", "report"]) == 0
        study = load_study("cifar.toml")
        built = {split: (study.cache_path(split) / "meta.json").stat().st_mtime_ns for split in ("search", "report")}
        assert main(["tune", "cifar.toml"]) == 0
        reused = {split: (study.cache_path(split) / "meta.json").stat().st_mtime_ns for split in ("search", "report")}
    return study_file.parent, written, built == reused


def test_cifar10_certify_caches_the_expected_test_images(cifar_run) -> None:
    work, (_, labels), _ = cifar_run
    expected = _expected(CIFAR_IMAGES, SPLIT_SEED, REPORT, SEARCH)
    for split in ("search", "report"):
        cache = load_cache(work / load_study(work / "cifar.toml").cache_path(split))
        assert cache.index.tolist() == expected[split], "cache rows are the split's images, in dataset order"
        assert cache.label.tolist() == [labels[i] for i in expected[split]]
        assert cache.predictions.shape == (len(expected[split]), 64)
        assert (cache.meta.n0, cache.meta.n, cache.meta.sigma) == (8, 64, 0.5)
        assert cache.certified.any(), "g certifies some inputs, so the trials exercise IRS"
    assert not set(expected["search"]) & set(expected["report"])


def test_cifar10_tune_reuses_the_cache_and_runs_trials(cifar_run) -> None:
    work, _, caches_reused = cifar_run
    assert caches_reused, "tune reused the base caches that certify wrote"
    study = optuna.load_study(study_name="cifar-e2e", storage=f"sqlite:///{work / 'runs/cifar-e2e/study.db'}")
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(finished) == 2 and trials and study.metric_names == ["ACR", "accuracy", "size_bytes"]
    assert study.user_attrs["n"] == 64 and study.user_attrs["n_p"] == 32
    params = trials[0].params
    assert params and {v for k, v in params.items() if k.endswith(".precision")} <= {"fp32", "int8"}
    assert len(params) == 2 * 22, "a precision and a pruning amount for each of ResNet-20's 21 convs and 1 linear"
    assert (work / "runs/cifar-e2e/front.png").is_file()


def test_cifar10_export(cifar_run, capsys) -> None:
    pytest.importorskip("approxtune.export")
    work, _, _ = cifar_run
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert main(["export", "cifar.toml", "--trial", "0", "--out", "exported"]) == 0
    assert (work / "exported").is_dir() and (work / "exported" / "certificate.json").is_file()


def test_tensor_file_certify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (30, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 30)
    np.savez(tmp_path / "digits.npz", x=images, y=labels)
    torch.manual_seed(0)
    save_checkpoint(DigitsCNN(), "digits-cnn", tmp_path / "model.pt")
    (tmp_path / "t.toml").write_text(
        f'[model]\narch = "digits-cnn"\ncheckpoint = "{tmp_path / "model.pt"}"\n'
        f'[data]\ndataset = "tensors"\nroot = "{tmp_path / "digits.npz"}"\nsplit_seed = 2\n'
        "search_inputs = 6\nreport_inputs = 4\n[certify]\nn0 = 8\nn = 64\n[irs]\nn_p = 32\n"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["certify", "t.toml"]) == 0
    assert main(["certify", "t.toml", "--split", "report"]) == 0
    expected = _expected(30, 2, 4, 6)
    for split in ("search", "report"):
        cache = load_cache(tmp_path / load_study(tmp_path / "t.toml").cache_path(split))
        assert cache.index.tolist() == expected[split] and cache.label.tolist() == labels[expected[split]].tolist()
