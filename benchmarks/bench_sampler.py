"""Which Optuna sampler should `approxtune tune` use by default?  Hypervolume of the front after a fixed budget.

For each sampler (random, NSGA-II, multivariate TPE) and several seeds, run the default digits study's search (same
base cache, same enqueued baselines, `search.trials` trials) in memory and measure the hypervolume of the Pareto
front in normalised objectives (ACR / base ACR, clean accuracy, size / fp32 size; reference point (0, 0, 1)).
Evaluations are deterministic, so results are memoised by configuration across runs (it changes no number).

    python benchmarks/bench_sampler.py [--study studies/digits.toml] [--seeds 3] [--out benchmarks/sampler_results]
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import optuna
import torch
from _harness import load, machine, parser

from approxtune import search
from approxtune.hypervolume import study_hypervolume

SAMPLERS = ("random", "nsga2", "tpe")


def main() -> None:
    p = parser(__doc__, "benchmarks/sampler_results", rewrite=False)
    p.add_argument("--seeds", type=int, default=3)
    args = p.parse_args()

    device = torch.device("cpu")
    loaded = load(args.study)
    study, model, inputs, cache, base_accuracy = loaded
    attrs = search.study_attrs(study, cache, base_accuracy, model)
    layers = loaded.layers
    memo: dict[str, tuple[float, float, int]] = {}
    evaluations = 0

    def objective(trial: optuna.Trial) -> tuple[float, float, int]:
        nonlocal evaluations
        config = search.suggest_config(trial, layers, study)
        key = json.dumps(config.to_dict(), sort_keys=True)
        if key not in memo:
            memo[key] = search.evaluate(model, config, inputs, cache, study, device).values
            evaluations += 1
        trial.set_constraint("none", -1.0)
        return memo[key]

    results: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    start = time.perf_counter()
    for seed in range(args.seeds):
        for name in SAMPLERS:
            variant = replace(study, study=replace(study.study, seed=seed), search=replace(study.search, sampler=name))
            optuna_study = optuna.create_study(directions=list(search.DIRECTIONS), sampler=search.make_sampler(variant))
            search.enqueue_baselines(optuna_study, study, layers)
            optuna_study.optimize(objective, n_trials=study.search.trials)
            values = [tuple(t.values) for t in optuna_study.best_trials]
            hv = study_hypervolume(values, attrs["base_acr"], attrs["fp32_size_bytes"])
            results[name].append(hv)
            print(
                f"seed {seed} {name:7s} hypervolume {hv:.4f}  front {len(values)}  ({evaluations} evaluations so far)"
            )

    summary = {name: {"median": statistics.median(v), "all": v} for name, v in results.items()}
    meta = {
        "machine": machine(torch.get_num_threads()),
        "optuna": optuna.__version__,
        "command": f"python benchmarks/bench_sampler.py --study {args.study} --seeds {args.seeds}",
        "trials": study.search.trials,
        "population": study.search.population,
        "evaluations": evaluations,
        "seconds": round(time.perf_counter() - start, 1),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "hypervolume": summary}, indent=2) + "\n")
    lines = [
        "# Sampler choice: hypervolume of the front after the default study's budget",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}; Optuna {meta['optuna']}; {meta['trials']} trials per run (7 enqueued "
        f"baselines included), NSGA-II population {meta['population']}; {meta['evaluations']} distinct "
        f"configurations evaluated in {meta['seconds']} s.",
        "",
        "Hypervolume in (ACR / base ACR, clean accuracy, size / fp32 size), reference point (0, 0, 1); "
        "higher is better.",
        "",
        "| sampler | median | per seed |",
        "|---|---|---|",
    ]
    for name, row in summary.items():
        lines.append(f"| {name} | {row['median']:.4f} | {', '.join(f'{v:.4f}' for v in row['all'])} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
