"""approxtune export on a tiny digits study: the artifact, its exactness in fresh processes, the held-out certificate,
the Optuna artifacts, and bad input."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from _studies import tiny_study
from _wsgi import wsgi_get
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta
from optuna.trial import TrialState

import approxtune
from approxtune import export, pipeline
from approxtune.approximation import (
    ApproximationConfig,
    LayerChoice,
    apply_approximation,
    compress_model,
    model_size_bytes,
)
from approxtune.cache import load_cache, model_fingerprint
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.irs import replay
from approxtune.models import load_checkpoint
from approxtune.search import front
from approxtune.statistics import certified_accuracy, certified_accuracy_curve

TINY = tiny_study("export-tiny", seed=3)
REPO = str(Path(export.__file__).resolve().parents[1])
EXPORT_FILES = {"weights.bin", "index.json", "config.json", "model.pt2", "certificate.json"}


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A tiny tuned study, plus one FAIL trial; tests export from it into their own directories."""
    root = tmp_path_factory.mktemp("export")
    (root / "tiny.toml").write_text(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["tune", "tiny.toml"]) == 0
    storage = f"sqlite:///{root / 'runs/export-tiny/study.db'}"
    study = optuna.load_study(study_name="export-tiny", storage=storage)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    return root


def _study(root):
    return optuna.load_study(study_name="export-tiny", storage=f"sqlite:///{root / 'runs/export-tiny/study.db'}")


def _run(root, monkeypatch, *args):
    monkeypatch.chdir(root)
    return main(["export", "tiny.toml", *map(str, args)])


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _artifact_counts(root):
    study = _study(root)
    return [len(get_all_artifact_meta(t, storage=study._storage)) for t in study.trials]


def _trial_artifacts(root, number):
    study = _study(root)
    return get_all_artifact_meta(study.trials[number], storage=study._storage)


# --------------------------------------------------------------------------------------- export of study trials


