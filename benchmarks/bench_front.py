"""Time to a good front: the hypervolume of the front found so far against certification samples and wall time.

Four ways to search a study, each over ``--seeds`` seeds (the sampler's seed; the study, its base cache and the
enqueued baselines are the same for all):

* **(a) nsga2**: Optuna NSGA-II, every trial certified by IRS in full (``search.race = []``);
* **(b) nsga2+race**: NSGA-II with racing, the default of ``approxtune tune`` before the guided search;
* **(c) guided+race**: ``search.sampler = "guided"`` with racing; its cost includes measuring the layer sensitivities
  (samples and seconds, charged to every seed as if measured for it alone);
* **(d) nsga2+scratch**: what a user would assemble without approxtune -- the same NSGA-II trials as (a), each
  certified from scratch by Cohen's CERTIFY (fresh noise, n0 selection samples included) at the smallest n_s on a
  grid of 16 whose ACR reaches the trial's IRS ACR (as ``bench_study.py`` computes it; n_s = n, a lower bound, where
  even n does not reach it).  Its front is (a)'s by construction, its cost per trial that of scratch.  A repeated
  configuration costs nothing in (a)-(c) (``same_as``) and, generously, in (d) too.

Every trial of (a)-(c) is run by ``approxtune.search.make_objective``, the objective ``approxtune tune`` runs, in an
in-memory study: its samples are the forward passes it recorded (deterministic), its time the wall-clock time of the
run so far (sampling included; noisy).  The scratch certification of each (a) trial runs right after it (outside
(a)'s clock), so that the per-sample times of IRS and of scratch are measured side by side under the same load;
(d)'s time is its scratch seconds plus (a)'s sampler time.

The **reference front** is the feasible front of every trial of every run of the study (all methods, all seeds);
the hypervolume is in (ACR / base ACR, accuracy, size / fp32 size) with reference point (0, 0, 1)
(:mod:`approxtune.hypervolume`).  For each run, the samples and the time at which its front first reaches 95 % and
99 % of the reference hypervolume; ``>`` marks a run that did not reach it within its trials (its total, a lower
bound).

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_front.py --study studies/digits.toml --seeds 5 \\
        --trials 80 --guided-trials 40                # one study per run: results merged into OUT.json by study
    python benchmarks/bench_front.py --report-only    # rewrite front_results.md and the plots from front_results.json

The deeper model's study (``benchmarks/studies/resnet20-synthetic.toml``) trains its model on synthetic data first
(:func:`prepare_synthetic`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import optuna
import torch
import torch.nn.functional as F
from _harness import load, machine, parser, report_only, scratch_acr, scratch_grid, write_results, write_with_notes
from scipy.stats import spearmanr

from approxtune import guided, search
from approxtune.approximation import ApproximationConfig, apply_approximation
from approxtune.certification import certify, predict_under_noise
from approxtune.config import Study, load_study
from approxtune.data import Inputs
from approxtune.hypervolume import study_hypervolume
from approxtune.models import save_checkpoint
from approxtune.noise import Stream, input_seeds
from approxtune.training import train_model

matplotlib.use("Agg")
import matplotlib.pyplot as plt

METHODS = ("nsga2", "nsga2+race", "guided+race")
LABELS = {
    "nsga2": "(a) NSGA-II",
    "nsga2+race": "(b) NSGA-II + racing",
    "guided+race": "(c) guided + racing",
    "nsga2+scratch": "(d) NSGA-II + scratch at equal ACR",
}
LEVELS = (0.95, 0.99)
SCRATCH_CHUNK = 256
"""Estimation samples per step of the search for scratch's n_s (the excess of the last step is timed, then scaled)."""


# --------------------------------------------------------------------------------------------- the deeper model


