"""Scale-out: workers on one study through a real PostgreSQL server, a worker killed mid-trial, base certification
split into shards and merged byte for byte.

The PostgreSQL tests need a real server.  ``.ci/run`` starts the Debian cluster and exports
``APPROXTUNE_TEST_POSTGRES_URL``; without it, the tests start a private throwaway server from ``pgserver`` (a
pip-installable PostgreSQL that the test extra brings: ``pip install -e '.[test]'``), on a local socket only, so the
README's two commands pass the tests on a fresh machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from unittest import mock

import optuna
import pytest
from optuna.trial import TrialState

from approxtune import cache as cache_mod
from approxtune import pipeline, search, storage
from approxtune import trials as records
from approxtune.cli import main
from approxtune.config import load_study

URL_ENV = "APPROXTUNE_TEST_POSTGRES_URL"
HOW_TO_GET_A_SERVER = (
    f"the PostgreSQL tests need a server and found none: install the test extra (`pip install -e '.[test]'`, which "
    f"brings pgserver, a PostgreSQL the tests start themselves), or point {URL_ENV} at a server "
    "(postgresql+psycopg2://USER:PASSWORD@HOST:PORT/DB, a role allowed to CREATE DATABASE)"
)

BASELINES = {"fp32", "fp16", "bf16", "int8", "prune5", "prune10", "prune20"}

# Like tests/test_cli.py's TINY, with trials slow enough (0.5-2 s) to kill a worker mid-trial, and many enough that
# the other workers still start trials after its trial has turned stale (grace period 2 s) and so retry it.  Mode
# "max" replays every cached sample (n_p = n); the default tail mode keeps half of them for its decisions.
CLUSTER_STUDY = """
[study]
name = "{name}"
output_dir = "{output_dir}"
seed = 1
[data]
search_inputs = 30
report_inputs = 20
[train]
epochs = 4
[certify]
n0 = 16
n = 600
[irs]
n_p = 600
mode = "max"
[search]
trials = {trials}
storage = "{url}"
heartbeat_interval = 1
grace_period = 2
"""


# --------------------------------------------------------------------------------------------------------------------
# A PostgreSQL server for the tests


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _private_server():
    """A throwaway PostgreSQL server of ``pgserver`` (its own binaries, a Unix socket, no TCP), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="approxtune-pg-"))
    runtime = {} if os.environ.get("XDG_RUNTIME_DIR") else {"XDG_RUNTIME_DIR": str(root)}  # pgserver's lock files
    try:
        with mock.patch.dict(os.environ, runtime):
            try:
                import pgserver
            except ImportError:
                pytest.fail(HOW_TO_GET_A_SERVER)
            server = pgserver.get_server(root / "data", cleanup_mode="stop")
            try:
                yield server.get_uri().replace("postgresql://", "postgresql+psycopg2://", 1)
            finally:
                server.cleanup()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _fresh_database(url: str):
    """A new database on the server of ``url`` (dropped afterwards), so that the workers create Optuna's tables at
    once on an empty database; the database of ``url`` itself when the role may not create one."""
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    name = f"approxtune_test_{uuid.uuid4().hex[:12]}"
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    except sqlalchemy.exc.OperationalError as exc:
        pytest.fail(f"cannot connect to the PostgreSQL server at {make_url(url)!r}: {exc.orig}\n{HOW_TO_GET_A_SERVER}")
    except sqlalchemy.exc.ProgrammingError:  # no CREATEDB privilege: share the given database
        engine.dispose()
        yield url
        return
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get(URL_ENV)
    if url:
        with _fresh_database(url) as fresh:
            yield fresh
        return
    with _private_server() as server, _fresh_database(server) as fresh:
        yield fresh


# --------------------------------------------------------------------------------------------------------------------
# Workers on one study


def _worker_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _start_worker(root: Path, study_file: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "approxtune.cli", "tune", str(study_file)],
            cwd=root,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=_worker_env(),
        )