def test_export_by_trial_writes_compressed_weights_a_deployable_and_a_held_out_certificate(tuned, monkeypatch, capsys):
    root = tuned
    study = _study(root)
    int8 = next(t for t in study.trials if t.user_attrs.get("baseline") == "int8")
    out = root / "exports" / "int8"
    capsys.readouterr()
    assert _run(root, monkeypatch, "--trial", int8.number, "--out", out) == 0
    stdout = " ".join(capsys.readouterr().out.split())
    assert f"Chosen trial: {int8.number} (trial {int8.number} as requested)" in stdout
    assert "winner's curse" in stdout and "held-out" in stdout
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directory is left behind"

    # Size on disk: weights.bin is exactly the reported size; index.json is the (small) header.
    payload = (out / "weights.bin").read_bytes()
    assert len(payload) == int8.user_attrs["size_bytes"] == int(int8.values[2])
    header = (out / "index.json").stat().st_size
    assert header < 4000, "a few hundred bytes per tensor"
    assert f"weights {len(payload):,} bytes (the reported size {len(payload):,}) + header {header:,} bytes" in stdout

    config = json.loads((out / "config.json").read_text())
    assert config["arch"] == "digits-cnn" and config["study"] == "export-tiny" and config["trial"] == int8.number
    assert config["approximation"] == int8.user_attrs["config"] and config["sigma"] == 0.5
    base = load_checkpoint(root / "runs/export-tiny/model.pt", "digits-cnn")
    approx = apply_approximation(base, ApproximationConfig.from_dict(config["approximation"]))
    assert config["base_model_fingerprint"] == model_fingerprint(base)
    assert model_fingerprint(approxtune.load_model(out)) == model_fingerprint(approx) == config["model_fingerprint"]

    # The certificate: held-out inputs, fresh noise, consistent numbers.
    cert = json.loads((out / "certificate.json").read_text())
    s = load_study(root / "tiny.toml")
    report, search = pipeline.load_inputs(s, "report"), pipeline.load_inputs(s, "search")
    assert cert["model_sha256"] == hashlib.sha256(payload).hexdigest() == config["model_sha256"]
    assert cert["method"] == "irs" and cert["trial"] == int8.number
    assert (cert["sigma"], cert["alpha"], cert["alpha_zeta"], cert["alpha_d"]) == (0.5, 0.001, 0.001, 0.001)
    assert (cert["irs_mode"], cert["irs_zeta"]) == ("tail", "loss")  # the defaults
    assert (cert["n0"], cert["n"], cert["n_p"]) == (16, 200, 100)
    assert cert["confidence"] == pytest.approx(1 - (0.001 + max(0.001, 0.001)))
    assert cert["inputs"]["split"] == "report" and cert["inputs"]["indices"] == report.index.tolist()
    assert cert["inputs"]["fingerprint"] == report.fingerprint()
    assert not set(cert["inputs"]["indices"]) & set(search.index.tolist()), "held-out inputs are not search inputs"
    assert cert["noise"]["run_seed"] == pipeline.noise_seed(s, "report") != pipeline.noise_seed(s, "search")
    assert cert["noise"]["search_run_seed"] == pipeline.noise_seed(s, "search")
    per_input = cert["per_input"]
    assert [p["index"] for p in per_input] == cert["inputs"]["indices"]
    assert [p["label"] for p in per_input] == report.y.tolist()
    radii = np.array([p["radius"] for p in per_input])
    assert cert["acr"] == pytest.approx(radii.mean(), abs=1e-12)
    assert cert["certified_accuracy_curve"] == [list(point) for point in certified_accuracy_curve(radii)]
    assert cert["certified_accuracy"] == {k: certified_accuracy(radii, float(k)) for k in cert["certified_accuracy"]}
    for p in per_input:  # IRS certifies the label or nothing
        assert (p["predicted"] == p["label"]) == (p["radius"] > 0) and p["predicted"] in (p["label"], -1)
    assert cert["search"]["acr"] == int8.values[0] and cert["search"]["accuracy"] == int8.values[1]
    assert cert["search"]["certified_accuracy"] == int8.user_attrs["certified_accuracy"]
    assert cert["search"]["reproduced_acr"] == int8.values[0], "the exported model reproduces the trial's search ACR"
    assert cert["search"]["trials_compared"] == 9 and "winner's curse" in cert["explanation"]
    assert (root / s.cache_path("report") / "meta.json").is_file()

    # The certificate and the front plot are Optuna artifacts of the trial.
    metas = _trial_artifacts(root, int8.number)
    assert sorted(m.filename for m in metas) == ["certificate.json", "front.png"]
    store = FileSystemArtifactStore(root / "runs/export-tiny/artifacts")
    meta = next(m for m in metas if m.filename == "certificate.json")
    download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(root / "downloaded.json"))
    assert (root / "downloaded.json").read_bytes() == (out / "certificate.json").read_bytes()
    assert study.trials[int8.number].values == int8.values, "the trial itself is unchanged"


def test_dashboard_lists_the_artifacts_of_the_exported_trial(tuned, monkeypatch):
    from optuna_dashboard import wsgi

    root = tuned
    number = next(t.number for t in _study(root).trials if t.user_attrs.get("baseline") == "bf16")
    assert _run(root, monkeypatch, "--trial", number, "--out", root / "exports/bf16") == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'runs/export-tiny/study.db'}")
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(root / "runs/export-tiny/artifacts"))

    def get(path, query=""):
        return wsgi_get(app, path, query)

    study_id = next(s["study_id"] for s in json.loads(get("/api/studies"))["study_summaries"])
    trials = json.loads(get(f"/api/studies/{study_id}", "after=0"))["trials"]
    trial = next(t for t in trials if t["number"] == number)
    files = {a["filename"]: a["artifact_id"] for a in trial["artifacts"]}
    assert set(files) == {"certificate.json", "front.png"}
    served = get(f"/artifacts/{study_id}/{trial['trial_id']}/{files['certificate.json']}")
    assert served == (root / "exports/bf16/certificate.json").read_bytes()


