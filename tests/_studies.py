"""The tiny digits study that end-to-end tests run in seconds."""

import pytest
import torch

from approxtune import pipeline
from approxtune.config import load_study


def tiny_study(name: str, seed: int) -> str:
    """Study-file text: 30 search / 20 report inputs, n = 200, n_p = 100, 9 trials, outputs in runs/<name>."""
    return f"""
[study]
name = "{name}"
output_dir = "runs/{name}"
seed = {seed}
[data]
search_inputs = 30
report_inputs = 20
[train]
epochs = 4
[certify]
n0 = 16
n = 200
[irs]
n_p = 100
[search]
trials = 9
"""


def load_tiny(root, name: str, text: str):
    """``(study, model, search inputs, search cache)`` of the study ``text`` written to ``root/<name>.toml``, with
    its model trained and g certified (relative paths under ``root``)."""
    path = root / f"{name}.toml"
    path.write_text(text)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        study = load_study(path)
        model = pipeline.ensure_model(study)
        inputs = pipeline.load_inputs(study, "search")
        cache, _ = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    return study, model, inputs, cache
