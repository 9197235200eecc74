"""``approxtune export`` of a tuned study's trial: the directory it writes, the held-out certificate of every shipped
artifact, what it says before certifying, the count of models the report set has certified, and bad input."""

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
from _exports import TINY, run_export, study_of, tree
from _studies import tiny_study
from optuna.trial import TrialState

import approxtune
from approxtune import pipeline
from approxtune.approximation import ApproximationConfig, apply_approximation
from approxtune.cache import model_fingerprint
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.models import load_checkpoint
from approxtune.statistics import certified_accuracy, certified_accuracy_curve
from approxtune.trials import front

EXPORT_FILES = {"weights.bin", "index.json", "config.json", "model.onnx", "model.pt2", "certificate.json"}


def _trial(root, baseline):
    return next(t for t in study_of(root).trials if t.user_attrs.get("baseline") == baseline)


def test_export_writes_compressed_weights_both_deployables_and_a_certificate_per_runtime(exported):
    root, out, int8 = exported
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")], "no temporary directory is left behind"
    payload = (out / "weights.bin").read_bytes()
    assert len(payload) == int8.user_attrs["size_bytes"] == int(int8.values[2])

    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == {"kind": "builtin", "arch": "digits-cnn"} and config["trial"] == int8.number
    assert config["study"] == "export-tiny" and config["study_file"] == str(root / "tiny.toml")
    assert config["approximation"] == int8.user_attrs["config"] and config["sigma"] == 0.5
    base = load_checkpoint(root / "runs/export-tiny/model.pt", "digits-cnn")
    approx = apply_approximation(base, ApproximationConfig.from_dict(config["approximation"]))
    assert config["base_model_fingerprint"] == model_fingerprint(base)
    assert model_fingerprint(approxtune.load_model(out)) == model_fingerprint(approx) == config["model_fingerprint"]

    cert = json.loads((out / "certificate.json").read_text())
    s = load_study(root / "tiny.toml")
    report, search = pipeline.load_inputs(s, "report"), pipeline.load_inputs(s, "search")
    assert cert["model_sha256"] == hashlib.sha256(payload).hexdigest() == config["model_sha256"]
    assert cert["method"] == "irs" and cert["trial"] == int8.number
    assert (cert["sigma"], cert["alpha"], cert["alpha_zeta"], cert["alpha_d"]) == (0.5, 0.001, 0.001, 0.001)
    assert (cert["irs_mode"], cert["irs_zeta"]) == ("tail", "loss")  # the defaults
    assert (cert["n0"], cert["n"], cert["n_p"], cert["batch_size"]) == (16, 200, 100, s.certify.batch_size)
    assert cert["confidence"] == pytest.approx(1 - (0.001 + max(0.001, 0.001)))
    assert cert["inputs"]["split"] == "report" and cert["inputs"]["indices"] == report.index.tolist()
    assert cert["inputs"]["fingerprint"] == report.fingerprint()
    assert not set(cert["inputs"]["indices"]) & set(search.index.tolist()), "held-out inputs are not search inputs"
    assert cert["noise"]["run_seed"] == pipeline.noise_seed(s, "report") != pipeline.noise_seed(s, "search")
    assert cert["noise"]["search_run_seed"] == pipeline.noise_seed(s, "search")
    assert cert["search"]["acr"] == int8.values[0] and cert["search"]["accuracy"] == int8.values[1]
    assert cert["search"]["certified_accuracy"] == int8.user_attrs["certified_accuracy"]
    assert cert["search"]["reproduced_acr"] == int8.values[0], "the exported model reproduces the trial's search ACR"
    assert cert["search"]["trials_compared"] == 9 and "winner's curse" in cert["explanation"]
    assert cert["report_set"]["certified_models"] >= 1
    assert cert["report_set"]["record"] == str(s.output_dir / "report_certifications.json")

    assert [(c["runtime"], c["artifact"]) for c in cert["certificates"]] == [
        ("onnxruntime", "model.onnx"),
        ("torch", "model.pt2"),
    ]
    for entry in cert["certificates"]:
        data = (out / entry["artifact"]).read_bytes()
        assert (
            entry["artifact_sha256"] == hashlib.sha256(data).hexdigest() == config["files"][entry["artifact"]]["sha256"]
        )
        per_input = entry["per_input"]
        assert [p["index"] for p in per_input] == cert["inputs"]["indices"]
        assert [p["label"] for p in per_input] == report.y.tolist()
        radii = np.array([p["radius"] for p in per_input])
        assert entry["acr"] == pytest.approx(radii.mean(), abs=1e-12) and radii.max() > 0
        assert entry["certified_accuracy_curve"] == [list(point) for point in certified_accuracy_curve(radii)]
        assert entry["certified_accuracy"] == {
            k: certified_accuracy(radii, float(k)) for k in entry["certified_accuracy"]
        }
        for p in per_input:  # IRS certifies the label or nothing
            assert (p["predicted"] == p["label"]) == (p["radius"] > 0) and p["predicted"] in (p["label"], -1)
        assert "decided from the last 100 cached samples" in entry["samples"]
    assert (root / s.cache_path("report") / "meta.json").is_file()