def test_export_by_rule_picks_the_smallest_front_model_that_satisfies_it(tuned, monkeypatch, capsys):
    root = tuned
    study = _study(root)
    candidates = front(study)
    base_accuracy = study.user_attrs["base_accuracy"]
    min_acr = float(np.median([t.values[0] for t in candidates]))
    max_drop = max(base_accuracy - t.values[1] for t in candidates)  # every front trial qualifies on accuracy

    def expected(keep):
        return min((t for t in candidates if keep(t)), key=lambda t: (t.values[2], -t.values[0])).number

    cases = {
        "acr": (["--min-acr", min_acr], expected(lambda t: t.values[0] >= min_acr)),
        "both": (
            ["--min-acr", min_acr, "--max-accuracy-drop", max_drop],
            expected(lambda t: t.values[0] >= min_acr),
        ),
        "drop": (["--max-accuracy-drop", 0.0], expected(lambda t: t.values[1] >= base_accuracy)),
    }
    for name, (rule, number) in cases.items():
        if name == "drop" and not any(t.values[1] >= base_accuracy for t in candidates):
            continue
        capsys.readouterr()
        out = root / "exports" / f"rule-{name}"
        assert _run(root, monkeypatch, *rule, "--out", out, "--recheck", "scratch") == 0
        stdout = " ".join(capsys.readouterr().out.split())
        assert re.search(rf"Chosen trial: {number} \(the smallest of \d+ front trials with ", stdout), stdout
        assert json.loads((out / "config.json").read_text())["trial"] == number


def test_scratch_recheck_certifies_from_scratch_on_fresh_noise(tuned, monkeypatch):
    root = tuned
    number = next(t.number for t in _study(root).trials if t.user_attrs.get("baseline") == "fp16")
    out = root / "exports" / "scratch"
    assert _run(root, monkeypatch, "--trial", number, "--out", out, "--recheck", "scratch") == 0
    cert = json.loads((out / "certificate.json").read_text())
    s = load_study(root / "tiny.toml")
    assert cert["method"] == "scratch" and cert["noise"]["streams"] == ["FRESH"]
    assert cert["noise"]["run_seed"] == pipeline.noise_seed(s, "report")
    assert cert["confidence"] == pytest.approx(1 - 0.001) and cert["alpha_zeta"] is None and cert["n_p"] is None
    assert cert["irs_zeta"] is None
    radii = np.array([p["radius"] for p in cert["per_input"]])
    assert cert["acr"] == pytest.approx(radii.mean(), abs=1e-12) and radii.max() > 0
    for p in cert["per_input"]:
        assert p["radius"] == 0 or p["predicted"] == p["label"]


def test_force_replaces_an_export_and_only_an_export(tuned, monkeypatch, capsys):
    root = tuned
    number = next(t.number for t in _study(root).trials if t.user_attrs.get("baseline") == "fp32")
    out = root / "exports" / "forced"
    assert _run(root, monkeypatch, "--trial", number, "--out", out) == 0
    assert sorted(m.filename for m in _trial_artifacts(root, number)) == ["certificate.json", "front.png"]
    (out / "stale.txt").write_text("from an earlier export")
    capsys.readouterr()
    assert _run(root, monkeypatch, "--trial", number, "--out", out) == 2
    assert "already exists; pass --force to replace it" in " ".join(capsys.readouterr().err.split())
    assert (out / "stale.txt").is_file()
    certificate = (out / "certificate.json").read_bytes()
    assert _run(root, monkeypatch, "--trial", number, "--out", out, "--force") == 0
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    assert (out / "certificate.json").read_bytes() == certificate, "the same export gives the same certificate"
    assert len(_trial_artifacts(root, number)) == 2, "an identical re-export attaches nothing new"
    assert _run(root, monkeypatch, "--trial", number, "--out", out, "--force", "--recheck", "scratch") == 0
    assert sorted(m.filename for m in _trial_artifacts(root, number)) == ["certificate.json"] * 2 + ["front.png"]


