"""The command line end to end on a tiny digits study: train, certify, tune, resume, front, dashboard, bad input."""

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import optuna
import pytest
from _caches import as_format_1, rewrite_meta
from _studies import tiny_study
from _wsgi import wsgi_get

from approxtune.cli import main
from approxtune.config import load_study

TINY = tiny_study("tiny", seed=1)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tiny study, tuned once, shared by the tests below (they only read it or add trials to copies)."""
    root = tmp_path_factory.mktemp("cli")
    study = root / "tiny.toml"
    study.write_text(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["tune", str(study)]) == 0
    return root, study


def test_tune_creates_model_cache_study_and_front(tuned):
    root, _ = tuned
    out = root / "runs" / "tiny"
    assert (out / "model.pt").is_file() and (out / "front.png").stat().st_size > 1000
    cache = root / load_study(root / "tiny.toml").cache_path("search")
    assert cache.parent == out and (cache / "predictions.npy").is_file()
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(trials) == 9
    assert study.metric_names == ["ACR", "accuracy", "size_bytes"]
    baselines = {t.user_attrs.get("baseline") for t in trials} - {None}
    assert baselines == {"fp32", "fp16", "bf16", "int8", "prune5", "prune10", "prune20"}
    for key in ("sigma", "n", "alpha", "alpha_zeta", "n_p", "cache_fingerprint", "base_acr", "base_accuracy"):
        assert key in study.user_attrs
    attrs = trials[0].user_attrs
    for key in ("config", "size_bytes", "size_ratio", "certified_accuracy", "mean_zeta", "direct_share", "confidence"):
        assert key in attrs
    assert attrs["confidence"] == pytest.approx(1 - 0.002)
    fp32 = next(t for t in trials if t.user_attrs.get("baseline") == "fp32")
    int8 = next(t for t in trials if t.user_attrs.get("baseline") == "int8")
    assert fp32.user_attrs["size_ratio"] == 1.0 and 0.25 < int8.user_attrs["size_ratio"] < 0.27


def test_front_json_is_the_pareto_front_of_the_trials(tuned, capsys):
    root, study_file = tuned
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["front", str(study_file), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    rows = document["front"]
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'runs/tiny/study.db'}")
    values = [t.values for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]

    def dominated(v):
        return any(
            w[0] >= v[0] and w[1] >= v[1] and w[2] <= v[2] and (w[0] > v[0] or w[1] > v[1] or w[2] < v[2])
            for w in values
        )

    assert {r["trial"] for r in rows} == {i for i, t in enumerate(study.trials) if t.values and not dominated(t.values)}
    assert [r["acr"] for r in rows] == sorted((r["acr"] for r in rows), reverse=True)
    assert all(r["confidence"] == pytest.approx(0.998) for r in rows)
    assert all(r["accuracy"] == round(r["accuracy"] * 30) / 30 for r in rows), "k/30 in float64, not float32 noise"
    assert document["base"]["reference"] == "base model g" and document["base"]["confidence"] == pytest.approx(0.999)


def test_front_shows_g_first_and_draws_the_curves(tuned, capsys):
    root, study_file = tuned
    out = root / "runs" / "tiny"
    (out / "front.html").unlink()
    capsys.readouterr()
    assert main_in(root, ["front", str(study_file), "--curves"]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    table = lines[: next(i for i, line in enumerate(lines) if line.startswith("Plot:"))]
    assert all(len(line) <= 80 for line in table), "the table fits 80 columns (the commands after it do not wrap)"
    first = next(line for line in lines if line.startswith("│"))
    assert first.split("│")[1].strip() == "g" and "base model, reference" in first
    assert "conf." in stdout and "0.998" in stdout and "layers, in order: conv1 conv2 fc1 fc2" in " ".join(lines)
    assert (out / "front.html").stat().st_size > 1_000_000 and (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert f"Certified accuracy curves: {Path('runs/tiny/curves.png')}" in stdout
    assert "--artifact-dir runs/tiny/artifacts" in " ".join(stdout.split())

    assert main_in(root, ["front", str(study_file), "--trials", "0,3", "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{out / 'study.db'}")
    assert document["curves"] == str(Path("runs/tiny/curves.png"))
    assert document["base"]["acr"] == study.user_attrs["base_acr"] and document["base"]["size_ratio"] == 1.0


@pytest.mark.parametrize(
    ("trials", "message"),
    [("0,x", "--trials takes trial numbers separated by commas"), ("0,999", "study 'tiny' has no trial 999")],
)
def test_front_curves_refuse_bad_trials_before_writing(tuned, capsys, trials, message):
    root, study_file = tuned
    curves = root / "runs" / "tiny" / "curves.png"
    curves.unlink(missing_ok=True)
    capsys.readouterr()
    assert main_in(root, ["front", str(study_file), "--trials", trials]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not curves.exists()


def test_resume_adds_only_the_missing_trials_and_refuses_other_settings(tuned, capsys):
    root, _ = tuned
    more = root / "more.toml"
    more.write_text(TINY.replace("trials = 9", "trials = 11"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        capsys.readouterr()
        assert main(["tune", str(more)]) == 0  # same study name, same output dir: resumes
        study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'runs/tiny/study.db'}")
        assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 11
        err = capsys.readouterr().err
        assert "Reusing the base cache" in err and "certify g on" not in err, "no certification bar for a reused cache"
        other = root / "other.toml"
        other.write_text(TINY.replace("n_p = 100", "n_p = 80"))
        assert main(["tune", str(other)]) == 2
        err = capsys.readouterr().err
        assert "n_p: study has 100, now 80" in err and "Traceback" not in err
        other.write_text(TINY.replace("[irs]\n", "[irs]\nzeta = 'disagreement'\n"))
        assert main(["tune", str(other)]) == 2
    err = capsys.readouterr().err
    assert "irs_zeta: study has 'loss', now 'disagreement'" in err and "Traceback" not in err


def test_dashboard_serves_the_study(tuned):
    from optuna_dashboard import wsgi

    root, _ = tuned
    storage = optuna.storages.RDBStorage(f"sqlite:///{root / 'runs/tiny/study.db'}")
    app = wsgi(storage)

    def get(path, query=""):
        return json.loads(wsgi_get(app, path, query))

    summaries = get("/api/studies")["study_summaries"]
    tiny = next(s for s in summaries if s["study_name"] == "tiny")
    detail = get(f"/api/studies/{tiny['study_id']}", "after=0")
    attrs = [{a["key"] for a in t["user_attrs"]} for t in detail["trials"]]
    assert detail["objective_names"] == ["ACR", "accuracy", "size_bytes"]
    assert all({"feasible", "accuracy_drop"} <= a for a in attrs), "constraints are visible as user attrs"
    assert all({"size_ratio", "mean_zeta", "config"} <= a for a in attrs)
    assert all({"layer conv1", "layer conv2", "layer fc1", "layer fc2"} <= a for a in attrs), "one per layer"
    for trial in detail["trials"]:  # every finished trial has its note: a per-layer table and its certificate
        body = trial["note"]["body"]
        assert body.startswith(f"### Trial {trial['number']}") and "| `conv1` |" in body and "| `fc2` |" in body
        assert "each radius holds with probability ≥ 0.998" in body or "stopped by racing" in body


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[certify]\nsigma = -1", "certify.sigma must be positive"),
        ("[certify\n", "not valid TOML"),
        ("[irs]\nn_p = 10001", "irs.n_p must lie in"),
        ("[certfy]\n", "did you mean [certify]"),
        ("[model]\narch = 'cifar_resnet20'\ncheckpoint = 'missing.pt'", "missing.pt does not exist"),
        ("[model]\narch = 'resnet9000'", "model.arch = 'resnet9000' is not one of"),
        # Checked before the digits model is trained or anything is written:
        ("[study]\nseed = -1", r"study.seed must lie in [0, 2**32 - 1] (Optuna's range), got -1"),
        ("[certify]\nsigma = inf", "certify.sigma must be a finite number, got inf"),
        ("[certify]\nsigma = 1e38", "certify.sigma must be positive and at most 2e+37 (the noise sigma * eps is"),
        ("[data]\nsearch_inputs = 5000", "data.search_inputs = 5000, but the digits split holds 300 search inputs"),
        ("[search]\ninclude = ['conv*', 'nope*']", "include pattern 'nope*' matches no compressible layer"),
        ("[certify]\nn = 10_000_000_000", "makes a cache of 2.0 TB (twice that while it is written), but"),
        ("[certify]\nbatch_size = 1_000_000_000_000", "certify.batch_size = 1,000,000,000,000 noisy inputs of 256"),
        (
            "[study]\noutput_dir = 'bad.toml/runs'",
            "bad.toml is a file, not a directory; set study.output_dir elsewhere",
        ),
    ],
)
@pytest.mark.parametrize("command", ["tune", "certify"])
def test_bad_input_exits_2_without_traceback_or_files(tmp_path, monkeypatch, capsys, command, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.toml").write_text(text)
    assert main([command, "bad.toml"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and re.search(re.escape(message), " ".join(err.split()))
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"], "nothing was written"


def test_front_without_a_study(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text("")
    assert main(["front", "s.toml"]) == 2
    assert "run `approxtune tune s.toml` first" in capsys.readouterr().err


def _start_tune(root, study):
    return subprocess.Popen(
        [sys.executable, "-m", "approxtune.cli", "tune", str(study)],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def _wait_for_trials(proc, count):
    """Read stderr until ``count`` trial lines have been printed; returns them."""
    lines = []
    for line in proc.stderr:
        if line.startswith("trial "):
            lines.append(line)
            if len(lines) >= count:
                return lines
    raise AssertionError("tune ended before printing enough trials")


@pytest.mark.slow
def test_ctrl_c_finishes_the_running_trial_and_prints_the_front(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY.replace("trials = 9", "trials = 500"))
    proc = _start_tune(tmp_path, study)
    _wait_for_trials(proc, 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err  # stopped, not finished: scripts can tell
    assert "Stopping after the current trial" in err and "Traceback" not in err
    assert "Pareto front" in out
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    states = [t.state for t in db.trials]
    assert optuna.trial.TrialState.RUNNING not in states and optuna.trial.TrialState.FAIL not in states
    assert 2 <= states.count(optuna.trial.TrialState.COMPLETE) < 500


@pytest.mark.slow
def test_killed_tune_continues_when_run_again(tmp_path):
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    proc = _start_tune(tmp_path, study)
    _wait_for_trials(proc, 3)  # a trial prints its line once its result and constraints are recorded
    proc.kill()
    proc.communicate()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main_in(tmp_path, ["tune", str(study)]) == 0
    assert not [w for w in caught if "is already set" in str(w.message)], "a retry inherits no constraint values"
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    assert len(db.get_trials(states=(optuna.trial.TrialState.COMPLETE,))) == 9
    for retry in (t for t in db.trials if "failed_trial" in t.system_attrs):  # its own result, not the dead one's
        assert retry.constraints["accuracy_drop"] == pytest.approx(
            db.user_attrs["base_accuracy"] - retry.values[1] - 1.0
        )


@pytest.mark.slow
def test_a_trial_killed_with_its_worker_is_failed_and_run_again_at_once(tmp_path):
    """SIGKILL mid-trial, then an immediate rerun (well inside the 90 s heartbeat grace): the dead trial's worker was
    this host and is gone, so it is failed and its copy runs; the study ends with every baseline and no trial left
    RUNNING or WAITING."""
    study = tmp_path / "slow.toml"
    slow = (
        TINY.replace("n = 200", "n = 2000")
        .replace("n_p = 100", "n_p = 800")
        .replace("search_inputs = 30", "search_inputs = 60")
    )
    study.write_text(slow.replace('name = "tiny"', 'name = "slow"').replace("runs/tiny", "runs/slow"))
    proc = _start_tune(tmp_path, study)
    _wait_for_trials(proc, 2)
    proc.kill()
    proc.communicate()
    db_url = f"sqlite:///{tmp_path / 'runs/slow/study.db'}"
    running = [
        t.number for t in optuna.load_study(study_name="slow", storage=db_url).trials if t.state.name == "RUNNING"
    ]
    assert len(running) == 1, "the kill landed mid-trial"
    completed = subprocess.run(
        [sys.executable, "-m", "approxtune.cli", "tune", str(study)], cwd=tmp_path, capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stderr
    assert f"Trial(s) {running[0]} died with their worker on this host" in completed.stderr
    trials = optuna.load_study(study_name="slow", storage=db_url).trials
    by_state = {state: [t for t in trials if t.state.name == state] for state in ("COMPLETE", "PRUNED", "FAIL")}
    assert [t.number for t in by_state["FAIL"]] == running
    assert not [t for t in trials if t.state.name in ("RUNNING", "WAITING")]
    assert len(by_state["COMPLETE"]) + len(by_state["PRUNED"]) == 9
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == running[0]]
    assert len(retries) == 1 and retries[0].state.name in ("COMPLETE", "PRUNED")
    baselines = {t.user_attrs.get("baseline") for t in by_state["COMPLETE"] + by_state["PRUNED"]} - {None}
    assert baselines == {"fp32", "fp16", "bf16", "int8", "prune5", "prune10", "prune20"}


def main_in(directory, argv):
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main(argv)
    finally:
        os.chdir(cwd)


def test_allocator_setting_can_be_turned_off(monkeypatch):
    from approxtune.cli import tune_malloc

    monkeypatch.setenv("APPROXTUNE_MALLOC", "default")
    assert tune_malloc() is False
    monkeypatch.delenv("APPROXTUNE_MALLOC")
    assert tune_malloc() is (platform.libc_ver()[0] == "glibc")


def test_a_cache_under_the_old_name_is_renamed_not_recomputed_and_other_settings_keep_their_own(
    tuned, tmp_path, capsys
):
    root, _ = tuned
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(TINY)
    study = load_study(study_file)
    out = tmp_path / "runs" / "tiny"
    out.mkdir(parents=True)
    shutil.copy(root / "runs/tiny/model.pt", out / "model.pt")
    legacy = tmp_path / study.legacy_cache_path("search")
    shutil.copytree(root / study.cache_path("search"), legacy)
    before = {p.name: p.read_bytes() for p in legacy.iterdir()}
    capsys.readouterr()

    assert main_in(tmp_path, ["certify", str(study_file)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "Renamed the base cache" in err and "Reusing the base cache" in err and "Wrote" not in err, err
    new = tmp_path / study.cache_path("search")
    assert not legacy.exists() and {p.name: p.read_bytes() for p in new.iterdir()} == before

    # Another n0 in the same output_dir certifies into a cache of its own and leaves the first one as it was.
    other = tmp_path / "other.toml"
    other.write_text(TINY.replace("n0 = 16", "n0 = 8"))
    assert main_in(tmp_path, ["certify", str(other)]) == 0
    assert "Wrote the base cache" in capsys.readouterr().err
    assert (tmp_path / load_study(other).cache_path("search") / "meta.json").is_file()
    assert {p.name: p.read_bytes() for p in new.iterdir()} == before

    # An old-named cache of other settings is left where it is (and a fresh one is certified).
    shutil.move(new, legacy)
    third = tmp_path / "third.toml"
    third.write_text(TINY.replace("seed = 1", "seed = 2"))
    assert main_in(tmp_path, ["certify", str(third)]) == 0
    assert "Renamed" not in capsys.readouterr().err and legacy.is_dir()


def test_version_module_entry_and_plain_help():
    from importlib.metadata import version

    done = subprocess.run([sys.executable, "-m", "approxtune", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"approxtune {version('approxtune')}"
    for args in (["--help"], *([command, "--help"] for command in ("train", "certify", "tune", "front", "export"))):
        done = subprocess.run([sys.executable, "-m", "approxtune", *args], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: approxtune" in done.stdout
        assert "``" not in done.stdout and "`" not in done.stdout, "help texts are plain text"
        assert "-q, --quiet" in done.stdout and "-v, --verbose" in done.stdout


def test_quiet_shows_results_only_and_verbose_lets_optunas_log_through(tuned, capfd):
    root, study = tuned
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        capfd.readouterr()
        assert main(["-q", "tune", str(study)]) == 0
        quiet = capfd.readouterr()
        assert quiet.err == "" and "Pareto front" in quiet.out
        assert main(["tune", "--quiet", str(study)]) == 0 and capfd.readouterr().err == ""
        trials = len(optuna.load_study(study_name="tiny", storage=f"sqlite:///{root / 'runs/tiny/study.db'}").trials)
        more = root / "more-verbose.toml"
        for flag, trial in ((["-v"], trials), ([], trials + 1)):  # a subprocess: Optuna's handler keeps its stream
            more.write_text(TINY.replace("trials = 9", f"trials = {trial + 1}"))
            command = [sys.executable, "-m", "approxtune", "tune", *flag, str(more)]
            done = subprocess.run(command, cwd=root, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            logged = f"Trial {trial} finished with values" in done.stderr
            assert logged == bool(flag), "Optuna's INFO log line of the new trial, with -v only"


def test_certify_rebuilds_a_format_1_cache_and_refuses_one_whose_noise_it_cannot_reproduce(tuned, tmp_path, capsys):
    root, _ = tuned
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(TINY)
    study = load_study(study_file)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    shutil.copy(root / "runs/tiny/model.pt", tmp_path / "runs/tiny/model.pt")
    cache = tmp_path / study.cache_path("search")
    shutil.copytree(root / study.cache_path("search"), cache)
    good = {p.name: p.read_bytes() for p in cache.iterdir()}

    # Another installation's noise (its canary is not this one's): refused in one line, the cache left as it is.
    rewrite_meta(cache, noise_canary="0" * 64)
    capsys.readouterr()
    assert main_in(tmp_path, ["certify", str(study_file)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: the base cache {study.cache_path('search')} was certified with noise that this" in err
    assert "cannot reproduce" in err and "remove it and certify again" in err and "Traceback" not in err
    assert json.loads((cache / "meta.json").read_text())["noise_canary"] == "0" * 64

    # A cache of format 1 is certified again, saying why; the result is the cache this approxtune writes.
    as_format_1(cache)
    assert main_in(tmp_path, ["certify", str(study_file)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "has cache format 1, this approxtune reads format 2 (its noise came from torch's generator" in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == good


def _copy_of_tuned(tuned, tmp_path):
    """The tuned study copied into ``tmp_path`` (model, search cache and study): ``(study file, study, cache)``."""
    root, _ = tuned
    study_file = tmp_path / "tiny.toml"
    study_file.write_text(TINY)
    study = load_study(study_file)
    shutil.copytree(root / "runs", tmp_path / "runs", ignore=shutil.ignore_patterns("*.html", "*.png"))
    return study_file, study, tmp_path / study.cache_path("search")


def _flip(file, offset):
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


CLI_DAMAGE = {
    "truncated predictions.npy": (
        lambda c: (c / "predictions.npy").write_bytes((c / "predictions.npy").read_bytes()[:-100]),
        "predictions.npy has 6,028 bytes, 6,128 were written (truncated?)",
    ),
    "a flipped header byte": (
        lambda c: _flip(c / "p_a.npy", 20),
        "p_a.npy does not match its SHA-256 checksum (changed on disk)",
    ),
    "a flipped data byte": (
        lambda c: _flip(c / "predictions.npy", 3000),
        "predictions.npy does not match its SHA-256 checksum (changed on disk)",
    ),
    "garbage meta.json": (
        lambda c: (c / "meta.json").write_text('{"alpha": 0.001 "n": 200}'),
        "meta.json is not valid JSON (Expecting ',' delimiter: line 1 column 17 (char 16))",
    ),
    "a missing file": (lambda c: (c / "c_hat.npy").unlink(), "c_hat.npy is missing"),
}


@pytest.mark.parametrize("damage", CLI_DAMAGE)
def test_a_damaged_cache_is_refused_by_tune_and_set_aside_and_certified_again_by_certify(
    tuned, tmp_path, capsys, damage
):
    """Before checksums: a truncated file gave "mmap length is greater than file size" (no path), a flipped header
    byte a traceback, a flipped data byte was used silently, a garbage meta.json "Expecting ',' delimiter"."""
    study_file, study, cache = _copy_of_tuned(tuned, tmp_path)
    good = {p.name: p.read_bytes() for p in cache.iterdir()}
    change, problem = CLI_DAMAGE[damage]
    change(cache)
    damaged = {p.name: p.read_bytes() for p in cache.iterdir()}
    db = f"sqlite:///{tmp_path / 'runs/tiny/study.db'}"
    trials = len(optuna.load_study(study_name="tiny", storage=db).trials)
    before = sorted(p.name for p in (tmp_path / "runs/tiny").iterdir())
    capsys.readouterr()

    assert main_in(tmp_path, ["tune", str(study_file)]) == 2  # a trial is never scored on it
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    path = study.cache_path("search")
    assert err == (
        f"error: the base cache {path} is damaged: {problem}; `approxtune certify {study_file}` sets it aside and "
        "certifies it again (the same settings give the same cache)\n"
    )
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == damaged, "tune leaves it as it is"
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == before, "nothing written, no lock left"
    assert len(optuna.load_study(study_name="tiny", storage=db).trials) == trials

    assert main_in(tmp_path, ["certify", str(study_file)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    aside = [p for p in (tmp_path / "runs/tiny").iterdir() if p.name.startswith(f"{cache.name}.damaged-")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == damaged, "kept, as it was"
    assert f"Rebuilding {path}: it is damaged ({problem}); set aside as {aside[0].name}" in err
    assert f"Wrote the base cache {path}" in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == good, "certified again: the same bytes"
    assert main_in(tmp_path, ["tune", str(study_file)]) == 0, "and the study goes on"


def test_export_and_verify_refuse_a_damaged_cache_in_one_line(tuned, tmp_path, capsys):
    study_file, study, cache = _copy_of_tuned(tuned, tmp_path)
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    fp32 = next(t.number for t in db.trials if t.user_attrs.get("baseline") == "fp32")
    _flip(cache / "radius.npy", 200)
    capsys.readouterr()
    out = tmp_path / "exported"
    assert main_in(tmp_path, ["export", str(study_file), "--trial", str(fp32), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: the base cache {study.cache_path('search')} is damaged: radius.npy does not match its SHA-256 "
        f"checksum (changed on disk); `approxtune certify {study_file}` sets it aside and certifies it again (the same "
        "settings give the same cache), then export again\n"
    )
    assert not out.exists() and not list(tmp_path.glob(".exported*"))

    assert main_in(tmp_path, ["certify", str(study_file)]) == 0
    assert main_in(tmp_path, ["export", str(study_file), "--trial", str(fp32), "--out", str(out)]) == 0
    report = tmp_path / study.cache_path("report")
    (report / "index.npy").write_bytes((report / "index.npy").read_bytes()[:-8])
    capsys.readouterr()
    assert main_in(tmp_path, ["verify", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"error: the base cache {study.cache_path('report')} is damaged: index.npy has " in err
    assert f"`approxtune certify {study_file} --split report` sets it aside and certifies it again" in err
    assert err.endswith("then verify again\n")


def test_a_changed_sigma_is_refused_before_anything_is_certified_or_trained(tuned, tmp_path, capsys):
    study_file, _, _ = _copy_of_tuned(tuned, tmp_path)
    study_file.write_text(TINY.replace("[certify]\n", "[certify]\nsigma = 0.25\n"))
    model = (tmp_path / "runs/tiny/model.pt").read_bytes()
    before = sorted(p.name for p in (tmp_path / "runs/tiny").iterdir())
    capsys.readouterr()
    assert main_in(tmp_path, ["tune", str(study_file)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sigma: study has 0.5, now 0.25" in err and "machines" not in err
    assert sorted(p.name for p in (tmp_path / "runs/tiny").iterdir()) == before, "no cache of sigma 0.25"
    assert (tmp_path / "runs/tiny/model.pt").read_bytes() == model


def test_search_trials_below_the_baselines_runs_baselines_only_and_says_so(tuned, tmp_path, capsys):
    study_file, _, _ = _copy_of_tuned(tuned, tmp_path)
    study_file.write_text(TINY.replace('name = "tiny"', 'name = "few"').replace("trials = 9", "trials = 3"))
    capsys.readouterr()
    assert main_in(tmp_path, ["tune", str(study_file)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "search.trials = 3 is below the 7 baselines: only baselines will run; raise search.trials" in err
    few = optuna.load_study(study_name="few", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    finished = [t for t in few.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert [t.user_attrs["baseline"] for t in finished] == ["fp32", "fp16", "bf16"]


def _tune_lines(err):
    return [line for line in err.splitlines() if line.startswith("trial ")]


@pytest.mark.slow
def test_two_tunes_started_at_once_on_a_fresh_study_share_one_model_one_cache_and_the_trials(tmp_path):
    """Before the locks, both trained and certified, and the second died with "[Errno 2] No such file or directory:
    '...cache.partial/chunk-...tmp-<host>-<pid>.npz'" (the first removed the parts it was writing into)."""
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    procs = [_start_tune(tmp_path, study) for _ in range(2)]
    done = [proc.communicate(timeout=600) for proc in procs]
    errs = [err for _, err in done]
    assert [proc.returncode for proc in procs] == [0, 0], errs
    assert sum("train digits-cnn" in err for err in errs) == 1, "one process trained the model"
    assert sum("certify g on 30 search inputs" in err for err in errs) == 1, "one certified the cache"
    cache = load_study(study).cache_path("search")
    assert sorted(f"Wrote the base cache {cache}" in err for err in errs) == [False, True]
    assert sorted(f"Reusing the base cache {cache}" in err for err in errs) == [False, True]
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    states = sorted(t.state.name for t in db.trials)
    assert states.count("COMPLETE") + states.count("PRUNED") == len(states) == 9, "exactly its trials, no other"
    baselines = [t.user_attrs["baseline"] for t in db.trials if "baseline" in t.user_attrs]
    assert sorted(baselines) == sorted(["fp32", "fp16", "bf16", "int8", "prune5", "prune10", "prune20"])
    numbers = sorted(int(line.split()[1]) for err in errs for line in _tune_lines(err))
    assert numbers == list(range(9)), "each trial ran once, in one of the two processes"
    assert sum("Measured the layer sensitivities" in err for err in errs) == 1, "one measured the guide's"
    assert sum("Reusing the layer sensitivities" in err for err in errs) == 1
    names = sorted(p.name for p in (tmp_path / "runs/tiny").iterdir())
    sensitivities = [name for name in names if name.startswith(f"{cache.name.removesuffix('.cache')}.sensitivity-")]
    assert len(sensitivities) == 1 and sensitivities[0].endswith(".json")
    assert names == sorted(
        ["model.pt", cache.name, *sensitivities, "study.db", "front.png", "front.html", "front.digest"]
    ), "no parts, locks or temporary files left"


