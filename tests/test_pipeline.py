"""``pipeline``: the search/report inputs of digits and real datasets, the bundled study files, devices.

Real datasets are written in their exact on-disk formats (``_realdata_formats``); nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from _realdata_formats import write_cifar10
from PIL import Image

from approxtune import data as data_mod
from approxtune import pipeline
from approxtune.approximation import compressible_layers
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.data import DataError, cifar10_inputs, digits_splits, imagefolder_inputs, tensor_file_inputs
from approxtune.models import build_model, cifar_resnet20

REPO = Path(__file__).resolve().parents[1]
STUDIES = sorted((REPO / "studies").glob("*.toml"))
REAL_STUDIES = {
    "cifar10-resnet20.toml": ("cifar_resnet20", "cifar10"),
    "cifar10-resnet110.toml": ("cifar_resnet110", "cifar10"),
    "imagenet-resnet50.toml": ("resnet50", "imagefolder"),
}


def _study(path: Path, dataset: str = "digits", root: str | Path = "", **data) -> Path:
    """A study file with a [data] section; other sections keep their defaults."""
    lines = [f'dataset = "{dataset}"'] + ([f'root = "{root}"'] if root else [])
    lines += [f"{key} = {value}" for key, value in data.items()]
    path.write_text("[data]\n" + "\n".join(lines) + "\n")
    return path


def _plain(text: str) -> str:
    return " ".join(text.split())


def _cohen_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised cifar_resnet20 saved as Cohen et al.'s train.py saves its checkpoint.pth.tar."""
    torch.manual_seed(seed)
    model = cifar_resnet20()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"epoch": 90, "arch": "cifar_resnet20", "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()},
        path,
    )
    return path


# --- digits: unchanged ---------------------------------------------------------------------------------------------


def test_digits_inputs_are_unchanged(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path / "d.toml", search_inputs=50, report_inputs=40, split_seed=2))
    splits = digits_splits(2)
    for split, count in (("search", 50), ("report", 40), ("train", None)):
        inputs = pipeline.load_inputs(study, split)
        expected = splits[split] if count is None else splits[split].head(count)
        assert inputs.fingerprint() == expected.fingerprint()


# --- real datasets: seeded disjoint subsets of the test split ------------------------------------------------------


def test_split_indices_are_disjoint_sorted_and_seeded() -> None:
    got = pipeline.split_indices(50, 7, report=5, search=9)
    order = np.random.default_rng(7).permutation(50)
    assert got["report"].tolist() == sorted(order[:5].tolist())
    assert got["search"].tolist() == sorted(order[5:14].tolist())
    assert not set(got["report"]) & set(got["search"])
    assert pipeline.split_indices(50, 7, report=5, search=20)["report"].tolist() == got["report"].tolist()
    assert pipeline.split_indices(50, 8, report=5, search=9)["report"].tolist() != got["report"].tolist()


def test_cifar10_search_and_report_come_from_the_test_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = write_cifar10(tmp_path / "data", {"test_batch": 40})
    data, labels = written["test_batch"]
    study = load_study(
        _study(tmp_path / "c.toml", "cifar10", tmp_path / "data", split_seed=3, search_inputs=7, report_inputs=5)
    )
    asked = []
    reader = data_mod.cifar10_inputs
    monkeypatch.setattr(data_mod, "cifar10_inputs", lambda *a, **k: asked.append((a, k)) or reader(*a, **k))
    report, search = pipeline.load_inputs(study, "report"), pipeline.load_inputs(study, "search")
    order = np.random.default_rng(3).permutation(40)
    assert report.index.tolist() == sorted(order[:5].tolist())
    assert search.index.tolist() == sorted(order[5:12].tolist())
    for inputs in (report, search):
        assert inputs.x.shape == (len(inputs.index), 3, 32, 32)
        assert torch.equal(inputs.x, torch.from_numpy(data[inputs.index].reshape(-1, 3, 32, 32)).float() / 255)
        assert inputs.y.tolist() == [labels[i] for i in inputs.index]
    # the reader was asked for the test split and only the selected images
    assert [(a[1], len(a[2])) for a, _ in asked] == [("test", 5), ("test", 7)]
    assert torch.equal(report.x, cifar10_inputs(tmp_path / "data", indices=report.index).x)


