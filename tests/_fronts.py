"""Studies built from chosen trial values, in memory: what the report and the plots draw, without running a search."""

import numpy as np
import optuna

from approxtune import search, trials
from approxtune.approximation import ApproximationConfig, LayerChoice

LAYERS = ("conv1", "conv2", "fc1", "fc2")
FP32_SIZE = 100_000
INPUTS = 40


def config(*choices: str) -> ApproximationConfig:
    """``config("int8", "int4/0.2", ...)``: one choice per layer of :data:`LAYERS` (precision[/prune])."""
    layers = {}
    for name, choice in zip(LAYERS, choices, strict=True):
        precision, _, prune = choice.partition("/")
        layers[name] = LayerChoice(precision, float(prune or 0))
    return ApproximationConfig(layers)


def radii_for(acr: float, certified: int, seed: int) -> np.ndarray:
    """:data:`INPUTS` radii, ``certified`` of them positive, whose mean is ``acr``."""
    rng = np.random.default_rng(seed)
    radii = np.zeros(INPUTS)
    positive = rng.uniform(0.5, 1.5, certified)
    radii[:certified] = positive * (acr * INPUTS / positive.sum())
    return radii


def recorded(study: optuna.Study, acr: float, accuracy: float, size: int, cfg: ApproximationConfig, **kw):
    """``(values, user attributes, record)`` of a complete trial as the objective records one (rounded attributes,
    an exact record with radii); ``baseline`` names it, ``certified`` sets how many of its radii are positive,
    ``same_as`` makes it a repeat of that trial (same radii and values), ``radii_of`` gives it that trial's radii
    (another configuration at the same point)."""
    same_as = kw.get("same_as")
    seed = kw.get("radii_of", len(study.trials) if same_as is None else same_as)
    radii = radii_for(acr, kw.get("certified", 30), seed=seed)
    result = search.TrialResult(
        config=cfg,
        acr=float(np.mean(radii)),
        accuracy=accuracy,
        size_bytes=size,
        size_ratio=size / FP32_SIZE,
        certified_accuracy={f"{r:g}": float(np.mean(radii >= r)) for r in search.REPORT_RADII},
        mean_zeta=0.01,
        direct_share=0.1,
        confidence=0.998,
        samples=1000,
        seconds=0.5,
        same_as=same_as,
        radii=radii,
    )
    attrs = result.to_attrs()
    if kw.get("baseline"):
        attrs["baseline"] = kw["baseline"]
    return result.values, attrs, result.record()


def add_trial(study: optuna.Study, acr: float, accuracy: float, size: int, cfg: ApproximationConfig, **kw):
    """Add a complete trial (:func:`recorded`); ``feasible=False`` makes it break a constraint."""
    values, attrs, record = recorded(study, acr, accuracy, size, cfg, **kw)
    trial = optuna.trial.create_trial(
        values=list(values),
        user_attrs=attrs,
        system_attrs={trials.RESULT_ATTR: record},
        constraints={"size_ratio": -0.1 if kw.get("feasible", True) else 0.2},
    )
    study.add_trial(trial)
    return study.trials[-1]


def empty_study(name: str = "synthetic") -> optuna.Study:
    study = optuna.create_study(study_name=name, directions=list(search.DIRECTIONS))
    for key, value in {
        "base_acr": 0.45,
        "base_accuracy": 0.95,
        "fp32_size_bytes": FP32_SIZE,
        "alpha": 0.001,
        "n": 10_000,
        "sigma": 0.5,
        "confidence": 0.998,
        "search_inputs": INPUTS,
    }.items():
        study.set_user_attr(key, value)
    return study


def front_study(infeasible: bool = False) -> optuna.Study:
    """fp32 and int8 baselines, three mixed trials on the front, one dominated; one infeasible trial if asked."""
    study = empty_study()
    add_trial(study, 0.40, 0.95, FP32_SIZE, config("fp32", "fp32", "fp32", "fp32"), baseline="fp32")
    add_trial(study, 0.39, 0.95, 25_000, config("int8", "int8", "int8", "int8"), baseline="int8")
    add_trial(study, 0.36, 0.93, 15_000, config("int8", "int4/0.2", "int4/0.5", "fp16"))
    add_trial(study, 0.30, 0.90, 9_000, config("int4/0.3", "int4/0.5", "int4/0.5", "int8"))
    add_trial(study, 0.20, 0.85, 30_000, config("bf16", "int8", "int8", "int8"))  # dominated by int8
    add_trial(study, 0.38, 0.94, 24_000, config("int8", "int8", "int4", "bf16"))
    if infeasible:
        add_trial(study, 0.41, 0.70, 20_000, config("int4", "int4", "int4", "int4"), feasible=False)
    return study
