"""The Python API: tune any PyTorch classifier on any labelled data; the command line is a thin layer over it.

::

    import approxtune
    result = approxtune.tune(model, (x, y), sigma=0.5, n_p=400, trials=40, output_dir="runs/mine")
    result.front                                 # the Pareto front: one dict per trial
    result.study                                 # the optuna.Study
    result.export(trial=7, out="exported/")      # the same export as `approxtune export`

Settings are the study file's keys (:meth:`approxtune.config.Study.from_keywords`), or a :class:`~approxtune.Study`
(``approxtune.load_study("studies/x.toml")``, ``Study.from_dict({...})``), or both (keywords override).  Calling
:func:`tune` again with the same ``output_dir`` continues the study, with the same caches and resume rules as the
command line, whose ``tune``, ``certify`` and ``export`` call these functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import TrialState
from torch import nn

from approxtune import guided, pipeline, report, search
from approxtune.budget import TrialBudget
from approxtune.cache import BaseCache, CacheError, load_cache
from approxtune.config import Study
from approxtune.export import ExportResult, export_trial
from approxtune.job import Job, prepare
from approxtune.progress import Reporter
from approxtune.storage import is_shared_storage, masked_url, worker_id
from approxtune.trials import FINISHED

__all__ = ["Certification", "TuneResult", "certify", "settings", "tune"]

StudyLike = Study | dict | str | Path | None


def settings(study: StudyLike = None, data: object | None = None, **keywords: Any) -> Study:
    """The study settings ``study`` (a Study, nested dict, study file or None) with ``keywords`` on top.

    Data given from Python makes the dataset ``"python"`` (the cache name records it).
    """
    if data is not None:
        keywords = {"dataset": "python", **keywords}
    return Study.from_keywords(study, **keywords)


@dataclass
class Certification:
    """The base certification of one split: the cache, g's clean accuracy, and whether it was certified now."""

    cache: BaseCache
    accuracy: float
    built: bool
    split: str


@dataclass
class TuneResult:
    """A tuned study: its settings, the Optuna study and the base model and data it ran on."""

    settings: Study
    study: optuna.Study
    job: Job = field(repr=False)
    reporter: Reporter = field(repr=False, default_factory=Reporter)

    @property
    def front(self) -> list[dict]:
        """The feasible Pareto front by decreasing ACR: trial, acr, accuracy, size_bytes, size_ratio, config,
        confidence, and the trial's other certificate numbers."""
        return report.front_rows(self.study)

    def export(
        self,
        trial: int | None = None,
        out: str | Path = "exported",
        *,
        min_acr: float | None = None,
        max_accuracy_drop: float | None = None,
        recheck: str = "irs",
        runtime: str = "all",
        force: bool = False,
    ) -> ExportResult:
        """Export trial ``trial`` (or the smallest front model with ``min_acr`` / ``max_accuracy_drop``) to ``out``:
        the same export as ``approxtune export`` — compressed weights, ``model.onnx`` and ``model.pt2``, each with
        a certificate computed in its runtime on the held-out report inputs (see the README, "Exporting a model")."""
        return export_trial(
            self.job,
            out,
            trial=trial,
            min_acr=min_acr,
            max_accuracy_drop=max_accuracy_drop,
            recheck=recheck,
            runtime=runtime,
            force=force,
            progress=self.reporter.progress,
            log=self.reporter.info,
        )


def _first(study: Study) -> str:
    return (
        f"run `approxtune certify {study.origin}` once first (or `--shard I/K` on several machines, then `--merge`), "
        "with the study's output_dir on storage every worker sees"
    )


def _shared_cache(job: Job) -> BaseCache:
    """The search cache of a worker on a shared study storage: it must exist and match; workers never certify."""
    study = job.study
    first = _first(study)
    path = study.cache_path("search")
    try:
        cache = load_cache(path)
    except CacheError as exc:
        raise CacheError(
            f"{str(exc).split(';')[0]}; with a shared study storage ({masked_url(study.storage)}) workers do "
            f"not certify g themselves, which would race the other workers: {first}"
        ) from None
    try:
        cache.check(pipeline.expected_meta(study, job.model, job.inputs("search"), "search"))
    except CacheError as exc:
        raise CacheError(
            f"{exc}\nWorkers on a shared study storage never rebuild the cache the others read: fix the study file or "
            f"the model checkpoint, or {first}"
        ) from None
    return cache