def test_cifar10_folder_itself_as_root(tmp_path: Path) -> None:
    write_cifar10(tmp_path, {"test_batch": 12})
    folder = tmp_path / "cifar-10-batches-py"
    study = load_study(_study(tmp_path / "c.toml", "cifar10", folder, search_inputs=3, report_inputs=4))
    search = pipeline.load_inputs(study, "search")
    assert search.index.tolist() == pipeline.split_indices(12, 0, report=4, search=3)["search"].tolist()


def test_too_few_images_names_the_counts_and_the_keys(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data", {"test_batch": 10})
    path = _study(tmp_path / "c.toml", "cifar10", tmp_path / "data", search_inputs=7, report_inputs=5)
    with pytest.raises(DataError) as err:
        pipeline.load_inputs(load_study(path), "search")
    assert str(err.value) == (
        f"the CIFAR-10 test split in {tmp_path / 'data' / 'cifar-10-batches-py'} has 10 inputs, but "
        f"data.report_inputs = 5 and data.search_inputs = 7 need 12 distinct ones; lower data.report_inputs or "
        f"data.search_inputs in {path}"
    )


def test_train_split_of_a_real_dataset_asks_for_a_checkpoint(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((20, 1, 8, 8), np.uint8), y=np.zeros(20, np.int64))
    path = _study(tmp_path / "t.toml", "tensors", tmp_path / "d.npz", search_inputs=5, report_inputs=5)
    study = load_study(path)
    message = r"approxtune trains only the embedded digits model; a tensors study needs a trained model: put its"
    with pytest.raises(DataError, match=message + r".*set model.checkpoint in .*t\.toml"):
        pipeline.load_inputs(study, "train")
    with pytest.raises(DataError, match=message):  # digits-cnn is trainable, but not on tensors: no training starts
        pipeline.ensure_model(study)
    assert not study.checkpoint.exists()
    with pytest.raises(ValueError, match="split must be one of search, report"):
        pipeline.load_inputs(study, "test")


def test_missing_cifar10_says_what_to_put_where(tmp_path: Path) -> None:
    path = _study(tmp_path / "c.toml", "cifar10", "/path/to/cifar10", search_inputs=5, report_inputs=5)
    with pytest.raises(DataError) as err:
        pipeline.load_inputs(load_study(path), "search")
    assert str(err.value).startswith(
        "CIFAR-10 not found: /path/to/cifar10/cifar-10-batches-py/test_batch does not exist (approxtune never "
        "downloads data). Extract cifar-10-python.tar.gz"
    )
    assert str(err.value).endswith(
        f"(data.root in {path} must name the folder that holds cifar-10-batches-py/, extracted from "
        f"cifar-10-python.tar.gz)"
    )


def test_imagefolder_decodes_only_the_selected_images(tmp_path: Path) -> None:
    from torchvision.datasets import ImageFolder

    root = tmp_path / "val"
    rng = np.random.default_rng(0)
    for cls, count in (("cat", 4), ("dog", 3), ("emu", 0)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (20 + i, 30, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    path = _study(tmp_path / "i.toml", "imagefolder", root, split_seed=1, search_inputs=3, report_inputs=2)
    study = load_study(path)
    chosen = pipeline.split_indices(7, 1, report=2, search=3)
    samples = ImageFolder(str(root), allow_empty=True).samples
    unused = sorted(set(range(7)) - set(chosen["report"]) - set(chosen["search"]))
    Path(samples[unused[0]][0]).write_bytes(b"not an image")  # never decoded
    for split, count in (("report", 2), ("search", 3)):
        inputs = pipeline.load_inputs(study, split)
        assert inputs.index.tolist() == chosen[split].tolist() and inputs.x.shape == (count, 3, 224, 224)
        assert inputs.y.tolist() == [samples[i][1] for i in chosen[split]]
        assert torch.equal(inputs.x, imagefolder_inputs(root, chosen[split]).x)
    missing = load_study(_study(tmp_path / "m.toml", "imagefolder", tmp_path / "nope", search_inputs=1))
    with pytest.raises(DataError, match=r"image folder .*nope does not exist .*\(data.root in .*m\.toml must name a"):
        pipeline.load_inputs(missing, "search")


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_tensor_file_inputs(tmp_path: Path, suffix: str) -> None:
    images = np.random.default_rng(0).integers(0, 256, (30, 8, 8), dtype=np.uint8)
    labels = np.arange(30) % 10
    file = tmp_path / f"d{suffix}"
    if suffix == ".npz":
        np.savez(file, x=images, y=labels)
    else:
        torch.save({"images": torch.from_numpy(images), "labels": torch.from_numpy(labels)}, file)
    study = load_study(_study(tmp_path / "t.toml", "tensors", file, split_seed=4, search_inputs=6, report_inputs=4))
    chosen = pipeline.split_indices(30, 4, report=4, search=6)
    for split in ("report", "search"):
        inputs = pipeline.load_inputs(study, split)
        assert inputs.index.tolist() == chosen[split].tolist() and inputs.y.tolist() == labels[chosen[split]].tolist()
        assert torch.equal(inputs.x, tensor_file_inputs(file, chosen[split]).x) and inputs.x.shape[1:] == (1, 8, 8)
    missing = load_study(_study(tmp_path / "m.toml", "tensors", tmp_path / "nope.npz", search_inputs=1))
    with pytest.raises(DataError, match=r"tensor file .*nope\.npz does not exist; .*must name a \.npz or \.pt file"):
        pipeline.load_inputs(missing, "search")


# --- bundled study files -------------------------------------------------------------------------------------------


def test_the_bundled_studies_include_the_real_ones() -> None:
    assert set(REAL_STUDIES) <= {p.name for p in STUDIES}


@pytest.mark.parametrize("path", STUDIES, ids=[p.name for p in STUDIES])
def test_every_bundled_study_loads(path: Path) -> None:
    study = load_study(path)
    assert study.path == path and study.search.trials >= 1
    if path.name not in REAL_STUDIES:
        return
    arch, dataset = REAL_STUDIES[path.name]
    assert (study.model.arch, study.data.dataset) == (arch, dataset)
    assert study.model.checkpoint.startswith("/path/to/models/") and study.model.checkpoint.endswith(
        "noise_0.50/checkpoint.pth.tar"
    )
    assert study.data.root.startswith("/path/to/")
    c = study.certify
    assert (c.sigma, c.n0, c.n, c.alpha, c.device) == (0.5, 100, 10000, 0.001, "auto")
    assert study.irs.n_p == 1000 and study.irs_settings.total_alpha(c.alpha) == pytest.approx(0.002)
    assert study.search.sampler == "guided" and study.search.include == ["*"] and not study.search.exclude
    layers = compressible_layers(build_model(arch), study.search.include)
    assert layers == compressible_layers(build_model(arch)), "every conv and linear layer is searched"


@pytest.mark.parametrize("command", ["certify", "tune"])
def test_bundled_cifar_study_with_placeholders_exits_2_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, command: str
) -> None:
    bundled = REPO / "studies" / "cifar10-resnet20.toml"
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main([command, str(bundled)]) == 2
    err = _plain(capsys.readouterr().err)
    assert "error: checkpoint /path/to/models/cifar10/resnet20/noise_0.50/checkpoint.pth.tar does not exist;" in err
    assert f"set model.checkpoint in {bundled}" in err and "Traceback" not in err
    assert not any(work.iterdir()), "nothing was written"

    # with the checkpoint in place, the data placeholder is what stops it
    checkpoint = _cohen_checkpoint(tmp_path / "models" / "checkpoint.pth.tar")
    text = bundled.read_text().replace(
        "/path/to/models/cifar10/resnet20/noise_0.50/checkpoint.pth.tar", str(checkpoint)
    )
    (work / "study.toml").write_text(text)
    assert main([command, "study.toml"]) == 2
    err = _plain(capsys.readouterr().err)
    assert "error: CIFAR-10 not found: /path/to/cifar10/cifar-10-batches-py/test_batch does not exist" in err
    assert "Extract cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html) into /path/to/cifar10" in err
    assert "(data.root in study.toml must name the folder that holds cifar-10-batches-py/" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in work.iterdir()) == ["study.toml"], "nothing was written"


def test_missing_checkpoint_of_an_untrainable_model(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text('[model]\narch = "cifar_resnet20"\ncheckpoint = "nope.pth.tar"\n')
    with pytest.raises(ValueError, match=r"checkpoint nope\.pth\.tar does not exist; approxtune trains only digits"):
        pipeline.ensure_model(load_study(path))


# --- devices -------------------------------------------------------------------------------------------------------


def _global_state() -> tuple:
    return (
        torch.get_default_dtype(),
        torch.is_autocast_enabled("cpu"),
        torch.is_autocast_enabled("cuda"),
        torch.is_grad_enabled(),
        torch.are_deterministic_algorithms_enabled(),
        torch.get_num_threads(),
    )


def test_resolve_device_only_picks_a_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    auto = load_study(_study(tmp_path / "a.toml"))
    before = _global_state()
    cuda = torch.cuda.is_available()
    assert pipeline.resolve_device(auto) == torch.device("cuda" if cuda else "cpu")
    assert pipeline.resolve_device(auto, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pipeline.resolve_device(auto) == torch.device("cuda")
    assert pipeline.resolve_device(auto, "cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pipeline.resolve_device(auto) == torch.device("cpu")
    with pytest.raises(ValueError, match="device cuda was requested, but torch sees no CUDA device; use --device cpu"):
        pipeline.resolve_device(auto, "cuda")
    assert _global_state() == before, "no autocast, dtype or other global change"


def test_model_keeps_its_dtype_on_the_resolved_device(tmp_path: Path) -> None:
    study = load_study(_study(tmp_path / "a.toml"))
    model = build_model("digits-cnn").to(pipeline.resolve_device(study, "cpu"))
    x = digits_splits()["search"].x[:4]
    assert {p.dtype for p in model.parameters()} == {torch.float32} and model(x).dtype == torch.float32


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("how", ["flag", "study"])
@pytest.mark.parametrize("command", ["certify", "tune"])
def test_cuda_without_a_gpu_exits_2_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, command: str, how: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text('[certify]\ndevice = "cuda"\n' if how == "study" else "")
    assert main([command, "s.toml", *(["--device", "cuda"] if how == "flag" else [])]) == 2
    err = _plain(capsys.readouterr().err)
    assert err == "error: device cuda was requested, but torch sees no CUDA device; use --device cpu"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.toml"], "nothing was written (no training started)"


def test_adopting_an_old_named_cache_renames_only_a_match_and_tolerates_a_racing_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from approxtune.cache import build_base_cache

    monkeypatch.chdir(tmp_path)
    study = load_study(_study(tmp_path / "s.toml", search_inputs=4))
    torch.manual_seed(0)
    model = build_model("digits-cnn")
    inputs = pipeline.load_inputs(study, "search")
    expected = pipeline.expected_meta(study, model, inputs, "search")
    old = study.legacy_cache_path("search")
    build_base_cache(model, inputs, old, pipeline.certify_settings(study, "search"))

    assert not pipeline.adopt_legacy_cache(study, "search", dataclasses.replace(expected, n0=expected.n0 + 1))
    assert old.is_dir(), "a cache of other settings stays where it is"

    def renamed_by_another_process(src, dst):
        raise FileNotFoundError(src)

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.os, "replace", renamed_by_another_process)
        assert not pipeline.adopt_legacy_cache(study, "search", expected)
    said = []
    assert pipeline.adopt_legacy_cache(study, "search", expected, said.append)
    assert not old.exists() and study.cache_path("search").is_dir() and "Renamed the base cache" in said[0]
    assert not pipeline.adopt_legacy_cache(study, "search", expected), "nothing left to adopt"
