"""Figures of a study: the Pareto front (``front.png``, and ``front.html`` to hover over) and certified-accuracy curves
(``curves.png``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.transforms import Bbox
from optuna.trial import TrialState

from approxtune.report import Curve, base_row
from approxtune.statistics import certified_accuracy_curve
from approxtune.trials import DIGEST_FILE, feasible, front, front_digest, front_files, front_files_current

__all__ = [
    "curves_figure",
    "front_figure",
    "front_html",
    "front_plotly",
    "plot_curves",
    "plot_front",
    "write_front",
]

LABEL_OFFSETS = ((5, 4), (5, -4), (-5, 4), (-5, -4), (0, 8), (0, -8), (9, 0), (-9, 0))
"""Where a point's label may go, in points from the point; the first that overlaps no earlier label is taken."""
MARKER_RADII = {False: 2.5, True: 4.5}
"""Marker radius in points of a trial off the front and of one on it (with its ring)."""


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _size_ratio(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> float:
    fp32 = study.user_attrs.get("fp32_size_bytes")
    return trial.values[2] / fp32 if fp32 else trial.user_attrs["size_ratio"]


def _confidence_caption(study: optuna.Study) -> str:
    attrs = study.user_attrs
    parts = [f"{attrs.get('search_inputs', '?')} search inputs, σ = {attrs.get('sigma', '?')}"]
    if "confidence" in attrs:
        parts.append(f"each trial's certificate (IRS) holds with probability ≥ {attrs['confidence']:.4g}")
    if "alpha" in attrs:
        parts.append(f"g's (Cohen) with ≥ {1 - attrs['alpha']:.4g}")
    return "; ".join(parts)


def _write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` then rename ``tmp`` to ``path``: workers sharing an output_dir may plot at once."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}{path.suffix}")
    write(tmp)
    os.replace(tmp, path)
    return path


def _place_labels(
    fig: Figure, ax, labels: list[tuple[str, tuple[float, float], str]], points: list[tuple[float, float, float]]
) -> None:
    """Annotate each ``(text, (x, y), colour)`` next to its point, at the first offset of :data:`LABEL_OFFSETS` whose
    box overlaps no label placed before and no marker of ``points`` (``(x, y, radius in points)``); else at the
    least overlapping one."""
    renderer = FigureCanvasAgg(fig).get_renderer()
    scale = fig.dpi / 72
    centres = ax.transData.transform([(x, y) for x, y, _ in points]) if points else []
    markers = [
        Bbox.from_bounds(px - r * scale, py - r * scale, 2 * r * scale, 2 * r * scale)
        for (px, py), (_, _, r) in zip(centres, points, strict=True)
    ]
    placed = []
    for text, xy, colour in labels:
        best = None
        for dx, dy in LABEL_OFFSETS:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            ann = ax.annotate(
                text, xy, xytext=(dx, dy), textcoords="offset points", fontsize=7, color=colour, ha=ha, va=va
            )
            box = ann.get_window_extent(renderer)
            overlap = sum(_overlap(box, other) for other in (*placed, *markers))
            if best is None or overlap < best[0]:
                if best is not None:
                    best[1].remove()
                best = (overlap, ann, box)
            else:
                ann.remove()
            if overlap == 0:
                break
        placed.append(best[2])


def _overlap(a, b) -> float:
    width = min(a.x1, b.x1) - max(a.x0, b.x0)
    height = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(width, 0.0) * max(height, 0.0)


def front_figure(study: optuna.Study) -> Figure:
    """Every complete trial's ACR against its size relative to fp32, coloured by clean accuracy.

    Pareto-front trials are ringed in red and labelled with their trial number (and baseline name); baselines off
    the front are labelled in grey; a dashed line marks the base model g's ACR; infeasible trials are grey crosses
    (and in the legend) only when there are any.  The caption states the certificates' confidence.
    """
    trials = _complete(study)
    best = {t.number for t in front(study)}
    fig = Figure(figsize=(8, 5.2), dpi=120)
    ax = fig.add_subplot()
    ok = [t for t in trials if feasible(t)]
    bad = [t for t in trials if not feasible(t)]
    points = ax.scatter(
        [_size_ratio(study, t) for t in ok],
        [t.values[0] for t in ok],
        c=[t.values[1] for t in ok],
        cmap="viridis",
        s=[(2 * MARKER_RADII[t.number in best]) ** 2 for t in ok],
        edgecolors=["red" if t.number in best else "none" for t in ok],
        linewidths=1.5,
        zorder=3,
    )
    if ok:
        fig.colorbar(points, ax=ax, label="clean accuracy (search inputs)")
    handles = [
        Line2D([], [], ls="", marker="o", mfc="none", mec="red", mew=1.5, ms=8, label="Pareto front (trial number)")
    ]
    if bad:
        ax.scatter([_size_ratio(study, t) for t in bad], [t.values[0] for t in bad], marker="x", color="grey", s=30)
        handles.append(Line2D([], [], ls="", marker="x", color="grey", label="infeasible (search.constraints)"))
    base = base_row(study)
    if base is not None:
        line = ax.axhline(base["acr"], color="black", ls="--", lw=1, zorder=1)
        line.set_label(f"base model g: ACR {base['acr']:.4f} (Cohen, n = {base['n']})")
        handles.append(line)
    ax.set_xlabel("model size / fp32 size")
    ax.set_ylabel("ACR (IRS, search inputs)")
    ax.set_title(f"{study.study_name}: ACR against size, {len(trials)} complete trials", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=3, frameon=False)
    fig.text(0.01, 0.01, _confidence_caption(study), fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    points = [(_size_ratio(study, t), t.values[0], MARKER_RADII[t.number in best]) for t in trials]
    labels = []
    for t in sorted(trials, key=lambda t: (t.number not in best, -t.values[0])):
        name = t.user_attrs.get("baseline")
        if t.number in best:
            labels.append((f"{t.number}" + (f" {name}" if name else ""), (_size_ratio(study, t), t.values[0]), "black"))
        elif name:
            labels.append((f"{t.number} {name}", (_size_ratio(study, t), t.values[0]), "grey"))
    _place_labels(fig, ax, labels, points)
    return fig


def plot_front(study: optuna.Study, path: str | Path) -> Path:
    """:func:`front_figure` as a PNG at ``path`` (written atomically)."""
    return _write(path, front_figure(study).savefig)


def _hover(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    attrs = trial.user_attrs
    config = attrs.get("config") or {"layers": {}}
    layers = "<br>".join(
        f"  {name}: {c['precision']}" + (f", {c['prune']:.0%} pruned" if c["prune"] else "")
        for name, c in config["layers"].items()
    )
    title = f"trial {trial.number}" + (f" (baseline {attrs['baseline']})" if attrs.get("baseline") else "")
    status = "" if feasible(trial) else "<br><i>infeasible</i>"
    return (
        f"<b>{title}</b><br>ACR {trial.values[0]:.4f}<br>accuracy {trial.values[1]:.4f}<br>"
        f"size {int(trial.values[2]):,} bytes ({_size_ratio(study, trial):.1%} of fp32)<br>"
        f"certificate holds with probability ≥ {attrs.get('confidence', float('nan')):.4g}{status}<br>"
        f"layers:<br>{layers}"
    )


def front_plotly(study: optuna.Study):  # -> plotly.graph_objects.Figure
    """An interactive version of :func:`front_figure` (plotly): hovering a point shows its trial number, per-layer
    configuration, ACR, accuracy, size and confidence."""
    import plotly.graph_objects as go  # only the HTML plot needs plotly (~0.5 s to import)

    trials = _complete(study)
    best = {t.number for t in front(study)}
    fig = go.Figure()
    ok = [t for t in trials if feasible(t)]
    fig.add_trace(
        go.Scatter(
            x=[_size_ratio(study, t) for t in ok],
            y=[t.values[0] for t in ok],
            mode="markers+text",
            text=[str(t.number) if t.number in best else "" for t in ok],
            textposition="top center",
            textfont={"size": 10},
            hovertext=[_hover(study, t) for t in ok],
            hoverinfo="text",
            marker={
                "color": [t.values[1] for t in ok],
                "colorscale": "Viridis",
                "colorbar": {"title": {"text": "accuracy"}},
                "size": [13 if t.number in best else 7 for t in ok],
                "line": {"color": ["red" if t.number in best else "rgba(0,0,0,0)" for t in ok], "width": 2},
            },
            name="trials (red ring: Pareto front)",
        )
    )
    bad = [t for t in trials if not feasible(t)]
    if bad:
        fig.add_trace(
            go.Scatter(
                x=[_size_ratio(study, t) for t in bad],
                y=[t.values[0] for t in bad],
                mode="markers",
                marker={"symbol": "x", "color": "grey", "size": 8},
                hovertext=[_hover(study, t) for t in bad],
                hoverinfo="text",
                name="infeasible (search.constraints)",
            )
        )
    base = base_row(study)
    if base is not None:
        fig.add_hline(
            y=base["acr"],
            line_dash="dash",
            line_color="black",
            annotation_text=f"base model g: ACR {base['acr']:.4f} (Cohen, n = {base['n']})",
            annotation_position="bottom left",
        )
    fig.update_layout(
        title={"text": f"{study.study_name}: ACR against size<br><sup>{_confidence_caption(study)}</sup>"},
        xaxis_title="model size / fp32 size",
        yaxis_title="ACR (IRS, search inputs)",
        template="plotly_white",
        showlegend=True,
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def front_html(study: optuna.Study, path: str | Path) -> Path:
    """:func:`front_plotly` as a self-contained HTML file (plotly.js inside: it works offline, ~4.8 MB)."""
    fig = front_plotly(study)
    # A fixed div id: the same study writes the same bytes (an export attaches an unchanged plot only once).
    return _write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs=True, div_id="front"))


def write_front(study: optuna.Study, output_dir: str | Path) -> list[Path]:
    """``front.png`` and ``front.html`` (:data:`approxtune.trials.FRONT_FILES`) in ``output_dir``, drawn again only
    when what they show changed (:func:`approxtune.trials.front_digest`, kept in ``front.digest``): drawing both takes
    about a second."""
    paths = front_files(output_dir)
    digest = front_digest(study)
    if not front_files_current(output_dir, digest):
        plot_front(study, paths[0])
        front_html(study, paths[1])
        _write(Path(output_dir) / DIGEST_FILE, lambda tmp: tmp.write_text(digest + "\n"))
    return paths


def curves_figure(curves: list[Curve], title: str) -> Figure:
    """Certified accuracy against radius (Cohen et al.'s Fig. 1): for each curve, the fraction of its inputs whose
    certified radius is positive and at least r.  g is black, each trial has a colour, its held-out export dashed;
    the caption says which inputs each kind of line was certified on."""
    top = max((float(c.radii.max()) for c in curves if c.radii.size), default=1.0) or 1.0
    grid = np.linspace(0.0, top * 1.05, 400)
    fig = Figure(figsize=(8, 5), dpi=120)
    ax = fig.add_subplot()
    colours = {}
    palette = iter(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"))
    for curve in curves:
        accuracy = [a for _, a in certified_accuracy_curve(curve.radii, grid)]
        if curve.trial is None:
            style = {"color": "black", "lw": 2.0}
        else:
            colour = colours.setdefault(curve.trial, next(palette, "tab:gray"))
            style = {"color": colour, "lw": 1.4, "ls": "--" if curve.split == "report" else "-"}
        label = f"{curve.label}: ACR {curve.acr:.4f}, holds w.p. ≥ {curve.confidence:.4g}"
        ax.plot(grid, accuracy, label=label, **style)
    ax.set_xlabel("radius r (ℓ2)")
    ax.set_ylabel("certified accuracy at r")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, grid[-1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    sizes = {c.split: len(c.radii) for c in curves}
    caption = []
    if "search" in sizes:
        caption.append(f"solid: certificates on the {sizes['search']} search inputs the trials were chosen on")
    if "report" in sizes:
        caption.append(f"dashed: an export's held-out certificate ({sizes['report']} report inputs, fresh noise)")
    fig.text(0.01, 0.01, "; ".join(caption), fontsize=7, color="dimgray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig


def plot_curves(curves: list[Curve], path: str | Path, title: str) -> Path:
    """:func:`curves_figure` as a PNG at ``path`` (written atomically)."""
    return _write(path, curves_figure(curves, title).savefig)