def certify_job(
    job: Job, split: str, reporter: Reporter, *, shared: bool = False, repair: bool = False
) -> Certification:
    """Load the base cache of ``split`` if it matches the job, else certify g and write it (with a progress bar).

    A damaged cache is set aside and certified again when ``repair`` (``certify``), else refused (``tune``)."""
    if shared:
        cache = _shared_cache(job)
        reporter.info(f"Reusing the base cache {job.study.cache_path(split)} (read-only)")
        return Certification(cache, search.clean_accuracy(job.model, job.inputs(split), job.device), False, split)
    inputs = job.inputs(split)
    cache, built = pipeline.certify_split(
        job.study,
        job.model,
        inputs,
        split,
        num_classes=job.num_classes,
        device=job.device,
        progress=reporter.progress,
        say=reporter.info,
        repair=repair,
    )
    return Certification(cache, search.clean_accuracy(job.model, inputs, job.device), built, split)


def certify(
    model: nn.Module | None = None,
    data: object | None = None,
    study: StudyLike = None,
    *,
    split: str = "search",
    device: str | torch.device | None = None,
    verbose: bool = True,
    reporter: Reporter | None = None,
    **keywords: Any,
) -> Certification:
    """Certify the smoothed base model g once on the ``search`` (or held-out ``report``) inputs and cache it.

    Reuses a cache that matches; resumes an interrupted certification; sets a damaged cache aside and certifies it
    again.  Arguments as for :func:`tune`.
    """
    reporter = reporter or Reporter(quiet=not verbose)
    job = prepare(
        settings(study, data, **keywords),
        model=model,
        data=data,
        device=device,
        train_progress=reporter.progress,
        say=reporter.info,
    )
    return certify_job(job, split, reporter, repair=True)


def tune(
    model: nn.Module | None = None,
    data: object | None = None,
    study: StudyLike = None,
    *,
    device: str | torch.device | None = None,
    verbose: bool = True,
    reporter: Reporter | None = None,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    **keywords: Any,
) -> TuneResult:
    """Search per-layer compression of ``model``, each trial certified by IRS; returns the study and its front.

    ``model``: any ``nn.Module`` mapping a float batch ``(N, *shape)`` to logits ``(N, classes)``; its ``Conv1d``,
    ``Conv2d``, ``Conv3d`` and ``Linear`` layers are compressible.  None: the study's [model] (default: the embedded
    digits CNN, trained on first use).  ``data``: ``(x, y)`` tensors or arrays, or a ``torch.utils.data.Dataset`` of
    ``(x, y)`` pairs, split into search and held-out report inputs by ``split_seed``; None: the study's [data].
    ``study`` and ``keywords``: the settings (see :func:`settings`).  The model is not modified.

    Makes sure the base cache exists (certifying g once), creates or resumes the Optuna study (enqueuing the
    baselines), runs the missing trials and returns a :class:`TuneResult`.  Bad input raises
    :class:`~approxtune.errors.ApproxtuneError` before any certification starts.
    """
    reporter = reporter or Reporter(quiet=not verbose)
    study_settings = settings(study, data, **keywords)
    shared = is_shared_storage(study_settings.storage)
    refusal = (  # a worker on a shared storage would race the others
        f"no checkpoint at {study_settings.checkpoint}; with a shared study storage "
        f"({masked_url(study_settings.storage)}) workers neither train nor certify: {_first(study_settings)}"
    )
    job = prepare(
        study_settings,
        model=model,
        data=data,
        device=device,
        train_progress=reporter.progress,
        no_training=refusal if shared else None,
        say=reporter.info,
    )
    return tune_job(job, reporter, callbacks=callbacks, shared=shared)


