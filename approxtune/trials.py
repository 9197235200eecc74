"""What a study's finished trials hold: feasibility, the Pareto front, and each trial's exact record.

A complete trial keeps its exact result and the certified radius of every search input in the trial system attribute
:data:`RESULT_ATTR` (JSON, radii as zlib-compressed float64: exact, a few KB); its user attributes are rounded for
reading (:meth:`approxtune.search.TrialResult.to_attrs`).  Imports no torch, so showing a front stays fast.
"""

from __future__ import annotations

import base64
import json
import zlib

import numpy as np
import optuna

__all__ = ["FINISHED", "RESULT_ATTR", "decode_radii", "encode_radii", "feasible", "front", "trial_radii"]

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
"""Trials that count towards search.trials: a trial stopped by racing was a candidate evaluated."""

RESULT_ATTR = "approxtune:result"
"""Trial system attribute holding a complete trial's exact result and its per-input radii
(:meth:`approxtune.search.TrialResult.record`)."""


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
