"""Exporting a trial of a study: choosing it, checking the study's artifacts, writing the export and its certificate.

``approxtune export STUDY.toml --trial N --out DIR`` (or a rule: ``--min-acr X`` / ``--max-accuracy-drop Y``, the
smallest front model that satisfies it) is :func:`export_trial`: every check runs before anything is written; then
:func:`~approxtune.export.writer.export_model` writes DIR, the trial's f^p is replayed on the search set (the export
must reproduce the trial's search ACR), every shipped artifact is certified in its runtime on the held-out report
inputs (:mod:`approxtune.export.certificate`), and the files, the held-out numbers and the export's path are left on
the Optuna trial (:mod:`approxtune.export.artifacts`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from optuna.trial import TrialState

from approxtune import pipeline, plots
from approxtune.approximation import ApproximationConfig
from approxtune.cache import CacheDamagedError, CacheError, cache_fingerprint, load_cache
from approxtune.export.artifacts import attach_artifacts, set_export_attrs
from approxtune.export.certificate import (
    CERTIFICATE_FORMAT,
    CERTIFICATE_VERSION,
    RECORD,
    Progress,
    Recheck,
    count_certifications,
    measure_rate,
    no_progress,
    recertify,
    runtime_certificate,
)
from approxtune.export.format import CERTIFICATE, CONFIG, INDEX, PAYLOAD, ExportError
from approxtune.export.runtimes import load_deployable, select_runtimes
from approxtune.export.writer import ExportResult, check_output, export_model
from approxtune.irs import certify_irs
from approxtune.job import Job
from approxtune.search import clean_accuracy
from approxtune.storage import load_existing_study
from approxtune.trials import front, front_files

__all__ = ["TrialSelectionError", "export_trial", "select_trial"]

WHY_THEY_DIFFER = (
    "The search-set numbers belong to the trial that looked best among {trials} compared on the search inputs and "
    "noise, so they are optimistically biased (winner's curse / multiple comparisons); the held-out certificate "
    "uses inputs and noise the search never saw and holds for this one model at the stated confidence."
)
SELECTION_NOTE = (
    "The report set has certified {k} distinct model(s) so far. Choosing among them by their held-out numbers selects "
    "again: the chosen one's radii then hold with probability >= 1 - {k} x {alpha:.4g} each (union bound)."
)


class TrialSelectionError(ExportError):
    """No trial, an unfinished trial or no trial matching the rule."""


# --------------------------------------------------------------------------------------------- trial selection


def _rule_text(min_acr: float | None, max_accuracy_drop: float | None) -> str:
    parts = []
    if min_acr is not None:
        parts.append(f"search ACR >= {min_acr:g}")
    if max_accuracy_drop is not None:
        parts.append(f"accuracy drop <= {max_accuracy_drop:g}")
    return " and ".join(parts)


def select_trial(
    optuna_study: Any,
    *,
    trial: int | None = None,
    min_acr: float | None = None,
    max_accuracy_drop: float | None = None,
    study_file: str = "STUDY.toml",
) -> tuple[Any, str]:
    """The trial to export and why: trial number ``trial``, or the smallest front model satisfying the rule.

    The rule keeps Pareto-front trials (``front``: feasible, non-dominated) with search ACR >= ``min_acr``
    and clean accuracy >= the study's base accuracy - ``max_accuracy_drop`` (both when both are given), and picks the
    smallest; ties go to the higher ACR, then the higher accuracy, then the lower trial number.
    """
    has_rule = min_acr is not None or max_accuracy_drop is not None
    if trial is not None and has_rule:
        raise TrialSelectionError("give either --trial N or a rule (--min-acr / --max-accuracy-drop), not both")
    if trial is None and not has_rule:
        raise TrialSelectionError(
            f"choose the trial to export: --trial N, or a rule --min-acr X and/or --max-accuracy-drop Y "
            f"(`approxtune front {study_file}` lists the front)"
        )
    name = optuna_study.study_name
    if trial is not None:
        trials = {t.number: t for t in optuna_study.get_trials(deepcopy=False)}
        if trial not in trials:
            span = f"trials are numbered 0 to {max(trials)}" if trials else "it has no trials"
            raise TrialSelectionError(
                f"study {name!r} has no trial {trial} ({span}); see `approxtune front {study_file}`"
            )
        chosen = trials[trial]
        if chosen.state != TrialState.COMPLETE:
            raise TrialSelectionError(
                f"trial {trial} of study {name!r} is {chosen.state.name}, not COMPLETE: it has no scores to export; "
                f"choose a COMPLETE trial (see `approxtune front {study_file}`)"
            )
        if "config" not in chosen.user_attrs:
            raise TrialSelectionError(f"trial {trial} of study {name!r} records no approximation config to export")
        return chosen, f"trial {trial} as requested"
    for label, value in (("--min-acr", min_acr), ("--max-accuracy-drop", max_accuracy_drop)):
        if value is not None and not np.isfinite(value):
            raise TrialSelectionError(f"{label} must be a finite number, got {value}")
    base_accuracy = optuna_study.user_attrs.get("base_accuracy")
    if max_accuracy_drop is not None and base_accuracy is None:
        raise TrialSelectionError(f"study {name!r} records no base accuracy; use --trial N or --min-acr")
    candidates = front(optuna_study)
    if not candidates:
        raise TrialSelectionError(
            f"study {name!r} has no feasible complete trial on its Pareto front yet; run `approxtune tune {study_file}`"
        )
    eps = 1e-12  # accuracies are ratios of counts: do not let rounding decide an equality
    matching = [
        t
        for t in candidates
        if (min_acr is None or t.values[0] >= min_acr - eps)
        and (max_accuracy_drop is None or base_accuracy - t.values[1] <= max_accuracy_drop + eps)
    ]
    rule = _rule_text(min_acr, max_accuracy_drop)
    if not matching:
        acrs = [t.values[0] for t in candidates]
        drops = [base_accuracy - t.values[1] for t in candidates] if base_accuracy is not None else []
        span = f"the {len(candidates)} front trials have search ACR {min(acrs):.4f} to {max(acrs):.4f}"
        if drops:
            span += f" and accuracy drops {min(drops):.3f} to {max(drops):.3f}"
        raise TrialSelectionError(
            f"no trial on the Pareto front of study {name!r} has {rule}: {span}; relax the rule or pick one with "
            f"--trial N (`approxtune front {study_file}`)"
        )
    chosen = min(matching, key=lambda t: (t.values[2], -t.values[0], -t.values[1], t.number))
    return chosen, f"the smallest of {len(matching)} front trials with {rule}"


# ----------------------------------------------------------------------------------------------------- export


def _duration(seconds: float) -> str:
    if seconds < 1:
        return "under a second"
    if seconds < 120:
        return f"about {seconds:.0f} s"
    return f"about {seconds / 60:.0f} min" if seconds < 7200 else f"about {seconds / 3600:.1f} h"


def _announce(
    study: Any, plan: Recheck, base: Any, deployables: list[Any], inputs: Any, ready: bool, device: Any
) -> str:
    """What certifying will cost: inputs, samples and an estimate from a short measured run of each function."""
    count, c = len(inputs), study.certify
    batch = min(c.batch_size, 256)
    steps = []
    if plan.irs is not None and not ready:
        samples = count * (c.n0 + c.n)
        rate = measure_rate(base, inputs.x, batch, device)
        steps.append(
            f"certify g on the {count} report inputs first ({samples:,} samples, {_duration(samples / rate)} "
            f"at the {rate:,.0f} samples/s of a short run)"
        )
    each = count * plan.irs.n_p if plan.irs is not None else count * (plan.n0 + plan.n)
    for deployable in deployables:
        rate = measure_rate(deployable, inputs.x, batch, "cpu")
        steps.append(
            f"{deployable.runtime.artifact} in {deployable.runtime.name}: {'up to ' if plan.irs else ''}{each:,} "
            f"samples, {_duration(each / rate)}"
        )
    return f"Held-out certificate on {count} report inputs: " + "; then ".join(steps) + "."


def export_trial(
    job: Job,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    min_acr: float | None = None,
    max_accuracy_drop: float | None = None,
    recheck: str = "irs",
    runtime: str = "all",
    force: bool = False,
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    on_chosen: Callable[[Any, str], None] | None = None,
) -> ExportResult:
    """Export a trial of the study of ``job`` (:class:`~approxtune.job.Job`: the settings, the base model and its
    data) with a held-out certificate per runtime.

    Every check (re-check method, runtimes and their packages, output directory, study, trial, search cache,
    checkpoint) runs before anything is written.  Then f^p is exported (:func:`export_model`: the compressed weights
    and the deployables of ``runtime``), replayed on the search set, and each deployable is re-certified in its
    runtime on the study's report inputs -- ``recheck="irs"``: IRS against the report base cache (built by
    ``pipeline.certify_split`` if needed; an estimate of its cost is logged first); ``"scratch"``: Cohen's CERTIFY on
    noise stream FRESH.  The exported files go onto the trial as Optuna artifacts (those up to
    :data:`~approxtune.export.artifacts.ARTIFACT_MAX_BYTES`), with the front plot; the held-out ACR and accuracy
    (the lowest over the runtimes) and the export's path become user attributes of the trial.
    """
    progress = progress or no_progress
    say = log or (lambda message: None)
    study, device = job.study, job.device
    c = study.certify
    plan = Recheck(recheck, c.sigma, c.n0, c.n, c.alpha, c.batch_size, study.irs_settings if recheck == "irs" else None)
    select_runtimes(runtime)
    out_dir = check_output(out_dir, force)
    study_file = study.origin
    optuna_study = load_existing_study(study)
    if optuna_study is None:
        raise ExportError(f"no study {study.name!r} in {study.storage}; run `approxtune tune {study_file}` first")
    chosen, reason = select_trial(
        optuna_study, trial=trial, min_acr=min_acr, max_accuracy_drop=max_accuracy_drop, study_file=study_file
    )
    attrs, recorded = chosen.user_attrs, optuna_study.user_attrs
    config = ApproximationConfig.from_dict(attrs["config"])
    if on_chosen is not None:
        on_chosen(chosen, reason)

    base, search_inputs = job.model, job.inputs("search")
    expected = pipeline.expected_meta(study, base, search_inputs, "search")
    pipeline.adopt_legacy_cache(study, "search", expected, say)
    cache_path = study.cache_path("search")
    try:
        search_cache = load_cache(cache_path)
    except CacheDamagedError as exc:
        raise pipeline.damaged(study, "search", exc, ", then export again") from None
    except CacheError:
        raise ExportError(
            f"the search cache {cache_path} is missing or unreadable; it holds the base certification trial "
            f"{chosen.number} was scored against. Recreate it with `approxtune certify {study_file}` (the same "
            "settings give the same cache), then export again"
        ) from None
    if recorded.get("cache_format", 1) != search_cache.meta.format_version:
        raise ExportError(
            f"study {study.name!r} was tuned against a base cache of format {recorded.get('cache_format', 1)}, whose "
            "noise this approxtune no longer draws, so its trials cannot be replayed: tune a new study (another "
            "study.name) and export from it"
        )
    if recorded.get("cache_fingerprint") != cache_fingerprint(search_cache):
        raise ExportError(
            f"the search cache {cache_path} is not the one study {study.name!r} was tuned against (its fingerprint "
            f"differs from the study's); recreate it with `approxtune certify {study_file}` and the study's settings"
        )
    if expected.model_fingerprint != search_cache.meta.model_fingerprint:
        raise ExportError(
            f"the model is not the one study {study.name!r} was tuned with (its weights' fingerprint differs from the "
            f"search cache's); restore that model (checkpoint {study.checkpoint})"
        )
    report_inputs = job.inputs("report")
    settings = study.irs_settings
    complete = len(optuna_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    started = time.perf_counter()

    def certify(result: ExportResult) -> dict[str, Any]:
        model = result.model.to(device)
        # The exported model, read back from disk, must reproduce the trial's search certificate (same replayed noise).
        with progress(
            f"replay trial {chosen.number} on the search set", int(search_cache.certified.sum()) * settings.n_p
        ) as advance:
            replayed = certify_irs(
                model, search_inputs, search_cache, settings, batch_size=c.batch_size, device=device, progress=advance
            )
        deployables = [load_deployable(rt, result.path, device) for rt in result.runtimes]
        ready = plan.irs is None or pipeline.reusable_cache(study, base, report_inputs, "report") is not None
        say(_announce(study, plan, base, deployables, report_inputs, ready, device))
        if not ready:
            say(f"To skip this next time, {pipeline.report_cache_hint(study)}.")
        cache, noise = None, {"run_seed": pipeline.noise_seed(study, "report"), "streams": ["FRESH"]}
        if plan.irs is not None:
            cache, _ = pipeline.certify_split(
                study,
                base,
                report_inputs,
                "report",
                num_classes=job.num_classes,
                device=device,
                progress=progress,
                say=say,
            )
            noise = {
                "run_seed": cache.meta.seed,
                "streams": ["SELECTION", "ESTIMATION"],
                "base_cache": str(study.cache_path("report")),
                "base_cache_fingerprint": cache_fingerprint(cache),
            }
        noise.update(
            block_size=search_cache.meta.block_size,
            search_run_seed=search_cache.meta.seed,
            search_streams=["SELECTION", "ESTIMATION"],
        )
        held = [
            runtime_certificate(
                d,
                recertify(
                    d,
                    report_inputs,
                    plan,
                    cache=cache,
                    run_seed=noise["run_seed"],
                    progress=progress,
                    label=f"{d.runtime.artifact} in {d.runtime.name}",
                ),
            )
            for d in deployables
        ]
        certified = count_certifications(
            study.output_dir,
            {
                "study": study.name,
                "inputs_fingerprint": report_inputs.fingerprint(),
                "model_sha256": result.sha256,
                "method": recheck,
                "trial": chosen.number,
                "path": str(Path(out_dir).resolve()),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )
        return {
            "format": CERTIFICATE_FORMAT,
            "format_version": CERTIFICATE_VERSION,
            "model_sha256": result.sha256,
            "study": study.name,
            "trial": chosen.number,
            "summary": config.summary(),
            **plan.levels(),
            "confidence": 1.0 - plan.total_alpha,
            "inputs": {
                "split": "report",
                "dataset": study.data.dataset,
                "count": len(report_inputs),
                "fingerprint": report_inputs.fingerprint(),
                "indices": report_inputs.index.tolist(),
            },
            "noise": noise,
            "search": {
                "acr": chosen.values[0],
                "accuracy": chosen.values[1],
                "certified_accuracy": attrs.get("certified_accuracy"),
                "confidence": attrs.get("confidence"),
                "inputs": len(search_inputs),
                "inputs_fingerprint": search_inputs.fingerprint(),
                "trials_compared": complete,
                "reproduced_acr": replayed.acr,
                "reproduced_accuracy": clean_accuracy(model, search_inputs, device),
            },
            "explanation": WHY_THEY_DIFFER.format(trials=complete),
            "report_set": {
                "certified_models": certified,
                "record": str(study.output_dir / RECORD),
                "note": SELECTION_NOTE.format(k=certified, alpha=plan.total_alpha),
            },
            "certificates": held,
        }

    result = export_model(
        base,
        config,
        out_dir,
        architecture=job.architecture,
        runtime=runtime,
        force=force,
        example_input=report_inputs.x[:2],
        meta={
            "study": study.name,
            "study_file": None if study.path is None else str(study.path.resolve()),
            "trial": chosen.number,
            "sigma": c.sigma,
        },
        certify=certify,
    )
    result.seconds = time.perf_counter() - started
    plot_files = front_files(study.output_dir)
    if not all(path.is_file() for path in plot_files):
        plots.write_front(optuna_study, study.output_dir)
    exported = [result.path / name for name in (CERTIFICATE, CONFIG, INDEX, PAYLOAD, *result.deployable_bytes)]
    result.artifacts, result.not_attached = attach_artifacts(study, chosen, [*exported, *plot_files])
    held = result.certificate["certificates"]
    set_export_attrs(
        study,
        chosen,
        {
            "heldout_acr": round(min(h["acr"] for h in held), 4),
            "heldout_accuracy": round(min(h["accuracy"] for h in held), 4),
            "heldout_runtimes": ", ".join(h["runtime"] for h in held),
            "export_path": str(result.path.resolve()),
        },
    )
    return result
