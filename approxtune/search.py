"""The Optuna study: per-layer approximation choices scored by IRS against one cached base certification.

Each trial samples a precision and a pruning amount for every searched layer, builds f^p
(:func:`approxtune.approximation.apply_approximation`), and measures three objectives:

* **ACR** (maximise): IRS's average certified radius of g^p on the search inputs, zeros included; every certificate
  holds with the probability its IRS mode states (:meth:`approxtune.irs.IRSSettings.total_alpha`);
* **accuracy** (maximise): f^p's clean accuracy on the search inputs;
* **size** (minimise): the bytes of f^p's compressed weights (:func:`approxtune.approximation.model_size_bytes`).

``study.best_trials`` is the Pareto front.  Trials carry their numbers as user attributes, rounded to what they mean,
so optuna-dashboard shows them (with a note per trial, :mod:`approxtune.dashboard`); a complete trial keeps its exact
result and per-input radii in the system attribute :data:`RESULT_ATTR`.  The study records what its trials were
certified against and refuses to resume against anything else.

**Racing.**  Most candidates of a multi-objective search end up dominated.  A trial's accuracy and size are known
before any noise sample; its ACR is bounded from above, before sampling and after each fraction ``search.race`` of
its replay, by :meth:`approxtune.irs.IRSRun.upper_acr` (every remaining sample the best it could be: predicting c_hat
and losing nothing, and for the signed zeta a gain wherever f misses c_hat), averaged as the final ACR is, so that a
trial tied with a complete one is never stopped for it.  When that best reachable ``(ACR, accuracy, size)`` is
Pareto-dominated by a complete feasible trial, or the candidate breaks a constraint, the full run could not reach the
feasible front either: the trial stops as PRUNED with what it had
seen in its user attributes (Optuna's pruners do not work for multi-objective studies; we raise
``optuna.TrialPruned`` ourselves).  Otherwise the same replay is extended, so no sample is evaluated twice, and only a
trial that reaches its full pre-set budget reports a certificate.  The front of the trials run is therefore exactly
the front those trials would have without racing, and every certificate keeps its stated confidence.

**Repeated configurations.**  Samplers propose a configuration again now and then (NSGA-II's crossover and mutation
on categorical choices do).  The same configuration is the same f^p, and IRS replays the same cached noise, so its
certificate is the same one: a trial whose configuration an earlier finished trial already scored takes that
trial's result without evaluating a sample (user attribute ``same_as``; ``samples`` 0).  A repeat of a trial that
racing stopped stops too: the complete trial that dominated it is still there.

**Several workers.**  Any number of ``approxtune tune`` processes, on any number of machines, can share one study
through a database server (``search.storage = "postgresql+psycopg2://..."``).  Exactly one of them creates the study
(``optuna.create_study(load_if_exists=False)`` is decided by the database's unique study name: the others get
``DuplicatedStudyError`` and join), and only the creator enqueues the baselines and records the study's settings,
the cache fingerprint last; a joining worker waits until that fingerprint is there and then checks its own against
it.  Each trial records the ``worker`` (``host:pid``) that runs it.  A worker that dies stops sending heartbeats;
after ``search.grace_period`` seconds another worker marks its trial FAIL and enqueues a copy
(:class:`optuna.storages.RetryHeartbeatStaleTrialCallback`), which the next free worker runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import optuna
import torch
from torch import nn

from approxtune import dashboard
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
from approxtune.cache import BaseCache, CacheMeta, cache_fingerprint
from approxtune.certification import clean_classes
from approxtune.config import Study
from approxtune.data import Inputs
from approxtune.errors import ApproxtuneError
from approxtune.guided import Guide, GuidedSampler
from approxtune.irs import IRSRun
from approxtune.storage import is_shared_storage, load_existing_study, masked_url, study_storage, worker_id
from approxtune.trials import RESULT_ATTR, decode_radii, dominates, encode_radii, feasible

__all__ = [
    "OBJECTIVES",
    "OpenedStudy",
    "Stopped",
    "StudyMismatchError",
    "TrialResult",
    "constraint_violation",
    "create_study",
    "dominates",
    "earlier_result",
    "enqueue_baselines",
    "evaluate",
    "make_objective",
    "make_race",
    "study_attrs",
]

OBJECTIVES = ("ACR", "accuracy", "size_bytes")
DIRECTIONS = ("maximize", "maximize", "minimize")
REPORT_RADII = (0.25, 0.5, 0.75, 1.0)


class StudyMismatchError(ApproxtuneError):
    """An existing Optuna study that was run against another cache or other IRS settings."""


def clean_accuracy(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor], inputs: Inputs, device: torch.device | str = "cpu"
) -> float:
    """Accuracy of ``model`` (a module, put in eval mode, or any function from a batch to logits) on the unperturbed
    inputs: the exact count of correct ones over their number (float64)."""
    return int((clean_classes(model, inputs.x, device) == inputs.y.numpy()).sum()) / len(inputs)


Values = tuple[float, float, int]
"""A trial's objectives: (ACR, accuracy, size in bytes)."""


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def _rounded_up(value: float, digits: int = 4) -> float:
    """``value`` rounded up to ``digits`` decimals (an upper bound stays one); unchanged if already rounded."""
    shown = round(value, digits)
    return shown if shown >= value else round(shown + 10**-digits, digits)


