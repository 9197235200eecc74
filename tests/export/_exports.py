"""Helpers of the export tests: the tiny study, the approximation configs every deployable is tested with."""

import optuna
from _studies import tiny_study

from approxtune.approximation import ApproximationConfig, LayerChoice
from approxtune.cli import main

TINY = tiny_study("export-tiny", seed=3)
LAYERS = ("conv1", "conv2", "fc1", "fc2")
CONFIGS = {
    "fp32": {"*": ("fp32", 0.0)},
    "fp16": {"*": ("fp16", 0.0)},
    "bf16": {"*": ("bf16", 0.0)},
    "int8": {"*": ("int8", 0.0)},
    "int4": {"*": ("int4", 0.0)},
    "sparse": {"conv1": ("int8", 0.5), "conv2": ("int4", 0.5), "fc1": ("fp16", 0.5), "fc2": ("bf16", 0.3)},
    "dense-fallback": {"conv1": ("int4", 0.1), "conv2": ("int8", 0.05), "fc1": ("int4", 0.2), "fc2": ("fp32", 0.02)},
    "sparse-fp32": {"conv1": ("fp32", 0.999), "*": ("fp32", 0.8)},  # conv1 entirely pruned
    "global": "global",
}
"""Every precision, both pruned encodings (sparse where smaller, dense otherwise), a fully pruned layer, global."""


def config_named(name):
    spec = CONFIGS[name]
    if spec == "global":
        return ApproximationConfig(dict.fromkeys(LAYERS, LayerChoice("int8")), global_prune=0.3)
    return ApproximationConfig({layer: LayerChoice(*spec.get(layer, spec.get("*"))) for layer in LAYERS})


def study_of(root):
    return optuna.load_study(study_name="export-tiny", storage=f"sqlite:///{root / 'runs/export-tiny/study.db'}")


def run_export(root, monkeypatch, *args):
    monkeypatch.chdir(root)
    return main(["export", "tiny.toml", *map(str, args)])


def tree(root):
    """Every path under ``root`` with its size (what a command that must write nothing must leave as it is)."""
    return sorted((str(p.relative_to(root)), p.stat().st_size if p.is_file() else -1) for p in root.rglob("*"))
