"""The tiny digits study that end-to-end tests run in seconds."""

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


def prepared(root, text: str, monkeypatch):
    """Write the study ``text`` under ``root``, train its model and certify its search inputs there; returns
    ``(study, model, search inputs, search cache, base accuracy)``."""
    path = root / "study.toml"
    path.write_text(text)
    monkeypatch.chdir(root)
    study = load_study(path)
    model = pipeline.ensure_model(study)
    inputs = pipeline.load_inputs(study, "search")
    cache, base_accuracy = pipeline.ensure_cache(study, model, inputs, "search", device=torch.device("cpu"))
    return study, model, inputs, cache, base_accuracy