@dataclass
class TrialResult:
    """What one candidate scores; :meth:`to_attrs` is what a trial shows, :meth:`record` what it keeps exactly."""

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
    same_as: int | None = None
    """The earlier trial of the same configuration whose result this is (no sample evaluated), if any."""
    radii: np.ndarray | None = field(default=None, repr=False, compare=False)
    """Certified radius of each search input, in cache order (:attr:`approxtune.irs.IRSResult.radius`)."""

    @property
    def values(self) -> Values:
        return (self.acr, self.accuracy, self.size_bytes)

    @classmethod
    def from_attrs(cls, attrs: dict) -> TrialResult:
        """The result in a :meth:`record` (or, for a trial recorded before records, its exact user attributes)."""
        kept = {f.name for f in fields(cls)} - {"config", "radii"}
        values = {k: v for k, v in attrs.items() if k in kept}
        values["mean_zeta"] = math.nan if values.get("mean_zeta") is None else values["mean_zeta"]
        radii = None if attrs.get("radii") is None else decode_radii(attrs["radii"])
        return cls(config=ApproximationConfig.from_dict(attrs["config"]), radii=radii, **values)

    @classmethod
    def from_trial(cls, trial: optuna.trial.FrozenTrial) -> TrialResult:
        """The exact result a complete trial recorded."""
        record = trial.system_attrs.get(RESULT_ATTR)
        return cls.from_attrs(trial.user_attrs if record is None else json.loads(record))

    def record(self) -> str:
        """The exact result and the radii, as JSON text (the trial system attribute :data:`RESULT_ATTR`)."""
        record = {k: v for k, v in asdict(self).items() if k not in ("config", "radii")}
        record["config"] = self.config.to_dict()
        record["mean_zeta"] = None if math.isnan(self.mean_zeta) else self.mean_zeta
        record["radii"] = None if self.radii is None else encode_radii(self.radii)
        return json.dumps(record)

    def to_attrs(self) -> dict:
        """User attributes, rounded to what they mean: 4 decimals for ACR and fractions, sizes in whole bytes; the
        configuration as ``config`` (JSON), ``summary`` and one ``layer <name>`` attribute per layer."""
        return {
            "acr": _rounded(self.acr),
            "accuracy": _rounded(self.accuracy),
            "size_bytes": int(self.size_bytes),
            "size_ratio": _rounded(self.size_ratio),
            "certified_accuracy": {r: _rounded(a) for r, a in self.certified_accuracy.items()},
            "mean_zeta": None if math.isnan(self.mean_zeta) else float(f"{self.mean_zeta:.4g}"),
            "direct_share": _rounded(self.direct_share),
            "confidence": _rounded(self.confidence, 6),
            "samples": int(self.samples),
            "seconds": _rounded(self.seconds, 2),
            "same_as": self.same_as,
            "config": self.config.to_dict(),
            "summary": self.config.summary(),
            **dashboard.layer_attrs(self.config),
        }


