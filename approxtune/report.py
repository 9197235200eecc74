"""A study's results as data: the Pareto front's rows with the base model g as the reference row, a compact per-layer
code for tables, and the certified-accuracy curves (per-input radii) of g, of chosen trials and of their exports."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta
from optuna.trial import TrialState
from rich.table import Table

from approxtune.config import Study
from approxtune.statistics import acr
from approxtune.trials import front, trial_radii

__all__ = [
    "Curve",
    "base_radii",
    "base_row",
    "curves",
    "default_curve_trials",
    "front_rows",
    "front_table",
    "layer_code",
    "layer_legend",
    "parse_trials",
]

PRECISION_CODES = {"fp32": "f32", "fp16": "f16", "bf16": "b16", "int8": "i8", "int4": "i4"}
"""Two or three characters per precision in :func:`layer_code`."""


def layer_code(config: dict, baseline: str | None = None) -> str:
    """One short token per layer, in the model's order: ``i8 i4p20 f16 f32`` (``pN``: N% pruned); a uniform
    baseline as ``all int8 (baseline)``.  Tokens are separated by spaces, so a table wraps between layers only."""
    if baseline:
        return f"all {baseline} (baseline)"
    tokens = []
    for choice in config["layers"].values():
        prune = f"p{choice['prune'] * 100:g}" if choice["prune"] else ""
        tokens.append(PRECISION_CODES[choice["precision"]] + prune)
    if config.get("global_prune"):
        tokens.append(f"global-p{config['global_prune'] * 100:g}")
    return " ".join(tokens)


def layer_legend(config: dict) -> str:
    """What :func:`layer_code`'s tokens mean, naming the layers in order."""
    names = " ".join(config["layers"])
    return (
        f"layers, in order: {names}. f32/f16/b16: float weights, i8/i4: integer weights; pN: N% of the layer's "
        "weights pruned (L1)."
    )


def _row(trial: optuna.trial.FrozenTrial, fp32_size: int | None) -> dict:
    attrs = trial.user_attrs
    size = int(trial.values[2])
    return {
        "trial": trial.number,
        "acr": trial.values[0],
        "accuracy": trial.values[1],
        "size_bytes": size,
        "size_ratio": size / fp32_size if fp32_size else attrs.get("size_ratio"),
        "confidence": attrs.get("confidence"),
        "baseline": attrs.get("baseline"),
        "same_as": attrs.get("same_as"),
        "summary": attrs.get("summary"),
        "certified_accuracy": attrs.get("certified_accuracy"),
        "mean_zeta": attrs.get("mean_zeta"),
        "direct_share": attrs.get("direct_share"),
        "config": attrs.get("config"),
    }


def front_rows(study: optuna.Study) -> list[dict]:
    """One dict per feasible Pareto-optimal trial, by decreasing ACR (values exact, from the trial's objectives)."""
    fp32_size = study.user_attrs.get("fp32_size_bytes")
    return [_row(t, fp32_size) for t in front(study)]


def base_row(study: optuna.Study) -> dict | None:
    """The reference row of the base model g (uncompressed, certified by Cohen's CERTIFY with ``n`` samples), from
    what the study recorded when it was created; None for a study without those records."""
    attrs = study.user_attrs
    if not {"base_acr", "base_accuracy", "fp32_size_bytes", "alpha"} <= attrs.keys():
        return None
    return {
        "trial": None,
        "reference": "base model g",
        "acr": attrs["base_acr"],
        "accuracy": attrs["base_accuracy"],
        "size_bytes": attrs["fp32_size_bytes"],
        "size_ratio": 1.0,
        "confidence": 1.0 - attrs["alpha"],
        "n": attrs.get("n"),
    }


def front_table(study: optuna.Study) -> Table | None:
    """The front as a table that fits 80 columns: g first (the reference), then the front by decreasing ACR, each
    with its confidence and a compact per-layer code (:func:`layer_code`, explained in the caption; a repeated
    configuration names its earlier trial); None when the front is empty."""
    rows = front_rows(study)
    if not rows:
        return None
    table = Table(title=f"Pareto front of {study.study_name!r}: ACR up, accuracy up, size down", title_justify="left")
    for column in ("trial", "ACR", "acc.", "bytes", "size", "conf."):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("layers", justify="left", overflow="fold", min_width=12)
    base = base_row(study)
    if base is not None:
        table.add_row(
            "g",
            f"{base['acr']:.4f}",
            f"{base['accuracy']:.4f}",
            f"{base['size_bytes']:,}",
            "100%",
            f"{base['confidence']:.4g}",
            f"base model, reference (Cohen, n = {base['n']})",
            style="dim",
            end_section=True,
        )
    for row in rows:
        table.add_row(
            str(row["trial"]),
            f"{row['acr']:.4f}",
            f"{row['accuracy']:.4f}",
            f"{row['size_bytes']:,}",
            f"{row['size_ratio']:.1%}",
            "-" if row["confidence"] is None else f"{row['confidence']:.4g}",
            layer_code(row["config"], row["baseline"]),
        )
    table.caption = (
        f"{layer_legend(rows[0]['config'])} conf.: the probability with which each certificate holds (g's: Cohen's "
        "CERTIFY; the trials': IRS against it)."
    )
    table.caption_justify = "left"
    return table


