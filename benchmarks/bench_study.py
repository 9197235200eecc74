"""Study-level savings: the default study's trials certified with IRS against the same trials from scratch.

For every COMPLETE trial of a tuned study, f^p is rebuilt from the trial's config and certified twice on the search
inputs, side by side, with the same batch size and thread count:

* IRS against the study's base cache, at the study's n_p (what `approxtune tune` does);
* Cohen's CERTIFY from scratch with fresh noise (n0 selection samples included) at the same total confidence
  (alpha_b = alpha + alpha_zeta + alpha_d), for n_s = n_p, 2 n_p, 3 n_p, ... up to the cache's n, stopping at the first
  n_s whose ACR reaches the IRS ACR (the time there is the scratch time; "not reached" means the scratch time at
  n_s = n, a lower bound).

    approxtune tune studies/digits.toml      # first: the study whose trials are measured
    python benchmarks/bench_study.py [--study studies/digits.toml] [--out benchmarks/study_results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import optuna
import torch

from approxtune import pipeline, search
from approxtune.approximation import ApproximationConfig, apply_approximation
from approxtune.certification import certify
from approxtune.config import load_study
from approxtune.irs import certify_irs
from approxtune.noise import input_seeds
from approxtune.statistics import acr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/digits.toml")
    parser.add_argument("--out", default="benchmarks/study_results")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(args.study)
    optuna_study = search.load_existing_study(study)
    if optuna_study is None:
        raise SystemExit(f"no study yet: run `approxtune tune {args.study}` first")
    model = pipeline.ensure_model(study)
    inputs = pipeline.load_inputs(study, "search")
    cache, _ = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    settings = study.irs_settings
    alpha_b = settings.total_alpha(cache.meta.alpha)
    n_p, n, n0, batch = settings.n_p, cache.meta.n, study.certify.n0, study.certify.batch_size
    fresh_seeds = input_seeds(10_000 + study.study.seed, inputs.index)  # never the search noise

    rows = []
    trials = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for trial in trials:
        approx = apply_approximation(model, ApproximationConfig.from_dict(trial.user_attrs["config"]))
        start = time.perf_counter()
        irs = certify_irs(approx, inputs.x, cache, settings, batch_size=batch)
        t_irs = time.perf_counter() - start
        t_scratch, acr_scratch, n_s, reached = 0.0, 0.0, 0, False
        for n_s in range(n_p, n + 1, n_p):
            start = time.perf_counter()
            result = certify(approx, inputs.x, fresh_seeds, cache.meta.sigma, n0, n_s, alpha_b, batch_size=batch)
            t_scratch = time.perf_counter() - start
            correct = result.c_hat == inputs.y.numpy()
            acr_scratch = acr(result.radius * correct)
            if acr_scratch >= irs.acr:
                reached = True
                break
        rows.append(
            {
                "trial": trial.number,
                "summary": trial.user_attrs.get("summary"),
                "acr_irs": irs.acr,
                "irs_seconds": t_irs,
                "irs_samples": irs.samples,
                "scratch_n": n_s,
                "acr_scratch": acr_scratch,
                "scratch_seconds": t_scratch,
                "scratch_samples": len(inputs) * (n0 + n_s),
                "reached": reached,
            }
        )
        r = rows[-1]
        print(
            f"trial {r['trial']:3d}  IRS {r['acr_irs']:.4f} {t_irs:5.2f}s   scratch n={n_s:5d} {acr_scratch:.4f} "
            f"{t_scratch:5.2f}s {'' if reached else '(not reached)'}",
            flush=True,
        )

    total_irs = sum(r["irs_seconds"] for r in rows)
    total_scratch = sum(r["scratch_seconds"] for r in rows)
    samples_irs = sum(r["irs_samples"] for r in rows)
    samples_scratch = sum(r["scratch_samples"] for r in rows)
    meta = {
        "command": f"python benchmarks/bench_study.py --study {args.study} --threads {args.threads}",
        "machine": f"{os.cpu_count()} cores {platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)",
        "load_average": os.getloadavg(),
        "trials": len(rows),
        "search_inputs": len(inputs),
        "n": n,
        "n0": n0,
        "n_p": n_p,
        "alpha_b": alpha_b,
    }
    summary = {
        "irs_seconds": total_irs,
        "scratch_seconds": total_scratch,
        "time_ratio": total_scratch / total_irs,
        "sample_ratio": samples_scratch / samples_irs,
        "not_reached": sum(not r["reached"] for r in rows),
        "median_trial_ratio": statistics.median(r["scratch_seconds"] / r["irs_seconds"] for r in rows),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": summary, "trials": rows}, indent=2) + "\n")
    lines = [
        "# Study-level savings: IRS against certification from scratch, trial by trial",
        "",
        f"Command: `{meta['command']}` (after `approxtune tune {args.study}`)  ",
        f"Machine: {meta['machine']}; load average at the end {tuple(round(x, 2) for x in meta['load_average'])} "
        "(shared machine).  ",
        f"{meta['trials']} complete trials, {meta['search_inputs']} search inputs, n = {n}, n0 = {n0}, "
        f"IRS n_p = {n_p}; scratch at alpha_b = {alpha_b:g} (IRS's total), n_s = n_p, 2 n_p, ... until its ACR "
        "reaches the trial's IRS ACR.",
        "",
        "| | IRS | from scratch | ratio |",
        "|---|---:|---:|---:|",
        f"| total certification time (s) | {total_irs:.1f} | {total_scratch:.1f} | **{summary['time_ratio']:.2f}×** |",
        f"| total noise samples | {samples_irs:,} | {samples_scratch:,} | {summary['sample_ratio']:.2f}× |",
        f"| median per-trial time ratio | | | {summary['median_trial_ratio']:.2f}× |",
        "",
        f"Trials where scratch never reached the IRS ACR up to n_s = n (their scratch time is a lower bound): "
        f"{summary['not_reached']}.",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
