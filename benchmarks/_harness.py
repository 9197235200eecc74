"""What the benchmarks share: their command line, loading a study and its artifacts, machine facts, result files.

Every benchmark writes ``OUT.json`` (the numbers) and ``OUT.md`` (tables generated from the JSON; ``--report-only``
rewrites it, and notes written below :data:`NOTES` in the .md are kept).  ``benchmarks/`` is on ``sys.path`` when a
script there runs, so they import this module as ``_harness``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import optuna
import torch
from torch import nn

from approxtune import pipeline, search, storage
from approxtune.approximation import ApproximationConfig
from approxtune.cache import BaseCache
from approxtune.config import Study, load_study
from approxtune.data import Inputs
from approxtune.export.runtimes import cpu_model
from approxtune.statistics import acr, lower_confidence_bound, radius

NOTES = "<!-- notes: kept when the script rewrites the tables above -->"
SCRATCH_GRID = 16
"""Certification from scratch at equal ACR is searched over sample counts that are multiples of this."""


def machine(threads: int | None = None) -> str:
    """``"2 cores x86_64 (CPU model), torch X"``, with the torch thread count when given."""
    text = f"{os.cpu_count()} cores {platform.machine()} ({cpu_model()}), torch {torch.__version__}"
    return text + (f", {threads} thread(s)" if threads is not None else "")


def parser(
    doc: str, out: str, study: str | None = "studies/digits.toml", *, rewrite: bool = True
) -> argparse.ArgumentParser:
    """The arguments the benchmarks take: ``--study`` (unless ``study`` is None), ``--out`` and, with ``rewrite``,
    ``--report-only``."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    if study is not None:
        p.add_argument("--study", default=study)
    p.add_argument("--out", default=out, help="results file stem: OUT.md (and OUT.json)")
    if rewrite:
        p.add_argument("--report-only", action="store_true", help="rewrite OUT.md from OUT.json")
    return p


def report_only(args: argparse.Namespace, write_report: Callable[[dict, Path], None]) -> bool:
    """With ``--report-only``, rewrite the report from ``OUT.json`` and return True."""
    if args.report_only:
        out = Path(args.out)
        write_report(json.loads(out.with_suffix(".json").read_text()), out)
    return args.report_only


def write_results(data: dict, out: str | Path, write_report: Callable[[dict, Path], None]) -> None:
    """Write ``OUT.json`` and then the report generated from it."""
    out = Path(out)
    out.with_suffix(".json").write_text(json.dumps(data, indent=2) + "\n")
    write_report(data, out)


def write_with_notes(path: Path, lines: list[str]) -> None:
    """Write ``lines`` (the generated tables), then NOTES and the notes ``path`` already had below it."""
    notes = path.read_text().split(NOTES, 1)[1] if path.exists() and NOTES in path.read_text() else "\n"
    path.write_text("\n".join(lines) + "\n\n" + NOTES + notes)


class Loaded(NamedTuple):
    """A study with its base model, search inputs, base cache (built when missing) and f's clean accuracy."""

    study: Study
    model: nn.Module
    inputs: Inputs
    cache: BaseCache
    base_accuracy: float

    @property
    def layers(self) -> list[str]:
        return search.searched_layers(self.study, self.model)


def load(path: str | Path) -> Loaded:
    """Load a study file and make its model and search cache exist (as ``approxtune certify`` would)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = load_study(path)
    model = pipeline.ensure_model(study)
    inputs = pipeline.load_inputs(study, "search")
    cache, _ = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    return Loaded(study, model, inputs, cache, search.clean_accuracy(model, inputs))


def load_tuned(path: str | Path) -> tuple[Loaded, optuna.Study]:
    """A study that ``approxtune tune`` has run, and its Optuna study."""
    loaded = load(path)
    optuna_study = storage.load_existing_study(loaded.study)
    if optuna_study is None:
        raise SystemExit(f"no study yet: run `approxtune tune {path}` first")
    return loaded, optuna_study


def finished_trials(optuna_study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The study's COMPLETE and PRUNED (stopped by racing) trials, in trial order."""
    return optuna_study.get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    )


def distinct_trials(optuna_study: optuna.Study) -> Iterator[tuple[optuna.trial.FrozenTrial, ApproximationConfig]]:
    """Finished trials with their configuration, repeats of an earlier configuration (``same_as``) excepted."""
    for trial in finished_trials(optuna_study):
        if trial.user_attrs.get("same_as") is None:
            yield trial, ApproximationConfig.from_dict(trial.user_attrs["config"])


def scratch_acr(counts: np.ndarray, correct: np.ndarray, sigma: float, alpha: float, k: int) -> float:
    """ACR of Cohen's CERTIFY with the first ``k`` estimation samples: ``counts[:, k - 1]`` hits of c_hat among them
    (cumulative counts per input), radius 0 where c_hat is not the label (``correct`` False)."""
    return acr(radius(lower_confidence_bound(counts[:, k - 1], k, alpha), sigma) * correct)


def scratch_grid(lo: int, hi: int, n: int) -> list[int]:
    """The sample counts in ``(lo, hi]`` that scratch at equal ACR tries: multiples of SCRATCH_GRID, and ``n``."""
    return [k for k in [*range(SCRATCH_GRID, n, SCRATCH_GRID), n] if lo < k <= hi]
