"""Fixtures the export tests share: a tiny tuned digits study, one export of it, and every precision exported.

They are session-scoped because tuning and exporting take seconds; tests read them, or copy before they change them.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
import torch
from _exports import CONFIGS, TINY, config_named, run_export
from optuna.trial import TrialState

from approxtune import export, pipeline
from approxtune.approximation import apply_approximation
from approxtune.cache import load_cache
from approxtune.cli import main
from approxtune.config import load_study
from approxtune.irs import replay
from approxtune.models import load_checkpoint


@pytest.fixture(scope="session")
def tuned(tmp_path_factory):
    """A tiny tuned study, plus one FAIL trial; tests export from it into their own directories."""
    root = tmp_path_factory.mktemp("export")
    (root / "tiny.toml").write_text(TINY)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["tune", "tiny.toml"]) == 0
    storage = f"sqlite:///{root / 'runs/export-tiny/study.db'}"
    study = optuna.load_study(study_name="export-tiny", storage=storage)
    failed = study.ask()
    study.tell(failed, state=TrialState.FAIL)
    return root


@pytest.fixture(scope="session")
def exported(tuned):
    """The int8 baseline trial exported with the defaults (every runtime, IRS re-check): ``(root, DIR, trial)``."""
    root = tuned
    study = optuna.load_study(study_name="export-tiny", storage=f"sqlite:///{root / 'runs/export-tiny/study.db'}")
    int8 = next(t for t in study.trials if t.user_attrs.get("baseline") == "int8")
    out = root / "shared" / "int8"
    with pytest.MonkeyPatch.context() as mp:
        assert run_export(root, mp, "--trial", int8.number, "--out", out) == 0
    return root, out, int8


class Recorder(torch.nn.Module):
    """Runs a model and records every batch it sees, its logits and the classes it predicts."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches, self.logits = model, [], []

    def forward(self, x):
        logits = self.model(x)
        self.batches.append(x.detach().clone())
        self.logits.append(logits.detach().clone())
        return logits


@dataclass
class Exact:
    """Every config of CONFIGS exported into ``out/<name>``, and f^p (eager torch) on the replayed noise samples."""

    root: Path
    out: Path
    base: torch.nn.Module
    results: dict
    replayed: dict  # name -> f^p's classes on the replay (approxtune's own replay of the search cache)
    batches: torch.Tensor  # every replayed noisy input, in replay order
    sizes: list  # the replay's batch sizes
    logits: dict  # name -> f^p's logits on ``batches``


@pytest.fixture(scope="session")
def exact(tuned):
    root = tuned
    study = load_study(root / "tiny.toml")
    base = load_checkpoint(root / "runs/export-tiny/model.pt", "digits-cnn")
    cache = load_cache(root / study.cache_path("search"))
    inputs = pipeline.load_inputs(study, "search")
    x = inputs.x
    rows = np.flatnonzero(cache.certified)
    out = root / "exact"
    results, replayed, logits, batches = {}, {}, {}, None
    for name in CONFIGS:
        config = config_named(name)
        results[name] = export.export_model(base, config, out / name, architecture="digits-cnn", example_input=x[:2])
        recorder = Recorder(apply_approximation(base, config))
        replayed[name] = replay(recorder, inputs, cache, rows, study.irs.n_p, batch_size=study.certify.batch_size)
        logits[name] = torch.cat(recorder.logits)
        if batches is None:
            batches = recorder.batches
        assert all(torch.equal(a, b) for a, b in zip(batches, recorder.batches, strict=True)), "noise is replayed"
    sizes = [len(b) for b in batches]
    return Exact(root, out, base, results, replayed, torch.cat(batches), sizes, logits)
