"""What optuna-dashboard shows of a trial beyond its values: one user attribute per layer, and a markdown note (the
per-layer choices and the certificate's numbers) written with optuna-dashboard's note API (``save_note``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import optuna

from approxtune.approximation import ApproximationConfig, LayerChoice

__all__ = ["describe", "layer_attrs", "save_trial_note", "trial_note"]

LAYER_ATTR = "layer "
"""Prefix of the per-layer user attributes: ``layer conv1`` = ``int4, 20% pruned``."""


def describe(choice: LayerChoice) -> str:
    """A layer's choice in words, e.g. ``int8`` or ``int4, 20% pruned``."""
    return choice.precision + (f", {choice.prune:.0%} pruned" if choice.prune else "")


def layer_attrs(config: ApproximationConfig) -> dict[str, str]:
    """One user attribute per layer (``layer <name>``), in the model's order; a global pruning amount as its own."""
    attrs = {f"{LAYER_ATTR}{name}": describe(choice) for name, choice in config.layers.items()}
    if config.global_prune:
        attrs["global prune"] = f"{config.global_prune:.0%} of the weights of all layers together"
    return attrs


def _layer_table(config: Mapping[str, Any]) -> list[str]:
    lines = ["| layer | precision | pruned (L1) |", "|:--|:--|--:|"]
    for name, choice in config["layers"].items():
        pruned = f"{choice['prune']:.0%}" if choice["prune"] else "–"
        lines.append(f"| `{name}` | {choice['precision']} | {pruned} |")
    if config.get("global_prune"):
        lines.append(f"| all together | | {config['global_prune']:.0%} |")
    return lines


def trial_note(number: int, attrs: Mapping[str, Any], base: Mapping[str, float], violation: str | None = None) -> str:
    """The markdown note of a finished trial, from its (rounded) user attributes.

    ``base`` holds the base model g's ``acr`` and ``accuracy`` on the same inputs, shown beside the trial's;
    ``violation`` is the constraint a complete trial breaks (None: feasible).
    """
    title = f"### Trial {number}" + (f" · baseline `{attrs['baseline']}`" if attrs.get("baseline") else "")
    if "stopped" in attrs:
        stage = attrs["race_stage"]
        when = f"after {stage:.1%} of its samples" if stage else "before its first sample"
        lines = [
            f"{title} · stopped by racing",
            "",
            f"Stopped {when}: {attrs['stopped']}. Only a trial that runs its full budget reports a certificate; this "
            "is what it had seen.",
            "",
            "| | |",
            "|:--|--:|",
            f"| best reachable ACR | ≤ {attrs['upper_acr']:.4f} (base model g: {base['acr']:.4f}) |",
            f"| clean accuracy | {attrs['accuracy']:.4f} (g: {base['accuracy']:.4f}) |",
            f"| size | {attrs['size_bytes']:,} bytes |",
            f"| forward passes | {attrs['samples']:,} |",
            "",
        ]
        return "\n".join(lines + _layer_table(attrs["config"])) + "\n"
    radii = attrs["certified_accuracy"]
    lines = [
        title,
        "",
        f"**ACR {attrs['acr']:.4f}** (base model g: {base['acr']:.4f}) · **accuracy {attrs['accuracy']:.4f}** "
        f"(g: {base['accuracy']:.4f}) · **{attrs['size_bytes']:,} bytes** ({attrs['size_ratio']:.1%} of fp32)",
        "",
        *_layer_table(attrs["config"]),
        "",
        f"**Certificate**: IRS on the search inputs; each radius holds with probability ≥ {attrs['confidence']:.4g}.",
        "",
        "| radius r | " + " | ".join(radii) + " |",
        "|:--|" + "--:|" * len(radii),
        "| certified accuracy at r | " + " | ".join(f"{a:.4f}" for a in radii.values()) + " |",
        "",
        "| | |",
        "|:--|--:|",
        f"| mean ζ (bound on f's lost top-class samples) | {_number(attrs['mean_zeta'])} |",
        f"| radii from the direct bound | {attrs['direct_share']:.1%} |",
        f"| forward passes | {attrs['samples']:,} |",
        f"| time | {attrs['seconds']:.2f} s |",
        f"| feasible | {'yes' if violation is None else f'no: {violation}'} |",
    ]
    if attrs.get("same_as") is not None:
        lines += ["", f"Same configuration as trial {attrs['same_as']}: its certificate, no sample evaluated again."]
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def save_trial_note(trial: optuna.Trial, base: Mapping[str, float], violation: str | None = None) -> None:
    """Write :func:`trial_note` of a running trial's user attributes as its optuna-dashboard note."""
    # Imported here: optuna_dashboard imports optuna.importance and its dependencies (~1-2 s), which commands that
    # only read a study (``front``) do not need.
    from optuna_dashboard import save_note

    save_note(trial, trial_note(trial.number, trial.user_attrs, base, violation))
