"""Study-level savings: a tuned study's trials certified with IRS, with IRS and racing, and from scratch.

For every finished trial of a tuned study, in trial order, f^p is rebuilt from the trial's config and, for each IRS
rule (``--rules``, all at total confidence 1 - 0.002 on the default study), certified two ways side by side (the order
alternates from trial to trial), with the same batch size and thread count:

* **IRS**: :func:`approxtune.search.evaluate` without racing (build f^p, clean accuracy, IRS at the study's n_p);
* **IRS + racing**: the same with the study's ``search.race`` stages (or ``--race``), raced against the trials of this
  replay that completed before it under the same rule: a trial stops as soon as its best reachable (ACR, accuracy,
  size) is dominated.  Every stopped trial's bound is checked against its full ACR.

**Scratch at equal ACR**: Cohen's CERTIFY of f^p with fresh noise (n0 selection samples included) once at n_s = n
(untimed) gives its ACR at every n_s on a grid of 16 samples (the estimation samples are a replayable prefix, so the
first n_s of them are exactly what a run at n_s would draw), at the rule's total confidence; the smallest n_s whose
ACR reaches the trial's IRS ACR is then certified again, timed.  "Not reached" means n_s = n (a lower bound).

The front's hypervolume (ACR / base ACR, accuracy, size / fp32 size; reference (0, 0, 1)) is computed for all trials
certified in full and for the trials racing let complete; racing is sound, so the two must be equal.

Two more columns: **repeats reused** -- what ``approxtune tune`` itself spends, racing plus trials that repeat an
earlier configuration (user attr ``same_as``) costing nothing, as they do in the tool; and the **ceiling** -- scratch
over IRS on the rule's feasible front alone (repeats excepted).  A trial on the front must run its full budget
whatever racing does (a stopped trial reports no certificate), so no racing rule can beat that ratio with these
per-trial certificates.

    approxtune tune studies/digits.toml      # first: the study whose trials are measured
    python benchmarks/bench_study.py [--study studies/digits.toml] [--rules tail max gamma ...]
    python benchmarks/bench_study.py --report-only      # rewrite study_results.md from study_results.json
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import optuna
import torch
from bench_sampler import hypervolume

from approxtune import pipeline, search, storage
from approxtune.approximation import ApproximationConfig, apply_approximation, fp32_size_bytes
from approxtune.certification import certify
from approxtune.config import load_study
from approxtune.noise import input_seeds
from approxtune.statistics import acr, lower_confidence_bound, radius

RULES = {  # every rule at total confidence 1 - 0.002; "-disagreement": the paper's zeta on all f^p != f; "-signed":
    # the betting bound on losses minus gains
    "tail": {"mode": "tail", "alpha_zeta": 0.001, "alpha_d": 0.001, "zeta": "loss"},  # the default study's rule
    "tail-disagreement": {"mode": "tail", "alpha_zeta": 0.001, "alpha_d": 0.001, "zeta": "disagreement"},
    "tail-signed": {"mode": "tail", "alpha_zeta": 0.001, "alpha_d": 0.001, "zeta": "signed"},  # losses minus gains
    "max": {"mode": "max", "alpha_zeta": 0.0005, "alpha_d": 0.0005, "zeta": "loss"},
    "max-disagreement": {"mode": "max", "alpha_zeta": 0.0005, "alpha_d": 0.0005, "zeta": "disagreement"},
    "gamma": {"mode": "gamma", "gamma": 0.99, "alpha_zeta": 0.001, "alpha_d": 0.001, "zeta": "loss"},
    "tail-pilot16": {"mode": "tail", "pilot": 16, "alpha_zeta": 0.001, "alpha_d": 0.001, "zeta": "loss"},
}
GRID = 16
NOTES = "<!-- notes: kept when the script rewrites the tables above -->"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def scratch_curve(approx, inputs, seeds, cache, study) -> tuple[np.ndarray, np.ndarray]:
    """``(c_hat, counts)``: CERTIFY's class per input and its count among the first k estimation samples, every k."""
    c = study.certify
    full = certify(approx, inputs.x, seeds, cache.meta.sigma, c.n0, cache.meta.n, 0.25, batch_size=c.batch_size)
    hits = full.predictions == full.c_hat[:, None]
    return full.c_hat, np.cumsum(hits, axis=1)