def _bad_cases(root, fail_number):
    (root / "nostudy.toml").write_text(TINY.replace('name = "export-tiny"', 'name = "no-such-study"'))
    (root / "nocache.toml").write_text(
        TINY.replace('output_dir = "runs/export-tiny"', 'output_dir = "runs/nocache"')
        + f'storage = "sqlite:///{root / "runs/export-tiny/study.db"}"\n'
        + '[model]\ncheckpoint = "runs/export-tiny/model.pt"\n'
    )
    nocache = load_study(root / "nocache.toml")
    old = root / "runs/export-tiny/format1.db"  # the study as it was recorded against a cache of format 1
    shutil.copy(root / "runs/export-tiny/study.db", old)
    optuna.load_study(study_name="export-tiny", storage=f"sqlite:///{old}").set_user_attr("cache_format", 1)
    (root / "format1.toml").write_text(TINY + f'storage = "sqlite:///{old}"\n')
    (root / "occupied").mkdir(exist_ok=True)
    (root / "occupied" / "keep.txt").write_text("not an export")
    return {
        "not complete": (["--trial", fail_number], f"trial {fail_number} of study 'export-tiny' is FAIL, not COMPLETE"),
        "unknown trial": (["--trial", 999], "study 'export-tiny' has no trial 999 (trials are numbered 0 to"),
        "no match": (["--min-acr", 99], "no trial on the Pareto front of study 'export-tiny' has search ACR >= 99"),
        "no rule": ([], "choose the trial to export: --trial N, or a rule --min-acr X"),
        "both": (["--trial", 0, "--min-acr", 0.1], "give either --trial N or a rule"),
        "no study": (
            ["--trial", 0, "@nostudy.toml"],
            "no study 'no-such-study' in sqlite:///runs/export-tiny/study.db",
        ),
        "no cache": (["--trial", 0, "@nocache.toml"], f"the search cache {nocache.cache_path('search')} is missing"),
        "format 1 study": (
            ["--trial", 0, "@format1.toml"],
            "study 'export-tiny' was tuned against a base cache of format 1, whose noise this approxtune no longer",
        ),
        "exists": (["--trial", 0, "--out", root / "occupied"], "already exists; pass --force to replace it"),
        "not export": (
            ["--trial", 0, "--out", root / "occupied", "--force"],
            "is not an approxtune export (no config.json of format 'approxtune-export'); refusing to replace it",
        ),
    }