Race = Callable[[Values], str | None]
"""Given a candidate's best reachable values, the reason to stop it now (dominated, infeasible), or None."""


class Stopped(Exception):
    """A raced candidate stopped before its full budget: no certificate, only what was seen."""

    def __init__(
        self,
        reason: str,
        stage: float,
        upper: Values,
        samples: int,
        seconds: float,
        summary: str,
        same_as: int | None = None,
    ) -> None:
        super().__init__(reason)
        self.reason, self.stage, self.upper, self.samples, self.seconds = reason, stage, upper, samples, seconds
        self.summary, self.same_as = summary, same_as

    def to_attrs(self) -> dict:
        return {
            "stopped": self.reason,
            "race_stage": self.stage,
            "upper_acr": _rounded_up(self.upper[0]),
            "accuracy": _rounded(self.upper[1]),
            "size_bytes": int(self.upper[2]),
            "samples": self.samples,
            "seconds": _rounded(self.seconds, 2),
            "summary": self.summary,
            "same_as": self.same_as,
        }


def evaluate(
    model: nn.Module,
    config: ApproximationConfig,
    inputs: Inputs,
    cache: BaseCache,
    study: Study,
    device: torch.device | str = "cpu",
    race: Race | None = None,
) -> TrialResult:
    """Build f^p from ``config`` and score it: clean accuracy, IRS against ``cache``, compressed size.

    With ``race``, the candidate is raced (see the module docstring): ``race`` sees its best reachable values before
    any sample and after each fraction ``study.search.race`` of the replay, and :class:`Stopped` is raised as soon as
    it names a reason.
    """
    start = time.perf_counter()
    packed = compress_model(model, config)
    approx = apply_approximation(model, config, packed).to(device)
    accuracy = clean_accuracy(approx, inputs, device)
    size = model_size_bytes(model, config, packed)
    run = IRSRun(approx, inputs, cache, study.irs_settings, batch_size=study.certify.batch_size, device=device)
    for stage in (0.0, *study.search.race) if race is not None else ():
        run.extend(stage)
        if stage > 0 and run.complete:  # whole noise blocks reached the full budget: nothing left to save
            break
        upper = (run.upper_acr(), accuracy, size)
        reason = race(upper)
        if reason is not None:
            raise Stopped(reason, stage, upper, run.samples, time.perf_counter() - start, config.summary())
    result = run.result()
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


_PRUNED = optuna.trial.TrialState.PRUNED


def earlier_result(trial: optuna.Trial, config: ApproximationConfig, racing: bool = True) -> TrialResult | None:
    """The result of an earlier finished trial of the same ``config``, as this trial's (``same_as``, no samples).

    The same configuration is the same f^p and IRS replays the same cached noise, so the certificate is the one that
    trial got.  With ``racing``, a repeat of a trial that racing stopped raises :class:`Stopped` (the complete trial
    that dominated it still does); returns None when no such finished trial exists.
    """
    start = time.perf_counter()
    wanted = config.to_dict()
    states = (optuna.trial.TrialState.COMPLETE, _PRUNED) if racing else (optuna.trial.TrialState.COMPLETE,)
    twins = [
        t
        for t in trial.study.get_trials(deepcopy=False, states=states)
        if t.number != trial.number and t.user_attrs.get("config") == wanted
    ]
    if not twins:
        return None
    twin = min(twins, key=lambda t: (t.state == _PRUNED, t.number))  # a complete twin first
    attrs = twin.user_attrs
    if twin.state == _PRUNED:
        reason = f"same configuration as trial {twin.number}, which was stopped: {attrs['stopped']}"
        upper = (attrs["upper_acr"], attrs["accuracy"], attrs["size_bytes"])
        seconds = time.perf_counter() - start
        raise Stopped(reason, attrs["race_stage"], upper, 0, seconds, attrs["summary"], same_as=twin.number)
    result = TrialResult.from_trial(twin)
    return replace(result, samples=0, seconds=time.perf_counter() - start, same_as=twin.number)