def scratch_at_equal_acr(approx, inputs, seeds, cache, study, curve, alpha_b: float, target: float) -> dict:
    """The smallest n_s (grid of 16) whose scratch ACR at ``alpha_b`` reaches ``target``; CERTIFY there, timed."""
    c_hat, counts = curve
    correct = c_hat == inputs.y.numpy()
    n, n0 = cache.meta.n, study.certify.n0
    n_s, value = n, 0.0
    for k in [*range(GRID, n, GRID), n]:
        value = acr(radius(lower_confidence_bound(counts[:, k - 1], k, alpha_b), cache.meta.sigma) * correct)
        if value >= target:
            n_s = k
            break
    c = study.certify
    result, seconds = _timed(
        functools.partial(certify, approx, inputs.x, seeds, cache.meta.sigma, n0, n_s, alpha_b, batch_size=c.batch_size)
    )
    timed_acr = acr(result.radius * (result.c_hat == inputs.y.numpy()))
    assert abs(timed_acr - value) < 1e-9, "the timed run at n_s must certify what its prefix of the curve said"
    return {
        "scratch_n": n_s,
        "acr_scratch": timed_acr,
        "scratch_seconds": seconds,
        "reached": timed_acr >= target,
        "scratch_samples": len(inputs) * (n0 + n_s),
    }


