#!/usr/bin/env python
"""Branch rules and sample allocation for IRS at equal total confidence and equal total samples (issue 8, items 1-3).

For each sigma (the digits study of that sigma, model and base cache from ``pipeline``; n = 10^4, n0 = 100, alpha =
0.001, the first ``--inputs`` search inputs) and each uniform approximation f^p, every rule below certifies g^p from
the same cache with the same budget of replayed samples, ``n_p x (inputs g certifies)``, at the same total
confidence ``1 - ALPHA_TOTAL`` (0.002 by default: alpha = 0.001 for the base certificate plus 0.001 for IRS):

* ``gamma0.99`` -- the paper's threshold switch (direct iff cached p_a >= 0.99) with alpha_d = alpha_zeta = 0.001
  (alpha_d <= alpha): sound at alpha + alpha_zeta by the threshold argument of ../shared/DESIGN.md;
* ``gamma*`` -- the same switch with gamma chosen from (n_p, levels) alone: the smallest p at which the direct radius
  reachable with the expected count p n_p beats the zeta radius at its zero-disagreement floor;
* ``max`` -- the larger of both radii, alpha_zeta = alpha_d = 0.0005 (union bound alpha + alpha_zeta + alpha_d);
* ``direct-only`` -- the direct bound alone on every input (gamma just above 1/2), alpha_d = 0.002: a certificate
  that never uses p_a, wrong with probability <= alpha_d (the gate p_a > 1/2 only removes certificates);
* ``tail-uniform`` -- branch from the cache's tail, every input n_p samples, alpha_zeta = alpha_d = 0.001
  (alpha + max(alpha_zeta, alpha_d));
* ``tail`` -- branch and per-input counts from the tail (the budget spread by equalising the marginal plausible
  radius per sample), alpha_zeta = alpha_d = 0.001;
* ``tail-pilot16`` -- the same, after f^p ran on 16 tail samples per input (paid from the budget) to estimate the
  disagreement that the plausible radii expect.

Tail mode uses n_tail = n / 2: only the first 5000 cached samples of an input may be replayed.  The measure is ACR
over all ``--inputs`` inputs (zeros included); samples are counted exactly.  Results: ``--out`` (markdown) and a JSON
beside it.  Models and caches live in ``--workdir`` (default /tmp/bench-runs), never in the repository.

    python benchmarks/bench_allocation.py                       # sigma 0.5 and 1.0; int8, prune10, prune20
    python benchmarks/bench_allocation.py --quick               # one sigma, one approximation, two n_p
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from bench_irs import ALPHA, bench_study  # noqa: E402 (the same digits studies and settings)

from approxtune import pipeline  # noqa: E402
from approxtune.approximation import apply_approximation, preset  # noqa: E402
from approxtune.certification import DEFAULT_BATCH_SIZE  # noqa: E402
from approxtune.irs import IRSSettings, Mode, certify_irs  # noqa: E402
from approxtune.statistics import lower_confidence_bound, radius, upper_confidence_bound  # noqa: E402

EXTRA = 0.001  # confidence spent on IRS beyond the base certificate


def gamma_star(n_p: int, alpha_zeta: float, alpha_d: float, sigma: float) -> float:
    """Smallest p where the direct radius of the expected count p n_p beats the zeta radius at the floor; else 1."""
    grid = np.linspace(0.501, 0.9999, 5000)
    direct = radius(lower_confidence_bound(np.round(grid * n_p), n_p, alpha_d), sigma)
    zeta = radius(grid - upper_confidence_bound(0, n_p, alpha_zeta), sigma)
    wins = np.flatnonzero((direct >= zeta) & (direct > 0))
    return float(grid[wins[0]]) if len(wins) else 1.0


def rules(n_p: int, sigma: float) -> dict[str, tuple[IRSSettings, float]]:
    """name: (settings, stated total alpha of the rule)."""
    half = EXTRA / 2
    g = gamma_star(n_p, EXTRA, EXTRA, sigma)
    return {
        "gamma0.99": (IRSSettings(n_p, EXTRA, EXTRA, Mode.GAMMA, 0.99), ALPHA + EXTRA),
        "gamma*": (IRSSettings(n_p, EXTRA, EXTRA, Mode.GAMMA, g), ALPHA + EXTRA),
        "max": (IRSSettings(n_p, half, half, Mode.MAX), ALPHA + 2 * half),
        "direct-only": (IRSSettings(n_p, EXTRA, ALPHA + EXTRA, Mode.GAMMA, 0.5 + 1e-12), ALPHA + EXTRA),
        "tail-uniform": (IRSSettings(n_p, EXTRA, EXTRA, Mode.TAIL, allocate=False), ALPHA + EXTRA),
        "tail": (IRSSettings(n_p, EXTRA, EXTRA, Mode.TAIL), ALPHA + EXTRA),
        "tail-pilot16": (IRSSettings(n_p, EXTRA, EXTRA, Mode.TAIL, pilot=16), ALPHA + EXTRA),
    }


def run(args) -> dict:
    out = {"sigmas": {}}
    for sigma in args.sigmas:
        study = bench_study(sigma, args.n, args.n0, args.inputs, args.workdir, DEFAULT_BATCH_SIZE)
        model = pipeline.ensure_model(study).eval()
        inputs = pipeline.load_inputs(study, "search")
        cache, built = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
        cert = cache.certified
        print(
            f"sigma {sigma}: cache {'built' if built else 'reused'}, base ACR {cache.summary()['acr']:.4f}, "
            f"g certifies {cert.sum()}/{len(cache)}",
            flush=True,
        )
        res_sigma = {
            "base_acr": cache.summary()["acr"],
            "certified": int(cert.sum()),
            "inputs": len(cache),
            "cache_built_now": built,
            "approximations": {},
        }
        for name in args.approx:
            model_p = apply_approximation(model, preset(name, model)).eval()
            points = []
            for n_p in args.n_ps:
                point = {"n_p": n_p, "budget": int(n_p * cert.sum()), "rules": {}}
                for rule, (settings, stated) in rules(n_p, sigma).items():
                    t0 = time.perf_counter()
                    r = certify_irs(model_p, inputs, cache, settings, device="cpu")
                    ev = r.evaluated
                    assert r.samples <= point["budget"]
                    if rule == "direct-only":
                        assert r.branch_direct[ev].all()
                    else:  # IRSResult states the same level (gamma: alpha_zeta + max(alpha, alpha_d))
                        assert abs(r.alpha - stated) < 1e-12
                    point["rules"][rule] = {
                        "acr": r.acr,
                        "stated_alpha": stated,
                        "gamma": settings.gamma if rule.startswith("gamma") else None,
                        "samples": r.samples,
                        "evaluated": int(ev.sum()),
                        "direct_share": float(r.branch_direct[ev].mean()) if ev.any() else 0.0,
                        "count_min": int(r.counts[ev].min()) if ev.any() else 0,
                        "count_max": int(r.counts[ev].max()) if ev.any() else 0,
                        "cert_acc0": r.certified_accuracy(0.0),
                        "wall_s": time.perf_counter() - t0,
                    }
                points.append(point)
                print(
                    f"  {name:8s} n_p={n_p:5d} " + " | ".join(f"{k} {v['acr']:.4f}" for k, v in point["rules"].items()),
                    flush=True,
                )
            res_sigma["approximations"][name] = points
        out["sigmas"][str(sigma)] = res_sigma
    return out


def write_md(data: dict, path: Path) -> None:
    names = list(next(iter(next(iter(data["sigmas"].values()))["approximations"].values()))[0]["rules"])
    lines = [
        "# IRS branch rules and sample allocation at equal confidence and equal samples",
        "",
        f"Generated by `benchmarks/bench_allocation.py` ({data['date']}).",
        "",
        f"- command: `{data['command']}`",
        f"- machine: {data['machine']}",
        f"- wall time {data['wall_s']:.0f} s; load average at start {data['load_start']}, at end {data['load_end']}",
        f"- settings: n = {data['n']}, n0 = {data['n0']}, alpha = {ALPHA}, inputs = {data['inputs']}, total "
        f"confidence 1 - {ALPHA + EXTRA:g} for every rule; tail mode n_tail = n/2, allocation block 16",
        "- rules: gamma0.99 / gamma* = threshold switch on cached p_a (alpha_zeta = alpha_d = 0.001, stated "
        "alpha + alpha_zeta by DESIGN.md's threshold argument; `IRSResult.alpha` states the same); "
        "max = larger radius (alpha_zeta = alpha_d = 0.0005, union bound); direct-only = direct bound on every input "
        "at "
        "alpha_d = 0.002; tail-uniform / tail / tail-pilot16 = branch "
        "(and counts) from the cache's tail (alpha_zeta = alpha_d = 0.001, alpha + max(alpha_zeta, alpha_d))",
        "- every rule spends at most n_p x (inputs g certifies) replayed samples; tail spends exactly that unless "
        "inputs saturate",
        "",
    ]
    for sigma, rs in data["sigmas"].items():
        lines += [
            f"## sigma = {sigma} (base ACR {rs['base_acr']:.4f}; g certifies {rs['certified']}/{rs['inputs']})",
            "",
        ]
        lines += [
            "| approx | n_p | " + " | ".join(f"ACR {k}" for k in names) + " | tail vs max | tail-pilot16 vs "
            "max | tail counts min–max | direct share (max / tail / tail-pilot16) | gamma* |",
            "|---|---:|" + "---:|" * len(names) + "---:|---:|---|---|---:|",
        ]
        for name, points in rs["approximations"].items():
            for p in points:
                r = p["rules"]
                best = max(r[k]["acr"] for k in names)
                cells = [(f"**{r[k]['acr']:.4f}**" if r[k]["acr"] == best else f"{r[k]['acr']:.4f}") for k in names]
                rel = {k: r[k]["acr"] / r["max"]["acr"] - 1 if r["max"]["acr"] > 0 else float("nan") for k in names}
                lines.append(
                    f"| {name} | {p['n_p']} | " + " | ".join(cells) + f" | {rel['tail']:+.1%} | "
                    f"{rel['tail-pilot16']:+.1%} | "
                    f"{r['tail']['count_min']}–{r['tail']['count_max']} | "
                    f"{r['max']['direct_share']:.0%} / {r['tail']['direct_share']:.0%} / "
                    f"{r['tail-pilot16']['direct_share']:.0%} | {r['gamma*']['gamma']:.4f} |"
                )
        lines.append("")
    path.write_text("\n".join(lines) + "\n" + data.get("notes", ""))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0])
    ap.add_argument("--approx", nargs="+", default=["int8", "prune10", "prune20"])
    ap.add_argument("--n-ps", type=int, nargs="+", default=[100, 200, 400, 800])
    ap.add_argument("--inputs", type=int, default=100)
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--n0", type=int, default=100)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench-runs"))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "allocation_results.md")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.sigmas, args.approx, args.n_ps = [0.5], ["prune20"], [100, 400]
        args.out = Path("/tmp/bench-allocation-quick.md")
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    load_start = [round(x, 2) for x in os.getloadavg()]
    data = run(args)
    data.update(
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        command="python " + " ".join(sys.argv),
        machine=f"nproc {os.cpu_count()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"Python {platform.python_version()}, torch threads 1",
        wall_s=time.perf_counter() - t0,
        load_start=load_start,
        load_end=[round(x, 2) for x in os.getloadavg()],
        n=args.n,
        n0=args.n0,
        inputs=args.inputs,
    )
    notes_marker = "<!-- notes -->"
    if args.out.exists() and notes_marker in args.out.read_text():
        data["notes"] = args.out.read_text()[args.out.read_text().index(notes_marker) :]
    write_md(data, args.out)
    args.out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
