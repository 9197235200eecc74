#!/usr/bin/env python
"""IRS against certification from scratch, as in the IRS paper's Section 5.2/5.3 (Tables 2, 3) and A.5 (Table 7).

For each sigma (one digits study per sigma, its model trained by ``pipeline.ensure_model``) the base model f is
certified once (Cohen CERTIFY, ``n`` estimation samples, ``n0`` selection samples, level ``alpha``) into a cache.  Then
for every uniform approximation f^p (``approximation.preset``) and every ``n_p`` in ``fractions * n`` three timed
computations run back to back, in an order that rotates with ``n_p`` (so that machine noise hits them alike):

* **IRS, paper mode** -- ``certify_irs`` with mode "gamma", gamma = 0.99, alpha_zeta = 0.001, alpha_d = alpha +
  alpha_zeta = 0.002: true total confidence 1 - (alpha + alpha_zeta + alpha_d) = 1 - 0.004 by the union bound;
* **IRS, approxtune mode** -- mode "max", alpha_zeta = alpha_d = 0.0005: total 1 - 0.002;
* **scratch** -- Cohen CERTIFY of f^p on *fresh* noise (a different run seed, so neither the selection nor the
  estimation samples are the cached ones) with ``n0`` selection samples and ``n_p`` estimation samples on every
  input.  Its samples do not depend on alpha, so one timed run gives both baselines: the Clopper-Pearson bound is
  evaluated at alpha_b = 0.004 (for the paper mode) and at alpha_b = 0.002 (for approxtune's mode); the bound costs
  well under a millisecond and is inside the timed region.

IRS time is the ``certify_irs`` call alone (replay of the first ``n_p`` cached samples of the inputs that g certified
correctly, plus the bounds); the base certification is excluded, as in the paper, and inputs that g abstained on or
got wrong are skipped by IRS at no cost -- that is part of IRS's saving and is reported as the skipped share.
Scratch time is selection + estimation on all inputs.  Same batch size, same thread count, same process.

Speedup (the paper's metric, ../shared/DESIGN.md "Speedup"): for each method, the points (ACR, time) over the n_p
values, sorted by n_p; ACR is replaced by its running maximum and only the points where the running maximum rises are
kept (a larger n_p that does not raise ACR buys nothing, so the curve keeps the first, cheapest time at each ACR).
Both curves are interpolated piecewise-linearly in ACR on the common interval [max(min ACRs), min(max ACRs)] and the
speedup is (area under scratch's time curve) / (area under IRS's time curve) there.  When the interval is empty the
area ratio is undefined and is reported as such, with the time ratio at the nearest ACRs as a bound.  Beside it: the
reference code's mean over n_p of the pointwise ratios t_scratch / t_IRS, and the same area ratio computed from
process CPU time and from noise-sample counts (the latter is free of machine noise).

Usage::

    python benchmarks/bench_irs.py --quick                  # smoke run, < 2 min, writes to /tmp/bench-irs-quick
    python benchmarks/bench_irs.py                          # full run: 3 sigmas x 6 approximations, n = 10^4
    python benchmarks/bench_irs.py --experiment table7 --n 100000 --sigmas 1.0 --approx fp16 bf16 int8 --inputs 40
    python benchmarks/bench_irs.py --report-only            # rewrite RESULTS.md and the plots from the JSON

Results (``--out-dir``, default ``benchmarks``): ``irs_results.json`` (raw numbers; experiments are merged by name),
``RESULTS.md`` (everything below its notes marker is kept when it is rewritten) and ``plots/*.png``.  Models and base
caches go to ``--workdir`` (default /tmp/bench-runs), never into the repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

import contextlib  # noqa: E402

import torch  # noqa: E402
from _machine import cpu_model  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

from approxtune import pipeline  # noqa: E402
from approxtune.approximation import apply_approximation, preset  # noqa: E402
from approxtune.certification import certify  # noqa: E402
from approxtune.config import load_study  # noqa: E402
from approxtune.irs import IRSSettings, Mode, certify_irs  # noqa: E402
from approxtune.noise import input_seeds  # noqa: E402
from approxtune.statistics import acr, lower_confidence_bound, radius  # noqa: E402

STUDIES = {0.25: "studies/digits-sigma0.25.toml", 0.5: "studies/digits.toml", 1.0: "studies/digits-sigma1.0.toml"}
APPROXIMATIONS = ("fp16", "bf16", "int8", "prune5", "prune10", "prune20")
ALPHA = 0.001
GAMMA = 0.99
MODES = {
    # name: (IRS settings without n_p, alpha of the matching from-scratch baseline)
    "paper": (dict(mode=Mode.GAMMA, gamma=GAMMA, alpha_zeta=0.001, alpha_d=ALPHA + 0.001), 0.004),
    "approxtune": (dict(mode=Mode.MAX, alpha_zeta=0.0005, alpha_d=0.0005), 0.002),
}
MODE_LABEL = {
    "paper": "paper's gamma switch (gamma 0.99, a_zeta 0.001, a_d 0.002; total 1-0.004)",
    "approxtune": "approxtune default: max of zeta and direct radius (a_zeta = a_d = 0.0005; total 1-0.002)",
}
FRESH_SEED_OFFSET = 1_000_003
"""Scratch runs draw their noise from run seed (cache's run seed + this): fresh selection and estimation samples."""

# The IRS paper's ResNet-20 / CIFAR-10 numbers (Tables 2, 3 and 7), keyed by sigma.
PAPER = {
    "table2": {
        0.25: {"fp16": 1.37, "bf16": 1.29, "int8": 1.30},
        0.5: {"fp16": 1.79, "bf16": 1.70, "int8": 1.77},
        1.0: {"fp16": 2.85, "bf16": 2.41, "int8": 2.65},
    },
    "table3": {
        0.25: {"prune5": 1.30, "prune10": 1.25, "prune20": 0.99},
        0.5: {"prune5": 1.63, "prune10": 1.39, "prune20": 1.13},
        1.0: {"prune5": 2.50, "prune10": 2.09, "prune20": 1.39},
    },
    "table7_n1e5": {
        0.25: {"fp16": 1.22, "bf16": 1.11, "int8": 1.27},
        0.5: {"fp16": 1.73, "bf16": 1.40, "int8": 1.86},
        1.0: {"fp16": 3.88, "bf16": 2.40, "int8": 4.31},
    },
}
NOTES_MARKER = "<!-- notes: everything below this line is kept when bench_irs.py rewrites this file -->"


# ----------------------------------------------------------------------------------------------------------- running


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info(threads: int) -> dict:
    cpu = cpu_model()
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": threads,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
    }


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def bench_study(sigma: float, n: int, n0: int, inputs: int, workdir: Path, batch_size: int):
    """The digits study of ``sigma`` with our n, n0, alpha, inputs and a scratch output dir under ``workdir``."""
    if sigma not in STUDIES:
        raise SystemExit(f"no digits study for sigma {sigma}; choose from {sorted(STUDIES)}")
    study = load_study(REPO / STUDIES[sigma])
    root = workdir / study.name
    return dataclasses.replace(
        study,
        study=dataclasses.replace(study.study, output_dir=str(root / f"N{inputs}-n0{n0}")),
        model=dataclasses.replace(study.model, checkpoint=str(root / "model.pt")),
        data=dataclasses.replace(study.data, search_inputs=inputs),
        certify=dataclasses.replace(study.certify, n=n, n0=n0, alpha=ALPHA, batch_size=batch_size, device="cpu"),
    )


