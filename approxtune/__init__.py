"""approxtune: compressed versions of a PyTorch classifier that stay certifiably robust.

The Python API (imported on first use, so ``import approxtune.<module>`` stays light)::

    result = approxtune.tune(model, (x, y), sigma=0.5, trials=40, output_dir="runs/mine")
    result.front, result.study, result.export(trial=7, out="exported/")
    approxtune.certify(model, (x, y), ...)       # the base certification alone
    approxtune.load_study("studies/digits.toml") # a study file's settings, to pass as study=...
    approxtune.Study.from_dict({...})            # settings as nested tables
    approxtune.load_model("exported/")           # an exported model, rebuilt
    approxtune.verify("exported/", study=...)    # its certificates recomputed on this machine
    approxtune.ApproxtuneError                   # every bad-input error
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from approxtune.api import Certification, TuneResult, certify, tune
    from approxtune.config import Study, load_study
    from approxtune.errors import ApproxtuneError
    from approxtune.export import load_model, verify

__all__ = [
    "ApproxtuneError",
    "Certification",
    "Study",
    "TuneResult",
    "certify",
    "load_model",
    "load_study",
    "tune",
    "verify",
]

_WHERE = {
    "ApproxtuneError": "approxtune.errors",
    "Certification": "approxtune.api",
    "Study": "approxtune.config",
    "TuneResult": "approxtune.api",
    "certify": "approxtune.api",
    "load_model": "approxtune.export",
    "load_study": "approxtune.config",
    "tune": "approxtune.api",
    "verify": "approxtune.export",
}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'approxtune' has no attribute {name!r}")
