"""What an export leaves on its Optuna trial: the exported files as artifacts (up to a size limit), the held-out
numbers and the export's path as user attributes -- read through the storage and optuna-dashboard's JSON API."""

import json
from pathlib import Path

import optuna
from _exports import run_export, study_of
from _wsgi import wsgi_get
from optuna.artifacts import FileSystemArtifactStore, download_artifact, get_all_artifact_meta

from approxtune.export import artifacts

EXPORTED = [
    "certificate.json",
    "config.json",
    "front.html",
    "front.png",
    "index.json",
    "model.onnx",
    "model.pt2",
    "weights.bin",
]


def _metas(root, number):
    study = study_of(root)
    return get_all_artifact_meta(study.trials[number], storage=study._storage)


def test_the_exported_files_are_artifacts_and_the_held_out_numbers_attributes_of_the_trial(exported, tmp_path):
    root, out, int8 = exported
    metas = _metas(root, int8.number)
    assert {m.filename for m in metas} == set(EXPORTED)
    store = FileSystemArtifactStore(root / "runs/export-tiny/artifacts")
    for name in (n for n in EXPORTED if not n.startswith("front.")):
        stored = []
        for meta in (m for m in metas if m.filename == name):  # (a later test may export this trial again)
            target = tmp_path / f"{meta.artifact_id}"
            download_artifact(artifact_store=store, artifact_id=meta.artifact_id, file_path=str(target))
            stored.append(target.read_bytes())
        assert (out / name).read_bytes() in stored, name
    attrs = study_of(root).trials[int8.number].user_attrs
    latest = Path(attrs["export_path"])  # this export's, or a later test's export of the same trial
    cert = json.loads((latest / "certificate.json").read_text())
    assert attrs["heldout_acr"] == round(min(c["acr"] for c in cert["certificates"]), 4)
    assert attrs["heldout_accuracy"] == round(min(c["accuracy"] for c in cert["certificates"]), 4)
    assert attrs["heldout_runtimes"] == ", ".join(c["runtime"] for c in cert["certificates"])
    assert study_of(root).trials[int8.number].values == int8.values, "the trial's results are unchanged"


def test_the_dashboard_lists_the_artifacts_and_attributes_of_the_exported_trial(tuned, monkeypatch):
    from optuna_dashboard import wsgi

    root = tuned
    number = next(t.number for t in study_of(root).trials if t.user_attrs.get("baseline") == "bf16")
    out = root / "exports" / "bf16"
    assert run_export(root, monkeypatch, "--trial", number, "--out", out) == 0
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'runs/export-tiny/study.db'}")
    app = wsgi(storage, artifact_store=FileSystemArtifactStore(root / "runs/export-tiny/artifacts"))
    study_id = next(s["study_id"] for s in json.loads(wsgi_get(app, "/api/studies"))["study_summaries"])
    trials = json.loads(wsgi_get(app, f"/api/studies/{study_id}", "after=0"))["trials"]
    trial = next(t for t in trials if t["number"] == number)
    assert {a["filename"] for a in trial["artifacts"]} == set(EXPORTED)
    url = f"/artifacts/{study_id}/{trial['trial_id']}"
    served = [wsgi_get(app, f"{url}/{a['artifact_id']}") for a in trial["artifacts"]]
    assert (out / "model.onnx").read_bytes() in served and (out / "certificate.json").read_bytes() in served
    attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
    cert = json.loads((out / "certificate.json").read_text())
    assert attrs["export_path"] == str(out.resolve()) and attrs["heldout_runtimes"] == "onnxruntime, torch"
    assert float(attrs["heldout_acr"]) == round(min(c["acr"] for c in cert["certificates"]), 4) > 0
    assert float(attrs["heldout_accuracy"]) == round(min(c["accuracy"] for c in cert["certificates"]), 4)
    before = len(_metas(root, number))
    assert run_export(root, monkeypatch, "--trial", number, "--out", out, "--force") == 0
    assert len(_metas(root, number)) == before, "an identical re-export attaches nothing new"


def test_files_above_the_size_limit_are_left_in_the_export_directory_only(tuned, monkeypatch, capsys):
    root = tuned
    number = next(t.number for t in study_of(root).trials if t.user_attrs.get("baseline") == "prune10")
    monkeypatch.setattr(artifacts, "ARTIFACT_MAX_BYTES", 20_000)
    before = {m.filename for m in _metas(root, number)}
    out = root / "exports" / "limited"
    capsys.readouterr()
    assert run_export(root, monkeypatch, "--trial", number, "--out", out) == 0
    order = ["certificate.json", "config.json", "index.json", "weights.bin", "model.onnx", "model.pt2"]
    files = [
        *(out / name for name in order),
        *(root / "runs/export-tiny" / name for name in ("front.png", "front.html")),
    ]
    big = [path.name for path in files if path.stat().st_size > 20_000]
    assert {"weights.bin", "model.onnx", "model.pt2"} <= set(big)
    err = " ".join(capsys.readouterr().err.split())
    assert f"Not attached to the trial (larger than the 20,000-byte artifact limit): {', '.join(big)}" in err
    added = {m.filename for m in _metas(root, number)} - before
    assert added == set(EXPORTED) - set(big) - before
