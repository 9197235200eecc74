"""The black-box ceiling: how far any IRS-like method could beat certification from scratch on a tuned study.

``study_results.md`` measures IRS, racing and scratch trial by trial.  This benchmark asks what the *best possible*
method could do on the same trials, given only what IRS may use about f^p: its predictions on replayed noise samples.
For every finished trial (repeats excepted), f^p replays **all** n cached samples of every input g certifies, which
gives per input f's frequency ``p`` of c_hat, the loss rate ``l`` (f = c_hat != f^p) and the gain rate ``g``
(f != c_hat = f^p).  Then ``P(f^p = c_hat) = p - d`` with the net difference ``d = l - g``, the mean of a variable in
{-1, 0, 1} with variance ``v = l + g - d^2``.

The **ideal black-box method** is granted, per input:

* ``p`` exactly, for free (an infinite base cache: no confidence spent on ``p_a``);
* a bound on ``d`` from ``m`` replayed samples whose width is only ``max(z sqrt(v / m), 1 - alpha^(1/m))``, with
  ``z = Phi^-1(1 - alpha)`` at the whole total level ``alpha`` (nothing split between bounds).  The first term is the
  large-sample width of the best regular estimator (the Cramér–Rao / local asymptotic minimax limit of a mean with
  variance ``v``); the second is exact: when the ``m`` samples show no loss, a bound below ``1 - alpha^(1/m)`` is
  unsound, because a loss rate that high still shows no loss with probability above ``alpha``;
* the sample count per input of its choice (the allocation that reaches the target ACR with the fewest samples,
  Lagrangian over a grid of 4 samples), and knowing which inputs can be certified at all.

Its radius is ``sigma Phi^-1(p - d - width)``.  For each trial the script finds the fewest samples with which the
ideal method reaches the trial's IRS ACR under the study-benchmark rule (``--rule``, the default ``tail``), and
compares them with that rule's measured scratch samples at equal ACR (Cohen's CERTIFY, n0 included).  The **study
ceiling** adds perfect racing: every trial off the front costs nothing, so it is scratch over all trials divided by
the ideal method on the front's trials.  Rates are plug-in estimates from the n samples, and ``p`` carries no
confidence interval at all, so every simplification favours the ideal method: a real method cannot beat these ratios.

    approxtune tune studies/digits.toml && python benchmarks/bench_study.py   # first: the trials and scratch samples
**What a real method could buy** (second table): a plug-in model of IRS that uses the same rates as expected
counts -- ``r = sigma Phi^-1(LCB(p n, n, alpha) - UCB(l n_p, n_p, alpha_zeta))`` or the direct radius
``LCB(q n_p, n_p, alpha_d)`` of f^p's own frequency ``q``, whichever is larger per input (``max`` without its alpha
split, 0.001 each), against scratch on the same model (the fewest n_s on a grid of 16 whose ACR ``LCB(q n_s, n_s,
0.002)`` reaches it, plus n0).  At the study's n it reproduces the measured ``max`` rule; it then shows what a larger
base certification (n, paid once per study) and an idealised signed zeta (``d + max(z sqrt(v / n_p), 1 -
alpha^(1/n_p))`` in place of the loss bound, a width no sound bound is known to reach) would change.

    python benchmarks/bench_ceiling.py [--study studies/digits.toml] [--rule tail]
    python benchmarks/bench_ceiling.py --report-only     # rewrite ceiling_results.md from ceiling_results.json
"""

from __future__ import annotations

import itertools
import json
import statistics
from pathlib import Path

import numpy as np
from _harness import distinct_trials, load_tuned, machine, parser, report_only, write_results, write_with_notes
from scipy.stats import norm

from approxtune.approximation import apply_approximation
from approxtune.irs import plausible_radii, replay
from approxtune.statistics import lower_confidence_bound, radius

GRID_STEP = 4
MODEL_N = (2_000, 10_000, 50_000)
"""Base sample counts the plug-in model is evaluated at (besides the study's own n), each with both zeta bounds."""
MODEL_ALPHA = 0.001


def ideal_radii(p: np.ndarray, d: np.ndarray, v: np.ndarray, m: np.ndarray, alpha: float, sigma: float) -> np.ndarray:
    """``(inputs, len(m))`` radii of the ideal black-box method with ``m`` samples (0 samples: radius 0)."""
    m = np.asarray(m, dtype=float)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        width = np.maximum(norm.ppf(1 - alpha) * np.sqrt(v[:, None] / m), 1 - alpha ** (1 / m))
    width = np.where(m > 0, width, np.inf)
    return radius(np.clip(p[:, None] - d[:, None] - width, 0.0, 1.0), sigma)


