"""What zeta should count: disagreements (the paper), losses of c_hat (approxtune), or losses minus gains (two ways).

For every finished trial of a tuned study (complete or stopped by racing; repeats of an earlier configuration
excepted), f^p replays the study's first ``n_p`` cached samples of every input g certifies, once, and three zeta
bounds are computed from the same counts:

* ``disagreement`` -- the paper's ``UCB(#{f^p != f}, n_p, alpha_zeta)``;
* ``loss`` -- ``UCB(#{f = c_hat != f^p}, n_p, alpha_zeta)`` (``irs.zeta = "loss"``, the default);
* ``signed`` -- ``UCB(#losses, n_p, alpha_zeta / 2) - LCB(#gains, n_p, alpha_zeta / 2)`` with gains
  ``f != c_hat = f^p``: ``P(f^p = c_hat) = P(f = c_hat) - P(loss) + P(gain)``, so it is sound at the same total level
  (union bound over the two halves), but each half pays for the split;
* ``betting`` -- ``irs.zeta = "signed"``: one betting bound on losses minus gains at the full ``alpha_zeta``
  (:func:`approxtune.irs.signed_zeta`), no split.

Each is turned into an ACR two ways, at the default study's total confidence 1 - 0.002: the zeta radius alone
(``alpha_zeta = 0.001``, as the gamma rule with no p_a >= gamma uses it) and the larger of it and the direct radius
(``alpha_zeta = alpha_d = 0.0005``, mode ``max``).  Counting only, no timing: all variants see the same samples.

    approxtune tune studies/digits.toml          # first
    python benchmarks/bench_zeta.py [--study studies/digits.toml]
"""

from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np
import torch
from _harness import distinct_trials, load_tuned, machine, parser, report_only, write_results

from approxtune.approximation import apply_approximation
from approxtune.irs import replay, signed_room, signed_zeta
from approxtune.statistics import acr, lower_confidence_bound, radius, upper_confidence_bound

VARIANTS = ("disagreement", "loss", "signed", "betting")


def zeta_bounds(
    dis: np.ndarray, losses: np.ndarray, gains: np.ndarray, net: np.ndarray, room: np.ndarray, alpha_zeta: float
) -> dict:
    """The four zeta upper bounds of one level, from the per-input counts and the per-sample net change ``net``."""
    n_p = net.shape[1]
    half = alpha_zeta / 2
    return {
        "disagreement": upper_confidence_bound(dis, n_p, alpha_zeta),
        "loss": upper_confidence_bound(losses, n_p, alpha_zeta),
        "signed": upper_confidence_bound(losses, n_p, half) - lower_confidence_bound(gains, n_p, half),
        "betting": signed_zeta(net, n_p, n_p, alpha_zeta, room=room),
    }


def main() -> None:
    args = parser(__doc__, "benchmarks/zeta_results").parse_args()
    if report_only(args, write_report):
        return
    torch.set_num_threads(1)
    (study, model, inputs, cache, _), optuna_study = load_tuned(args.study)
    n_p, sigma, n_inputs = study.irs.n_p, cache.meta.sigma, len(cache)
    rows = np.flatnonzero(cache.certified)
    p_a = cache.p_a[rows]
    room = signed_room(cache, rows)
    c_hat = cache.c_hat[rows, None]
    f_preds = np.asarray(cache.predictions[rows, :n_p])
    f_hit = f_preds == c_hat
    trials = []
    for trial, config in distinct_trials(optuna_study):
        preds = replay(apply_approximation(model, config), inputs, cache, rows, n_p)
        p_hit = preds == c_hat
        dis = (preds != f_preds).sum(axis=1)
        losses, gains = (f_hit & ~p_hit).sum(axis=1), (~f_hit & p_hit).sum(axis=1)
        net = p_hit.astype(np.int8) - f_hit
        zeta_only = zeta_bounds(dis, losses, gains, net, room, 0.001)
        in_max = zeta_bounds(dis, losses, gains, net, room, 0.0005)
        r_direct = radius(lower_confidence_bound(p_hit.sum(axis=1), n_p, 0.0005), sigma)
        row = {
            "trial": trial.number,
            "summary": config.summary(),
            "pruned": config.global_prune > 0 or any(c.prune > 0 for c in config.layers.values()),
            "disagreement_rate": float(dis.sum() / dis.size / n_p),
            "loss_rate": float(losses.sum() / losses.size / n_p),
            "gain_rate": float(gains.sum() / gains.size / n_p),
        }
        for v in VARIANTS:
            row[f"zeta_{v}"] = acr(radius(p_a - zeta_only[v], sigma)) * len(rows) / n_inputs
            row[f"max_{v}"] = acr(np.maximum(radius(p_a - in_max[v], sigma), r_direct)) * len(rows) / n_inputs
        trials.append(row)
        print(
            f"trial {trial.number:3d}  loss/dis {row['loss_rate']:.4f}/{row['disagreement_rate']:.4f}  "
            + "  ".join(f"{k} {row[k]:.4f}" for k in row if k.startswith(("zeta_", "max_"))),
            flush=True,
        )
    data = {
        "meta": {
            "command": f"python benchmarks/bench_zeta.py --study {args.study}",
            "machine": machine(),
            "n": cache.meta.n,
            "n_p": n_p,
            "search_inputs": n_inputs,
            "certified_inputs": len(rows),
        },
        "trials": trials,
    }
    write_results(data, args.out, write_report)