BAD = [
    "not complete",
    "unknown trial",
    "no match",
    "no rule",
    "both",
    "no study",
    "no cache",
    "format 1 study",
    "exists",
    "not export",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tuned, monkeypatch, capsys, case):
    root = tuned
    fail_number = next(t.number for t in _study(root).trials if t.state == TrialState.FAIL)
    args, message = _bad_cases(root, fail_number)[case]
    study_file = next((a[1:] for a in args if isinstance(a, str) and a.startswith("@")), "tiny.toml")
    args = [a for a in args if not (isinstance(a, str) and a.startswith("@"))]
    if "--out" not in args:
        args += ["--out", root / "exports" / "bad"]
    artifacts = _artifact_counts(root)
    before = _tree(root)
    capsys.readouterr()
    monkeypatch.chdir(root)
    assert main(["export", study_file, *map(str, args)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err and "Traceback" not in err
    assert _tree(root) == before, "nothing was written"
    assert _artifact_counts(root) == artifacts


# ------------------------------------------------------------------------------ exactness in fresh processes

CONFIGS = {
    "fp32": {"*": ("fp32", 0.0)},
    "fp16": {"*": ("fp16", 0.0)},
    "bf16": {"*": ("bf16", 0.0)},
    "int8": {"*": ("int8", 0.0)},
    "int4": {"*": ("int4", 0.0)},
    "sparse": {"conv1": ("int8", 0.5), "conv2": ("int4", 0.5), "fc1": ("fp16", 0.5), "fc2": ("bf16", 0.3)},
    "dense-fallback": {"conv1": ("int4", 0.1), "conv2": ("int8", 0.05), "fc1": ("int4", 0.2), "fc2": ("fp32", 0.02)},
    "global": "global",
}
LAYERS = ("conv1", "conv2", "fc1", "fc2")


def _config(name):
    spec = CONFIGS[name]
    if spec == "global":
        return ApproximationConfig(dict.fromkeys(LAYERS, LayerChoice("int8")), global_prune=0.3)
    return ApproximationConfig({layer: LayerChoice(*spec.get(layer, spec.get("*"))) for layer in LAYERS})


class Recorder(torch.nn.Module):
    """Runs a model and records every batch it sees and the classes it predicts."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches, self.classes = model, [], []

    def forward(self, x):
        logits = self.model(x)
        self.batches.append(x.detach().clone())
        self.classes.append(logits.argmax(1))
        return logits


NO_APPROXTUNE = """
import sys, json, numpy as np, torch
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "approxtune" or name.startswith("approxtune."):
            raise ImportError("this process must not import approxtune")
sys.meta_path.insert(0, Block())
torch.set_num_threads(1)
names, root = json.loads(sys.argv[1]), sys.argv[2]
batches = torch.from_numpy(np.load(f"{root}/batches.npy"))
sizes = np.load(f"{root}/sizes.npy").tolist()
for name in names:
    model = torch.export.load(f"{root}/{name}/model.pt2").module()
    with torch.inference_mode():
        classes = [model(x).argmax(1) for x in torch.split(batches, sizes)]
    np.save(f"{root}/{name}.pt2-classes.npy", torch.cat(classes).numpy())
assert not any(m == "approxtune" or m.startswith("approxtune.") for m in sys.modules)
"""

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
def exact(tuned):
    """Every config of CONFIGS exported; f^p's replayed predictions here and the exports' in two fresh processes."""
    root = tuned
    study = load_study(root / "tiny.toml")
    base = load_checkpoint(root / "runs/export-tiny/model.pt", "digits-cnn")
    cache = load_cache(root / study.cache_path("search"))
    inputs = pipeline.load_inputs(study, "search")
    x = inputs.x
    rows = np.flatnonzero(cache.certified)
    out = root / "exact"
    expected, results, batches = {}, {}, None
    for name in CONFIGS:
        config = _config(name)
        results[name] = export.export_model(base, config, out / name, arch="digits-cnn", example_input=x[:2])
        recorder = Recorder(apply_approximation(base, config))
        preds = replay(recorder, inputs, cache, rows, study.irs.n_p, batch_size=study.certify.batch_size)
        expected[name] = (preds, torch.cat(recorder.classes).numpy())
        if batches is None:
            batches = recorder.batches
        assert all(torch.equal(a, b) for a, b in zip(batches, recorder.batches, strict=True)), "noise is replayed"
    np.save(out / "batches.npy", torch.cat(batches).numpy())
    np.save(out / "sizes.npy", np.array([len(b) for b in batches]))
    names = json.dumps(list(CONFIGS))
    for script in (NO_APPROXTUNE, WITH_APPROXTUNE):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), names, str(out)],
            cwd=root,
            env={**os.environ, "PYTHONPATH": REPO},  # this checkout, even where an older editable install exists
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    return root, base, expected, results


@pytest.mark.parametrize("name", list(CONFIGS))
def test_exported_model_predicts_like_the_trial_model_on_every_replayed_sample_in_a_fresh_process(exact, name):
    root, _, expected, _ = exact
    replayed, classes = expected[name]
    assert replayed.size > 1000
    loaded = np.load(root / "exact" / f"{name}.load-replay.npy")
    assert np.array_equal(loaded, replayed), "approxtune.load_model in a fresh process"
    deployed = np.load(root / "exact" / f"{name}.pt2-classes.npy")
    assert np.array_equal(deployed, classes), "model.pt2 in a process without approxtune"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_weights_on_disk_are_the_reported_size_plus_the_header(exact, name):
    root, base, _, results = exact
    config = _config(name)
    directory = root / "exact" / name
    size = model_size_bytes(base, config)
    assert (directory / "weights.bin").stat().st_size == size == results[name].payload_bytes == results[name].size_bytes
    header = (directory / "index.json").stat().st_size
    assert header == results[name].header_bytes < 300 * 9, "the header: a few hundred bytes per tensor"
    index = json.loads((directory / "index.json").read_text())
    assert index["payload_bytes"] == size
    stored = sum(
        ref["nbytes"] for t in index["tensors"] for ref in [*t.get("arrays", {}).values(), t.get("data", {"nbytes": 0})]
    )
    assert stored == size, "the payload is the arrays and nothing else"


def test_configs_cover_every_precision_and_both_pruned_encodings(exact):
    _, base, _, _ = exact
    precisions, sparse, dense_pruned = set(), 0, 0
    for name in CONFIGS:
        config = _config(name)
        for layer, arrays in compress_model(base, config).items():
            precisions.add(config.layers[layer].precision)
            pruned = config.layers[layer].prune or config.global_prune
            sparse += "mask" in arrays
            dense_pruned += bool(pruned) and "mask" not in arrays
    assert precisions == {"fp32", "fp16", "bf16", "int8", "int4"}
    assert sparse >= 4 and dense_pruned >= 3


def test_load_model_refuses_a_corrupt_or_missing_export(exact, tmp_path):
    root, _, _, _ = exact
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root / "exact" / "int8", copy)
    assert approxtune.load_model is export.load_model
    payload = bytearray((copy / "weights.bin").read_bytes())
    payload[10] ^= 1
    (copy / "weights.bin").write_bytes(bytes(payload))
    with pytest.raises(export.ExportError, match=r"does not match index\.json"):
        approxtune.load_model(copy)
    with pytest.raises(export.ExportError, match="no export directory"):
        approxtune.load_model(tmp_path / "missing")
    (copy / "config.json").unlink()
    with pytest.raises(export.ExportError, match=r"config\.json is missing"):
        approxtune.load_model(copy)


def test_export_model_refuses_an_existing_directory_and_leaves_no_temporary_files(exact, tmp_path):
    _, base, _, _ = exact
    config = _config("int8")
    (tmp_path / "taken").mkdir()
    with pytest.raises(export.OutputExistsError, match="already exists; pass --force"):
        export.export_model(base, config, tmp_path / "taken", arch="digits-cnn")

    def broken(result):
        raise RuntimeError("certification failed")

    with pytest.raises(RuntimeError, match="certification failed"):
        export.export_model(base, config, tmp_path / "new", arch="digits-cnn", certify=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "a failed export leaves nothing behind"


def test_a_cifar_resnet_with_batchnorm_exports_and_reloads_bit_for_bit(tmp_path):
    from approxtune.approximation import compressible_layers
    from approxtune.models import build_model

    torch.manual_seed(0)
    base = build_model("cifar_resnet20").eval()
    for module in base.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.1, 0.1)
            module.running_var.uniform_(0.5, 1.5)
            module.num_batches_tracked.fill_(7)
    precisions = ("fp32", "fp16", "bf16", "int8", "int4")
    config = ApproximationConfig(
        {
            layer: LayerChoice(precisions[i % 5], (0.0, 0.3, 0.1)[i % 3])
            for i, layer in enumerate(compressible_layers(base))
        }
    )
    result = export.export_model(base, config, tmp_path / "resnet", arch="cifar_resnet20")
    assert result.payload_bytes == model_size_bytes(base, config)
    loaded = approxtune.load_model(tmp_path / "resnet")
    assert model_fingerprint(loaded) == model_fingerprint(apply_approximation(base, config))
    assert int(loaded.get_submodule("1.bn1").num_batches_tracked) == 7
    x = torch.rand(4, 3, 32, 32)
    deployed = torch.export.load(tmp_path / "resnet" / "model.pt2").module()
    with torch.inference_mode():
        assert torch.equal(deployed(x), loaded(x))


@pytest.mark.parametrize("mode", ["tail", "max"])
def test_a_study_exports_a_certificate_that_names_its_samples_and_level(tmp_path, monkeypatch, mode):
    """Tune, then export; tail mode (with a pilot) states its settings and ragged counts, max mode its n_p."""
    extra = "mode = 'tail'\npilot = 8\n" if mode == "tail" else "mode = 'max'\n"
    text = tiny_study(f"export-{mode}", seed=4).replace("[irs]\n", "[irs]\n" + extra)
    (tmp_path / "s.toml").write_text(text.replace("trials = 9", "trials = 2\nbaselines = false"))
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "s.toml"]) == 0
    assert main(["export", "s.toml", "--trial", "0", "--out", "out"]) == 0
    cert = json.loads((tmp_path / "out/certificate.json").read_text())
    assert cert["irs_mode"] == mode
    if mode == "tail":
        assert cert["n_tail"] == 100 and cert["pilot"] == 8 and cert["allocate"]
        assert cert["confidence"] == pytest.approx(1 - (0.001 + 0.001))  # alpha + max(alpha_zeta, alpha_d)
        assert "decided from the last 100 cached samples" in cert["noise"]["samples"]
    else:
        assert "n_tail" not in cert and cert["confidence"] == pytest.approx(1 - (0.001 + 0.001 + 0.001))
        assert "the first 100 estimation samples, replayed" in cert["noise"]["samples"]
    assert cert["search"]["reproduced_acr"] == pytest.approx(cert["search"]["acr"])


def test_export_adopts_an_old_named_search_cache(tuned, tmp_path, monkeypatch, capsys):
    root = tmp_path / "copy"
    shutil.copytree(tuned, root, ignore=shutil.ignore_patterns("exports"))
    study = load_study(root / "tiny.toml")
    old, new = root / study.legacy_cache_path("search"), root / study.cache_path("search")
    shutil.move(new, old)
    capsys.readouterr()
    assert _run(root, monkeypatch, "--trial", 0, "--out", root / "exports" / "fp32") == 0
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert f"Renamed the base cache {study.legacy_cache_path('search')}" in said, said
    assert new.is_dir() and not old.exists()