def load_tuned(path: str):
    """``(study, optuna study, model, search inputs, base cache, base accuracy)`` of a study that has been tuned."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(path)
    optuna_study = storage.load_existing_study(study)
    if optuna_study is None:
        raise SystemExit(f"no study yet: run `approxtune tune {path}` first")
    model = pipeline.ensure_model(study)
    inputs = pipeline.load_inputs(study, "search")
    cache, base_accuracy = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    return study, optuna_study, model, inputs, cache, base_accuracy


def finished_trials(optuna_study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE and PRUNED (stopped by racing) trials, in trial order."""
    return optuna_study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits.toml")
    parser.add_argument("--out", default="benchmarks/study_results")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--race", help="comma-separated racing stages (default: the study's search.race)")
    parser.add_argument("--rules", nargs="+", choices=tuple(RULES), default=list(RULES))
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report_only:
        write_report(json.loads(out.with_suffix(".json").read_text()), out)
        return

    torch.set_num_threads(args.threads)
    study, optuna_study, model, inputs, cache, base_accuracy = load_tuned(args.study)
    race = [float(x) for x in args.race.split(",")] if args.race else study.search.race
    if not race:
        raise SystemExit("no racing stages: pass --race 0.125,0.25,0.5")
    fresh_seeds = input_seeds(10_000 + study.study.seed, inputs.index)  # never the search noise
    fp32_size = fp32_size_bytes(model)

    rules = {}
    for name in args.rules:
        plain = dataclasses.replace(
            study, irs=dataclasses.replace(study.irs, **RULES[name]), search=dataclasses.replace(study.search, race=[])
        )
        raced = dataclasses.replace(plain, search=dataclasses.replace(plain.search, race=race))
        done: list[tuple[int, search.Values]] = []  # trials that racing let complete under this rule
        rules[name] = (plain, raced, done, search.make_race(raced, base_accuracy, fp32_size, lambda d=done: d))

    rows: dict[str, list[dict]] = {name: [] for name in rules}
    finished = finished_trials(optuna_study)
    for i, trial in enumerate(finished):
        config = ApproximationConfig.from_dict(trial.user_attrs["config"])
        approx = apply_approximation(model, config)
        curve = scratch_curve(approx, inputs, fresh_seeds, cache, study)
        line = f"trial {trial.number:3d}"
        for name, (plain, raced, done, race_fn) in rules.items():
            row: dict = {"trial": trial.number, "summary": config.summary(), "same_as": trial.user_attrs.get("same_as")}
            full = functools.partial(search.evaluate, model, config, inputs, cache, plain)
            fast = functools.partial(search.evaluate, model, config, inputs, cache, raced, race=race_fn)
            for step in (full, fast) if i % 2 == 0 else (fast, full):
                try:
                    result, seconds = _timed(step)
                except search.Stopped as stopped:
                    row.update(race_seconds=stopped.seconds, race_samples=stopped.samples, race_stage=stopped.stage)
                    row.update(stopped=stopped.reason, upper_acr=stopped.upper[0])
                    continue
                if step is full:
                    row.update(acr_irs=result.acr, accuracy=result.accuracy, size_bytes=result.size_bytes)
                    row.update(irs_seconds=seconds, irs_samples=result.samples, confidence=result.confidence)
                else:
                    row.update(race_seconds=seconds, race_samples=result.samples, race_stage=None, stopped=None)
                    done.append((trial.number, result.values))
            if row["stopped"] is not None:  # soundness of the racing bound, checked on every stopped trial
                assert row["upper_acr"] >= row["acr_irs"], f"racing's bound failed on trial {trial.number} ({name})"
            alpha_b = 1.0 - row["confidence"]
            row.update(scratch_at_equal_acr(approx, inputs, fresh_seeds, cache, study, curve, alpha_b, row["acr_irs"]))
            rows[name].append(row)
            stop = "" if row["stopped"] is None else f" (stopped at {row['race_stage']:g})"
            line += (
                f" | {name} {row['acr_irs']:.4f} {row['irs_seconds']:.2f}s raced {row['race_seconds']:.2f}s{stop}"
                f" scratch n={row['scratch_n']} {row['scratch_seconds']:.2f}s"
            )
        print(line, flush=True)

    meta = {
        "command": f"python benchmarks/bench_study.py --study {args.study} --threads {args.threads} --rules "
        + " ".join(args.rules)
        + (f" --race {args.race}" if args.race else ""),
        "study": args.study,
        "machine": f"{os.cpu_count()} cores {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "load_average": os.getloadavg(),
        "trials": len(finished),
        "search_inputs": len(inputs),
        "n": cache.meta.n,
        "n0": study.certify.n0,
        "n_p": study.irs.n_p,
        "race": race,
    }
    runs = {}
    for name, (plain, _, _, _) in rules.items():
        r = rows[name]
        settings = plain.irs_settings

        def hv(selected: list[dict], plain=plain) -> float:
            points = [(x["acr_irs"], x["accuracy"], x["size_bytes"]) for x in selected]
            feasible = [v for v in points if search.constraint_violation(plain, base_accuracy, fp32_size, v) is None]
            return hypervolume(feasible, float(cache.summary()["acr"]), fp32_size) if feasible else 0.0

        def values(x: dict) -> search.Values:
            return (x["acr_irs"], x["accuracy"], x["size_bytes"])

        feasible_rows = [
            x for x in r if search.constraint_violation(plain, base_accuracy, fp32_size, values(x)) is None
        ]
        front = [x for x in feasible_rows if not any(search.dominates(values(y), values(x)) for y in feasible_rows)]
        fresh = [x for x in r if x["same_as"] is None]

        runs[name] = {
            "settings": {
                "mode": settings.mode.value,
                "gamma": settings.gamma,
                "pilot": settings.pilot,
                "alpha_zeta": settings.alpha_zeta,
                "alpha_d": settings.alpha_d,
                "alpha_b": settings.total_alpha(cache.meta.alpha),
            },
            "summary": {
                **{k: sum(x[k] for x in r) for k in ("irs_seconds", "race_seconds", "scratch_seconds")},
                **{k: sum(x[k] for x in r) for k in ("irs_samples", "race_samples", "scratch_samples")},
                "stopped": sum(x["stopped"] is not None for x in r),
                "repeats": len(r) - len(fresh),
                "tool_seconds": sum(x["race_seconds"] for x in fresh),  # racing, and repeats take the earlier result
                "tool_samples": sum(x["race_samples"] for x in fresh),
                # The front must be certified in full whatever racing does (its repeats excepted): a floor on the time.
                "front": [x["trial"] for x in front],
                "front_irs_seconds": sum(x["irs_seconds"] for x in front if x["same_as"] is None),
                "front_irs_samples": sum(x["irs_samples"] for x in front if x["same_as"] is None),
                "stopped_at": {f"{st:g}": sum(x["race_stage"] == st for x in r) for st in (0.0, *race)},
                "not_reached": sum(not x["reached"] for x in r),
                "hypervolume_all": hv(r),
                "hypervolume_raced": hv([x for x in r if x["stopped"] is None]),
                "mean_acr": statistics.mean(x["acr_irs"] for x in r),
            },
            "trials": r,
        }
    data = {"meta": meta, "runs": runs}
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    write_report(data, out)


def write_report(data: dict, out: Path) -> None:
    """``out``.md from the JSON: one row per IRS rule; notes below the marker are kept."""
    m = data["meta"]
    load = tuple(round(x, 2) for x in m["load_average"])
    lines = [
        "# Study-level savings: IRS, IRS with racing, and certification from scratch, trial by trial",
        "",
        f"Generated by `benchmarks/bench_study.py` (`--report-only` rewrites this file from `{out.name}.json`).",
        "",
        f"- command: `{m['command']}` (after `approxtune tune {m['study']}`)",
        f"- machine: {m['machine']}; load average at the end {load} (shared machine)",
        f"- {m['trials']} trials of the study in trial order, {m['search_inputs']} search inputs, n = {m['n']}, "
        f"n0 = {m['n0']}, n_p = {m['n_p']}, racing stages {m['race']}",
        "- IRS times include building f^p and its clean accuracy (a few ms); scratch is Cohen's CERTIFY with fresh "
        f"noise at the rule's total confidence and the smallest n_s (grid of {GRID}) whose ACR reaches the trial's "
        "IRS ACR, timed at that n_s; hypervolume of the feasible front of all trials vs of the trials racing "
        "completed, in (ACR / base ACR, accuracy, size / fp32 size) with reference (0, 0, 1)",
        "",
        "| rule | α_ζ / α_d | confidence | mean ACR | IRS s | IRS + racing s | scratch s | scratch / IRS "
        "| scratch / (IRS + racing) | samples: scratch / (IRS + racing) | stopped (at stage: count) "
        "| hypervolume all / raced | repeats | scratch / (IRS + racing + repeats reused) "
        "| front trials | ceiling: scratch / (IRS of the front alone), time / samples |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for name, run in data["runs"].items():
        s, su = run["settings"], run["summary"]
        ratio, raced = su["scratch_seconds"] / su["irs_seconds"], su["scratch_seconds"] / su["race_seconds"]
        stages = ", ".join(f"{k}: {v}" for k, v in su["stopped_at"].items() if v)
        lines.append(
            f"| {name} | {s['alpha_zeta']:g} / {s['alpha_d']:g} | 1 − {s['alpha_b']:g} | {su['mean_acr']:.4f} | "
            f"{su['irs_seconds']:.1f} | {su['race_seconds']:.1f} | {su['scratch_seconds']:.1f} | {ratio:.2f}× | "
            f"**{raced:.2f}×** | {su['scratch_samples'] / su['race_samples']:.2f}× | {su['stopped']} of "
            f"{len(run['trials'])}{' (' + stages + ')' if stages else ''} | "
            f"{su['hypervolume_all']:.4f} / {su['hypervolume_raced']:.4f} | {su['repeats']} | "
            f"**{su['scratch_seconds'] / su['tool_seconds']:.2f}×** | {len(su['front'])} | "
            f"{su['scratch_seconds'] / su['front_irs_seconds']:.2f}× / "
            f"{su['scratch_samples'] / su['front_irs_samples']:.2f}× |"
        )
    write_with_notes(out.with_suffix(".md"), lines)
    print(out.with_suffix(".md").read_text())


def write_with_notes(path: Path, lines: list[str]) -> None:
    """Write ``lines`` (the generated tables), then NOTES and the notes ``path`` already had below it."""
    notes = path.read_text().split(NOTES, 1)[1] if path.exists() and NOTES in path.read_text() else "\n"
    path.write_text("\n".join(lines) + "\n\n" + NOTES + notes)


if __name__ == "__main__":
    main()