def fewest_samples(radii: np.ndarray, grid: np.ndarray, target_sum: float) -> tuple[int, int]:
    """``(allocated, uniform)``: the fewest total samples whose radii sum reaches ``target_sum``.

    ``allocated`` picks, for a Lagrange multiplier ``lam``, each input's ``argmax_m r(m) - lam m`` and bisects ``lam``
    to the largest value that still reaches the target; ``uniform`` gives every input the same grid count.
    """
    if radii[:, -1].sum() < target_sum:
        raise ValueError("the ideal method cannot reach the target even with every cached sample")
    uniform = next(int(m) * len(radii) for j, m in enumerate(grid) if radii[:, j].sum() >= target_sum)

    def pick(lam: float) -> tuple[float, int]:
        j = np.argmax(radii - lam * grid[None, :], axis=1)
        return float(radii[np.arange(len(radii)), j].sum()), int(grid[j].sum())

    lo, hi = 0.0, 1.0
    while pick(hi)[0] >= target_sum:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pick(mid)[0] >= target_sum else (lo, mid)
    return min(pick(lo)[1], uniform), uniform


def model_irs(p, loss, gain, q, n: int, n_p: int, zeta: str, sigma: float) -> tuple[np.ndarray, int]:
    """Plug-in IRS radii (per certified input) and samples: the larger of the zeta and direct radii per input.

    Both are tail mode's :func:`~approxtune.irs.plausible_radii` with the replay's rates as the expected ones (zeta
    on the losses, f^p's frequency ``q``); ``"signed"`` replaces the zeta radius by the idealised bound on losses
    minus gains.
    """
    levels = {"n": n, "alpha": MODEL_ALPHA, "alpha_zeta": MODEL_ALPHA, "alpha_d": MODEL_ALPHA, "sigma": sigma}
    r_direct, r_zeta = plausible_radii(p, n_p, d=loss, drop=p - q, **levels)
    if zeta == "signed":
        d = loss - gain
        width = norm.ppf(1 - MODEL_ALPHA) * np.sqrt((loss + gain - d**2) / n_p)
        p_a = lower_confidence_bound(np.round(p * n), n, MODEL_ALPHA)
        r_zeta = radius(p_a - d - np.maximum(width, 1 - MODEL_ALPHA ** (1 / n_p)), sigma)
    radii = np.maximum(r_zeta, r_direct)
    return radii, n_p * int(np.count_nonzero(radii))


def model_scratch(q, target_sum: float, n_inputs: int, n0: int, sigma: float, cap: int = 100_000) -> int:
    """Samples of scratch CERTIFY (n0 included, every input) at the fewest n_s of a 16-grid reaching ``target_sum``."""
    for n_s in range(16, cap + 1, 16):
        if radius(lower_confidence_bound(np.round(q * n_s), n_s, 2 * MODEL_ALPHA), sigma).sum() >= target_sum:
            return n_inputs * (n0 + n_s)
    raise ValueError(f"scratch does not reach the target within n_s = {cap}")


def main() -> None:
    p = parser(__doc__, "benchmarks/ceiling_results")
    p.add_argument("--study-results", default="benchmarks/study_results.json")
    p.add_argument("--rule", default="tail", help="the bench_study rule whose IRS ACR and scratch samples to use")
    args = p.parse_args()
    if report_only(args, write_report):
        return
    measured = json.loads(Path(args.study_results).read_text())["runs"][args.rule]
    by_trial = {row["trial"]: row for row in measured["trials"]}
    front = set(measured["summary"]["front"])
    (study, model, inputs, cache, _), optuna_study = load_tuned(args.study)
    n, sigma, n_inputs = cache.meta.n, cache.meta.sigma, len(cache)
    rows = np.flatnonzero(cache.certified)
    c_hat = cache.c_hat[rows, None]
    f_hit = np.asarray(cache.predictions[rows]) == c_hat
    p = f_hit.mean(axis=1)
    grid = np.arange(0, n + 1, GRID_STEP)
    trials = []
    for trial, config in distinct_trials(optuna_study):
        row = by_trial[trial.number]
        if row["summary"] != trial.user_attrs["summary"]:
            raise SystemExit(f"trial {trial.number} differs from {args.study_results}: rerun bench_study.py first")
        p_hit = replay(apply_approximation(model, config), inputs, cache, rows, n) == c_hat
        loss, gain = (f_hit & ~p_hit).mean(axis=1), (~f_hit & p_hit).mean(axis=1)
        d = loss - gain
        alpha = 1.0 - row["confidence"]
        radii = ideal_radii(p, d, loss + gain - d**2, grid, alpha, sigma)
        allocated, uniform = fewest_samples(radii, grid, row["acr_irs"] * n_inputs)
        models = {}
        n_p = study.irs.n_p
        for zeta, base_n in itertools.product(("loss", "signed"), sorted({n, *MODEL_N})):
            model_radii, model_samples = model_irs(p, loss, gain, p_hit.mean(axis=1), base_n, n_p, zeta, sigma)
            scratch = model_scratch(p_hit.mean(axis=1), model_radii.sum(), n_inputs, study.certify.n0, sigma)
            models[f"n={base_n} n_p={n_p} {zeta}"] = {
                "acr": float(model_radii.sum() / n_inputs),
                "samples": model_samples,
                "scratch_samples": scratch,
            }
        trials.append(
            {
                "trial": trial.number,
                "summary": row["summary"],
                "pruned": config.global_prune > 0 or any(c.prune > 0 for c in config.layers.values()),
                "front": trial.number in front,
                "loss_rate": float(loss.mean()),
                "gain_rate": float(gain.mean()),
                "acr_irs": row["acr_irs"],
                "irs_samples": row["irs_samples"],
                "scratch_samples": row["scratch_samples"],
                "ideal_samples": allocated,
                "ideal_uniform_samples": uniform,
                "models": models,
            }
        )
        t = trials[-1]
        print(
            f"trial {t['trial']:3d} {'front' if t['front'] else '     '} loss {t['loss_rate']:.4f} "
            f"IRS {t['irs_samples']:7d}  ideal {allocated:7d} (uniform {uniform:7d})  scratch {t['scratch_samples']:7d}"
            f"  scratch/ideal {t['scratch_samples'] / max(allocated, 1):6.1f}x",
            flush=True,
        )
    data = {
        "meta": {
            "command": f"python benchmarks/bench_ceiling.py --study {args.study} --rule {args.rule}",
            "machine": machine(),
            "rule": args.rule,
            "n": n,
            "search_inputs": n_inputs,
            "certified_inputs": len(rows),
            "scratch_samples_all": measured["summary"]["scratch_samples"],
            "tool_samples": measured["summary"]["tool_samples"],
        },
        "trials": trials,
    }
    write_results(data, args.out, write_report)