def timed(fn):
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def run_irs(model_p, x, cache, n_p, mode, batch_size):
    settings = IRSSettings(n_p=n_p, **MODES[mode][0])
    res, wall, cpu = timed(lambda: certify_irs(model_p, x, cache, settings, batch_size=batch_size, device="cpu"))
    ev = res.evaluated
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "acr": res.acr,
        "samples": res.samples,
        "evaluated": int(ev.sum()),
        "total_alpha": res.alpha,
        "mean_zeta": res.mean_zeta,
        "disagreement_rate": float(res.disagreements[ev].sum() / max(1, ev.sum() * n_p)),
        "inputs_with_disagreement": float((res.disagreements[ev] > 0).mean()) if ev.any() else 0.0,
        "direct_share": res.direct_share,
        "cert_acc0": res.certified_accuracy(0.0),
    }


def run_scratch(model_p, x, labels, seeds, sigma, n0, n_p, batch_size):
    def go():
        r = certify(model_p, x, seeds, sigma, n0, n_p, MODES["paper"][1], batch_size=batch_size, device="cpu")
        p2 = lower_confidence_bound(r.count, n_p, MODES["approxtune"][1])  # the other baseline: same samples
        return r, p2

    (r, p2), wall, cpu = timed(go)
    correct = r.c_hat == labels
    out = {"wall_s": wall, "cpu_s": cpu, "samples": len(labels) * (n0 + n_p)}
    for mode, (_, alpha_b) in MODES.items():
        rad = np.where(correct, r.radius if alpha_b == MODES["paper"][1] else radius(p2, sigma), 0.0)
        out[mode] = {"alpha_b": alpha_b, "acr": acr(rad), "cert_acc0": float((rad > 0).mean())}
    return out


