"""The Optuna study: per-layer approximation choices scored by IRS against one cached base certification.

Each trial samples a precision and a pruning amount for every searched layer, builds f^p
(:func:`approxtune.approximation.apply_approximation`), and measures three objectives:

* **ACR** (maximise): IRS's average certified radius of g^p on the search inputs, zeros included; every certificate
  holds with probability ``>= 1 - (alpha + alpha_zeta + alpha_d)``;
* **accuracy** (maximise): f^p's clean accuracy on the search inputs;
* **size** (minimise): the bytes of f^p's compressed weights (:func:`approxtune.approximation.model_size_bytes`).

``study.best_trials`` is the Pareto front.  Trials carry their numbers as user attributes, so optuna-dashboard shows
them; the study records what its trials were certified against and refuses to resume against anything else.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import optuna
import torch
from torch import nn

from approxtune.approximation import (
    PRESETS,
    ApproximationConfig,
    LayerChoice,
    apply_approximation,
    compress_model,
    compressible_layers,
    fp32_size_bytes,
    model_size_bytes,
)
from approxtune.cache import BaseCache
from approxtune.config import Study
from approxtune.data import Inputs
from approxtune.irs import certify_irs

__all__ = [
    "OBJECTIVES",
    "TrialResult",
    "create_study",
    "enqueue_baselines",
    "evaluate",
    "front",
    "make_objective",
    "study_attrs",
]

OBJECTIVES = ("ACR", "accuracy", "size_bytes")
DIRECTIONS = ("maximize", "maximize", "minimize")
REPORT_RADII = (0.25, 0.5, 0.75, 1.0)


class StudyMismatchError(ValueError):
    """An existing Optuna study that was run against another cache or other IRS settings."""


def clean_accuracy(model: nn.Module, inputs: Inputs, device: torch.device | str = "cpu") -> float:
    """Accuracy of ``model`` on the unperturbed inputs."""
    with torch.inference_mode():
        preds = [model.eval()(inputs.x[i : i + 1024].to(device)).argmax(1).cpu() for i in range(0, len(inputs), 1024)]
    return float((torch.cat(preds) == inputs.y).float().mean())


@dataclass
class TrialResult:
    """What one candidate scores; ``to_attrs`` is what a trial records."""

    config: ApproximationConfig
    acr: float
    accuracy: float
    size_bytes: int
    size_ratio: float
    certified_accuracy: dict[str, float]
    mean_zeta: float
    direct_share: float
    confidence: float
    samples: int
    seconds: float
    radii: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0))

    @property
    def values(self) -> tuple[float, float, int]:
        return (self.acr, self.accuracy, self.size_bytes)

    def to_attrs(self) -> dict:
        attrs = {k: v for k, v in asdict(self).items() if k not in ("config", "radii")}
        attrs["config"] = self.config.to_dict()
        attrs["summary"] = self.config.summary()
        attrs["mean_zeta"] = None if math.isnan(self.mean_zeta) else self.mean_zeta
        return attrs


def evaluate(
    model: nn.Module,
    config: ApproximationConfig,
    inputs: Inputs,
    cache: BaseCache,
    study: Study,
    device: torch.device | str = "cpu",
) -> TrialResult:
    """Build f^p from ``config`` and score it: clean accuracy, IRS against ``cache``, compressed size."""
    start = time.perf_counter()
    packed = compress_model(model, config)
    approx = apply_approximation(model, config, packed).to(device)
    accuracy = clean_accuracy(approx, inputs, device)
    settings = study.irs_settings
    result = certify_irs(approx, inputs.x, cache, settings, batch_size=study.certify.batch_size, device=device)
    size = model_size_bytes(model, config, packed)
    return TrialResult(
        config=config,
        acr=result.acr,
        accuracy=accuracy,
        size_bytes=size,
        size_ratio=size / fp32_size_bytes(model),
        certified_accuracy={f"{r:g}": result.certified_accuracy(r) for r in REPORT_RADII},
        mean_zeta=result.mean_zeta,
        direct_share=result.direct_share,
        confidence=1.0 - result.alpha,
        samples=result.samples,
        seconds=time.perf_counter() - start,
        radii=result.radius,
    )


def searched_layers(study: Study, model: nn.Module) -> list[str]:
    """The layers the search chooses for: compressible layers matching ``search.include`` minus ``search.exclude``."""
    return compressible_layers(model, study.search.include, study.search.exclude or None)


def suggest_config(trial: optuna.Trial, layers: Sequence[str], study: Study) -> ApproximationConfig:
    """Sample one precision and one pruning amount per layer (parameters ``<layer>.precision`` / ``<layer>.prune``)."""
    space = study.search
    return ApproximationConfig(
        {
            name: LayerChoice(
                trial.suggest_categorical(f"{name}.precision", space.precisions),
                trial.suggest_categorical(f"{name}.prune", space.prune),
            )
            for name in layers
        }
    )


def cache_fingerprint(cache: BaseCache) -> str:
    """SHA-256 of the cache's metadata, which determines its contents (model, inputs, sigma, n, alpha, seed)."""
    return hashlib.sha256(cache.meta.to_json().encode()).hexdigest()