def constraint_violation(study: Study, base_accuracy: float, fp32_size: int, values: Values) -> str | None:
    """Which of ``search.constraints`` a trial with these values breaks, or None when it is feasible."""
    limits = study.search.constraints
    accuracy_drop, size_ratio = base_accuracy - values[1], values[2] / fp32_size
    if accuracy_drop > limits.max_accuracy_drop:
        return f"accuracy drop {accuracy_drop:.3f} > search.constraints.max_accuracy_drop"
    if size_ratio > limits.max_size_ratio:
        return f"size ratio {size_ratio:.3f} > search.constraints.max_size_ratio"
    return None


def make_race(
    study: Study, base_accuracy: float, fp32_size: int, rivals: Callable[[], Sequence[tuple[int, Values]]]
) -> Race:
    """The :data:`Race` of a study: stop a candidate that breaks a constraint or whose best reachable values one of
    ``rivals()`` (trial number and values of every complete feasible trial) dominates."""

    def race(upper: Values) -> str | None:
        violation = constraint_violation(study, base_accuracy, fp32_size, upper)
        if violation is not None:
            return violation
        return next((f"dominated by trial {number}" for number, v in rivals() if dominates(v, upper)), None)

    return race


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


def settings_attrs(study: Study, meta: CacheMeta) -> dict:
    """The part of :func:`study_attrs` known before certifying: the settings and the cache's fingerprint."""
    i = study.irs
    return {
        "cache_fingerprint": cache_fingerprint(meta),
        "cache_format": meta.format_version,
        "sigma": meta.sigma,
        "n": meta.n,
        "alpha": meta.alpha,
        "n_p": i.n_p,
        "alpha_zeta": i.alpha_zeta,
        "alpha_d": i.alpha_d,
        "irs_mode": i.mode,
        "irs_zeta": i.zeta,
        "gamma": i.gamma,
        "n_tail": i.n_tail,
        "allocate": i.allocate,
        "block": i.block,
        "pilot": i.pilot,
        "confidence": 1.0 - study.irs_settings.total_alpha(meta.alpha),
    }


def study_attrs(study: Study, cache: BaseCache, base_accuracy: float, model: nn.Module) -> dict:
    """What a study records about the certificate its trials build on; resuming requires the same values."""
    return {
        **settings_attrs(study, cache.meta),
        "search_inputs": len(cache),
        "base_acr": float(cache.summary()["acr"]),
        "base_accuracy": base_accuracy,
        "fp32_size_bytes": fp32_size_bytes(model),
    }


CHECKED_ATTRS = (
    "cache_fingerprint",
    "cache_format",
    "sigma",
    "n",
    "alpha",
    "n_p",
    "alpha_zeta",
    "alpha_d",
    "irs_mode",
    "irs_zeta",
    "gamma",
)
RECORDED_BEFORE = {"irs_zeta": "disagreement", "cache_format": 1}
"""What a study created before an attribute was recorded ran with (zeta counted disagreements until irs.zeta; its
trials were certified against a cache of format 1 until the format was recorded)."""
TAIL_ATTRS = ("n_tail", "allocate", "block", "pilot")
"""Checked on resume as well when the IRS mode is "tail" (the other modes ignore them)."""


def make_sampler(study: Study, seed: int | None = None, guide: Guide | None = None) -> optuna.samplers.BaseSampler:
    """The study's sampler, seeded (``study.seed`` unless ``seed``); it reads the trials' constraints.

    ``"guided"`` needs the study's ``guide`` (:func:`approxtune.guided.build_guide`).
    """
    seed = study.study.seed if seed is None else seed
    name = study.search.sampler
    if name == "guided":
        if guide is None:
            raise ValueError('search.sampler = "guided" needs the layer sensitivities: build them with build_guide')
        return GuidedSampler(guide, seed=seed)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=study.search.population, seed=seed)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    return optuna.samplers.RandomSampler(seed=seed)


