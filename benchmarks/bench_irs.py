#!/usr/bin/env python
"""IRS against certification from scratch, as in the IRS paper's Section 5.2/5.3 (Tables 2, 3) and A.5 (Table 7).

For each sigma (one digits study per sigma, its model trained by ``pipeline.ensure_model``) the base model f is
certified once (Cohen CERTIFY, ``n`` estimation samples, ``n0`` selection samples, level ``alpha``) into a cache.  Then
for every uniform approximation f^p (``approximation.preset``) and every ``n_p`` in ``fractions * n`` the IRS rules of
``RULES`` and one scratch run are timed back to back, in an order that rotates with ``n_p`` (so that machine noise hits
them alike).  Each rule switches one improvement on over the one before it, and each states its own total level:

* ``paper`` -- the paper's Algorithm 2: mode "gamma", gamma = 0.99, alpha_zeta = 0.001, alpha_d = alpha + alpha_zeta =
  0.002; total 1 - (alpha + alpha_zeta + alpha_d) = 1 - 0.004 by the union bound;
* ``gamma-sharp`` -- the same threshold switch with alpha_zeta = alpha_d = 0.001, counted by the threshold argument of
  ../shared/DESIGN.md ("Confidence accounting"): max(alpha + alpha_zeta, alpha_zeta + alpha_d) = 0.002 (stated here,
  not read from ``IRSResult.alpha``);
* ``gamma-loss`` -- ``gamma-sharp`` with zeta on the losses of c_hat (f = c_hat != f^p) instead of all disagreements
  (``irs.zeta = "loss"``; same level);
* ``max-disagreement`` -- the larger of the zeta and the direct radius, alpha_zeta = alpha_d = 0.0005, the paper's zeta
  on all disagreements; union bound 0.002;
* ``max`` -- approxtune's default: ``max-disagreement`` with zeta on the losses;
* ``tail`` -- mode "tail": branch and per-input sample counts decided from the cache's tail (allocation of the budget
  ``n_p x (inputs g certifies)``), alpha_zeta = alpha_d = 0.001; total alpha + max(alpha_zeta, alpha_d) = 0.002;
* ``tail-pilot16`` -- as ``tail`` plus a pilot of 16 tail samples per input through f^p, paid from the same budget;
* **scratch** -- Cohen CERTIFY of f^p on *fresh* noise (a different run seed, so neither the selection nor the
  estimation samples are the cached ones) with ``n0`` selection samples and ``n_p`` estimation samples on every
  input.  Its samples do not depend on alpha, so one timed run gives the baseline of every rule: the Clopper-Pearson
  bound is evaluated at each rule's total alpha_b (0.004 for ``paper``, 0.002 for the others); the bound costs well
  under a millisecond and is inside the timed region.

Every rule replays at most ``n_p x (inputs g certifies)`` samples (checked; tail mode counts its pilot in), so the
rules compare at equal samples as well as at equal confidence (all but ``paper`` at 1 - 0.002).

IRS time is the ``certify_irs`` call alone (replay of cached samples of the inputs that g certified correctly -- the
first ``n_p``, or in tail mode each input's allocated prefix plus the pilot -- and the bounds and the allocation); the
base certification is excluded, as in the paper, and inputs that g abstained on or
got wrong are skipped by IRS at no cost -- that is part of IRS's saving and is reported as the skipped share.
Scratch time is selection + estimation on all inputs.  Same batch size, same thread count, same process.

Speedup (the paper's metric, ../shared/DESIGN.md "Speedup"): for each method, the points (ACR, time) over the n_p
values, sorted by n_p; ACR is replaced by its running maximum and only the points where the running maximum rises are
kept (a larger n_p that does not raise ACR buys nothing, so the curve keeps the first, cheapest time at each ACR).
Both curves are interpolated piecewise-linearly in ACR on the common interval [max(min ACRs), min(max ACRs)] and the
speedup is (area under scratch's time curve) / (area under IRS's time curve) there.  When the interval is empty the
area ratio is undefined and is reported as such, with the time ratio at the nearest ACRs as a bound.  Beside it: the
reference code's mean over n_p of the pointwise ratios t_scratch / t_IRS, and the same area ratio computed from
process CPU time and from noise-sample counts (``IRSResult.samples``; free of machine noise).  Experiments written
before the rules above existed (two rules, "paper" and "approxtune" = today's "max") are still reported in their own
layout.

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
from _harness import cpu_model  # noqa: E402 (benchmarks/ is on sys.path when a script runs)

from approxtune import pipeline  # noqa: E402
from approxtune.approximation import apply_approximation, preset  # noqa: E402
from approxtune.certification import certify  # noqa: E402
from approxtune.config import load_study  # noqa: E402
from approxtune.irs import IRSSettings, Mode, Zeta, certify_irs  # noqa: E402
from approxtune.noise import input_seeds  # noqa: E402
from approxtune.statistics import acr, lower_confidence_bound, radius  # noqa: E402

STUDIES = {0.25: "studies/digits-sigma0.25.toml", 0.5: "studies/digits.toml", 1.0: "studies/digits-sigma1.0.toml"}
APPROXIMATIONS = ("fp16", "bf16", "int8", "prune5", "prune10", "prune20")
ALPHA = 0.001
GAMMA = 0.99
RULES = {
    # name: IRS settings without n_p; alpha_b = the total alpha this benchmark states for the rule (its scratch
    # baseline runs at the same level); how = the accounting behind alpha_b; label; what is switched on over "paper".
    "paper": {
        "settings": dict(mode=Mode.GAMMA, gamma=GAMMA, alpha_zeta=0.001, alpha_d=ALPHA + 0.001, zeta=Zeta.DISAGREEMENT),
        "alpha_b": 0.004,
        "how": "union bound α + α_ζ + α_d",
        "label": "paper's γ switch (γ 0.99, α_ζ 0.001, α_d 0.002; union bound, total 1−0.004)",
        "on": "— (the paper's Algorithm 2, its α_d = α + α_ζ)",
    },
    "gamma-sharp": {
        "settings": dict(mode=Mode.GAMMA, gamma=GAMMA, alpha_zeta=0.001, alpha_d=0.001, zeta=Zeta.DISAGREEMENT),
        "alpha_b": 0.002,
        "how": "threshold argument max(α + α_ζ, α_ζ + α_d)",
        "label": "γ switch at its sharp level (γ 0.99, α_ζ = α_d = 0.001; total 1−0.002)",
        "on": "sharp accounting of the threshold switch (α_d ≤ α)",
    },
    "gamma-loss": {
        "settings": dict(mode=Mode.GAMMA, gamma=GAMMA, alpha_zeta=0.001, alpha_d=0.001, zeta=Zeta.LOSS),
        "alpha_b": 0.002,
        "how": "threshold argument max(α + α_ζ, α_ζ + α_d)",
        "label": "γ switch at its sharp level, ζ on the losses of ĉA (total 1−0.002)",
        "on": "gamma-sharp + ζ counting only losses of ĉA (f = ĉA ≠ f^p)",
    },
    "max-disagreement": {
        "settings": dict(mode=Mode.MAX, alpha_zeta=0.0005, alpha_d=0.0005, zeta=Zeta.DISAGREEMENT),
        "alpha_b": 0.002,
        "how": "union bound α + α_ζ + α_d",
        "label": "max of ζ (on all disagreements) and direct radius (α_ζ = α_d = 0.0005; total 1−0.002)",
        "on": "gamma-sharp + direct radius as a fallback on every input (larger radius)",
    },
    "max": {
        "settings": dict(mode=Mode.MAX, alpha_zeta=0.0005, alpha_d=0.0005, zeta=Zeta.LOSS),
        "alpha_b": 0.002,
        "how": "union bound α + α_ζ + α_d",
        "label": "approxtune's default: max of ζ (on the losses) and direct radius (α_ζ = α_d = 0.0005; total 1−0.002)",
        "on": "max-disagreement + ζ counting only losses of ĉA",
    },
    "tail": {
        "settings": dict(mode=Mode.TAIL, alpha_zeta=0.001, alpha_d=0.001, allocate=True, pilot=0, zeta=Zeta.LOSS),
        "alpha_b": 0.002,
        "how": "α + max(α_ζ, α_d) (decisions from the tail)",
        "label": "tail mode, budget allocated from the tail (α_ζ = α_d = 0.001; total 1−0.002)",
        "on": "branch and per-input counts from the cache's tail (allocation)",
    },
    "tail-pilot16": {
        "settings": dict(mode=Mode.TAIL, alpha_zeta=0.001, alpha_d=0.001, allocate=True, pilot=16, zeta=Zeta.LOSS),
        "alpha_b": 0.002,
        "how": "α + max(α_ζ, α_d) (decisions from the tail)",
        "label": "tail mode + 16 pilot tail samples per input through f^p (α_ζ = α_d = 0.001; total 1−0.002)",
        "on": "tail + pilot estimate of f^p's disagreement (paid from the budget)",
    },
}
LEGACY_RULES = {  # experiments written by the two-rule version of this script
    "paper": {"alpha_b": 0.004, "label": "paper's gamma switch (gamma 0.99, a_zeta 0.001, a_d 0.002; total 1-0.004)"},
    "approxtune": {
        "alpha_b": 0.002,
        "label": "approxtune default: max of zeta and direct radius (a_zeta = a_d = 0.0005; total 1-0.002)",
    },
}
COLORS = {
    "paper": "tab:blue",
    "gamma-sharp": "tab:cyan",
    "gamma-loss": "tab:olive",
    "max-disagreement": "tab:orange",
    "max": "tab:red",
    "approxtune": "tab:red",
    "tail": "tab:green",
    "tail-pilot16": "tab:purple",
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


def stated_alpha(rule: str) -> float:
    """The total alpha of ``rule`` by the accounting its row names; checked against ``RULES[rule]['alpha_b']``."""
    s = RULES[rule]["settings"]
    a_z, a_d = s["alpha_zeta"], s["alpha_d"]
    if s["mode"] is Mode.TAIL:
        total = ALPHA + max(a_z, a_d)
    elif rule in ("gamma-sharp", "gamma-loss"):  # threshold switch on the cached p_a: DESIGN.md's threshold argument
        total = max(ALPHA + a_z, a_z + a_d)
    else:
        total = ALPHA + a_z + a_d
    if abs(total - RULES[rule]["alpha_b"]) > 1e-12:
        raise AssertionError(f"rule {rule}: stated alpha_b {RULES[rule]['alpha_b']} but its accounting gives {total}")
    return total


def run_irs(model_p, inputs, cache, n_p, rule, batch_size):
    settings = IRSSettings(n_p=n_p, **RULES[rule]["settings"])
    res, wall, cpu = timed(lambda: certify_irs(model_p, inputs, cache, settings, batch_size=batch_size, device="cpu"))
    ev = res.evaluated
    certified = int(np.asarray(cache.certified).sum())
    budget = n_p * certified
    if res.samples > budget:
        raise AssertionError(f"{rule} at n_p={n_p} replayed {res.samples} samples > n_p x certified = {budget}")
    counts = res.counts[ev] if len(res.counts) == len(ev) else np.full(int(ev.sum()), n_p)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "acr": res.acr,
        "samples": res.samples,
        "budget": budget,
        "certified": certified,
        "pilot_samples": res.pilot_samples,
        "evaluated": int(ev.sum()),
        "counts_min_max": [int(counts.min()), int(counts.max())] if len(counts) else [0, 0],
        "total_alpha": RULES[rule]["alpha_b"],
        "library_alpha": res.alpha,
        "mean_zeta": res.mean_zeta,
        "disagreement_rate": float(res.disagreements[ev].sum() / max(1, counts.sum())),
        "inputs_with_disagreement": float((res.disagreements[ev] > 0).mean()) if ev.any() else 0.0,
        "direct_share": res.direct_share,
        "branch_direct_share": float(res.branch_direct[ev].mean()) if ev.any() and len(res.branch_direct) else 0.0,
        "cert_acc0": res.certified_accuracy(0.0),
    }


def run_scratch(model_p, x, labels, seeds, sigma, n0, n_p, batch_size):
    alphas = sorted({m["alpha_b"] for m in RULES.values()}, reverse=True)

    def go():
        r = certify(model_p, x, seeds, sigma, n0, n_p, alphas[0], batch_size=batch_size, device="cpu")
        # the other baselines: the same samples, only the Clopper-Pearson level differs
        return r, {a: lower_confidence_bound(r.count, n_p, a) for a in alphas[1:]}

    (r, p_other), wall, cpu = timed(go)
    correct = r.c_hat == labels
    out = {"wall_s": wall, "cpu_s": cpu, "samples": len(labels) * (n0 + n_p), "by_alpha": {}}
    for a in alphas:
        rad = np.where(correct, r.radius if a == alphas[0] else radius(p_other[a], sigma), 0.0)
        out["by_alpha"][f"{a:g}"] = {"alpha_b": a, "acr": acr(rad), "cert_acc0": float((rad > 0).mean())}
    for rule, m in RULES.items():  # each rule's own baseline, where summarize() looks for it
        out[rule] = out["by_alpha"][f"{m['alpha_b']:g}"]
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
    assert np.all(fresh[:, 0] != cache.seed[:, 0]), "scratch noise must not be the cached noise (another run seed)"
    n_ps = sorted({max(1, round(f * args.n)) for f in args.fractions})
    for rule in RULES:  # fail before any timing: levels as stated, tail rules stay out of the tail, pilot < n_p
        stated_alpha(rule)
        for n_p in n_ps:
            settings = IRSSettings(n_p=n_p, **RULES[rule]["settings"])
            if settings.mode is Mode.TAIL:
                settings.tail_length(args.n)
    approximations = {}
    for name in args.approx:
        config = preset(name, model)
        model_p = apply_approximation(model, config).eval()
        with torch.inference_mode():
            acc_p = float((model_p(x).argmax(1) == inputs.y).float().mean())
            model_p(torch.zeros(args.batch_size, *x.shape[1:]))  # warm-up
        points = []
        items = ["scratch", *RULES]
        for k, n_p in enumerate(n_ps):
            order = items[k % len(items) :] + items[: k % len(items)]
            point = {"n_p": n_p, "n0": args.n0, "fraction": n_p / args.n, "order": order}
            for what in order:
                if what == "scratch":
                    point["scratch"] = run_scratch(model_p, x, labels, fresh, sigma, args.n0, n_p, args.batch_size)
                else:
                    point[what] = run_irs(model_p, inputs, cache, n_p, what, args.batch_size)
            points.append(point)
            s = point["scratch"]
            log(
                f"  {name:8s} n_p={n_p:5d}: "
                + " | ".join(f"{r} {point[r]['wall_s']:5.2f}s {point[r]['acr']:.3f}" for r in RULES)
                + f" | scratch {s['wall_s']:5.2f}s "
                + "/".join(f"{v['acr']:.3f}" for v in s["by_alpha"].values())
                + f" | dis {point['max']['disagreement_rate']:.4f}"
            )
        approximations[name] = {"clean_accuracy": acc_p, "points": points}
        log(f"  {name}: area speedup " + ", ".join(f"{r} {fmt_x(summarize(points, r)['area_wall'])}" for r in RULES))
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


def rules_of(exp: dict) -> dict[str, dict]:
    """The rules an experiment ran, in order: name -> {"alpha_b", "label", "alpha_zeta", ...} (from its JSON)."""
    s = exp["settings"]
    if "rules" in s:
        return s["rules"]
    return {m: {**LEGACY_RULES[m], "alpha_zeta": float(v["alpha_zeta"])} for m, v in s["modes"].items()}


def is_legacy(exp: dict) -> bool:
    """Written by the two-rule version of this script ("paper" and "approxtune"): reported in its own layout."""
    return "rules" not in exp["settings"]


def rank(res: dict | None) -> float:
    """Sort key of an area-speedup result: its value, its lower bound (†), or -inf (‡ / missing)."""
    if res is None:
        return -np.inf
    if res.get("value") is not None:
        return res["value"]
    if "bound" in res and res["bound"][0] == ">=":
        return res["bound"][1]
    return -np.inf


def paper_figure(sigma_key: str, aname: str, table_q: str = "table2") -> float | None:
    return {**PAPER[table_q].get(float(sigma_key), {}), **PAPER["table3"].get(float(sigma_key), {})}.get(aname)


def plot_scratch(ax, pts: list[dict], rule: str, alpha_b: float, color) -> None:
    ax.plot(
        [p["scratch"][rule]["acr"] for p in pts],
        [p["scratch"]["wall_s"] for p in pts],
        "s--",
        color=color,
        ms=3,
        alpha=0.7,
        label=f"scratch α_b={alpha_b}",
    )


def plot_experiment(name: str, exp: dict, plots: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots.mkdir(parents=True, exist_ok=True)
    rules = rules_of(exp)
    legacy = is_legacy(exp)
    short = {"paper": "γ switch (1−0.004)", "approxtune": "max (1−0.002)"} if legacy else {}
    written = []
    for sigma_key, res in exp["sigmas"].items():
        approx = res["approximations"]
        cols = min(3, len(approx))
        rows = -(-len(approx) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
        for ax, (aname, a) in zip(axes.flat, approx.items(), strict=False):
            pts = a["points"]
            sp = {}
            seen = {}
            for rule, meta in rules.items():  # one scratch curve per distinct level, after its first rule's curve
                seen.setdefault(meta["alpha_b"], rule)
            for rule, meta in rules.items():
                ax.plot(
                    [p[rule]["acr"] for p in pts],
                    [p[rule]["wall_s"] for p in pts],
                    "o-",
                    color=COLORS.get(rule),
                    ms=3,
                    lw=1.5 if legacy else 1.2,
                    label="IRS " + short.get(rule, f"{rule} (1−{meta['alpha_b']:g})"),
                )
                sp[rule] = summarize(pts, rule)["area_wall"]
                if legacy and seen[meta["alpha_b"]] == rule:  # the two-rule layout: each rule beside its baseline
                    plot_scratch(ax, pts, rule, meta["alpha_b"], COLORS.get(rule))
            if not legacy:
                for alpha_b, rule in seen.items():
                    plot_scratch(ax, pts, rule, alpha_b, "0.55" if alpha_b > 0.003 else "black")
            if legacy:
                title = f"{aname}: speedup γ {fmt_x(sp['paper'])}, max {fmt_x(sp['approxtune'])}"
            else:
                best = max(sp, key=lambda r: rank(sp[r]))
                title = f"{aname}: best {best} {fmt_x(sp[best])} (paper rule {fmt_x(sp.get('paper'))})"
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("ACR")
            ax.set_ylabel("time for all inputs (s)")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(approx) :]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6 if not legacy else 7)
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


def rule_table(exp: dict) -> list[str]:
    lines = [
        "| rule | mode | γ | α_ζ | α_d | allocate / pilot | stated total α (scratch's α_b) | accounting "
        "| improvement it switches on | `IRSResult.alpha` at the run |",
        "|---|---|---:|---:|---:|---|---:|---|---|---:|",
    ]
    first = next(iter(exp["sigmas"].values()))["approximations"]
    pts = next(iter(first.values()))["points"] if first else []
    for rule, m in rules_of(exp).items():
        s = m["settings"]
        alloc = f"{'yes' if s['allocate'] == 'True' else 'no'} / {s['pilot']}" if s["mode"] == "tail" else "–"
        lib = f"{pts[0][rule]['library_alpha']:g}" if pts else "–"
        lines.append(
            f"| `{rule}` | {s['mode']} | {s.get('gamma', '–') if s['mode'] == 'gamma' else '–'} | {s['alpha_zeta']}"
            f" | {s['alpha_d']} | {alloc} | {m['alpha_b']:g} | {m['how']}"
            f" | {m['on']} | {lib} |"
        )
    return lines


def onoff_table(exp: dict, sigma_key: str, field: str, with_paper: bool) -> list[str]:
    rules = rules_of(exp)
    head = " | ".join(f"`{r}` (1−{m['alpha_b']:g})" for r, m in rules.items())
    lines = [
        f"| approx | {head} |" + (" paper's ResNet-20 |" if with_paper else ""),
        "|---|" + "---:|" * (len(rules) + with_paper),
    ]
    for aname, a in exp["sigmas"][sigma_key]["approximations"].items():
        sp = {r: summarize(a["points"], r)[field] for r in rules}
        best = max(sp, key=lambda r: rank(sp[r]))
        cells = [f"**{fmt_x(v)}**" if r == best else fmt_x(v) for r, v in sp.items()]
        ref = paper_figure(sigma_key, aname)
        paper = [f"{ref:.2f}×" if ref else "–"] if with_paper else []
        lines.append(f"| {aname} | " + " | ".join(cells + paper) + " |")
    return lines


def targets_lines(exp: dict) -> list[str]:
    """Issue targets: (a) beat the paper's figure in every cell of a σ; (b) area speedup >= 1, prune20, σ >= 0.5."""
    rules = list(rules_of(exp))
    lines = [
        "(a) cells (approximations) where the rule's area speedup (wall) exceeds the paper's ResNet-20 figure; "
        '"best" = the best rule of each cell (a per-cell choice, not one rule):',
        "",
        "| σ | " + " | ".join(f"`{r}`" for r in rules) + " | best | missed by every rule |",
        "|---|" + "---:|" * (len(rules) + 1) + "---|",
    ]
    for sigma_key, res in exp["sigmas"].items():
        wins = dict.fromkeys(rules, 0)
        best_wins, total, missed = 0, 0, []
        for aname, a in res["approximations"].items():
            ref = paper_figure(sigma_key, aname)
            if ref is None:
                continue
            total += 1
            sp = {r: rank(summarize(a["points"], r)["area_wall"]) for r in rules}
            for r in rules:
                wins[r] += sp[r] > ref
            best_wins += max(sp.values()) > ref
            if max(sp.values()) <= ref:
                missed.append(f"{aname} (best {max(sp.values()):.2f}× vs {ref:.2f}×)")
        lines.append(
            f"| {sigma_key} | "
            + " | ".join(f"{wins[r]}/{total}" for r in rules)
            + f" | {best_wins}/{total} | {', '.join(missed) or '—'} |"
        )
    lines += ["", "(b) prune20, area speedup (wall / samples), target ≥ 1:", ""]
    lines += ["| σ | " + " | ".join(f"`{r}`" for r in rules) + " | met by |", "|---|" + "---:|" * len(rules) + "---|"]
    for sigma_key, res in exp["sigmas"].items():
        if float(sigma_key) < 0.5 or "prune20" not in res["approximations"]:
            continue
        pts = res["approximations"]["prune20"]["points"]
        sp = {r: summarize(pts, r) for r in rules}
        met = [r for r in rules if rank(sp[r]["area_wall"]) >= 1]
        lines.append(
            f"| {sigma_key} | "
            + " | ".join(f"{fmt_x(sp[r]['area_wall'])} / {fmt_x(sp[r]['area_samples'])}" for r in rules)
            + f" | {', '.join(f'`{r}`' for r in met) or 'none'} |"
        )
    return lines