def _running_trial_of(study_name: str, url: str, pids: dict[int, subprocess.Popen], num_params: int, timeout: float):
    """Poll the database until a RUNNING trial names one of ``pids`` as its worker and has all its ``num_params``
    parameters (it is being evaluated); returns (trial, pid)."""
    host = socket.gethostname()
    owners = {f"{host}:{pid}": pid for pid in pids}
    storage = optuna.storages.RDBStorage(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            time.sleep(0.05)
            continue
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = owners.get(trial.user_attrs.get("worker"))
            if pid is not None and len(trial.params) == num_params:
                return trial, pid
        if all(p.poll() is not None for p in pids.values()):
            break
        time.sleep(0.05)
    raise AssertionError("no worker was seen running a trial")


def _pareto(values: dict[int, list[float]]) -> set[int]:
    """Numbers of the trials that no other trial dominates (ACR up, accuracy up, size down)."""

    def dominates(w, v):
        return w[0] >= v[0] and w[1] >= v[1] and w[2] <= v[2] and (w[0] > v[0] or w[1] > v[1] or w[2] < v[2])

    return {n for n, v in values.items() if not any(dominates(w, v) for m, w in values.items() if m != n)}


@pytest.mark.slow
def test_three_workers_one_killed_mid_trial(tmp_path, postgres_url, capsys):
    """Three workers start at once on a fresh database; one is SIGKILLed in the middle of a trial.  Its trial is
    failed and retried by another worker, the study completes, baselines were enqueued once, the front is right."""
    trials = 18
    name = f"cluster-{uuid.uuid4().hex[:8]}"
    study_file = tmp_path / "cluster.toml"
    study_file.write_text(CLUSTER_STUDY.format(name=name, output_dir="shared", trials=trials, url=postgres_url))
    assert _main_in(tmp_path, ["certify", str(study_file)]) == 0  # the model and the cache, once, on "shared storage"

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        study_config = load_study(study_file)
        num_params = 2 * len(search.searched_layers(study_config, pipeline.ensure_model(study_config)))

    workers = [_start_worker(tmp_path, study_file, tmp_path / f"worker{i}.log") for i in range(3)]
    try:
        pids = {w.pid: w for w in workers}
        victim_trial, victim_pid = _running_trial_of(name, postgres_url, pids, num_params, timeout=180)
        os.kill(victim_pid, signal.SIGKILL)
        for w in workers:
            w.wait(timeout=300)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
    logs = {w.pid: (tmp_path / f"worker{i}.log").read_text() for i, w in enumerate(workers)}
    for w in workers:
        if w.pid != victim_pid:
            assert w.returncode == 0, logs[w.pid]
            assert "Traceback" not in logs[w.pid]
    assert sum("created it" in log for log in logs.values()) == 1, "exactly one worker created the study"
    assert sum("joined it" in log for log in logs.values()) == 2

    study = optuna.load_study(study_name=name, storage=postgres_url)
    by_number = {t.number: t for t in study.trials}
    summary = [
        (t.number, t.state.name, t.user_attrs.get("worker"), t.system_attrs.get("failed_trial"), t.duration)
        for t in study.trials
    ]
    print(f"victim {victim_pid} in trial {victim_trial.number}; trials: {summary}")  # shown when an assertion fails
    states = [t.state for t in study.trials]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states

    # The killed trial: failed through its stale heartbeat, retried by another worker, and the retry completed.
    killed = by_number[victim_trial.number]
    assert killed.state == TrialState.FAIL
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert killed.params.items() <= retries[0].params.items()  # the same candidate, evaluated to the end
    assert retries[0].user_attrs["worker"] != f"{socket.gethostname()}:{victim_pid}"

    # Nothing else is lost: every trial is COMPLETE or PRUNED, or FAIL with a completed retry.
    for t in study.trials:
        if t.state == TrialState.FAIL:
            chain = [r for r in study.trials if t.number in r.system_attrs.get("retry_history", [])]
            assert any(r.state == TrialState.COMPLETE for r in chain), f"trial {t.number} failed without a retry"
        else:
            assert t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    finished = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == trials, "exactly the requested number: the workers claim trials in the shared output_dir"

    # Each baseline enqueued exactly once (a retried copy carries the failed trial's attributes, so skip those).
    originals = [
        t.user_attrs["baseline"]
        for t in study.trials
        if "baseline" in t.user_attrs and "failed_trial" not in t.system_attrs
    ]
    assert sorted(originals) == sorted(BASELINES)

    # Workers do not propose the same candidate at once: the guided sampler leaves the best proposal to the earlier of
    # two trials choosing together (and NSGA-II samples with seeds of its own). Only the first is compared.
    first_sampled = {}
    for t in sorted(complete, key=lambda t: t.number):
        if "baseline" not in t.user_attrs and "failed_trial" not in t.system_attrs:
            first_sampled.setdefault(t.user_attrs["worker"], tuple(sorted(t.params.items())))
    assert len(first_sampled) >= 2 and len(set(first_sampled.values())) == len(first_sampled), first_sampled

    # The reported front is the Pareto set of the completed trials' values (all feasible: no constraints set), each
    # configuration once (its first trial: a retry or a repeat of the same configuration is the same certificate).
    first = {}
    for t in sorted(complete, key=lambda t: t.number):
        first.setdefault(str(sorted(t.params.items())), t)
    expected = _pareto({t.number: t.values for t in first.values()})
    assert {t.number for t in records.front(study)} == expected
    assert all(records.feasible(t) for t in complete)

    # A worker whose cache is not the study's is refused, and so is one without a cache: nothing is added.
    before = len(study.trials)
    capsys.readouterr()
    other = tmp_path / "other.toml"
    other.write_text(
        CLUSTER_STUDY.format(name=name, output_dir="other", trials=trials, url=postgres_url).replace(
            "search_inputs = 30", "search_inputs = 25"
        )
    )
    (tmp_path / "other").mkdir()
    shutil.copy(tmp_path / "shared" / "model.pt", tmp_path / "other" / "model.pt")
    assert _main_in(tmp_path, ["certify", str(other)]) == 0  # a local cache, of other inputs
    assert _main_in(tmp_path, ["tune", str(other)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "tuned against another base certification" in err and "every worker must read the same cache" in err, err

    lonely = tmp_path / "lonely.toml"
    lonely.write_text(CLUSTER_STUDY.format(name=name, output_dir="lonely", trials=trials, url=postgres_url))
    (tmp_path / "lonely").mkdir()
    assert _main_in(tmp_path, ["tune", str(lonely)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no checkpoint" in err and "workers neither train nor certify" in err, err
    shutil.copy(tmp_path / "shared" / "model.pt", tmp_path / "lonely" / "model.pt")
    assert _main_in(tmp_path, ["tune", str(lonely)]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "no base cache" in err and "workers do not certify g themselves" in err, err
    assert not list((tmp_path / "lonely").glob("base-*")), "no cache, whole or partial"
    assert len(optuna.load_study(study_name=name, storage=postgres_url).trials) == before


def test_storage_errors_are_one_line_messages(tmp_path):
    with pytest.raises(ValueError, match=r"cannot open the study storage postgresql\+psycopg2://u:\*\*\*@127\.0\.0\.1"):
        storage.storage(f"postgresql+psycopg2://u:secret@127.0.0.1:{_free_port()}/db")


def test_a_joining_worker_waits_for_the_creator_then_gives_up_with_a_message(tmp_path, monkeypatch):
    """A study that exists without approxtune's settings (its creator died right after creating it)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text('[study]\nname = "half"\n[search]\nsampler = "nsga2"\n')  # no guide needed
    study = load_study(tmp_path / "s.toml")
    Path(study.output_dir).mkdir(parents=True)
    optuna.create_study(study_name="half", storage=study.storage, directions=list(search.DIRECTIONS))
    attrs = dict.fromkeys(search.CHECKED_ATTRS, 1)
    start = time.monotonic()
    with pytest.raises(search.StudyMismatchError, match="records no base certification"):
        search.create_study(study, attrs, setup_timeout=0.5)
    assert time.monotonic() - start < 10


def test_creator_enqueues_baselines_joiners_do_not(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "s.toml").write_text('[study]\nname = "once"\n[search]\nsampler = "nsga2"\n')  # no guide needed
    study = load_study(tmp_path / "s.toml")
    Path(study.output_dir).mkdir(parents=True)
    attrs = {**dict.fromkeys(search.CHECKED_ATTRS, 1), "base_acr": 0.5}
    first = search.create_study(study, attrs, ["conv1", "fc"])
    second = search.create_study(study, attrs, ["conv1", "fc"])
    assert first.created and not second.created and second.enqueued == []
    assert sorted(first.enqueued) == sorted(BASELINES)
    assert len(second.study.trials) == len(BASELINES)
    with pytest.raises(search.StudyMismatchError, match="tuned against another base certification"):
        search.create_study(study, {**attrs, "cache_fingerprint": 2}, ["conv1", "fc"])


# --------------------------------------------------------------------------------------------------------------------
# Base certification in shards

SHARD_STUDY = """
[study]
name = "shards"
output_dir = "{output_dir}"
seed = 1
[data]
search_inputs = 30
report_inputs = 20
[train]
epochs = 2
[certify]
n0 = 16
n = 200
[irs]
n_p = 100
"""
CHUNK_SAMPLES = 4 * 216  # 4 inputs per chunk: 8 chunks (the last of 2 inputs)
RUN_WITH_SMALL_CHUNKS = (
    "import sys; import approxtune.cache as c; c.CHUNK_SAMPLES = int(sys.argv[1]); "
    "from approxtune.cli import main; sys.exit(main(sys.argv[2:]))"
)


def _cache_name(study_file: Path) -> str:
    return load_study(study_file).cache_path("search").name


def _certify_process(root: Path, *argv: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUN_WITH_SMALL_CHUNKS, str(CHUNK_SAMPLES), "certify", *argv],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_worker_env(),
    )


def _dir_bytes(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def shard_setup(tmp_path_factory):
    """A trained model and the one-process cache (same chunking) to compare the shards against."""
    root = tmp_path_factory.mktemp("shards")
    (root / "ref.toml").write_text(SHARD_STUDY.format(output_dir="ref"))
    assert _main_in(root, ["train", "ref.toml"]) == 0
    proc = _certify_process(root, "ref.toml")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return root


def _shard_study(root: Path, name: str) -> Path:
    (root / name).mkdir()
    shutil.copy(root / "ref" / "model.pt", root / name / "model.pt")
    study_file = root / f"{name}.toml"
    study_file.write_text(SHARD_STUDY.format(output_dir=name))
    return study_file


@pytest.mark.slow
def test_two_shards_merge_to_the_one_process_cache_byte_for_byte(shard_setup, monkeypatch, capsys):
    root = shard_setup
    study_file = _shard_study(root, "split")
    cache = _cache_name(study_file)  # the same for ref/, whose study differs only in output_dir
    # Three processes at once, as on three machines sharing the output folder: shard 0/2 twice (racing on the same
    # chunks) and shard 1/2.
    procs = [_certify_process(root, study_file.name, "--shard", s) for s in ("0/2", "1/2", "0/2")]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert not (root / "split" / cache).exists(), "a shard writes no cache"
    assert len(list((root / "split" / f"{cache}.partial").glob("chunk-*.npz"))) == 8
    assert not list((root / "split" / f"{cache}.partial").glob("*tmp*")), "no temporary file left behind"

    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", CHUNK_SAMPLES)
    capsys.readouterr()
    assert _main_in(root, ["certify", study_file.name, "--merge"]) == 0
    assert "Merged the shards" in capsys.readouterr().err
    assert _dir_bytes(root / "split" / cache) == _dir_bytes(root / "ref" / cache)
    assert not (root / "split" / f"{cache}.partial").exists()


@pytest.mark.slow
def test_merge_refuses_missing_shards_and_parts_of_another_model(shard_setup, monkeypatch, capsys):
    root = shard_setup
    monkeypatch.setattr(cache_mod, "CHUNK_SAMPLES", CHUNK_SAMPLES)
    study_file = _shard_study(root, "half")
    cache = _cache_name(study_file)
    assert _main_in(root, ["certify", study_file.name, "--shard", "1/2"]) == 0
    capsys.readouterr()
    assert _main_in(root, ["certify", study_file.name, "--merge"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "misses chunks 0 (inputs 0-3), 2 (inputs 8-11), 4 (inputs 16-19), 6 (inputs 24-27) of 8" in err, err
    assert not (root / "half" / cache).exists()

    # Another model (retrained with one more epoch) in place of the one the parts were certified with.
    (root / "half.toml").write_text(SHARD_STUDY.format(output_dir="half").replace("epochs = 2", "epochs = 3"))
    assert _main_in(root, ["train", "half.toml"]) == 0
    capsys.readouterr()
    assert _main_in(root, ["certify", "half.toml", "--shard", "0/2"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "holds parts of another base certification" in err and "the model (weights fingerprint)" in err, err
    assert _main_in(root, ["certify", "half.toml", "--merge"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "belong to another base certification" in err and "the model (weights fingerprint)" in err, err
    assert len(list((root / "half" / f"{cache}.partial").glob("chunk-*.npz"))) == 4, "nothing was deleted"

    capsys.readouterr()
    assert _main_in(root, ["certify", "half.toml", "--shard", "2/2"]) == 2
    assert "I must lie in 0..K-1" in capsys.readouterr().err


def _main_in(directory: Path, argv: list[str]) -> int:
    cwd = os.getcwd()
    os.chdir(directory)
    try:
        return main(argv)
    finally:
        os.chdir(cwd)


@pytest.mark.slow
def test_tune_fails_a_stale_trial_even_when_the_study_needs_no_more_trials(tmp_path):
    """A worker that died during the study's last trials leaves a RUNNING trial; the next `tune` (here with nothing
    left to run) fails it once its heartbeat is older than the grace period."""
    study_file = tmp_path / "stale.toml"
    text = CLUSTER_STUDY.format(name="stale", output_dir="runs", trials=1, url="").replace('storage = ""\n', "")
    study_file.write_text(text.replace("n = 600", "n = 100").replace("n_p = 600", "n_p = 100"))
    assert _main_in(tmp_path, ["tune", str(study_file)]) == 0
    url = f"sqlite:///{tmp_path / 'runs' / 'study.db'}"
    rdb = storage.storage(url, heartbeat_interval=1, grace_period=2)
    study = optuna.load_study(study_name="stale", storage=rdb)
    orphan = rdb.create_new_trial(study._study_id)  # as a worker's study.ask()
    rdb.record_heartbeat(orphan)
    time.sleep(3)
    assert _main_in(tmp_path, ["tune", str(study_file)]) == 0
    assert rdb.get_trial(orphan).state == TrialState.FAIL