def run_sigma(args, sigma: float) -> dict:
    study = bench_study(sigma, args.n, args.n0, args.inputs, args.workdir, args.batch_size)
    t0 = time.perf_counter()
    model = pipeline.ensure_model(study).eval()
    train_s = time.perf_counter() - t0
    inputs = pipeline.load_inputs(study, "search")
    if len(inputs) < args.inputs:
        raise SystemExit(f"only {len(inputs)} search inputs exist; ask for at most that many")
    log(f"sigma {sigma}: model ready ({train_s:.1f} s), certifying g on {len(inputs)} inputs, n={args.n}, n0={args.n0}")
    load0 = loadavg()
    (cache, built), base_wall, base_cpu = timed(
        lambda: pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    )
    cert = cache.certified
    p_a = np.asarray(cache.p_a)
    base = {
        "study": STUDIES[sigma],
        "inputs": len(inputs),
        "n": args.n,
        "n0": args.n0,
        "alpha": ALPHA,
        "cache_built_now": built,
        "base_wall_s": base_wall if built else None,
        "base_cpu_s": base_cpu if built else None,
        "acr": cache.summary()["acr"],
        "certified_share": float(cert.mean()),
        "skipped_share": float(1 - cert.mean()),
        "clean_accuracy": None,
        "p_a_max_possible": float(ALPHA ** (1 / args.n)),
        "p_a_quantiles_certified": {f"q{q}": float(np.quantile(p_a[cert], q / 100)) for q in (10, 25, 50, 75, 90)}
        if cert.any()
        else {},
        "share_p_a_ge_gamma": float((p_a[cert] >= GAMMA).mean()) if cert.any() else 0.0,
        "share_p_a_lt_0.9": float((p_a[cert] < 0.9).mean()) if cert.any() else 0.0,
        "load_before": load0,
    }
    with torch.inference_mode():
        base["clean_accuracy"] = float((model(inputs.x).argmax(1) == inputs.y).float().mean())
    if built:
        log(f"  base certification {base_wall:.1f} s wall; ACR {base['acr']:.3f}, certified {cert.mean():.0%}")
    else:
        log(f"  reused cache {study.cache_path('search')}; ACR {base['acr']:.3f}, certified {cert.mean():.0%}")

    x = inputs.x
    labels = inputs.y.numpy()
    fresh = input_seeds(pipeline.noise_seed(study, "search") + FRESH_SEED_OFFSET, inputs.index)
    assert not np.intersect1d(fresh, cache.seed).size, "scratch noise must not be the cached noise"
    n_ps = sorted({max(1, round(f * args.n)) for f in args.fractions})
    approximations = {}
    for name in args.approx:
        config = preset(name, model)
        model_p = apply_approximation(model, config).eval()
        with torch.inference_mode():
            acc_p = float((model_p(x).argmax(1) == inputs.y).float().mean())
            model_p(torch.zeros(args.batch_size, *x.shape[1:]))  # warm-up
        points = []
        for k, n_p in enumerate(n_ps):
            order = [
                ("scratch", "paper", "approxtune"),
                ("paper", "approxtune", "scratch"),
                ("approxtune", "scratch", "paper"),
            ][k % 3]
            point = {"n_p": n_p, "n0": args.n0, "fraction": n_p / args.n, "order": list(order)}
            for what in order:
                if what == "scratch":
                    point["scratch"] = run_scratch(model_p, x, labels, fresh, sigma, args.n0, n_p, args.batch_size)
                else:
                    point[what] = run_irs(model_p, x, cache, n_p, what, args.batch_size)
            points.append(point)
            log(
                f"  {name:8s} n_p={n_p:6d}: IRS paper {point['paper']['wall_s']:6.2f}s ACR {point['paper']['acr']:.3f}"
                f" | IRS max {point['approxtune']['wall_s']:6.2f}s ACR {point['approxtune']['acr']:.3f}"
                f" | scratch {point['scratch']['wall_s']:6.2f}s ACR {point['scratch']['paper']['acr']:.3f}"
                f"/{point['scratch']['approxtune']['acr']:.3f}"
                f" | zeta {point['approxtune']['mean_zeta']:.4f} dis {point['approxtune']['disagreement_rate']:.5f}"
            )
        approximations[name] = {"clean_accuracy": acc_p, "points": points}
        sp = {m: summarize(points, m) for m in MODES}
        log(
            f"  {name}: speedup paper {fmt_x(sp['paper']['area_wall'])}, "
            f"approxtune {fmt_x(sp['approxtune']['area_wall'])}"
        )
    base["load_after"] = loadavg()
    return {"base": base, "approximations": approximations}


