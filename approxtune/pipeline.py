"""The steps every command shares: the inputs of a study, its base model and its base caches.

``ensure_model`` and ``ensure_cache`` make the study's artifacts exist — reusing what is on disk when it matches the
study, (re)building it otherwise — so that ``approxtune tune`` runs from a fresh clone in one command.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from approxtune.cache import BaseCache, CacheError, CacheMeta, build_base_cache, load_cache, model_fingerprint
from approxtune.config import Study
from approxtune.data import Inputs, digits_splits
from approxtune.models import load_checkpoint, save_checkpoint
from approxtune.noise import DEFAULT_BLOCK_SIZE
from approxtune.training import train_model

__all__ = ["TRAINABLE", "ensure_cache", "ensure_model", "load_inputs", "resolve_device"]

TRAINABLE = ("digits-cnn",)
"""Architectures that `approxtune train` can train on the study's own data."""


def resolve_device(study: Study, override: str | None = None) -> torch.device:
    """The device to run models on: ``override`` (from ``--device``), else the study's, ``auto`` meaning cuda if any."""
    name = override or study.certify.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was requested, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def load_inputs(study: Study, split: str) -> Inputs:
    """The study's ``train``, ``search`` or ``report`` inputs (search and report are disjoint and held out)."""
    d = study.data
    if d.dataset != "digits":
        raise ValueError(f"dataset {d.dataset!r} is not supported yet")
    inputs = digits_splits(d.split_seed)[split]
    count = {"search": d.search_inputs, "report": d.report_inputs}.get(split)
    return inputs if count is None else inputs.head(count)


def train_study_model(study: Study, progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """Train the study's base model with noise augmentation at its sigma and save it to its checkpoint path."""
    arch = study.model.arch
    if arch not in TRAINABLE:
        raise ValueError(f"approxtune trains only {', '.join(TRAINABLE)}; give a checkpoint for {arch!r} instead")
    t = study.train
    model = train_model(
        arch,
        load_inputs(study, "train"),
        sigma=study.certify.sigma,
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        seed=study.study.seed,
        progress=progress,
    )
    save_checkpoint(model, arch, study.checkpoint)
    return model


def ensure_model(study: Study, progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """The study's base model f: loaded from its checkpoint, or trained first when that is missing and trainable."""
    if not study.checkpoint.exists() and study.model.arch in TRAINABLE:
        return train_study_model(study, progress)
    return load_checkpoint(study.checkpoint, study.model.arch)


def expected_meta(study: Study, model: nn.Module, inputs: Inputs, split: str) -> CacheMeta:
    """The metadata a base cache of ``split`` must have to belong to this study."""
    c = study.certify
    return CacheMeta(
        sigma=c.sigma,
        n0=c.n0,
        n=c.n,
        alpha=c.alpha,
        seed=noise_seed(study, split),
        block_size=DEFAULT_BLOCK_SIZE,
        num_inputs=len(inputs),
        model_fingerprint=model_fingerprint(model),
        inputs_fingerprint=inputs.fingerprint(),
    )


def noise_seed(study: Study, split: str) -> int:
    """Noise run seed of a split: search and report inputs never share noise."""
    return study.study.seed * 2 + (split == "report")


def ensure_cache(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    split: str,
    *,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    on_rebuild: Callable[[str], None] | None = None,
) -> tuple[BaseCache, bool]:
    """Load the base cache of ``split`` if it matches the study, else certify g and write it.

    Returns the cache and whether it was (re)built.  ``on_rebuild`` is told why an existing cache was not reused.
    """
    path = study.cache_path(split)
    expected = expected_meta(study, model, inputs, split)
    if path.exists():
        try:
            cache = load_cache(path)
            cache.check(expected)
            return cache, False
        except CacheError as exc:
            if on_rebuild is not None:
                on_rebuild(str(exc))
    c = study.certify
    cache = build_base_cache(
        model,
        inputs,
        path,
        sigma=c.sigma,
        n0=c.n0,
        n=c.n,
        alpha=c.alpha,
        seed=expected.seed,
        block_size=expected.block_size,
        batch_size=c.batch_size,
        device=device,
        progress=progress,
    )
    return cache, True
