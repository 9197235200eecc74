"""How fast does a study go with 1 and 2 workers, and what does the database cost per trial?

Runs `approxtune tune` on the default digits study (`studies/digits.toml`, `search.trials` set to --trials) as 1 or 2
worker processes (OMP_NUM_THREADS=1 each) on one fresh study, against SQLite (one worker, the default) and against
PostgreSQL (1 and 2 workers), --reps times each.  The model and the base cache are made once beforehand (not timed).

Per run: wall time of the whole command (process start to exit, the slowest worker), the span from the first trial's
start to the last trial's end (from the trials' timestamps in the database), trials per hour over that span, and per
trial, measured inside every worker: time in the objective's evaluation (`search.evaluate`), time in storage calls
on the trial's critical path (every method of Optuna's RDBStorage, outermost calls only, called by the main thread
while `Study.optimize` runs: ask, suggest, set attributes, tell, the sampler's reads, the stale-trial check), the
heartbeat thread's storage time (off the critical path), and the storage time of a worker's start (create or join
the study, enqueue the baselines) and end (the front).

    python benchmarks/bench_workers.py [--trials 12] [--reps 3] [--postgres URL] [--out benchmarks/workers_results]

Without --postgres (or APPROXTUNE_TEST_POSTGRES_URL) it starts a private PostgreSQL server from the Debian binaries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import pwd
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import optuna
import torch
from _harness import cpu_model, write_with_notes  # benchmarks/ is on sys.path when a script runs

ROOT = Path(__file__).resolve().parent.parent

# Runs inside each worker: times every public RDBStorage method (by thread) and search.evaluate, then runs the CLI.
WORKER = r"""
import atexit, json, sys, threading, time
import optuna
from optuna.storages import RDBStorage
from approxtune import search
from approxtune.cli import main

stats = {"phase": "setup", "evaluate_s": 0.0, "evaluations": 0}
for phase in ("setup", "trials", "after", "heartbeat"):
    stats[f"storage_{phase}_s"] = 0.0
    stats[f"storage_{phase}_calls"] = 0

depth = threading.local()

def timed_storage(fn):
    def wrapper(*args, **kwargs):
        outer = getattr(depth, "n", 0) == 0  # count only the outermost call: methods call one another
        depth.n = getattr(depth, "n", 0) + 1
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            depth.n -= 1
            if outer:
                main_thread = threading.current_thread() is threading.main_thread()
                key = stats["phase"] if main_thread else "heartbeat"
                stats[f"storage_{key}_s"] += time.perf_counter() - start
                stats[f"storage_{key}_calls"] += 1
    return wrapper

for name, fn in list(vars(RDBStorage).items()):
    if callable(fn) and not name.startswith("__") and not isinstance(fn, (staticmethod, classmethod, type)):
        setattr(RDBStorage, name, timed_storage(fn))

evaluate = search.evaluate
def timed_evaluate(*args, **kwargs):
    start = time.perf_counter()
    try:
        return evaluate(*args, **kwargs)
    finally:
        stats["evaluate_s"] += time.perf_counter() - start
        stats["evaluations"] += 1
search.evaluate = timed_evaluate

optimize = optuna.Study.optimize
def phased_optimize(*args, **kwargs):
    stats["phase"] = "trials"
    try:
        return optimize(*args, **kwargs)
    finally:
        stats["phase"] = "after"
optuna.Study.optimize = phased_optimize

atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(stats)))
sys.exit(main(["tune", sys.argv[2]]))
"""


def postgres_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@contextlib.contextmanager
def private_postgres():
    """A throwaway local PostgreSQL server (as the test suite starts one), fsync on as in production."""
    bindir = postgres_bindir()
    if bindir is None:
        sys.exit("no PostgreSQL binaries: apt-get install postgresql, or pass --postgres URL")
    root = Path(tempfile.mkdtemp(prefix="approxtune-bench-pg-"))
    run_as = []
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    try:
        subprocess.run(
            [*run_as, bindir / "initdb", "-D", data, "-A", "trust", "-U", "bench"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
        subprocess.run(
            [*run_as, bindir / "pg_ctl", "-D", data, "-l", root / "log", "-o", options, "-w", "start"],
            cwd=root,
            check=True,
            capture_output=True,
        )
        yield f"postgresql+psycopg2://bench@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, bindir / "pg_ctl", "-D", data, "-m", "fast", "stop"], cwd=root, capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def study_file(base: str, work: Path, name: str, storage: str, trials: int) -> Path:
    """The digits study with its own name, storage and trial count; output_dir shared by all runs (model, cache)."""
    text = (ROOT / base).read_text()
    text = text.replace('name = "digits-sigma0.5"', f'name = "{name}"')
    text = text.replace('output_dir = "runs/digits-sigma0.5"', f'output_dir = "{work / "shared"}"')
    text = text.replace("trials = 40", f"trials = {trials}\nstorage = {json.dumps(storage)}")
    assert f'name = "{name}"' in text and f"trials = {trials}" in text, "studies/digits.toml changed: update the bench"
    path = work / f"{name}.toml"
    path.write_text(text)
    return path


def run(work: Path, study: Path, storage: str, name: str, workers: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    stats_files = [work / f"{name}-w{i}.json" for i in range(workers)]
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(f), str(study)],
            cwd=work,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for f in stats_files
    ]
    errors = [p.communicate()[1] for p in procs]
    wall = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode:
            raise SystemExit(f"worker failed:\n{err}")
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    span = (max(t.datetime_complete for t in trials) - min(t.datetime_start for t in trials)).total_seconds()
    per = [json.loads(f.read_text()) for f in stats_files]
    total = {k: sum(s[k] for s in per) for k in per[0] if k != "phase"}
    n = len(trials)
    return {
        "workers": workers,
        "complete_trials": n,
        "wall_s": wall,
        "trial_span_s": span,
        "trials_per_hour": 3600 * n / span,
        "trial_mean_s": statistics.mean((t.datetime_complete - t.datetime_start).total_seconds() for t in trials),
        "evaluate_per_trial_s": total["evaluate_s"] / max(1, total["evaluations"]),
        "storage_per_trial_s": total["storage_trials_s"] / max(1, total["evaluations"]),
        "storage_calls_per_trial": total["storage_trials_calls"] / max(1, total["evaluations"]),
        "heartbeat_storage_per_trial_s": total["storage_heartbeat_s"] / max(1, total["evaluations"]),
        "storage_setup_s": statistics.mean(s["storage_setup_s"] for s in per),
        "storage_after_s": statistics.mean(s["storage_after_s"] for s in per),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits.toml")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--postgres", default=os.environ.get("APPROXTUNE_TEST_POSTGRES_URL"))
    parser.add_argument("--out", default="benchmarks/workers_results")
    args = parser.parse_args()

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="approxtune-bench-workers-"))
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        postgres = args.postgres or stack.enter_context(private_postgres())
        prep = study_file(args.study, work, "prep", f"sqlite:///{work / 'prep.db'}", args.trials)
        subprocess.run(
            [sys.executable, "-m", "approxtune.cli", "certify", str(prep)],
            cwd=work,
            check=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            capture_output=True,
        )
        rows = []
        variants = [("sqlite", 1), ("postgresql", 1), ("postgresql", 2)]
        for rep in range(args.reps):
            for backend, workers in variants:
                name = f"bench-{backend}-{workers}w-{rep}-{uuid.uuid4().hex[:6]}"
                url = f"sqlite:///{work / (name + '.db')}" if backend == "sqlite" else postgres
                load = os.getloadavg()[0]
                row = run(work, study_file(args.study, work, name, url, args.trials), url, name, workers)
                row.update(backend=backend, rep=rep, load_1min_before=load)
                rows.append(row)
                print(json.dumps(row), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()

    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    keys = [
        ("trials_per_hour", "trials/hour", "{:.0f}"),
        ("trial_span_s", "first start to last end (s)", "{:.1f}"),
        ("wall_s", "command wall (s)", "{:.1f}"),
        ("trial_mean_s", "trial duration (s)", "{:.2f}"),
        ("evaluate_per_trial_s", "evaluate per trial (s)", "{:.2f}"),
        ("storage_per_trial_s", "storage per trial, critical path (ms)", "ms"),
        ("storage_calls_per_trial", "storage calls per trial", "{:.1f}"),
        ("heartbeat_storage_per_trial_s", "heartbeat storage per trial (ms)", "ms"),
        ("storage_setup_s", "storage at start, per worker (ms)", "ms"),
        ("storage_after_s", "storage for the final front, per worker (ms)", "ms"),
    ]
    lines = [
        "| storage | workers | " + " | ".join(label for _, label, _ in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for backend, workers in variants:
        sel = [r for r in rows if r["backend"] == backend and r["workers"] == workers]
        cells = []
        for key, _, fmt in keys:
            value = statistics.median(r[key] for r in sel)
            cells.append(f"{1000 * value:.1f}" if fmt == "ms" else fmt.format(value))
        lines.append(f"| {backend} | {workers} | " + " | ".join(cells) + " |")
    header = [
        "# Workers on one study: trials per hour and the database's cost per trial",
        "",
        f"The default digits study (`{args.study}`, {args.trials} trials: the 7 baselines, then NSGA-II) run by "
        "`approxtune tune` as 1 worker on SQLite (the default), and as 1 and 2 workers on one PostgreSQL study "
        f"({'the server at --postgres' if args.postgres else 'a private local PostgreSQL server, fsync on'}, on the "
        "same machine). Model and base cache made beforehand. Trials/hour over the span from the first trial's start "
        "to the last trial's end; storage = time in Optuna's RDBStorage methods on a trial's critical path (main "
        "thread, during `optimize`), per trial; heartbeat = the heartbeat thread's storage time, off the critical "
        "path. Written by `benchmarks/bench_workers.py`.",
        "",
        f"- `nproc`: {os.cpu_count()}; each worker OMP_NUM_THREADS=1; CPU: {cpu_model()}",
        f"- torch {torch.__version__}, optuna {optuna.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
        f"- load average (1, 5, 15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; after: "
        f"{', '.join(f'{x:.2f}' for x in load_after)} (other jobs share these cores)",
        f"- command: `python benchmarks/bench_workers.py --trials {args.trials} --reps {args.reps}`",
        f"- medians of {args.reps} runs per row",
    ]
    lines += [
        "",
        "Every run (the load average is the other jobs' share of the 2 cores when the run started):",
        "",
        "| rep | storage | workers | load (1 min) | trials/hour | trial span (s) | evaluate per trial (s) | "
        "storage per trial (ms) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rep']} | {r['backend']} | {r['workers']} | {r['load_1min_before']:.2f} | "
            f"{r['trials_per_hour']:.0f} | {r['trial_span_s']:.1f} | {r['evaluate_per_trial_s']:.2f} | "
            f"{1000 * r['storage_per_trial_s']:.0f} |"
        )
    write_with_notes(out.with_suffix(".md"), [*header, "", *lines])
    print("\n".join([*header, "", *lines]))


if __name__ == "__main__":
    main()
