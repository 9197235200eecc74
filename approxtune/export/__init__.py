"""Exporting a chosen approximation f^p: compressed weights, compressed standalone deployables, and a held-out
certificate of each deployable computed in the runtime that ships it.

``approxtune export STUDY.toml --trial N --out DIR`` writes ``DIR``:

====================  ==============================================================================================
``weights.bin``       f^p's compressed weights, exactly ``size_bytes`` long (:mod:`~approxtune.export.format`)
``index.json``        their header
``config.json``       architecture, approximation, study, trial, input shape, fingerprints, every file's SHA-256
``model.onnx``        the ONNX deployable, weights compressed in the file (:mod:`~approxtune.export.onnx`)
``model.pt2``         the ``torch.export`` deployable, weights compressed in the program (:mod:`~approxtune.export.
                      program`)
``certificate.json``  one held-out certificate per shipped artifact, computed in its runtime
                      (:mod:`~approxtune.export.certificate`, :mod:`~approxtune.export.runtimes`)
====================  ==============================================================================================

The modules: :mod:`~approxtune.export.format` (the directory's own format, :func:`load_model`),
:mod:`~approxtune.export.onnx` and :mod:`~approxtune.export.program` (the deployables),
:mod:`~approxtune.export.runtimes` (running them), :mod:`~approxtune.export.certificate` (re-certification),
:mod:`~approxtune.export.writer` (:func:`export_model`), :mod:`~approxtune.export.trial` (:func:`export_trial`),
:mod:`~approxtune.export.verify` (:func:`verify`) and :mod:`~approxtune.export.artifacts` (the Optuna trial).
"""

from approxtune.export import artifacts
from approxtune.export.certificate import RECHECK_MODES, certificate_table
from approxtune.export.format import ExportError, OutputExistsError, load_model
from approxtune.export.runtimes import RUNTIMES
from approxtune.export.trial import TrialSelectionError, export_trial, select_trial
from approxtune.export.verify import VerifyResult, verify
from approxtune.export.writer import ExportResult, export_model

__all__ = [
    "RECHECK_MODES",
    "RUNTIMES",
    "ExportError",
    "ExportResult",
    "OutputExistsError",
    "TrialSelectionError",
    "VerifyResult",
    "artifacts",
    "certificate_table",
    "export_model",
    "export_trial",
    "load_model",
    "select_trial",
    "verify",
]
