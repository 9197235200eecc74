"""The export directory's own format: weights.bin is the reported size, load_model rebuilds f^p bit for bit (in a
fresh process too), config.json records the architecture and every file's hash, and damaged directories are refused."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _exports import CONFIGS, config_named

import approxtune
from approxtune import export
from approxtune.approximation import apply_approximation, compress_model, model_size_bytes
from approxtune.cache import model_fingerprint
from approxtune.export.format import check_files, read_config, rebuild_architecture

REPO = str(Path(export.__file__).resolve().parents[2])

WITH_APPROXTUNE = """
import sys, json, numpy as np, torch
import approxtune
from approxtune import pipeline
from approxtune.cache import load_cache
from approxtune.config import load_study
from approxtune.irs import replay
torch.set_num_threads(1)
names, root = json.loads(sys.argv[1]), sys.argv[2]
study = load_study("tiny.toml")
cache = load_cache(study.cache_path("search"))
inputs = pipeline.load_inputs(study, "search")
rows = np.flatnonzero(cache.certified)
for name in names:
    model = approxtune.load_model(f"{root}/{name}")
    preds = replay(model, inputs, cache, rows, study.irs.n_p, batch_size=study.certify.batch_size)
    np.save(f"{root}/{name}.load-replay.npy", preds)
"""


@pytest.fixture(scope="module")
def loaded_elsewhere(exact):
    """approxtune.load_model of every export, replayed in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(WITH_APPROXTUNE), json.dumps(list(CONFIGS)), str(exact.out)],
        cwd=exact.root,
        env={**os.environ, "PYTHONPATH": REPO},  # this checkout, even where an older editable install exists
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {name: np.load(exact.out / f"{name}.load-replay.npy") for name in CONFIGS}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_load_model_in_a_fresh_process_predicts_like_the_trial_model_on_every_replayed_sample(
    exact, loaded_elsewhere, name
):
    assert exact.replayed[name].size > 1000
    assert np.array_equal(loaded_elsewhere[name], exact.replayed[name])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_on_disk_are_the_reported_size_plus_the_header(exact, name):
    config = config_named(name)
    directory = exact.out / name
    result = exact.results[name]
    size = model_size_bytes(exact.base, config)
    assert (directory / "weights.bin").stat().st_size == size == result.payload_bytes == result.size_bytes
    header = (directory / "index.json").stat().st_size
    assert header == result.header_bytes < 300 * 9, "the header: a few hundred bytes per tensor"
    index = json.loads((directory / "index.json").read_text())
    assert index["payload_bytes"] == size
    stored = sum(
        ref["nbytes"] for t in index["tensors"] for ref in [*t.get("arrays", {}).values(), t.get("data", {"nbytes": 0})]
    )
    assert stored == size, "the payload is the arrays and nothing else"
    approx = apply_approximation(exact.base, config)
    assert model_fingerprint(approxtune.load_model(directory)) == model_fingerprint(approx)


def test_configs_cover_every_precision_and_both_pruned_encodings(exact):
    precisions, sparse, dense_pruned, empty = set(), 0, 0, 0
    for name in CONFIGS:
        config = config_named(name)
        for layer, arrays in compress_model(exact.base, config).items():
            precisions.add(config.layers[layer].precision)
            pruned = config.layers[layer].prune or config.global_prune
            sparse += "mask" in arrays
            dense_pruned += bool(pruned) and "mask" not in arrays
            empty += "mask" in arrays and not np.unpackbits(arrays["mask"]).any()
    assert precisions == {"fp32", "fp16", "bf16", "int8", "int4"}
    assert sparse >= 4 and dense_pruned >= 3 and empty == 1


def test_config_records_the_architecture_the_input_shape_and_every_file(exact):
    directory = exact.out / "int8"
    config = read_config(directory)
    assert config["architecture"] == {"kind": "builtin", "arch": "digits-cnn"}
    assert config["input_shape"] == [1, 8, 8], "from the example batch of the data"
    assert set(config["files"]) == {"weights.bin", "index.json", "model.onnx", "model.pt2"}
    check_files(directory, config)
    assert type(rebuild_architecture(config)).__name__ == "DigitsCNN"
    with pytest.raises(export.ExportError, match=r"cannot rebuild the exported architecture \(malformed"):
        rebuild_architecture({"architecture": {"kind": "factory", "name": "x"}})
    with pytest.raises(export.ExportError, match=r"unknown architecture .alexnet.*load_model\(DIR, model="):
        rebuild_architecture({"architecture": {"kind": "builtin", "arch": "alexnet"}})
    with pytest.raises(export.ExportError, match="cannot rebuild"):
        rebuild_architecture({"architecture": {"kind": "keras"}})


def test_load_model_and_check_files_refuse_a_damaged_or_foreign_export(exact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(exact.out / "int8", copy)
    assert approxtune.load_model is export.load_model
    payload = bytearray((copy / "weights.bin").read_bytes())
    payload[10] ^= 1
    (copy / "weights.bin").write_bytes(bytes(payload))
    with pytest.raises(export.ExportError, match=r"does not match index\.json"):
        approxtune.load_model(copy)
    with pytest.raises(export.ExportError, match=r"weights\.bin does not match the size and SHA-256"):
        check_files(copy, read_config(copy))
    onnx = copy / "model.onnx"
    onnx.write_bytes(onnx.read_bytes()[:-100])  # truncated
    shutil.copy(exact.out / "int8" / "weights.bin", copy / "weights.bin")
    with pytest.raises(export.ExportError, match=r"model\.onnx does not match .* changed or truncated"):
        check_files(copy, read_config(copy))
    with pytest.raises(export.ExportError, match="no export directory"):
        approxtune.load_model(tmp_path / "missing")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "format_version": 1}))
    with pytest.raises(export.ExportError, match="has export format 1; this approxtune reads 2: export the model"):
        approxtune.load_model(copy)
    (copy / "config.json").unlink()
    with pytest.raises(export.ExportError, match=r"config\.json is missing"):
        approxtune.load_model(copy)