def test_export_says_what_certifying_will_cost_and_prints_sizes_and_certificates(tuned, monkeypatch, capsys):
    root = tuned
    prune10 = _trial(root, "prune10")
    out = root / "exports" / "prune10"
    capsys.readouterr()
    assert run_export(root, monkeypatch, "--trial", prune10.number, "--out", out) == 0
    captured = capsys.readouterr()
    stdout, stderr = " ".join(captured.out.split()), " ".join(captured.err.split())
    assert f"Chosen trial: {prune10.number} (trial {prune10.number} as requested)" in stdout
    assert "winner's curse" in stdout and "held-out:" in stdout and "onnxruntime" in stdout
    assert re.search(
        r"Held-out certificate on 20 report inputs: .*model\.onnx in onnxruntime: up to 2,000 samples, "
        r"(about|under)[^;]+; then model\.pt2 in torch: up to 2,000 samples",
        stderr,
    ), stderr
    size = prune10.user_attrs["size_bytes"]
    header = (out / "index.json").stat().st_size
    assert f"weights {size:,} bytes (the reported size {size:,}) + header {header:,} bytes" in stdout
    onnx, pt2 = (out / "model.onnx").stat().st_size, (out / "model.pt2").stat().st_size
    assert f"model.onnx {onnx:,} bytes (size_bytes + {onnx - size:,})" in stdout
    assert f"model.pt2 {pt2:,} bytes (size_bytes + {pt2 - size:,})" in stdout
    assert "The report set has certified" in stdout


