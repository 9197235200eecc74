"""Presenting a study's Pareto front: rows for a table or JSON, and a plot of ACR against size."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
from optuna.trial import TrialState

from approxtune.search import feasible, front

__all__ = ["front_rows", "plot_front"]


def _row(trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    return {
        "trial": trial.number,
        "acr": trial.values[0],
        "accuracy": trial.values[1],
        "size_bytes": int(trial.values[2]),
        "size_ratio": attrs.get("size_ratio"),
        "baseline": attrs.get("baseline"),
        "summary": attrs.get("summary"),
        "certified_accuracy": attrs.get("certified_accuracy"),
        "mean_zeta": attrs.get("mean_zeta"),
        "direct_share": attrs.get("direct_share"),
        "confidence": attrs.get("confidence"),
        "config": attrs.get("config"),
    }


def front_rows(study: optuna.Study) -> list[dict]:
    """One dict per feasible Pareto-optimal trial, by decreasing ACR."""
    return [_row(t) for t in front(study)]


def plot_front(study: optuna.Study, path: str | Path) -> Path:
    """PNG of every complete trial's ACR against size ratio, coloured by accuracy; front and baselines marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = {t.number for t in front(study)}
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ratio = [t.user_attrs["size_ratio"] for t in trials]
    points = ax.scatter(
        ratio,
        [t.values[0] for t in trials],
        c=[t.values[1] for t in trials],
        cmap="viridis",
        s=[60 if t.number in best else 22 for t in trials],
        edgecolors=["red" if t.number in best else "none" for t in trials],
        linewidths=1.5,
    )
    fig.colorbar(points, ax=ax, label="clean accuracy")
    for t in trials:
        if t.user_attrs.get("baseline"):
            ax.annotate(t.user_attrs["baseline"], (t.user_attrs["size_ratio"], t.values[0]), fontsize=7)
        if not feasible(t):
            ax.scatter([t.user_attrs["size_ratio"]], [t.values[0]], marker="x", color="grey", s=30)
    ax.set_xlabel("model size / fp32 size")
    ax.set_ylabel("ACR (IRS, search inputs)")
    ax.set_title(f"{study.study_name}: red rings = Pareto front, x = infeasible")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}.png")  # workers sharing output_dir may plot at once
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