def test_a_cache_written_before_checksums_is_certified_again_and_its_study_goes_on(tuned, tmp_path, capsys):
    study_file, study, cache = _copy_of_tuned(tuned, tmp_path)
    good = {p.name: p.read_bytes() for p in cache.iterdir()}
    meta = json.loads(good["meta.json"])
    del meta["checksums"]
    (cache / "meta.json").write_text(json.dumps(meta))
    db = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'runs/tiny/study.db'}")
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    before = len(db.get_trials(states=finished))
    study_file.write_text(TINY.replace("trials = 9", f"trials = {before + 1}"))
    capsys.readouterr()
    assert main_in(tmp_path, ["tune", str(study_file)]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert f"Rebuilding {study.cache_path('search')}: the base cache" in err and "has no checksums" in err
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == good, "the same bytes, with checksums"
    assert len(db.get_trials(states=finished)) == before + 1, "the study goes on with the rebuilt cache"


def test_front_and_help_do_not_import_torch(tuned):
    """`approxtune front` starts without torch (seconds to import), numpy's scipy.stats or the export's onnx, and
    without the plotting libraries when its plots already show the study as it is."""
    root, study = tuned
    code = (
        "import sys; from approxtune.cli import main; code = main(['-q', 'front', sys.argv[1]]);"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'scipy.stats', 'optuna_dashboard', 'matplotlib',"
        " 'plotly') if m in sys.modules];"
        "print(code, heavy)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(study)], cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "0 []"