def base_radii(config: Study, study: optuna.Study) -> np.ndarray | None:
    """g's certified radius on each search input, from the study's search cache; None when that cache is missing or
    is not the one the study was run against."""
    # imported here: the cache module imports torch, which `approxtune front` without --curves never needs
    from approxtune.cache import CacheError, cache_fingerprint, load_cache

    try:
        cache = load_cache(config.cache_path("search"))
    except CacheError:
        return None
    if cache_fingerprint(cache) != study.user_attrs.get("cache_fingerprint"):
        return None
    return cache.certified_radius


# ------------------------------------------------------------------------------------------ certified accuracy


@dataclass
class Curve:
    """The per-input certified radii (0: not certified) behind one certified-accuracy curve.

    ``trial`` is None for the base model g; ``split`` is ``search`` (the trial's IRS certificate, or g's) or
    ``report`` (an export's held-out certificate); each radius holds with probability ``confidence``.
    """

    label: str
    radii: np.ndarray
    trial: int | None
    split: str
    confidence: float

    @property
    def acr(self) -> float:
        return acr(self.radii)


def parse_trials(text: str) -> list[int]:
    """``"3,8,12"`` as trial numbers; ValueError naming the bad part."""
    numbers = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit():
            raise ValueError(f"--trials takes trial numbers separated by commas (e.g. 3,8,12), got {part!r}")
        numbers.append(int(part))
    return list(dict.fromkeys(numbers))


def default_curve_trials(study: optuna.Study, count: int = 3) -> list[int]:
    """fp32 and ``count`` front trials spread over size (smallest, largest and evenly between), by size."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    fp32 = [t for t in complete if t.user_attrs.get("baseline") == "fp32"][:1]
    candidates = sorted((t for t in front(study) if t not in fp32), key=lambda t: t.values[2])
    picks = np.unique(np.round(np.linspace(0, len(candidates) - 1, min(count, len(candidates)))).astype(int))
    chosen = [candidates[i] for i in picks] + fp32
    return [t.number for t in sorted(chosen, key=lambda t: t.values[2])]


def _trial_label(trial: optuna.trial.FrozenTrial, fp32_size: int | None) -> str:
    name = trial.user_attrs.get("baseline") or layer_code(trial.user_attrs["config"])
    size = f", {trial.values[2] / fp32_size:.1%} of fp32" if fp32_size else ""
    return f"trial {trial.number} ({name}){size}"


def curves(
    study: optuna.Study, trials: list[int], base_radii: np.ndarray | None, artifact_dir: Path | None
) -> tuple[list[Curve], list[str]]:
    """The curves of g (``base_radii``: g's certified radius per search input, None to leave it out), of ``trials``
    (their stored radii) and of the held-out certificates of their exports (``certificate.json`` artifacts in
    ``artifact_dir``).  Returns the curves and notes on what could not be drawn.

    ValueError (checked before anything is read) for a trial that does not exist, is not complete, or has no stored
    radii.
    """
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    chosen = []
    for number in trials:
        trial = by_number.get(number)
        if trial is None:
            raise ValueError(f"--trials: study {study.study_name!r} has no trial {number}")
        if trial.state != TrialState.COMPLETE:
            raise ValueError(f"--trials: trial {number} is {trial.state.name}, only a complete trial has a certificate")
        radii = trial_radii(trial)
        if radii is None:
            raise ValueError(
                f"--trials: trial {number} has no stored radii (it was run by an approxtune that did not keep them); "
                "choose a trial run since"
            )
        chosen.append((trial, radii))
    attrs = study.user_attrs
    fp32_size = attrs.get("fp32_size_bytes")
    out, notes = [], []
    if base_radii is not None:
        label = f"base model g (Cohen, n = {attrs.get('n')})"
        out.append(Curve(label, np.asarray(base_radii, dtype=np.float64), None, "search", 1.0 - attrs["alpha"]))
    for trial, radii in chosen:
        out.append(Curve(_trial_label(trial, fp32_size), radii, trial.number, "search", trial.user_attrs["confidence"]))
        held, note = _held_out(study, trial, artifact_dir)
        out.extend(held)
        notes.extend([note] if note else [])
    return out, notes


def _held_out(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, artifact_dir: Path | None
) -> tuple[list[Curve], str | None]:
    """Curves of the held-out certificates that exports attached to ``trial`` (Optuna artifacts)."""
    metas = [m for m in get_all_artifact_meta(trial, storage=study._storage) if m.filename == "certificate.json"]
    if not metas:
        return [], None
    if artifact_dir is None or not Path(artifact_dir).is_dir():
        return [], f"trial {trial.number} was exported, but its certificate is not in the artifact store {artifact_dir}"
    store = FileSystemArtifactStore(base_path=str(artifact_dir))
    out = []
    for meta in metas:
        try:
            with store.open_reader(meta.artifact_id) as reader:
                cert = json.loads(reader.read())
            for held in cert["certificates"]:  # one per shipped artifact, certified in its runtime
                radii = np.array([p["radius"] for p in held["per_input"]], dtype=np.float64)
                label = (
                    f"trial {trial.number} held out ({held['runtime']}, {cert['method']}, {len(radii)} report "
                    "inputs, fresh noise)"
                )
                out.append(Curve(label, radii, trial.number, "report", cert["confidence"]))
        except (OSError, ValueError, KeyError, TypeError):
            return out, f"trial {trial.number}: its certificate artifact {meta.artifact_id} cannot be read"
    return sorted(out, key=lambda c: c.label), None