def prepare_synthetic(study: Study) -> None:
    """Write the synthetic data set and train the ResNet-20 checkpoint of ``study`` when they are missing.

    Ten classes, each a fixed random 4x4 colour pattern upsampled to 32x32 (bilinear) at 20 % contrast around grey,
    plus N(0, 0.05^2) pixel jitter, clipped to [0, 1]; 2000 training images (never written) and
    ``search_inputs + report_inputs`` evaluation images; all seeded by ``study.seed``.  Trained with approxtune's
    :func:`~approxtune.training.train_model` (Gaussian augmentation at the study's sigma) for 3 epochs.
    """
    data, checkpoint = Path(study.data.root), study.checkpoint
    if data.exists() and checkpoint.exists():
        return
    seed = study.study.seed
    prototypes = torch.from_numpy(np.random.default_rng(seed).random((10, 3, 4, 4))).float()

    def images(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, count)
        smooth = F.interpolate(prototypes[labels], size=32, mode="bilinear", align_corners=False).numpy()
        x = 0.5 + 0.2 * (smooth - 0.5) + rng.normal(0.0, 0.05, smooth.shape)
        return np.clip(x, 0.0, 1.0).astype(np.float32), labels.astype(np.int64)

    x, y = images(2000, np.random.default_rng(seed + 1))
    train = Inputs(torch.from_numpy(x), torch.from_numpy(y), np.arange(len(y)))
    model = train_model(study.model.arch, train, sigma=study.certify.sigma, epochs=3, batch_size=64, lr=0.01, seed=seed)
    data.parent.mkdir(parents=True, exist_ok=True)
    x, y = images(study.data.search_inputs + study.data.report_inputs, np.random.default_rng(seed + 2))
    np.savez(data, x=x, y=y)
    save_checkpoint(model, study.model.arch, checkpoint)


# ---------------------------------------------------------------------------------------------------- scratch


def scratch_at_equal_acr(approx, inputs: Inputs, seeds, study: Study, n: int, alpha_b: float, target: float) -> dict:
    """Cohen's CERTIFY of ``approx`` (fresh noise ``seeds``) at the smallest grid n_s whose ACR reaches ``target``.

    Estimation samples are evaluated in steps of SCRATCH_CHUNK until the ACR at a grid count reaches ``target`` (or n
    is reached: ``reached`` False, n_s = n, a lower bound); ``seconds`` is the measured time scaled to the samples
    of the run at n_s, ``n0 + n_s`` per input.
    """
    c, sigma, y = study.certify, study.certify.sigma, inputs.y.numpy()
    start = time.perf_counter()
    first = certify(approx, inputs.x, seeds, sigma, c.n0, min(SCRATCH_CHUNK, n), 0.25, batch_size=c.batch_size)
    correct = first.c_hat == y
    hits = np.cumsum(first.predictions == first.c_hat[:, None], axis=1)
    done, checked, n_s = hits.shape[1], 0, None
    while True:
        ks = scratch_grid(checked, done, n)
        n_s = next((k for k in ks if scratch_acr(hits, correct, sigma, alpha_b, k) >= target), None)
        checked = done
        if n_s is not None or done >= n:
            break
        stop = min(done + SCRATCH_CHUNK, n)
        preds = predict_under_noise(
            approx, inputs.x, seeds, Stream.ESTIMATION, done, stop, sigma, batch_size=c.batch_size
        )
        hits = np.concatenate([hits, hits[:, -1:] + np.cumsum(preds == first.c_hat[:, None], axis=1)], axis=1)
        done = stop
    seconds = time.perf_counter() - start
    reached = n_s is not None
    n_s = n if n_s is None else n_s
    evaluated = len(y) * (c.n0 + done)
    samples = len(y) * (c.n0 + n_s)
    return {
        "n_s": n_s,
        "acr": scratch_acr(hits, correct, sigma, alpha_b, n_s),
        "reached": reached,
        "samples": samples,
        "evaluated": evaluated,
        "measured_seconds": seconds,
        "seconds": seconds * samples / evaluated,
    }


# ------------------------------------------------------------------------------------------------------- runs


def variant(study: Study, method: str, seed: int) -> Study:
    """The study as ``method`` runs it with sampler seed ``seed``."""
    sampler = "guided" if method.startswith("guided") else "nsga2"
    race = study.search.race if method.endswith("+race") else []
    return dataclasses.replace(
        study,
        study=dataclasses.replace(study.study, seed=seed),
        search=dataclasses.replace(study.search, sampler=sampler, race=race),
    )