SETUP_TIMEOUT = 60.0
"""Seconds a joining worker waits for the creator of the study to record its settings."""
_SETUP_MARK = "cache_fingerprint"
"""The study user attribute the creator records last: once it is there, the study is set up."""


@dataclass
class OpenedStudy:
    """The Optuna study a worker runs, whether this worker created it, and the baselines it enqueued (creator only)."""

    study: optuna.Study
    created: bool
    enqueued: list[str]


def create_study(
    study: Study,
    attrs: dict,
    layers: Sequence[str] = (),
    *,
    setup_timeout: float = SETUP_TIMEOUT,
    guide: Guide | None = None,
) -> OpenedStudy:
    """Create the Optuna study, or join it; refuse one recorded against another cache or IRS setting.

    Safe with any number of processes starting at once: the database decides which one creates the study (the
    others get ``DuplicatedStudyError``).  The creator enqueues the baselines (fp32 and the uniform presets over
    ``layers``, when ``search.baselines``), then records ``attrs`` and the metric names, the cache fingerprint last.
    A joining worker waits (``setup_timeout`` seconds at most) for that fingerprint, checks ``attrs`` against what
    the study recorded, and samples with a seed of its own: workers seeded alike would propose the same trials.
    ``guide``: the guided sampler's predictions (``search.sampler = "guided"``).
    """
    optuna_storage = study_storage(study)
    try:
        optuna_study = optuna.create_study(
            study_name=study.name,
            storage=optuna_storage,
            directions=list(DIRECTIONS),
            sampler=make_sampler(study, guide=guide),
            load_if_exists=False,
        )
    except optuna.exceptions.DuplicatedStudyError:
        optuna_study = optuna.load_study(
            study_name=study.name,
            storage=optuna_storage,
            sampler=make_sampler(study, seed=_worker_seed(study), guide=guide),
        )
        recorded = _wait_for_setup(optuna_study, study, setup_timeout)
        _check_recorded(study, recorded, attrs)
        return OpenedStudy(optuna_study, created=False, enqueued=[])
    enqueued = enqueue_baselines(optuna_study, study, layers) if study.search.baselines and layers else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna_study.set_metric_names(list(OBJECTIVES))
    for key, value in attrs.items():
        if key != _SETUP_MARK:
            optuna_study.set_user_attr(key, value)
    optuna_study.set_user_attr(_SETUP_MARK, attrs[_SETUP_MARK])
    return OpenedStudy(optuna_study, created=True, enqueued=enqueued)


def _worker_seed(study: Study) -> int:
    text = f"{study.study.seed}|{worker_id()}|{time.time_ns()}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def _wait_for_setup(optuna_study: optuna.Study, study: Study, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        recorded = optuna_study.user_attrs
        if _SETUP_MARK in recorded:
            return recorded
        if time.monotonic() >= deadline:
            raise StudyMismatchError(
                f"study {study.name!r} in {masked_url(study.storage)} exists but records no base certification: the "
                f"process that created it stopped before it finished setting it up (waited {timeout:g}s), or "
                f"approxtune did not create it. Delete it (optuna delete-study --study-name {study.name} --storage "
                "URL) or use another study.name."
            )
        time.sleep(0.2)


def _check_recorded(study: Study, recorded: dict, attrs: dict) -> None:
    keys = CHECKED_ATTRS + (TAIL_ATTRS if attrs["irs_mode"] == "tail" else ())
    recorded = {**RECORDED_BEFORE, **recorded}
    fix = f"use a new study.name or output_dir, or delete the study ({_delete_hint(study)})"
    if recorded["cache_format"] != attrs["cache_format"]:
        raise StudyMismatchError(
            f"study {study.name!r} was tuned against a base cache of format {recorded['cache_format']}, whose noise "
            f"this approxtune no longer draws (it reads format {attrs['cache_format']}): its certificates cannot be "
            f"mixed with new ones; tune a new study: {fix}"
        )
    diffs = [k for k in keys if recorded.get(k) != attrs[k] and k not in (_SETUP_MARK, "cache_format")]
    if diffs:
        changed = "; ".join(f"{k}: study has {recorded.get(k)!r}, now {attrs[k]!r}" for k in diffs)
        raise StudyMismatchError(
            f"study {study.name!r} was tuned with other settings ({changed}); resuming it would mix certificates: "
            f"restore those settings, or {fix}"
        )
    if recorded.get(_SETUP_MARK) != attrs[_SETUP_MARK]:
        where = (
            "; every worker must read the same cache: put output_dir on storage all machines share, or copy the "
            "cache and the model checkpoint from the machine that created the study"
            if is_shared_storage(study.storage)
            else ""
        )
        raise StudyMismatchError(
            f"study {study.name!r} was tuned against another base certification (the model's weights, the data or "
            f"a certify setting changed){where}; resuming it would mix certificates: restore them, or {fix}"
        )