def tune_job(
    job: Job,
    reporter: Reporter,
    *,
    callbacks: Sequence[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] = (),
    shared: bool = False,
) -> TuneResult:
    """:func:`tune` for a prepared :class:`~approxtune.job.Job`."""
    study = job.study
    reporter.set_optuna_verbosity()
    expected = pipeline.expected_meta(study, job.model, job.inputs("search"), "search")
    expected = replace(expected, num_classes=job.num_classes)
    search.check_existing(study, search.settings_attrs(study, expected))  # before certifying anything
    certification = certify_job(job, "search", reporter, shared=shared)
    cache, base_accuracy = certification.cache, certification.accuracy
    attrs = search.study_attrs(study, cache, base_accuracy, job.model)
    layers = search.searched_layers(study, job.model)
    guide = _guide(job, cache, layers, reporter) if study.search.sampler == "guided" else None
    opened = search.create_study(study, attrs, layers, guide=guide)
    optuna_study = opened.study
    if opened.created and study.search.trials < len(opened.enqueued):
        reporter.warn(
            f"search.trials = {study.search.trials} is below the {len(opened.enqueued)} baselines: only baselines will "
            "run; raise search.trials to search beyond them (or set search.baselines = false)"
        )

    def on_dead(numbers: list[int]) -> None:
        dead = ", ".join(map(str, numbers))
        reporter.warn(f"Trial(s) {dead} died with their worker on this host: failed, run again.")

    with TrialBudget(study.output_dir / f"{study.name}.trials.lock", study.search.trials, on_dead) as budget:
        remaining = budget.open(optuna_study)  # the study's trials left, retries of failed ones included
        done = len(optuna_study.get_trials(deepcopy=False, states=FINISHED))
        how = f"created it; baselines: {', '.join(opened.enqueued) or 'none'}" if opened.created else "joined it"
        reporter.info(
            f"Study {study.name!r} ({masked_url(study.storage)}): worker {worker_id()} {how}; "
            f"{done} trials done, running up to {remaining}; {len(layers)} layers searched; "
            f"certificates hold with probability >= {attrs['confidence']:.4g}."
        )
        if remaining:
            fp32_size = attrs["fp32_size_bytes"]
            with reporter.progress("trials", remaining) as advance:

                def on_result(trial: optuna.Trial, result: search.TrialResult | search.Stopped) -> None:
                    reporter.info(f"trial {trial.number:3d}  {_trial_line(result, fp32_size)}")
                    advance(1)

                objective = search.make_objective(
                    study, job.model, job.inputs("search"), cache, base_accuracy, job.device, on_result
                )
                optuna_study.optimize(
                    budget.objective(objective), timeout=study.search.timeout or None, callbacks=[*callbacks, budget]
                )
    finished = optuna_study.get_trials(deepcopy=False, states=FINISHED)
    stopped = sum(t.state == TrialState.PRUNED for t in finished)
    if stopped:
        reporter.info(f"Racing stopped {stopped} trial(s) early: they could not reach the front (search.race).")
    repeats = sum(t.user_attrs.get("same_as") is not None for t in finished)
    if repeats:
        reporter.info(f"{repeats} trial(s) repeated an earlier configuration and took its result without sampling.")
    return TuneResult(study, optuna_study, job, reporter)


def _guide(job: Job, cache: BaseCache, layers: list[str], reporter: Reporter) -> guided.Guide:
    """The guided sampler's guide: layer sensitivities reused from beside the cache, or measured now (with a bar)."""
    study = job.study
    guide, measured = guided.build_guide(
        study,
        job.model,
        job.inputs("search"),
        cache,
        layers,
        device=job.device,
        progress=lambda total: reporter.progress("layer sensitivities", total),
    )
    s = guide.sensitivity
    trial = study.irs.n_p * max(len(s.rows), 1)
    verb = "Measured" if measured else "Reusing"
    reporter.info(
        f"{verb} the layer sensitivities ({len(s.lost)} single-layer choices, {s.samples:,} forward passes = "
        f"{s.samples / trial:.2f} x one trial's n_p x inputs, {s.seconds:.1f} s to measure, on noise samples no "
        "certificate replays)"
    )
    return guide


def _trial_line(result: search.TrialResult | search.Stopped, fp32_size: int) -> str:
    if isinstance(result, search.Stopped):
        acr, accuracy, size = result.upper
        line = f"ACR ≤{acr:.4f} acc {accuracy:.3f}  size {size / fp32_size:6.1%}  {result.seconds:5.1f}s"
        return line + f"  stopped at {result.stage:.1%} of its samples: {result.reason}"
    line = f"ACR {result.acr:.4f}  acc {result.accuracy:.3f}  size {result.size_ratio:6.1%}"
    line += f"  {result.seconds:5.1f}s  {result.config.summary()}"
    if result.same_as is not None:
        line += f"  (same configuration as trial {result.same_as}: its certificate, no samples)"
    return line
