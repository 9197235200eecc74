"""The steps every command shares: the inputs of a study, its base model and its base caches.

``ensure_model`` and ``ensure_cache`` make the study's artifacts exist — reusing what is on disk when it matches the
study, (re)building it otherwise — so that ``approxtune tune`` runs from a fresh clone in one command.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from approxtune.cache import (
    BaseCache,
    CacheError,
    CacheMeta,
    CertifySettings,
    NoiseMismatchError,
    build_base_cache,
    cache_meta,
    load_cache,
)
from approxtune.config import Study
from approxtune.data import DataError, Inputs, dataset_size, digits_splits, read_inputs
from approxtune.models import CheckpointError, load_checkpoint, save_checkpoint
from approxtune.training import train_model

__all__ = [
    "TRAINABLE",
    "adopt_legacy_cache",
    "ensure_cache",
    "ensure_model",
    "load_inputs",
    "resolve_device",
    "split_indices",
]

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


REAL_SPLITS = ("search", "report")
"""The splits of a real dataset: both drawn from its test/validation images (approxtune trains only on digits)."""

_ROOT_HINTS = {
    "cifar10": "the folder that holds cifar-10-batches-py/, extracted from cifar-10-python.tar.gz",
    "imagefolder": "a folder with one sub-folder of images per class, e.g. the sorted ImageNet validation set",
    "tensors": "a .npz or .pt file holding images x and labels y",
}


def load_inputs(study: Study, split: str) -> Inputs:
    """The study's ``train``, ``search`` or ``report`` inputs (search and report are disjoint and held out).

    ``digits`` is split as :func:`~approxtune.data.digits_splits` does.  A real dataset (``cifar10``: the test batch,
    ``imagefolder``, ``tensors``) gives only its test/validation images to approxtune: a seeded permutation
    (``data.split_seed``) of all their indices is cut into the first ``data.report_inputs`` (report) and the next
    ``data.search_inputs`` (search), each sorted into dataset order, and only the selected images are decoded.
    There is no ``train`` split for real datasets: their models come with a checkpoint.  Raises
    :class:`~approxtune.data.DataError` naming the files or study keys to fix.
    """
    d = study.data
    if d.dataset == "digits":
        inputs = digits_splits(d.split_seed)[split]
        count = {"search": d.search_inputs, "report": d.report_inputs}.get(split)
        return inputs if count is None else inputs.head(count)
    if split == "train":
        raise DataError(
            f"approxtune trains only the embedded digits model; a {d.dataset} study needs a trained model: put its "
            f"checkpoint at {study.checkpoint} or set model.checkpoint in {study.path} (Cohen et al.'s "
            f"checkpoint.pth.tar files load as they are)"
        )
    if split not in REAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(REAL_SPLITS)} for a {d.dataset} study, not {split!r}")
    root = Path(d.root)
    try:
        total, source = dataset_size(d.dataset, root)
    except DataError as exc:
        raise DataError(f"{exc} (data.root in {study.path} must name {_ROOT_HINTS[d.dataset]})") from None
    try:
        indices = split_indices(total, d.split_seed, d.report_inputs, d.search_inputs, source)[split]
    except DataError as exc:
        raise DataError(f"{exc} in {study.path}") from None
    try:
        return read_inputs(d.dataset, root, indices)
    except DataError as exc:
        raise DataError(f"{exc} ({study.path}: data.root = {d.root!r})") from None


def split_indices(
    total: int, split_seed: int, report: int, search: int, source: str = "the dataset"
) -> dict[str, np.ndarray]:
    """``{"report", "search"}``: disjoint sorted index arrays cut from a ``split_seed`` permutation of ``total``.

    Report takes the first ``report`` positions of the permutation and search the next ``search`` (as for digits),
    so the report inputs do not change when only ``search`` does.
    """
    if report + search > total:
        raise DataError(
            f"{source} has {total} images, but data.report_inputs = {report} and data.search_inputs = {search} need "
            f"{report + search} distinct ones; lower data.report_inputs or data.search_inputs"
        )
    order = np.random.default_rng(split_seed).permutation(total)
    return {"report": np.sort(order[:report]), "search": np.sort(order[report : report + search])}


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
    arch = study.model.arch
    if not study.checkpoint.exists():
        if arch in TRAINABLE:
            return train_study_model(study, progress)
        raise CheckpointError(
            f"checkpoint {study.checkpoint} does not exist; approxtune trains only {', '.join(TRAINABLE)}, so a "
            f"{arch} study needs the trained model's checkpoint: put it there or set model.checkpoint in {study.path} "
            f"(Cohen et al.'s checkpoint.pth.tar files, e.g. models/cifar10/resnet110/noise_0.50/checkpoint.pth.tar "
            f"from their release, load as they are)"
        )
    return load_checkpoint(study.checkpoint, arch)


def certify_settings(study: Study, split: str) -> CertifySettings:
    """The base certification of ``split`` that the study asks for."""
    c = study.certify
    return CertifySettings(sigma=c.sigma, n0=c.n0, n=c.n, alpha=c.alpha, seed=noise_seed(study, split))


def expected_meta(study: Study, model: nn.Module, inputs: Inputs, split: str) -> CacheMeta:
    """The metadata a base cache of ``split`` must have to belong to this study."""
    return cache_meta(model, inputs, certify_settings(study, split))


def noise_seed(study: Study, split: str) -> int:
    """Noise run seed of a split: search and report inputs never share noise."""
    return study.study.seed * 2 + (split == "report")


def adopt_legacy_cache(
    study: Study, split: str, expected: CacheMeta, on_adopt: Callable[[str], None] | None = None
) -> bool:
    """Rename a cache under :meth:`~approxtune.config.Study.legacy_cache_path` to ``cache_path`` if it matches.

    Only a complete cache whose metadata is ``expected`` is renamed, and only when nothing is at the new path, so an
    hours-long certification made before cache names held every setting is kept rather than recomputed.  Returns
    whether a cache was renamed (``on_adopt`` is told, in a sentence).
    """
    old, new = study.legacy_cache_path(split), study.cache_path(split)
    if new.exists() or not old.is_dir():
        return False
    try:
        load_cache(old).check(expected)
    except CacheError:
        return False
    try:
        os.replace(old, new)
    except OSError:  # another process (a shard on another machine) renamed it first
        return False
    if on_adopt is not None:
        on_adopt(f"Renamed the base cache {old} to {new} (cache names now hold every setting they depend on)")
    return True


def ensure_cache(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    split: str,
    *,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
    on_rebuild: Callable[[str], None] | None = None,
    on_adopt: Callable[[str], None] | None = None,
) -> tuple[BaseCache, bool]:
    """Load the base cache of ``split`` if it matches the study, else certify g and write it.

    Returns the cache and whether it was (re)built.  ``on_rebuild`` is told why an existing cache was not reused (one
    of an older format too), ``on_adopt`` that a cache under the old name was renamed (see
    :func:`adopt_legacy_cache`).  A cache whose noise this installation cannot reproduce is refused
    (:class:`~approxtune.cache.NoiseMismatchError`), never rebuilt over.
    """
    path = study.cache_path(split)
    expected = expected_meta(study, model, inputs, split)
    adopt_legacy_cache(study, split, expected, on_adopt)
    if path.exists():
        try:
            cache = load_cache(path)
            cache.check(expected)
            return cache, False
        except NoiseMismatchError:
            raise  # never overwrite a cache that another installation can replay: the user decides
        except CacheError as exc:
            if on_rebuild is not None:
                on_rebuild(str(exc))
    settings = certify_settings(study, split)
    cache = build_base_cache(
        model, inputs, path, settings, batch_size=study.certify.batch_size, device=device, progress=progress
    )
    return cache, True