def write_report(data: dict, out: Path) -> None:
    m, trials = data["meta"], data["trials"]
    scratch_all = m["scratch_samples_all"]
    front = [t for t in trials if t["front"]]

    def total(key: str, subset: list[dict]) -> int:
        return sum(t[key] for t in subset)

    def ratios(subset: list[dict], key: str) -> str:
        values = [t["scratch_samples"] / max(t[key], 1) for t in subset]
        return f"{statistics.median(values):.1f}× ({min(values):.1f}–{max(values):.1f}×)" if values else "–"

    lines = [
        "# The black-box ceiling: what any IRS-like method could reach at equal ACR",
        "",
        f"Generated by `{m['command']}` (after `approxtune tune` and `bench_study.py`); {m['machine']}.",
        f"{len(trials)} distinct finished trials of the study, {m['search_inputs']} search inputs "
        f"({m['certified_inputs']} certified by g), all n = {m['n']} cached samples replayed to estimate each input's "
        f"rates; IRS ACR, confidence, front and scratch samples are rule `{m['rule']}`'s in `study_results.json`. "
        "Counting only, no timing (the study benchmark's wall and sample ratios agree within a few percent).",
        "",
        "| trials | count | scratch / IRS (median, range) | scratch / ideal black-box (median, range) |",
        "|---|---:|---:|---:|",
    ]
    for label, subset in (
        ("front, pruned", [t for t in front if t["pruned"]]),
        ("front, unpruned", [t for t in front if not t["pruned"]]),
        ("off the front", [t for t in trials if not t["front"]]),
    ):
        irs, ideal = ratios(subset, "irs_samples"), ratios(subset, "ideal_samples")
        lines.append(f"| {label} | {len(subset)} | {irs} | {ideal} |")
    lines += [
        "",
        "| study level, samples | scratch / method |",
        "|---|---:|",
        f"| approxtune as `tune` runs it (IRS, racing, repeats reused) | {scratch_all / m['tool_samples']:.2f}× |",
        "| ideal black-box certificate on every trial, no racing | "
        f"{scratch_all / total('ideal_samples', trials):.2f}× |",
        f"| IRS on the front's trials only (perfect racing) | {scratch_all / total('irs_samples', front):.2f}× |",
        "| **ideal black-box certificate on the front's trials only (perfect racing): the ceiling** | "
        f"**{scratch_all / total('ideal_samples', front):.2f}×** |",
        "",
        "Plug-in model of IRS (expected counts, `max` of the ζ and direct radii at α = 0.001 each) against the same "
        "model of scratch; `loss`: ζ = UCB(losses) as approxtune computes it; `signed`: the idealised bound on losses "
        "minus gains (no sound bound of that width is known):",
        "",
        "| base n | n_p | ζ | mean ACR | scratch / IRS, all trials | front pruned, median | front unpruned, median "
        "| front-only ceiling (perfect racing) |",
        "|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key in trials[0]["models"]:
        base_n, n_p, zeta = (part.split("=")[-1] for part in key.split())
        cells = [t["models"][key] for t in trials]
        front_cells = [t["models"][key] for t in front]

        def median_ratio(pruned: bool, key=key) -> str:
            cells = [t["models"][key] for t in front if t["pruned"] == pruned]
            values = [c["scratch_samples"] / c["samples"] for c in cells]
            return f"{statistics.median(values):.2f}×" if values else "–"

        scratch_model = sum(c["scratch_samples"] for c in cells)
        lines.append(
            f"| {int(base_n):,} | {n_p} | {zeta} | {statistics.mean(c['acr'] for c in cells):.4f} "
            f"| {scratch_model / sum(c['samples'] for c in cells):.2f}× | {median_ratio(True)} | {median_ratio(False)} "
            f"| {scratch_model / sum(c['samples'] for c in front_cells):.2f}× |"
        )
    write_with_notes(out.with_suffix(".md"), lines)


if __name__ == "__main__":
    main()