# ------------------------------------------------------------------------------------------------------ the metric


def _curve(acrs, times):
    """Sorted by n_p already: running max of ACR, keeping the first (cheapest) point at each new maximum."""
    xs, ys, best = [], [], -np.inf
    for a, t in zip(acrs, times, strict=False):
        if a > best + 1e-12:
            xs.append(float(a))
            ys.append(float(t))
            best = a
    return np.array(xs), np.array(ys)


def area_speedup(acr_irs, t_irs, acr_s, t_s) -> dict:
    """The paper's speedup: area under scratch's time-vs-ACR curve / IRS's, on the ACR range both reach."""
    xi, yi = _curve(acr_irs, t_irs)
    xs, ys = _curve(acr_s, t_s)
    lo, hi = max(xi[0], xs[0]), min(xi[-1], xs[-1])
    out = {"acr_lo": lo, "acr_hi": hi, "value": None, "note": ""}
    if hi - lo <= 1e-9:
        if xi[0] >= xs[-1]:
            # IRS's cheapest point already reaches scratch's best ACR: a lower bound on the time ratio
            out["note"] = "no common ACR range: IRS at its smallest n_p reaches scratch's best ACR"
            out["bound"] = (">=", float(ys[-1] / yi[0]))
        else:
            out["note"] = "no common ACR range: IRS never reaches scratch's smallest ACR"
            out["bound"] = ("<", float(ys[0] / yi[-1]))
        return out
    grid = np.linspace(lo, hi, 2001)
    a_s = np.trapezoid(np.interp(grid, xs, ys), grid)
    a_i = np.trapezoid(np.interp(grid, xi, yi), grid)
    out["value"] = float(a_s / a_i)
    return out


def summarize(points: list[dict], mode: str) -> dict:
    irs = [p[mode] for p in points]
    scr = [p["scratch"] for p in points]
    a_i = [r["acr"] for r in irs]
    a_s = [r[mode]["acr"] for r in scr]
    out = {}
    for key, field in (("wall", "wall_s"), ("cpu", "cpu_s"), ("samples", "samples")):
        res = area_speedup(a_i, [r[field] for r in irs], a_s, [r[field] for r in scr])
        out[f"area_{key}"] = res
    # what the paper's Algorithm 2 would spend: n_p replays on every input, also those g did not certify correctly
    n_all = [
        s["samples"] / (s_n0 + p["n_p"]) for s, p, s_n0 in zip(scr, points, [p["n0"] for p in points], strict=False)
    ]
    out["area_samples_noskip"] = area_speedup(
        a_i, [n * p["n_p"] for n, p in zip(n_all, points, strict=False)], a_s, [r["samples"] for r in scr]
    )
    out["mean_ratio_wall"] = float(np.mean([s["wall_s"] / i["wall_s"] for s, i in zip(scr, irs, strict=False)]))
    out["mean_ratio_samples"] = float(
        np.mean([s["samples"] / max(1, i["samples"]) for s, i in zip(scr, irs, strict=False)])
    )
    out["acr_irs"] = [min(a_i), max(a_i)]
    out["acr_scratch"] = [min(a_s), max(a_s)]
    out["mean_zeta"] = float(np.nanmean([r["mean_zeta"] for r in irs]))
    out["disagreement_rate"] = float(np.mean([r["disagreement_rate"] for r in irs]))
    out["direct_share"] = float(np.mean([r["direct_share"] for r in irs]))
    out["irs_time"] = float(sum(r["wall_s"] for r in irs))
    out["scratch_time"] = float(sum(s["wall_s"] for s in scr))
    return out