def record(trial: optuna.trial.FrozenTrial, wall: float) -> dict:
    """What a run keeps of one finished trial."""
    attrs = trial.user_attrs
    complete = trial.state == optuna.trial.TrialState.COMPLETE
    return {
        "number": trial.number,
        "state": trial.state.name,
        "values": list(trial.values) if complete else None,
        "upper": None if complete else [attrs["upper_acr"], attrs["accuracy"], attrs["size_bytes"]],
        "feasible": bool(attrs.get("feasible")) if complete else False,
        "samples": int(attrs["samples"]),
        "seconds": float(attrs["seconds"]),
        "wall": wall,
        "summary": attrs["summary"],
        "same_as": attrs.get("same_as"),
    }


def run(loaded, method: str, seed: int, trials: int, guide: guided.Guide, after_trial=None) -> dict:
    """``trials`` trials of ``method`` in an in-memory study; ``after_trial(trial)`` runs outside the run's clock."""
    study = variant(loaded.study, method, seed)
    optuna_study = optuna.create_study(
        directions=list(search.DIRECTIONS), sampler=search.make_sampler(study, guide=guide)
    )
    search.enqueue_baselines(optuna_study, study, loaded.layers)
    objective = search.make_objective(study, loaded.model, loaded.inputs, loaded.cache, loaded.base_accuracy, "cpu")
    rows: list[dict] = []
    paused = 0.0
    start = time.perf_counter()

    def callback(_: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        nonlocal paused
        rows.append(record(trial, time.perf_counter() - start - paused))
        if after_trial is not None:
            before = time.perf_counter()
            after_trial(trial)
            paused += time.perf_counter() - before

    optuna_study.optimize(objective, n_trials=trials, callbacks=[callback])
    return {"method": method, "seed": seed, "trials": rows}


def measure_study(args, loaded) -> dict:
    """Every run of one study, the scratch costs of (a)'s trials, the reference front and the predictor's quality."""
    study, model, inputs, cache, _ = loaded
    guided_study = dataclasses.replace(study, search=dataclasses.replace(study.search, sampler="guided"))
    guide, _ = guided.build_guide(guided_study, model, inputs, cache, loaded.layers)
    fresh = input_seeds(10_000 + study.study.seed, inputs.index)  # never the search noise
    alpha_b = study.irs_settings.total_alpha(cache.meta.alpha)
    scratch: dict[str, dict] = {}
    predicted: dict[str, tuple] = {}  # (a)'s complete trials: the guide's prediction and the certified values

    def certify_from_scratch(trial: optuna.trial.FrozenTrial) -> None:
        summary = trial.user_attrs["summary"]
        if trial.state != optuna.trial.TrialState.COMPLETE or summary in scratch:
            return
        config = ApproximationConfig.from_dict(trial.user_attrs["config"])
        predicted[summary] = (guide.sensitivity.predict(config, study.irs_settings), trial.values)
        approx = apply_approximation(model, config)
        scratch[summary] = scratch_at_equal_acr(approx, inputs, fresh, study, cache.meta.n, alpha_b, trial.values[0])

    budgets = {"nsga2": args.trials, "nsga2+race": args.trials, "guided+race": args.guided_trials}
    runs = []
    for seed in range(args.seeds):
        for method in METHODS:
            hook = certify_from_scratch if method == "nsga2" else None
            out = run(loaded, method, seed, budgets[method], guide, hook)
            runs.append(out)
            last = out["trials"][-1]
            print(
                f"{study.name} seed {seed} {method:12s} {len(out['trials'])} trials {last['wall']:7.1f}s "
                f"{sum(t['samples'] for t in out['trials']):>10,} samples",
                flush=True,
            )
    pairs = list(predicted.values())  # the predictor's quality on NSGA-II's (unguided) trials: rank correlations
    base_acr, fp32_size = float(cache.summary()["acr"]), guide.fp32_size
    points = [t["values"] for r in runs for t in r["trials"] if t["values"] is not None and t["feasible"]]
    irs = [t for r in runs if r["method"] == "nsga2" for t in r["trials"] if t["samples"]]
    sens = guide.sensitivity
    return {
        "study": args.study,
        "name": study.name,
        "command": f"OMP_NUM_THREADS=1 nice -n 5 python benchmarks/bench_front.py --study {args.study} "
        f"--seeds {args.seeds} --trials {args.trials} --guided-trials {args.guided_trials}",
        "machine": machine(torch.get_num_threads()),
        "load_average": os.getloadavg(),
        "seeds": args.seeds,
        "budgets": budgets,
        "settings": {
            "sigma": cache.meta.sigma,
            "n": cache.meta.n,
            "n_p": study.irs.n_p,
            "search_inputs": len(inputs),
            "layers": len(loaded.layers),
            "race": study.search.race,
            "confidence": 1 - alpha_b,
        },
        "base_acr": base_acr,
        "fp32_size": fp32_size,
        "reference_hv": study_hypervolume(points, base_acr, fp32_size),
        "sensitivity": {
            "samples": sens.samples,
            "seconds": sens.seconds,
            "variants": len(sens.lost),
            "rows": len(sens.rows),
            "guide_samples": study.search.guide_samples,
            "median_trial_samples": statistics.median(t["samples"] for t in irs) if irs else 0,
        },
        "predictor": {
            "configurations": len(pairs),
            "spearman_acr": rank_correlation([p[0] for p, _ in pairs], [v[0] for _, v in pairs]),
            "spearman_accuracy": rank_correlation([p[1] for p, _ in pairs], [v[1] for _, v in pairs]),
        },
        "per_sample_seconds": {
            "irs": sum(t["seconds"] for t in irs) / max(sum(t["samples"] for t in irs), 1),
            "scratch": sum(s["measured_seconds"] for s in scratch.values())
            / max(sum(s["evaluated"] for s in scratch.values()), 1),
        },
        "scratch": scratch,
        "runs": runs,
    }


def rank_correlation(a: list[float], b: list[float]) -> float | None:
    """Spearman's rho, None where either side is constant (every accuracy equal, say)."""
    return float(spearmanr(a, b).statistic) if len(set(a)) > 1 and len(set(b)) > 1 else None


# ----------------------------------------------------------------------------------------------------- report


def curves(entry: dict) -> dict[str, list[dict]]:
    """Per method, per seed: cumulative samples, seconds and hypervolume fraction after every trial."""
    sens, scratch = entry["sensitivity"], entry["scratch"]
    out: dict[str, list[dict]] = {m: [] for m in (*METHODS, "nsga2+scratch")}
    for r in entry["runs"]:
        found, samples, seconds, hv = [], [], [], []
        extra = (sens["samples"], sens["seconds"]) if r["method"].startswith("guided") else (0, 0.0)
        scratch_samples = scratch_seconds = 0.0
        d_samples, d_seconds, previous_wall = [], [], 0.0
        for i, t in enumerate(r["trials"]):
            if t["values"] is not None and t["feasible"]:
                found.append(t["values"])
            hv.append(study_hypervolume(found, entry["base_acr"], entry["fp32_size"]) / entry["reference_hv"])
            samples.append(extra[0] + sum(x["samples"] for x in r["trials"][: i + 1]))
            seconds.append(extra[1] + t["wall"])
            if r["method"] == "nsga2":  # (d): the same trials, certified from scratch; (a)'s sampler time kept
                overhead = max(t["wall"] - previous_wall - t["seconds"], 0.0)
                previous_wall = t["wall"]
                cost = scratch[t["summary"]] if t["same_as"] is None and t["values"] is not None else None
                scratch_samples += cost["samples"] if cost else 0
                scratch_seconds += (cost["seconds"] if cost else 0.0) + overhead
                d_samples.append(scratch_samples)
                d_seconds.append(scratch_seconds)
        out[r["method"]].append({"seed": r["seed"], "samples": samples, "seconds": seconds, "hv": hv})
        if r["method"] == "nsga2":
            out["nsga2+scratch"].append({"seed": r["seed"], "samples": d_samples, "seconds": d_seconds, "hv": hv})
    return out


def crossing(curve: dict, level: float) -> tuple[float, float, bool]:
    """``(samples, seconds, reached)`` when the curve first reaches ``level``; its totals (a lower bound) if never."""
    i = next((i for i, h in enumerate(curve["hv"]) if h >= level - 1e-12), None)
    if i is None:
        return curve["samples"][-1], curve["seconds"][-1], False
    return curve["samples"][i], curve["seconds"][i], True


def summary(values: list[tuple[float, bool]]) -> tuple[float, bool, float, float]:
    """``(median, exact, min, max)`` over seeds of ``(value, reached)`` pairs.  A run that never reached the level
    ranks after every run that did (infinitely late): a median that falls on one is only a lower bound (``exact``
    False; its value is then that run's total)."""
    ranked = sorted(v for v in values if v[1]) + sorted(v for v in values if not v[1])
    k = len(ranked)
    if k % 2:
        value, exact = ranked[k // 2]
    else:
        (a, exact_a), (b, exact_b) = ranked[k // 2 - 1], ranked[k // 2]
        value, exact = (a + b) / 2, exact_a and exact_b
    return value, exact, min(v for v, _ in values), max(v for v, _ in values)


def rho(value: float | None) -> str:
    return "– (constant)" if value is None else f"{value:.3f}"


def fmt(value: float, exact: bool, seconds: bool = False) -> str:
    text = f"{value:,.0f}" if not seconds else (f"{value:.0f}" if value >= 100 else f"{value:.1f}")
    return text if exact else f"> {text}"


def step_at(xs: list[float], ys: list[float], grid: np.ndarray) -> np.ndarray:
    """The step function through ``(xs, ys)`` (0 before the first point) at every point of ``grid``."""
    i = np.searchsorted(np.asarray(xs), grid, side="right") - 1
    return np.where(i >= 0, np.asarray(ys)[np.maximum(i, 0)], 0.0)


def plot(entry: dict, lines: dict[str, list[dict]], path: Path) -> None:
    """Hypervolume fraction against samples and against seconds: median over seeds (thick), every seed (thin)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    colours = dict(zip(LABELS, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=True))
    for ax, axis in zip(axes, ("samples", "seconds"), strict=True):
        for method, runs in lines.items():
            grid = np.geomspace(max(min(r[axis][0] for r in runs), 1e-3), max(r[axis][-1] for r in runs), 200)
            at = [step_at(r[axis], r["hv"], grid) for r in runs]
            for r in runs:
                ax.step(r[axis], r["hv"], where="post", color=colours[method], alpha=0.2, linewidth=0.7)
            ax.plot(grid, np.median(at, axis=0), color=colours[method], linewidth=2, label=LABELS[method])
        for level in LEVELS:
            ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # labelled decades only
        ax.set_xlabel("certification samples (forward passes)" if axis == "samples" else "wall time, seconds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("hypervolume / reference hypervolume")
    final = min(float(np.median([r["hv"][-1] for r in runs])) for runs in lines.values())
    axes[0].set_ylim(max(0.0, min(final, 0.8) - 0.1), 1.005)
    axes[0].legend(loc="lower right", fontsize=8)
    s = entry["settings"]
    fig.suptitle(
        f"{entry['name']}: sigma = {s['sigma']:g}, n = {s['n']}, n_p = {s['n_p']}, {s['search_inputs']} search inputs, "
        f"{s['layers']} layers; {entry['seeds']} seeds (median thick)",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict, out: Path) -> None:
    """``out``.md and ``benchmarks/plots/front_<study>.png`` from the JSON; notes below the marker are kept."""
    lines = [
        "# Time to a good front: guided search, racing and certification from scratch",
        "",
        f"Generated by `benchmarks/bench_front.py` (`--report-only` rewrites this file and the plots from "
        f"`{out.name}.json`).  Samples are deterministic forward-pass counts; times are wall-clock seconds on a shared "
        "machine (noisy).  `> X`: the median run did not reach the level within its trials (X is its total, a lower "
        "bound).  (d)'s front is (a)'s; its cost per trial is scratch CERTIFY at equal ACR.",
        "",
    ]
    intro_length = len(lines)
    targets = [
        "| study | σ | samples to 99 %: (a) / (c) (target ≥ 3×) | time to 99 %: (d) / (c) (target ≥ 10×) "
        "| time to 95 %: (d) / (c) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, entry in data["studies"].items():
        lines_by_method = curves(entry)
        plot(entry, lines_by_method, out.parent / "plots" / f"front_{name}.png")
        s, sens, pred, per = entry["settings"], entry["sensitivity"], entry["predictor"], entry["per_sample_seconds"]
        lines += [
            f"## {name} (σ = {s['sigma']:g})",
            "",
            f"- command: `{entry['command']}`",
            f"- machine: {entry['machine']}; load average at the end "
            f"{tuple(round(x, 2) for x in entry['load_average'])} (shared machine)",
            f"- {s['search_inputs']} search inputs, {s['layers']} searched layers, n = {s['n']}, n_p = {s['n_p']}, "
            f"racing stages {s['race']}, confidence {s['confidence']:.4g}; trials per run "
            + ", ".join(f"{m} {t}" for m, t in entry["budgets"].items())
            + f"; {entry['seeds']} seeds",
            f"- reference hypervolume {entry['reference_hv']:.4f} (the feasible front of every trial of every run)",
            f"- layer sensitivities: {sens['variants']} single-layer choices × ({sens['rows']} inputs × "
            f"{sens['guide_samples']} guide samples + {s['search_inputs']} clean) = {sens['samples']:,} forward passes "
            f"= {sens['samples'] / max(sens['median_trial_samples'], 1):.2f} × the median (a) trial's "
            f"{sens['median_trial_samples']:,.0f}; {sens['seconds']:.1f} s",
            f"- predictor against (a)'s {pred['configurations']} distinct complete trials: Spearman ρ "
            f"{rho(pred['spearman_acr'])} (ACR), {rho(pred['spearman_accuracy'])} (accuracy)",
            f"- seconds per forward pass, measured side by side: IRS {per['irs'] * 1e6:.1f} µs, scratch CERTIFY "
            f"{per['scratch'] * 1e6:.1f} µs",
            "",
            "| method | samples to 95 % | samples to 99 % | seconds to 95 % | seconds to 99 % | reached 99 % |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        medians = {}
        for method, runs in lines_by_method.items():
            cells = []
            for axis in (0, 1):
                for level in LEVELS:
                    med, exact, lo, hi = summary([(crossing(r, level)[axis], crossing(r, level)[2]) for r in runs])
                    medians[(method, axis, level)] = (med, exact)
                    cells.append(
                        f"{fmt(med, exact, axis == 1)} ({fmt(lo, True, axis == 1)}–{fmt(hi, True, axis == 1)})"
                    )
            reached = sum(crossing(r, 0.99)[2] for r in runs)
            lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + f" | {reached} of {len(runs)} |")
        lines.append("")
        lines.append("Median over seeds (min–max).")
        lines.append("")

        def ratio(top: tuple[float, bool], bottom: tuple[float, bool]) -> str:
            value = top[0] / bottom[0]
            if not bottom[1]:
                return "–"
            return f"{value:.1f}×" if top[1] else f"> {value:.1f}×"

        targets.append(
            f"| {name} | {s['sigma']:g} | {ratio(medians[('nsga2', 0, 0.99)], medians[('guided+race', 0, 0.99)])} "
            f"| {ratio(medians[('nsga2+scratch', 1, 0.99)], medians[('guided+race', 1, 0.99)])} "
            f"| {ratio(medians[('nsga2+scratch', 1, 0.95)], medians[('guided+race', 1, 0.95)])} |"
        )
        lines += [f"![{name}](plots/front_{name}.png)", ""]
    intro, body = lines[:intro_length], lines[intro_length:]
    write_with_notes(out.with_suffix(".md"), [*intro, "## Targets (medians over seeds)", "", *targets, "", *body])


def main() -> None:
    p = parser(__doc__, "benchmarks/front_results")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--trials", type=int, help="trials of each NSGA-II run (default: the study's search.trials)")
    p.add_argument("--guided-trials", type=int, help="trials of each guided run (default: --trials)")
    args = p.parse_args()
    if report_only(args, write_report):
        return
    torch.set_num_threads(1)
    study = load_study(args.study)
    if study.data.dataset == "tensors":
        prepare_synthetic(study)
    args.trials = args.trials or study.search.trials
    args.guided_trials = args.guided_trials or args.trials
    entry = measure_study(args, load(args.study))
    out = Path(args.out)
    data = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {"studies": {}}
    data["studies"][entry["name"]] = entry
    write_results(data, out, write_report)


if __name__ == "__main__":
    main()