def detail_table(exp: dict, mode: str) -> list[str]:
    lines = [
        "| σ | approx | area speedup (wall) | (CPU time) | (samples) | (samples, no skipping) | mean of ratios (wall) "
        "| ACR IRS | ACR scratch "
        "| mean ζ | ζ floor 1%→10% | real disagreement | inputs with ≥1 disagreement | direct won | skipped | "
        "IRS s | scratch s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    a_z = float(rules_of(exp)[mode]["alpha_zeta"])
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


def rule_points_table(exp: dict, sigma_key: str, aname: str) -> list[str]:
    """Per-n_p numbers of every rule (multi-rule experiments)."""
    pts = exp["sigmas"][sigma_key]["approximations"][aname]["points"]
    rules = list(rules_of(exp))
    alphas = list(pts[0]["scratch"]["by_alpha"])
    lines = [
        "| n_p | "
        + " | ".join(f"{r} s | {r} ACR" for r in rules)
        + " | scratch s | "
        + " | ".join(f"scratch ACR α_b={a}" for a in alphas)
        + " | real disagreement | direct won ("
        + " / ".join(rules)
        + ") | tail counts min–max | samples ("
        + " / ".join(rules)
        + ") ≤ budget |",
        "|---:|" + "---:|" * (2 * len(rules) + 1 + len(alphas) + 1) + "---|---|---|",
    ]
    for p in pts:
        s = p["scratch"]
        t = p.get("tail", p[rules[-1]])
        lines.append(
            f"| {p['n_p']} | "
            + " | ".join(f"{p[r]['wall_s']:.2f} | {p[r]['acr']:.3f}" for r in rules)
            + f" | {s['wall_s']:.2f} | "
            + " | ".join(f"{s['by_alpha'][a]['acr']:.3f}" for a in alphas)
            + f" | {p['max']['disagreement_rate']:.2e} | "
            + " / ".join(f"{p[r]['direct_share']:.0%}" for r in rules)
            + f" | {t['counts_min_max'][0]}–{t['counts_min_max'][1]} | "
            + " / ".join(str(p[r]["samples"]) for r in rules)
            + f" ≤ {t['budget']} |"
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
                    for m in rules_of(exp):
                        if p[m]["samples"]:
                            irs.append(p[m]["samples"] / p[m]["wall_s"])
                    scr.append(p["scratch"]["samples"] / p["scratch"]["wall_s"])
            lines.append(f"| {name} | {sigma_key} | {np.median(irs):,.0f} | {np.median(scr):,.0f} |")
    return lines


def _legacy_sections(name: str, exp: dict) -> list[str]:
    """Speedup and detail tables of a two-rule experiment (the layout this script wrote before the rule table)."""
    s = exp["settings"]
    L = []
    quant = [c for c in ("fp16", "bf16", "int8") if c in s["approx"]]
    prune = [c for c in ("prune5", "prune10", "prune20") if c in s["approx"]]
    table_q = "table2" if name != "table7" else "table7_n1e5"
    rules = rules_of(exp)
    for mode in rules:
        L += [
            "",
            f"### Speedups, {rules[mode]['label']}",
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
    for mode in rules:
        L += ["", f"### Details, {rules[mode]['label']}", "", DETAILS_TEXT, "", *detail_table(exp, mode)]
    for sigma_key in exp["sigmas"]:
        for aname in ("int8", "prune20"):
            if aname in exp["sigmas"][sigma_key]["approximations"]:
                L += ["", f"<details><summary>Per-n_p numbers, σ = {sigma_key}, {aname}</summary>", ""]
                L += [*points_table(exp, sigma_key, aname), "", "</details>"]
    return L


DETAILS_TEXT = (
    "Area speedup from wall time, from process CPU time, and from noise-sample counts (machine-noise "
    'free); "no skipping" charges IRS n_p samples on every input, as the paper\'s Algorithm 2 would '
    "(approxtune skips the inputs g did not certify correctly), so it isolates the saving of the zeta "
    "mechanism and of the n0 selection samples; ACR ranges over n_p; mean ζ = mean Clopper–Pearson upper "
    "bound over evaluated inputs and "
    "n_p; ζ floor = ln(1/α_ζ)/n_p (the bound at zero disagreements); real disagreement = fraction of "
    "replayed samples with f^p ≠ f; direct won = share of evaluated inputs whose radius came from the "
    "direct bound; skipped = inputs g did not certify correctly (IRS spends nothing on them, scratch "
    "does); IRS s / scratch s = total wall time over all n_p values."
)


def _rule_sections(exp: dict) -> list[str]:
    """Per-σ on/off tables, the issue's targets, per-rule details and per-n_p numbers of a multi-rule experiment."""
    rules = rules_of(exp)
    L = ["", "### IRS rules (each compared with scratch at its own stated total α)", "", *rule_table(exp), ""]
    L += [
        "Every rule replays at most n_p × (inputs g certifies) samples (asserted per call; tail mode spends that "
        "budget, its pilot included, unevenly over the inputs). The γ switch's level is stated here from the "
        'threshold argument of DESIGN.md ("Confidence accounting"), not read from `IRSResult.alpha`.',
    ]
    for sigma_key, res in exp["sigmas"].items():
        b = res["base"]
        L += [
            "",
            f"### σ = {sigma_key}: speedup with each improvement on/off",
            "",
            f"g certifies {b['certified_share']:.0%} of the inputs (IRS skips the rest); certified pA median "
            f"{b['p_a_quantiles_certified'].get('q50', 0):.4f}, {b['share_p_a_ge_gamma']:.0%} at pA ≥ γ = 0.99. "
            "Area-ratio speedup (paper's metric, wall time; **bold** = best rule of the row); † = no common ACR "
            "range, lower bound; ‡ = IRS never reaches scratch's smallest ACR. The paper's column is its ResNet-20 "
            "CIFAR-10 figure (Tables 2, 3) for its own rule at its own union-bound level.",
            "",
            *onoff_table(exp, sigma_key, "area_wall", True),
            "",
            "The same area ratio from noise-sample counts (`IRSResult.samples` against scratch's N·(n0 + n_p); free "
            "of machine noise):",
            "",
            *onoff_table(exp, sigma_key, "area_samples", True),
        ]
    L += ["", "### Issue targets (computed from the tables above)", "", *targets_lines(exp)]
    for rule in rules:
        L += [
            "",
            f"<details><summary>Details, <code>{rule}</code>: {rules[rule]['label']}</summary>",
            "",
            DETAILS_TEXT,
            "",
            *detail_table(exp, rule),
            "",
            "</details>",
        ]
    for sigma_key in exp["sigmas"]:
        for aname in ("int8", "prune20"):
            if aname in exp["sigmas"][sigma_key]["approximations"]:
                L += ["", f"<details><summary>Per-n_p numbers, σ = {sigma_key}, {aname}</summary>", ""]
                L += [*rule_points_table(exp, sigma_key, aname), "", "</details>"]
    return L


def write_report(data: dict, out_dir: Path) -> None:
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
        L += _legacy_sections(name, exp) if is_legacy(exp) else _rule_sections(exp)
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
                "rules": {
                    r: {
                        "settings": {k: str(v) for k, v in m["settings"].items()},
                        "alpha_zeta": m["settings"]["alpha_zeta"],
                        **{k: m[k] for k in ("alpha_b", "how", "label", "on")},
                    }
                    for r, m in RULES.items()
                },
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