def fmt_x(res: dict | None, digits: int = 2) -> str:
    if res is None:
        return "–"
    if res.get("value") is not None:
        return f"{res['value']:.{digits}f}×"
    if "bound" in res:
        op, v = res["bound"]
        return f"{op}{v:.{digits}f}×†" if op == ">=" else "n/a‡"
    return "n/a"


# --------------------------------------------------------------------------------------------------------- reporting


def plot_experiment(name: str, exp: dict, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for sigma_key, res in exp["sigmas"].items():
        approx = res["approximations"]
        cols = min(3, len(approx))
        rows = -(-len(approx) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, (aname, a) in zip(axes.flat, approx.items(), strict=False):
            pts = a["points"]
            styles = {"paper": ("tab:blue", "γ switch (1−0.004)"), "approxtune": ("tab:red", "max (1−0.002)")}
            titles = []
            for mode, (color, label) in styles.items():
                ax.plot(
                    [p[mode]["acr"] for p in pts],
                    [p[mode]["wall_s"] for p in pts],
                    "o-",
                    color=color,
                    ms=3,
                    label=f"IRS {label}",
                )
                ax.plot(
                    [p["scratch"][mode]["acr"] for p in pts],
                    [p["scratch"]["wall_s"] for p in pts],
                    "s--",
                    color=color,
                    ms=3,
                    alpha=0.7,
                    label=f"scratch α_b={MODES[mode][1]}",
                )
                titles.append(fmt_x(summarize(pts, mode)["area_wall"]))
            ax.set_title(f"{aname}: speedup γ {titles[0]}, max {titles[1]}", fontsize=9)
            ax.set_xlabel("ACR")
            ax.set_ylabel("time for all inputs (s)")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(approx) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        s = exp["settings"]
        fig.suptitle(
            f"digits CNN, σ={sigma_key}, n={s['n']}, N={res['base']['inputs']} inputs, "
            f"n_p = {s['fractions'][0]:.0%}…{s['fractions'][-1]:.0%} of n",
            fontsize=10,
        )
        fig.tight_layout()
        tag = "" if name == "main" else f"_{name}"
        path = plots / f"irs{tag}_sigma{sigma_key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    return written


def _cell(exp: dict, sigma_key: str, aname: str, mode: str, paper: float | None) -> str:
    res = exp["sigmas"].get(sigma_key, {}).get("approximations", {}).get(aname)
    if res is None:
        return "not run" + (f" / {paper:.2f}×" if paper else "")
    s = summarize(res["points"], mode)
    return (
        f"**{fmt_x(s['area_wall'])}** / {s['mean_ratio_wall']:.2f}× / {paper:.2f}×"
        if paper
        else f"**{fmt_x(s['area_wall'])}** / {s['mean_ratio_wall']:.2f}×"
    )


def paper_table(exp: dict, mode: str, cols: tuple[str, ...], table: str) -> list[str]:
    lines = ["| σ | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for sigma_key in exp["sigmas"]:
        ref = PAPER[table].get(float(sigma_key), {})
        lines.append(f"| {sigma_key} | " + " | ".join(_cell(exp, sigma_key, c, mode, ref.get(c)) for c in cols) + " |")
    return lines


def detail_table(exp: dict, mode: str) -> list[str]:
    lines = [
        "| σ | approx | area speedup (wall) | (CPU time) | (samples) | (samples, no skipping) | mean of ratios (wall) "
        "| ACR IRS | ACR scratch "
        "| mean ζ | ζ floor 1%→10% | real disagreement | inputs with ≥1 disagreement | direct won | skipped | "
        "IRS s | scratch s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    a_z = MODES[mode][0]["alpha_zeta"]
    n = exp["settings"]["n"]
    f = exp["settings"]["fractions"]
    floor = f"{np.log(1 / a_z) / (f[0] * n):.3f}→{np.log(1 / a_z) / (f[-1] * n):.4f}"
    for sigma_key, res in exp["sigmas"].items():
        skipped = res["base"]["skipped_share"]
        for aname, a in res["approximations"].items():
            s = summarize(a["points"], mode)
            with_dis = np.mean([p[mode]["inputs_with_disagreement"] for p in a["points"]])
            lines.append(
                f"| {sigma_key} | {aname} | {fmt_x(s['area_wall'])} | {fmt_x(s['area_cpu'])}"
                f" | {fmt_x(s['area_samples'])} | {fmt_x(s['area_samples_noskip'])} | {s['mean_ratio_wall']:.2f}×"
                f" | {s['acr_irs'][0]:.3f}–{s['acr_irs'][1]:.3f}"
                f" | {s['acr_scratch'][0]:.3f}–{s['acr_scratch'][1]:.3f} | {s['mean_zeta']:.4f} | {floor}"
                f" | {s['disagreement_rate']:.2e} | {with_dis:.0%} | {s['direct_share']:.0%} | {skipped:.0%}"
                f" | {s['irs_time']:.1f} | {s['scratch_time']:.1f} |"
            )
    return lines


def points_table(exp: dict, sigma_key: str, aname: str) -> list[str]:
    pts = exp["sigmas"][sigma_key]["approximations"][aname]["points"]
    lines = [
        "| n_p | IRS γ s | IRS γ ACR | IRS max s | IRS max ACR | scratch s | scratch ACR α_b=.004 "
        "| scratch ACR α_b=.002 "
        "| mean ζ (max) | direct won γ / max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in pts:
        g, m, s = p["paper"], p["approxtune"], p["scratch"]
        lines.append(
            f"| {p['n_p']} | {g['wall_s']:.2f} | {g['acr']:.3f} | {m['wall_s']:.2f} | {m['acr']:.3f}"
            f" | {s['wall_s']:.2f}"
            f" | {s['paper']['acr']:.3f} | {s['approxtune']['acr']:.3f} | {m['mean_zeta']:.4f}"
            f" | {g['direct_share']:.0%} / {m['direct_share']:.0%} |"
        )
    return lines


def engine_context(out_dir: Path) -> list[str]:
    lines = ["## Engine throughput (context)", ""]
    for cand in (out_dir / "engine_results.json", REPO / "benchmarks" / "engine_results.json"):
        if cand.is_file():
            lines.append(
                f"`benchmarks/bench_engine.py` results are in `{cand.name}` (and `engine_results.md`); they are "
                "not repeated here."
            )
            break
    else:
        lines.append(
            "`benchmarks/bench_engine.py` (another engineer's) measures the engine against the bare forward "
            "pass; its results file was not present when this report was written, so nothing is quoted from "
            "it. Run `python benchmarks/bench_engine.py --out benchmarks/engine_results`."
        )
    return lines


def throughput_lines(data: dict) -> list[str]:
    lines = [
        "",
        "Throughput seen inside this benchmark (noise samples / wall second, median over all timed calls; "
        "a by-product of the timings above, not a separate measurement):",
        "",
        "| experiment | σ | IRS replay | scratch CERTIFY |",
        "|---|---|---:|---:|",
    ]
    for name, exp in data["experiments"].items():
        for sigma_key, res in exp["sigmas"].items():
            irs, scr = [], []
            for a in res["approximations"].values():
                for p in a["points"]:
                    for m in MODES:
                        if p[m]["samples"]:
                            irs.append(p[m]["samples"] / p[m]["wall_s"])
                    scr.append(p["scratch"]["samples"] / p["scratch"]["wall_s"])
            lines.append(f"| {name} | {sigma_key} | {np.median(irs):,.0f} | {np.median(scr):,.0f} |")
    return lines


def write_report(data: dict, out_dir: Path) -> None:
    out_dir / "plots"
    md = out_dir / "RESULTS.md"
    notes = ""
    if md.is_file() and NOTES_MARKER in md.read_text():
        notes = md.read_text().split(NOTES_MARKER, 1)[1]
    L = [
        "# IRS against certification from scratch (digits CNN)",
        "",
        "Generated by `benchmarks/bench_irs.py` from `irs_results.json`; plots in `plots/`. Definitions follow "
        '`../shared/DESIGN.md` ("Speedup", "Confidence accounting") and the IRS paper §5.2–5.4 / A.5.',
        "",
    ]
    for name, exp in data["experiments"].items():
        m = exp["meta"]
        s = exp["settings"]
        L += [
            f"## Experiment `{name}`",
            "",
            f"- command: `{m['command']}`",
            f"- machine: `nproc` {m['machine']['nproc']}, CPU {m['machine']['cpu']}, torch {m['machine']['torch']}, "
            f"Python {m['machine']['python']}, torch threads {m['machine']['threads']}, batch size {s['batch_size']}, "
            f"GLIBC_TUNABLES `{m['machine']['glibc_tunables'] or '(unset)'}`",
            f"- date: {m['started']} → {m['finished']} ({m['runtime_s'] / 60:.1f} min wall in all); load average "
            f"(1/5/15 min) at start {m['load_start']}, at end {m['load_end']} — the 2 cores are shared with other "
            "engineers' jobs",
            f"- settings: σ {', '.join(exp['sigmas'])}; N = {s['inputs']} search inputs; n = {s['n']}, n0 = {s['n0']}, "
            f"α = {ALPHA}; n_p = {', '.join(str(round(f * s['n'])) for f in s['fractions'])}; "
            f"approximations {', '.join(s['approx'])}",
            "",
            "### Base certification of g (once per σ; excluded from every time below, as in the paper)",
            "",
            "| σ | clean acc f | base ACR | g certified (IRS evaluates) | skipped by IRS | pA q10/q50/q90 (certified) "
            "| pA ≥ γ=0.99 | pA < 0.9 | max possible pA | base time s |",
            "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for sigma_key, res in exp["sigmas"].items():
            b = res["base"]
            q = b["p_a_quantiles_certified"]
            bt = f"{b['base_wall_s']:.1f}" if b["base_wall_s"] is not None else "(cached)"
            L.append(
                f"| {sigma_key} | {b['clean_accuracy']:.1%} | {b['acr']:.3f} | {b['certified_share']:.1%} "
                f"| {b['skipped_share']:.1%} | {q.get('q10', 0):.4f} / {q.get('q50', 0):.4f} / {q.get('q90', 0):.4f}"
                f" | {b['share_p_a_ge_gamma']:.1%} | {b['share_p_a_lt_0.9']:.1%} | {b['p_a_max_possible']:.5f} | {bt} |"
            )
        quant = [c for c in ("fp16", "bf16", "int8") if c in s["approx"]]
        prune = [c for c in ("prune5", "prune10", "prune20") if c in s["approx"]]
        table_q = "table2" if name != "table7" else "table7_n1e5"
        for mode in MODES:
            L += [
                "",
                f"### Speedups, {MODE_LABEL[mode]}",
                "",
                "Each cell: **area-ratio speedup (paper's metric)** / mean of pointwise time ratios (reference "
                "code's metric) / paper's ResNet-20 CIFAR-10 figure. † = no common ACR range, IRS's cheapest point "
                "already reaches scratch's best ACR (the number is the time ratio there, a lower bound); ‡ = IRS "
                "never reaches scratch's smallest ACR.",
                "",
            ]
            if quant:
                L += [
                    "Quantization (layout of the paper's "
                    + ("Table 2" if name != "table7" else "Table 7, n = 10⁵ row")
                    + "):",
                    "",
                    *paper_table(exp, mode, tuple(quant), table_q),
                    "",
                ]
            if prune:
                L += ["Pruning (layout of the paper's Table 3):", "", *paper_table(exp, mode, tuple(prune), "table3")]
                L += [""]
        for mode in MODES:
            L += [
                "",
                f"### Details, {MODE_LABEL[mode]}",
                "",
                "Area speedup from wall time, from process CPU time, and from noise-sample counts (machine-noise "
                'free); "no skipping" charges IRS n_p samples on every input, as the paper\'s Algorithm 2 would '
                "(approxtune skips the inputs g did not certify correctly), so it isolates the saving of the zeta "
                "mechanism and of the n0 selection samples; ACR ranges over n_p; mean ζ = mean Clopper–Pearson upper "
                "bound over evaluated inputs and "
                "n_p; ζ floor = ln(1/α_ζ)/n_p (the bound at zero disagreements); real disagreement = fraction of "
                "replayed samples with f^p ≠ f; direct won = share of evaluated inputs whose radius came from the "
                "direct bound; skipped = inputs g did not certify correctly (IRS spends nothing on them, scratch "
                "does); IRS s / scratch s = total wall time over all n_p values.",
                "",
                *detail_table(exp, mode),
            ]
        for sigma_key in exp["sigmas"]:
            for aname in ("int8", "prune20"):
                if aname in exp["sigmas"][sigma_key]["approximations"]:
                    L += ["", f"<details><summary>Per-n_p numbers, σ = {sigma_key}, {aname}</summary>", ""]
                    L += [*points_table(exp, sigma_key, aname), "", "</details>"]
        L += ["", "Plots: " + ", ".join(f"`plots/{p}`" for p in exp.get("plots", [])), ""]
    L += ["", *engine_context(out_dir), *throughput_lines(data)]
    L += ["", NOTES_MARKER]
    md.write_text("\n".join(L) + (notes if notes else "\n"))


# -------------------------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 inputs, n=2000, 3 n_p, int8+prune20 (<2 min)")
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    ap.add_argument("--n", type=int, default=10_000, help="base samples n (default 10^4)")
    ap.add_argument("--n0", type=int, default=100, help="selection samples of CERTIFY (base and scratch)")
    ap.add_argument("--inputs", type=int, default=200, help="search inputs N (at most 300)")
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[k / 100 for k in range(1, 11)],
        help="n_p as fractions of n (default 0.01 .. 0.10)",
    )
    ap.add_argument("--approx", nargs="+", default=list(APPROXIMATIONS), choices=APPROXIMATIONS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the 2 cores are shared)")
    ap.add_argument("--batch-size", type=int, default=512, help="samples per forward pass, IRS and scratch alike")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-runs"), help="models and base caches")
    ap.add_argument("--out-dir", type=Path, help="results dir (default benchmarks/, or /tmp/bench-irs-quick)")
    ap.add_argument("--experiment", default="main", help="name under which results are merged into the JSON")
    ap.add_argument("--report-only", action="store_true", help="rewrite RESULTS.md and plots from the JSON")
    args = ap.parse_args()
    if args.quick:
        args.inputs, args.n, args.fractions, args.approx = 20, 2000, [0.02, 0.05, 0.1], ["int8", "prune20"]
    out_dir = args.out_dir or (Path("/tmp/bench-irs-quick") if args.quick else REPO / "benchmarks")
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "irs_results.json"
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"experiments": {}}

    if not args.report_only:
        torch.set_num_threads(args.threads)
        args.fractions = sorted(args.fractions)
        meta = {
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, REPO), *sys.argv[1:]]),
            "machine": machine_info(args.threads),
            "started": _dt.datetime.now().isoformat(timespec="seconds"),
            "load_start": loadavg(),
        }
        with contextlib.suppress(OSError):
            meta["git"] = subprocess.run(
                ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
            ).stdout.strip()
        t0 = time.perf_counter()
        exp = {
            "meta": meta,
            "settings": {
                "inputs": args.inputs,
                "n": args.n,
                "n0": args.n0,
                "alpha": ALPHA,
                "fractions": args.fractions,
                "approx": args.approx,
                "batch_size": args.batch_size,
                "modes": {m: {**{k: str(v) for k, v in s.items()}, "alpha_b": a} for m, (s, a) in MODES.items()},
                "scratch_noise": f"run seed = cache run seed + {FRESH_SEED_OFFSET} (fresh selection and "
                "estimation samples)",
            },
            "sigmas": {},
        }
        for sigma in args.sigmas:
            exp["sigmas"][f"{sigma:g}"] = run_sigma(args, sigma)
            # write after every sigma so that a killed run leaves its finished part behind
            meta.update(
                finished=_dt.datetime.now().isoformat(timespec="seconds"),
                load_end=loadavg(),
                runtime_s=time.perf_counter() - t0,
            )
            data["experiments"][args.experiment] = exp
            json_path.write_text(json.dumps(data, indent=1) + "\n")
    for name, exp in data["experiments"].items():
        for res in exp["sigmas"].values():  # results written before points recorded n0
            for a in res["approximations"].values():
                for p in a["points"]:
                    p.setdefault("n0", exp["settings"]["n0"])
        exp["plots"] = plot_experiment(name, exp, out_dir / "plots")
    json_path.write_text(json.dumps(data, indent=1) + "\n")
    write_report(data, out_dir)
    log(f"wrote {json_path}, {out_dir / 'RESULTS.md'} and plots in {out_dir / 'plots'}")


if __name__ == "__main__":
    main()