def test_export_before_the_report_cache_exists_estimates_building_it_and_says_how_to_build_it(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "s.toml").write_text(tiny_study("fresh", seed=5).replace("trials = 9", "trials = 1\nbaselines = false"))
    monkeypatch.chdir(tmp_path)
    assert main(["tune", "s.toml"]) == 0
    tuned_out = " ".join(capsys.readouterr().out.split())
    assert tuned_out.endswith(
        "Before `approxtune export`, build the held-out report cache ahead of time with `approxtune certify s.toml "
        "--split report` (20 inputs x 216 samples of g; `export` builds it otherwise)."
    ), "tune ends with the hint"
    assert main(["export", "s.toml", "--trial", "0", "--out", "a", "--runtime", "torch"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert re.search(
        r"certify g on the 20 report inputs first \(4,320 samples, (about|under) .* of a short run\); then "
        r"model\.pt2 in torch: up to 2,000 samples",
        err,
    ), err
    assert "To skip this next time, build the held-out report cache ahead of time with `approxtune certify" in err
    assert main(["export", "s.toml", "--trial", "0", "--out", "b", "--runtime", "torch"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "certify g on the" not in err and "To skip this next time" not in err and "Reusing the base cache" in err
    assert main(["tune", "s.toml"]) == 0
    assert "Before `approxtune export`" not in capsys.readouterr().out, "the report cache exists now"


def test_the_report_set_counts_the_distinct_models_it_has_certified(tuned, tmp_path, monkeypatch):
    root = tmp_path / "copy"  # a copy whose report set has certified nothing yet
    skip = shutil.ignore_patterns("exports", "exact", "shared", "certificate", "artifacts")
    shutil.copytree(tuned, root, ignore=skip)
    (root / "runs/export-tiny/report_certifications.json").unlink(missing_ok=True)
    prune5, fp32 = _trial(root, "prune5"), _trial(root, "fp32")

    def count(*args):
        out = root / "counts" / "-".join(map(str, args))
        assert run_export(root, monkeypatch, *args, "--out", out, "--runtime", "torch", "--force") == 0
        return json.loads((out / "certificate.json").read_text())["report_set"]["certified_models"]

    assert count("--trial", prune5.number) == 1
    assert count("--trial", fp32.number) == 2
    assert count("--trial", prune5.number) == 2, "the same model by the same method again selects nothing"
    assert count("--trial", prune5.number, "--recheck", "scratch") == 3
    cert = json.loads((root / "counts" / f"--trial-{prune5.number}" / "certificate.json").read_text())
    assert "1 - 2 x 0.002" in cert["report_set"]["note"]
    record = json.loads((root / "runs/export-tiny/report_certifications.json").read_text())["certifications"]
    assert [(e["trial"], e["method"]) for e in record] == [
        (prune5.number, "irs"),
        (fp32.number, "irs"),
        (prune5.number, "irs"),
        (prune5.number, "scratch"),
    ]


def test_export_by_rule_picks_the_smallest_front_model_that_satisfies_it(tuned, monkeypatch, capsys):
    root = tuned
    study = study_of(root)
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
        assert run_export(root, monkeypatch, *rule, "--out", out, "--recheck", "scratch", "--runtime", "torch") == 0
        stdout = " ".join(capsys.readouterr().out.split())
        assert re.search(rf"Chosen trial: {number} \(the smallest of \d+ front trials with ", stdout), stdout
        assert json.loads((out / "config.json").read_text())["trial"] == number


def test_force_replaces_an_export_and_only_an_export(tuned, monkeypatch, capsys):
    root = tuned
    number = _trial(root, "fp32").number
    out = root / "exports" / "forced"
    assert run_export(root, monkeypatch, "--trial", number, "--out", out, "--runtime", "torch") == 0
    (out / "stale.txt").write_text("from an earlier export")
    capsys.readouterr()
    assert run_export(root, monkeypatch, "--trial", number, "--out", out) == 2
    assert "already exists; pass --force to replace it" in " ".join(capsys.readouterr().err.split())
    assert (out / "stale.txt").is_file()
    assert run_export(root, monkeypatch, "--trial", number, "--out", out, "--force") == 0
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


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
        "unknown runtime": (["--trial", 0, "--runtime", "tflite"], "unknown runtime 'tflite'; choose one of"),
        "missing runtime": (["--trial", 0], "needs the package 'onnxruntime', which is not installed: pip install"),
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
    "unknown runtime",
    "missing runtime",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tuned, monkeypatch, capsys, case):
    root = tuned
    fail_number = next(t.number for t in study_of(root).trials if t.state == TrialState.FAIL)
    args, message = _bad_cases(root, fail_number)[case]
    if case == "missing runtime":
        monkeypatch.setitem(sys.modules, "onnxruntime", None)
    study_file = next((a[1:] for a in args if isinstance(a, str) and a.startswith("@")), "tiny.toml")
    args = [a for a in args if not (isinstance(a, str) and a.startswith("@"))]
    if "--out" not in args:
        args += ["--out", root / "exports" / "bad"]
    attrs = [t.user_attrs for t in study_of(root).trials]
    before = tree(root)
    capsys.readouterr()
    monkeypatch.chdir(root)
    assert main(["export", study_file, *map(str, args)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "error:" in err and message in err and "Traceback" not in err
    assert tree(root) == before, "nothing was written"
    assert [t.user_attrs for t in study_of(root).trials] == attrs


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
        assert all("decided from the last 100 cached samples" in c["samples"] for c in cert["certificates"])
    else:
        assert "n_tail" not in cert and cert["confidence"] == pytest.approx(1 - (0.001 + 0.001 + 0.001))
        assert all("the first 100 estimation samples, replayed" in c["samples"] for c in cert["certificates"])
    assert cert["search"]["reproduced_acr"] == pytest.approx(cert["search"]["acr"])
    assert main(["verify", "out"]) == 0, "verify repeats the pilot and the plan exactly"


def test_export_adopts_an_old_named_search_cache(tuned, tmp_path, monkeypatch, capsys):
    root = tmp_path / "copy"
    shutil.copytree(tuned, root, ignore=shutil.ignore_patterns("exports", "exact", "shared", "counts"))
    study = load_study(root / "tiny.toml")
    old, new = root / study.legacy_cache_path("search"), root / study.cache_path("search")
    shutil.move(new, old)
    capsys.readouterr()
    assert run_export(root, monkeypatch, "--trial", 0, "--out", root / "exports" / "fp32", "--runtime", "torch") == 0
    captured = capsys.readouterr()
    said = " ".join((captured.out + captured.err).split())
    assert f"Renamed the base cache {study.legacy_cache_path('search')}" in said, said
    assert new.is_dir() and not old.exists()


@pytest.mark.slow
def test_a_killed_export_leaves_its_staging_folder_and_the_next_export_removes_it(tuned, tmp_path):
    """SIGKILL mid-export: DIR is not there, its staging folder .DIR.tmp-<host>-<pid> is; the next export to DIR
    removes it, and leaves those of live processes and of other hosts alone."""
    root = tuned
    number = _trial(root, "fp32").number
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "approxtune", "export", "tiny.toml", "--trial", str(number), "--out", str(out)]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    staging = tmp_path / f".killed.tmp-{socket.gethostname()}-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (staging / "weights.bin").exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (staging / "weights.bin").is_file() and not out.exists(), "killed mid-export"
    live = tmp_path / f".killed.tmp-{socket.gethostname()}-{os.getpid()}"  # this process: alive
    other = tmp_path / f".killed.tmp-otherhost-{proc.pid}"  # another machine's: its pid means nothing here
    live.mkdir()
    other.mkdir()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert {p.name for p in out.iterdir()} == EXPORT_FILES
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, live.name, other.name])


def test_an_export_killed_while_replacing_a_previous_one_puts_the_previous_one_back(exported, tmp_path, capsys):
    """Killed between moving the previous export aside and moving the new one in: the next export puts it back
    instead of deleting it (then refuses to overwrite it without --force)."""
    root, source, _ = exported
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "replaced"
    shutil.copytree(source, tmp_path / f".replaced.old-{socket.gethostname()}-{dead.pid}")
    (tmp_path / f".replaced.tmp-{socket.gethostname()}-{dead.pid}").mkdir()  # the new one, half-written
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        assert run_export(root, mp, "--trial", 0, "--out", out) == 2
    assert "already exists; pass --force to replace it" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["replaced"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in source.iterdir()}
