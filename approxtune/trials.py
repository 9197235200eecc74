"""What a study's finished trials hold: feasibility, the Pareto front, and each trial's exact record.

A complete trial keeps its exact result and the certified radius of every search input in the trial system attribute
:data:`RESULT_ATTR` (JSON, radii as zlib-compressed float64: exact, a few KB); its user attributes are rounded for
reading (:meth:`approxtune.search.TrialResult.to_attrs`).  Imports no torch, so showing a front stays fast.
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from pathlib import Path

import numpy as np
import optuna

__all__ = [
    "DIGEST_FILE",
    "FINISHED",
    "FRONT_FILES",
    "RESULT_ATTR",
    "decode_radii",
    "dominates",
    "encode_radii",
    "feasible",
    "front",
    "front_digest",
    "front_files",
    "front_files_current",
    "trial_radii",
]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
"""Trials that count towards search.trials: a trial stopped by racing was a candidate evaluated."""

RESULT_ATTR = "approxtune:result"
"""Trial system attribute holding a complete trial's exact result and its per-input radii
(:meth:`approxtune.search.TrialResult.record`)."""


def dominates(a: tuple, b: tuple) -> bool:
    """Whether values ``a`` Pareto-dominate ``b`` (ACR, accuracy, size): ACR and accuracy at least as high, size at
    most as large, not equal."""
    return a[0] >= b[0] and a[1] >= b[1] and a[2] <= b[2] and tuple(a) != tuple(b)


def encode_radii(radii: np.ndarray) -> str:
    """The radii as text for a storage attribute: zlib-compressed little-endian float64, base64 (exact, a few KB)."""
    return base64.b64encode(zlib.compress(np.asarray(radii, dtype="<f8").tobytes(), 9)).decode("ascii")


def decode_radii(text: str) -> np.ndarray:
    """Inverse of :func:`encode_radii`."""
    return np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype="<f8").astype(np.float64)


def trial_radii(trial: optuna.trial.FrozenTrial) -> np.ndarray | None:
    """The certified radius of each search input a complete trial recorded, or None (a trial stopped by racing, or
    recorded before approxtune kept radii)."""
    record = trial.system_attrs.get(RESULT_ATTR)
    radii = None if record is None else json.loads(record).get("radii")
    return None if radii is None else decode_radii(radii)


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial met the study's constraints (Optuna constraint values, feasible when all are <= 0)."""
    return bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values())


def front(optuna_study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The feasible Pareto-optimal trials by decreasing ACR (then size), each configuration once.

    A repeated configuration (a sampler proposing it again) is the same f^p with the same certificate, so its repeats
    are left out: the front keeps the configuration's first trial.
    """
    trials = sorted((t for t in optuna_study.best_trials if feasible(t)), key=lambda t: t.number)
    seen, unique = set(), []
    for trial in trials:
        config = json.dumps(trial.user_attrs.get("config"), sort_keys=True)
        if config not in seen or trial.user_attrs.get("config") is None:
            seen.add(config)
            unique.append(trial)
    return sorted(unique, key=lambda t: (-t.values[0], t.values[2]))


FRONT_FILES = ("front.png", "front.html")
"""The front's plots in a study's output directory (:func:`approxtune.plots.write_front` draws them)."""
DIGEST_FILE = "front.digest"
"""Beside them: the :func:`front_digest` of the study they show."""


def front_digest(study: optuna.Study) -> str:
    """SHA-256 of everything the front plots show: the study's name and attributes and each complete trial's number,
    values, feasibility and user attributes."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    trials = [(t.number, t.values, feasible(t), t.user_attrs) for t in complete]
    text = json.dumps([study.study_name, study.user_attrs, trials], sort_keys=True, default=str)
    return hashlib.sha256(f"front plots {len(FRONT_FILES)}|{text}".encode()).hexdigest()


def front_files(output_dir: str | Path) -> list[Path]:
    """The paths of :data:`FRONT_FILES` in ``output_dir``."""
    return [Path(output_dir) / name for name in FRONT_FILES]


def front_files_current(output_dir: str | Path, digest: str) -> bool:
    """Whether the front's plots in ``output_dir`` show the study whose :func:`front_digest` is ``digest`` (so that
    nothing needs drawing, and the plotting libraries need not even be imported)."""
    record = Path(output_dir) / DIGEST_FILE
    current = record.is_file() and record.read_text().strip() == digest
    return current and all(p.is_file() for p in front_files(output_dir))