def _delete_hint(study: Study) -> str:
    url = study.storage
    if url.startswith("sqlite:///"):
        return f"rm {url.removeprefix('sqlite:///')}"
    return f"optuna delete-study --study-name {study.name} --storage URL"


def check_existing(study: Study, attrs: dict) -> None:
    """Refuse, before any certification, to resume a study recorded with other settings or another base cache.

    ``attrs`` are :func:`settings_attrs` of the certification about to be used; a study that does not exist yet, or
    that its creator has not finished setting up, passes.
    """
    existing = load_existing_study(study)
    if existing is not None and _SETUP_MARK in existing.user_attrs:
        _check_recorded(study, existing.user_attrs, attrs)


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
    """Enqueue the baselines (skipping those already in the study); returns the names enqueued.

    ``skip_if_exists`` is not atomic across processes: with several workers only the creator of the study calls this
    (:func:`create_study`).
    """
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
    on_result: Callable[[optuna.Trial, TrialResult | Stopped], None] | None = None,
) -> Callable[[optuna.Trial], Values]:
    """The Optuna objective: sample a config, race it (when ``search.race`` is set), record and return its values.

    ``on_result`` is called with the :class:`TrialResult` of a complete trial or the :class:`Stopped` of a pruned one.
    """
    layers = searched_layers(study, model)
    limits = study.search.constraints
    fp32_size = fp32_size_bytes(model)
    worker = worker_id()
    base = {"acr": float(cache.summary()["acr"]), "accuracy": base_accuracy}

    def objective(trial: optuna.Trial) -> Values:
        trial.set_user_attr("worker", worker)  # which process runs it (a stale trial's worker died)
        config = suggest_config(trial, layers, study)

        def rivals() -> list[tuple[int, Values]]:
            complete = trial.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
            return [(t.number, tuple(t.values)) for t in complete if feasible(t)]

        race = make_race(study, base_accuracy, fp32_size, rivals) if study.search.race else None
        try:
            result = earlier_result(trial, config, race is not None) or evaluate(
                model, config, inputs, cache, study, device, race
            )
        except Stopped as stopped:
            attrs = {**stopped.to_attrs(), "config": config.to_dict(), **dashboard.layer_attrs(config)}
            for key, value in attrs.items():
                trial.set_user_attr(key, value)
            dashboard.save_trial_note(trial, base)
            if on_result is not None:
                on_result(trial, stopped)
            raise optuna.TrialPruned(stopped.reason) from None
        accuracy_drop = base_accuracy - result.accuracy
        violation = constraint_violation(study, base_accuracy, fp32_size, result.values)
        # optuna-dashboard 0.21 does not show Optuna 5's trial constraints: repeat them as user attrs.
        attrs = {**result.to_attrs(), "accuracy_drop": _rounded(accuracy_drop), "feasible": violation is None}
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        trial.storage.set_trial_system_attr(trial._trial_id, RESULT_ATTR, result.record())
        trial.set_constraint("accuracy_drop", accuracy_drop - limits.max_accuracy_drop)
        trial.set_constraint("size_ratio", result.size_ratio - limits.max_size_ratio)
        dashboard.save_trial_note(trial, base, violation)
        if on_result is not None:
            on_result(trial, result)
        return result.values

    return objective