def study_attrs(study: Study, cache: BaseCache, base_accuracy: float, model: nn.Module) -> dict:
    """What a study records about the certificate its trials build on; resuming requires the same values."""
    i = study.irs
    return {
        "cache_fingerprint": cache_fingerprint(cache),
        "sigma": cache.meta.sigma,
        "n": cache.meta.n,
        "alpha": cache.meta.alpha,
        "n_p": i.n_p,
        "alpha_zeta": i.alpha_zeta,
        "alpha_d": i.alpha_d,
        "irs_mode": i.mode,
        "gamma": i.gamma,
        "confidence": 1.0 - study.irs_settings.total_alpha(cache.meta.alpha),
        "search_inputs": len(cache),
        "base_acr": float(cache.summary()["acr"]),
        "base_accuracy": base_accuracy,
        "fp32_size_bytes": fp32_size_bytes(model),
    }


CHECKED_ATTRS = ("cache_fingerprint", "sigma", "n", "alpha", "n_p", "alpha_zeta", "alpha_d", "irs_mode", "gamma")


def make_sampler(study: Study) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded; it reads the constraints each trial sets (``Trial.set_constraint``)."""
    seed, name = study.study.seed, study.search.sampler
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=study.search.population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


def feasible(trial: optuna.trial.FrozenTrial) -> bool:
    """Whether the trial met the study's constraints (Optuna constraint values, feasible when all are <= 0)."""
    return bool(trial.constraints) and all(v <= 0 for v in trial.constraints.values())


def storage(url: str) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats: a trial whose worker died is marked FAIL and enqueued again (twice at most)."""
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=2)
    return RDBStorage(
        url,
        heartbeat_interval=30,
        grace_period=90,
        heartbeat_stale_trial_callback=retry,
        engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None,
    )


def create_study(study: Study, attrs: dict) -> optuna.Study:
    """Create or resume the Optuna study; refuse to resume one recorded against another cache or IRS setting."""
    optuna_study = optuna.create_study(
        study_name=study.name,
        storage=storage(study.storage),
        directions=list(DIRECTIONS),
        sampler=make_sampler(study),
        load_if_exists=True,
    )
    recorded = optuna_study.user_attrs
    if recorded:
        diffs = [
            f"{k}: study has {recorded.get(k)!r}, now {attrs[k]!r}"
            for k in CHECKED_ATTRS
            if recorded.get(k) != attrs[k]
        ]
        if diffs:
            raise StudyMismatchError(
                f"study {study.name!r} in {study.storage} was run against another base certification or IRS "
                "setting:\n  " + "\n  ".join(diffs) + "\nUse a new study name (study.name) or delete the study."
            )
    else:
        for key, value in attrs.items():
            optuna_study.set_user_attr(key, value)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna_study.set_metric_names(list(OBJECTIVES))
    return optuna_study


def load_existing_study(study: Study) -> optuna.Study | None:
    """The study's Optuna study if it exists (an SQLite file is not created when it is missing)."""
    url = study.storage
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        return optuna.load_study(study_name=study.name, storage=storage(url))
    except KeyError:
        return None


def baseline_params(study: Study, layers: Sequence[str]) -> dict[str, dict]:
    """Parameters of fp32 and the paper's uniform approximations that the search space can express."""
    out = {}
    for name, choice in PRESETS.items():
        if choice.precision in study.search.precisions and choice.prune in study.search.prune:
            params = {}
            for layer in layers:
                params[f"{layer}.precision"] = choice.precision
                params[f"{layer}.prune"] = choice.prune
            out[name] = params
    return out


def enqueue_baselines(optuna_study: optuna.Study, study: Study, layers: Sequence[str]) -> list[str]:
    """Enqueue the baselines (skipping those already in the study); returns the names enqueued."""
    names = []
    for name, params in baseline_params(study, layers).items():
        optuna_study.enqueue_trial(params, user_attrs={"baseline": name}, skip_if_exists=True)
        names.append(name)
    return names


def make_objective(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    cache: BaseCache,
    base_accuracy: float,
    device: torch.device | str,
    on_result: Callable[[optuna.Trial, TrialResult], None] | None = None,
) -> Callable[[optuna.Trial], tuple[float, float, int]]:
    layers = searched_layers(study, model)
    limits = study.search.constraints

    def objective(trial: optuna.Trial) -> tuple[float, float, int]:
        config = suggest_config(trial, layers, study)
        result = evaluate(model, config, inputs, cache, study, device)
        for key, value in result.to_attrs().items():
            trial.set_user_attr(key, value)
        accuracy_drop = base_accuracy - result.accuracy
        trial.set_constraint("accuracy_drop", accuracy_drop - limits.max_accuracy_drop)
        trial.set_constraint("size_ratio", result.size_ratio - limits.max_size_ratio)
        # optuna-dashboard 0.21 does not show Optuna 5's trial constraints: repeat them as user attrs.
        trial.set_user_attr("accuracy_drop", accuracy_drop)
        trial.set_user_attr(
            "feasible", accuracy_drop <= limits.max_accuracy_drop and result.size_ratio <= limits.max_size_ratio
        )
        if on_result is not None:
            on_result(trial, result)
        return result.values

    return objective


def front(optuna_study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The feasible Pareto-optimal trials, by decreasing ACR."""
    trials = [t for t in optuna_study.best_trials if feasible(t)]
    return sorted(trials, key=lambda t: (-t.values[0], t.values[2]))