def write_report(data: dict, out: Path) -> None:
    m, trials = data["meta"], data["trials"]
    lines = [
        "# What ζ counts: disagreements, losses of ĉA, or losses minus gains",
        "",
        f"Generated by `{m['command']}` (after `approxtune tune`); {m['machine']}.",
        f"{len(trials)} finished trials (repeats excepted), {m['search_inputs']} search inputs "
        f"({m['certified_inputs']} certified by g), n = {m['n']}, n_p = {m['n_p']}, the same replayed samples for "
        "every variant; total confidence 1 − 0.002 everywhere (ζ alone: α_ζ = 0.001; max: α_ζ = α_d = 0.0005; "
        "signed: α_ζ split in halves between the losses and the gains; betting: one bound on losses minus gains, "
        '`irs.zeta = "signed"`).',
        "",
        "| trials | count | mean loss / disagreement rate | ACR, ζ alone: disagreement / loss / signed / betting "
        "| ACR, max with direct: disagreement / loss / signed / betting | loss over disagreement, ζ alone / max "
        "(median) | betting over loss, ζ alone / max (median) |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for label, subset in (
        ("all", trials),
        ("pruned", [t for t in trials if t["pruned"]]),
        ("unpruned", [t for t in trials if not t["pruned"]]),
    ):
        if not subset:
            continue

        def mean(key: str, subset=subset) -> float:
            return statistics.mean(t[key] for t in subset)

        def gain(prefix: str, better: str = "loss", worse: str = "disagreement", subset=subset) -> float:
            return statistics.median(t[f"{prefix}_{better}"] / t[f"{prefix}_{worse}"] - 1 for t in subset)

        lines.append(
            f"| {label} | {len(subset)} | {mean('loss_rate'):.4f} / {mean('disagreement_rate'):.4f} | "
            + " / ".join(f"{mean('zeta_' + v):.4f}" for v in VARIANTS)
            + " | "
            + " / ".join(f"{mean('max_' + v):.4f}" for v in VARIANTS)
            + f" | {gain('zeta'):+.1%} / {gain('max'):+.1%}"
            + f" | {gain('zeta', 'betting', 'loss'):+.1%} / {gain('max', 'betting', 'loss'):+.1%} |"
        )
    lines += [
        "",
        "Per trial, loss never certifies less than disagreement (every loss is a disagreement); "
        f"signed beats loss on {sum(t['max_signed'] > t['max_loss'] for t in trials)} of {len(trials)} trials "
        f"with max and on {sum(t['zeta_signed'] > t['zeta_loss'] for t in trials)} with ζ alone; betting beats loss "
        f"on {sum(t['max_betting'] > t['max_loss'] for t in trials)} with max and on "
        f"{sum(t['zeta_betting'] > t['zeta_loss'] for t in trials)} with ζ alone.",
        "",
    ]
    assert all(t[f"{p}_loss"] >= t[f"{p}_disagreement"] for t in trials for p in ("zeta", "max"))
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
