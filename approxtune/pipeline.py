"""The steps every command shares: the inputs of a study, its base model and its base caches.

``load_inputs`` splits a study's data (a built-in dataset, a folder, or the user's own); ``ensure_model`` builds or
loads its base model (training the embedded digits model when its checkpoint is missing); ``certify_split`` reuses a
base cache that matches the study or certifies g once and writes it, after checking that the disk can hold it — so
that ``approxtune tune`` runs from a fresh clone in one command.  :mod:`approxtune.job` puts them together.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from approxtune.cache import (
    SAME_CACHE,
    BaseCache,
    CacheDamagedError,
    CacheError,
    CacheMeta,
    CertifySettings,
    NoiseMismatchError,
    build_base_cache,
    build_lock,
    cache_meta,
    load_cache,
    set_aside,
)
from approxtune.certification import class_dtype
from approxtune.config import Study
from approxtune.data import DataError, Inputs, UserData, dataset_size, digits_splits, read_inputs
from approxtune.locking import file_lock, remove_leftovers
from approxtune.models import CheckpointError, build_architecture, load_checkpoint, load_weights, save_checkpoint
from approxtune.training import train_model
from approxtune.usercode import import_callable

__all__ = [
    "TRAINABLE",
    "adopt_legacy_cache",
    "certify_split",
    "ensure_cache",
    "ensure_model",
    "load_inputs",
    "report_cache_hint",
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
    "tensors": "a .npz or .pt file holding inputs x and labels y",
}


def study_folders(study: Study) -> list[Path]:
    """Where a study's own code (model factory, data loader) is imported from first: the study file's folder."""
    return [study.path.resolve().parent] if study.path is not None else []


def user_data(study: Study, data: object | None = None) -> UserData | None:
    """The study's data when the user brings it: ``data`` as given to the API, or ``data.loader``'s result."""
    if data is not None:
        return UserData(data, "the data")
    d = study.data
    if d.dataset != "python":
        return None
    if not d.loader:
        raise DataError(f'data.dataset = "python" needs data.loader = "package.module:callable" ({study.origin})')
    loader = import_callable(d.loader, "data.loader", study_folders(study))
    try:
        loaded = loader(**d.kwargs)
    except Exception as exc:  # the user's loader raised
        raise DataError(f"data.loader = {d.loader!r} raised {type(exc).__name__}: {exc}") from None
    return UserData(loaded, f"the data of data.loader = {d.loader!r}")


def load_inputs(study: Study, split: str, data: UserData | None = None) -> Inputs:
    """The study's ``train``, ``search`` or ``report`` inputs (search and report are disjoint and held out).

    ``digits`` is split as :func:`~approxtune.data.digits_splits` does.  Every other dataset — a real dataset
    (``cifar10``: the test batch, ``imagefolder``, ``tensors``) or the user's own data (``data``, e.g. from
    :func:`user_data`) — gives approxtune only inputs to certify: a seeded permutation (``data.split_seed``) of all
    its indices is cut into the first ``data.report_inputs`` (report) and the next ``data.search_inputs`` (search),
    each sorted into dataset order, and only the selected inputs are read.  There is no ``train`` split for them:
    their models come trained.  Raises :class:`~approxtune.data.DataError` naming the files or study keys to fix.
    """
    d = study.data
    if data is None and d.dataset == "digits":
        inputs = digits_splits(d.split_seed)[split]
        count = {"search": d.search_inputs, "report": d.report_inputs}.get(split)
        if count is not None and count > len(inputs):
            raise DataError(
                f"data.{split}_inputs = {count}, but the digits split holds {len(inputs)} {split} inputs; "
                f"lower data.{split}_inputs ({study.origin})"
            )
        return inputs if count is None else inputs.head(count)
    if split == "train":
        raise DataError(
            f"approxtune trains only the embedded digits model; a {d.dataset} study needs a trained model: put its "
            f"checkpoint at {study.checkpoint} or set model.checkpoint in {study.origin} (Cohen et al.'s "
            f"checkpoint.pth.tar files load as they are), or pass the trained model to approxtune.tune"
        )
    if split not in REAL_SPLITS:
        raise ValueError(f"split must be one of {', '.join(REAL_SPLITS)} for a {d.dataset} study, not {split!r}")
    if data is not None:
        total, source = len(data), data.what
    else:
        root = Path(d.root)
        try:
            total, source = dataset_size(d.dataset, root)
        except DataError as exc:
            raise DataError(f"{exc} (data.root in {study.origin} must name {_ROOT_HINTS[d.dataset]})") from None
    try:
        indices = split_indices(total, d.split_seed, d.report_inputs, d.search_inputs, source)[split]
    except DataError as exc:
        raise DataError(f"{exc} in {study.origin}") from None
    if data is not None:
        return data.read(indices)
    try:
        return read_inputs(d.dataset, root, indices)
    except DataError as exc:
        raise DataError(f"{exc} ({study.origin}: data.root = {d.root!r})") from None


def split_indices(
    total: int, split_seed: int, report: int, search: int, source: str = "the dataset"
) -> dict[str, np.ndarray]:
    """``{"report", "search"}``: disjoint sorted index arrays cut from a ``split_seed`` permutation of ``total``.

    Report takes the first ``report`` positions of the permutation and search the next ``search`` (as for digits),
    so the report inputs do not change when only ``search`` does.
    """
    if report + search > total:
        raise DataError(
            f"{source} has {total} inputs, but data.report_inputs = {report} and data.search_inputs = {search} need "
            f"{report + search} distinct ones; lower data.report_inputs or data.search_inputs"
        )
    order = np.random.default_rng(split_seed).permutation(total)
    return {"report": np.sort(order[:report]), "search": np.sort(order[report : report + search])}


def checkpoint_lock(study: Study, say: Callable[[str], None] | None = None) -> AbstractContextManager[None]:
    """The lock of the study's checkpoint (``<checkpoint>.lock``): one process trains while the others wait."""
    path = study.checkpoint
    return file_lock(path.with_name(path.name + ".lock"), say=say, what=f"trains the model {path}")


def train_study_model(
    study: Study, progress: Callable[[int, float], None] | None = None, say: Callable[[str], None] | None = None
) -> nn.Module:
    """Train the study's base model with noise augmentation at its sigma and save it to its checkpoint path, holding
    :func:`checkpoint_lock` (``say`` is told whom it waits for)."""
    arch = study.model.builtin_arch
    if study.model.kind != "builtin" or arch not in TRAINABLE:
        raise ValueError(
            f"approxtune trains only {', '.join(TRAINABLE)}; give a trained model (model.checkpoint) instead"
        )
    t = study.train
    with checkpoint_lock(study, say):
        remove_leftovers(study.checkpoint.parent, re.escape(study.checkpoint.name))  # of a killed training
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


def architecture(study: Study) -> dict[str, Any]:
    """The architecture spec (:mod:`approxtune.models`) of the model the study's [model] section names."""
    m = study.model
    if m.kind == "factory":
        folders = study_folders(study)
        return {
            "kind": "factory",
            "factory": m.factory,
            "kwargs": m.kwargs,
            "folder": str(folders[0]) if folders else None,
        }
    if m.kind == "torchvision":
        return {
            "kind": "torchvision",
            "name": m.torchvision,
            "num_classes": m.num_classes,
            "mean": m.mean,
            "std": m.std,
        }
    return {"kind": "builtin", "arch": m.builtin_arch}


def needs_training(study: Study) -> bool:
    """Whether the study's model is the trainable built-in one and its checkpoint does not exist yet."""
    return study.model.kind == "builtin" and study.model.builtin_arch in TRAINABLE and not study.checkpoint.exists()


def ensure_model(study: Study, progress: Callable[[int, float], None] | None = None) -> nn.Module:
    """The study's base model f on the CPU in eval mode, as its [model] section says.

    A built-in architecture loads its checkpoint (trained first when missing and trainable); a factory's model or a
    torchvision architecture is built (:func:`~approxtune.models.build_architecture`) and, when ``model.checkpoint``
    is set, the checkpoint is loaded into it (a torchvision model needs one: its weights are never downloaded).
    """
    m = study.model
    if m.kind != "builtin":
        model = build_architecture(architecture(study), study_folders(study))
        name = m.factory or m.torchvision
        if m.checkpoint:
            return load_weights(model, m.checkpoint, name)
        if m.kind == "torchvision":
            raise CheckpointError(
                f"model.torchvision = {name!r} needs model.checkpoint: approxtune never downloads weights, and a "
                f"randomly initialised network certifies nothing ({study.origin})"
            )
        return model.eval()
    arch = m.builtin_arch
    if needs_training(study):
        return train_study_model(study, progress)
    if not study.checkpoint.exists():
        raise CheckpointError(
            f"checkpoint {study.checkpoint} does not exist; approxtune trains only {', '.join(TRAINABLE)}, so a "
            f"{arch} study needs the trained model's checkpoint: put it there or set model.checkpoint in "
            f"{study.origin} (Cohen et al.'s checkpoint.pth.tar files, e.g. "
            "models/cifar10/resnet110/noise_0.50/checkpoint.pth.tar from their release, load as they are)"
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


def reusable_cache(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    split: str,
    *,
    on_rebuild: Callable[[str], None] | None = None,
    on_adopt: Callable[[str], None] | None = None,
    repair: bool = False,
) -> BaseCache | None:
    """The base cache of ``split`` on disk if it matches the study (adopting one under the old name), else None.

    ``on_rebuild`` is told why an existing cache cannot be reused (one of an older format too), ``on_adopt`` that one
    was renamed (:func:`adopt_legacy_cache`).  A cache whose noise this installation cannot reproduce is refused
    (:class:`~approxtune.cache.NoiseMismatchError`), never rebuilt over.  A damaged cache is set aside (kept as
    ``<cache>.damaged-<time>``) when ``repair`` (``approxtune certify``), else refused
    (:class:`~approxtune.cache.CacheDamagedError`, naming the file and the command that repairs it).
    """
    path = study.cache_path(split)
    expected = expected_meta(study, model, inputs, split)
    adopt_legacy_cache(study, split, expected, on_adopt)
    if not path.exists():
        return None
    try:
        cache = load_cache(path)
        cache.check(expected)
    except NoiseMismatchError:
        raise  # never overwrite a cache that another installation can replay: the user decides
    except CacheDamagedError as exc:
        if not repair:
            raise damaged(study, split, exc) from None
        aside = set_aside(path)
        if on_rebuild is not None:
            on_rebuild(f"it is damaged ({exc.problem}); set aside as {aside.name}")
        return None
    except CacheError as exc:
        if on_rebuild is not None:
            on_rebuild(str(exc))
        return None
    return cache


def damaged(study: Study, split: str, exc: CacheDamagedError, then: str = "") -> CacheDamagedError:
    """The refusal of a damaged cache of ``split`` by every command but ``certify``: which file is damaged, and the
    command that sets it aside and certifies it again (followed by ``then``)."""
    fix = f"{certify_command(study, split)} sets it aside and certifies it again ({SAME_CACHE}){then}"
    return CacheDamagedError(exc.path, exc.problem, fix)


def certify_command(study: Study, split: str) -> str:
    """The command that certifies ``split`` of the study: ``approxtune certify`` (or the Python API's certify)."""
    report = split == "report"
    if study.path is None:
        return "`approxtune.certify(model, data, ...{})`".format(', split="report"' if report else "")
    return f"`approxtune certify {study.path}{' --split report' if report else ''}`"


def cache_bytes(study: Study, inputs: int, num_classes: int) -> int:
    """Bytes of a base cache's predictions of ``inputs`` inputs (the bulk of the cache): ``inputs x n`` classes."""
    return inputs * study.certify.n * class_dtype(num_classes).itemsize


def check_room(study: Study, inputs: int, num_classes: int, sample_bytes: int = 0) -> None:
    """Refuse, before certifying, a base cache that the disk or the memory cannot hold, and a batch of noisy inputs
    (``sample_bytes`` each) that the memory cannot hold.

    Certifying writes the predictions twice on disk (the checkpointed chunks, then the cache, before the chunks are
    removed) and concatenates them in memory once.
    """
    c = study.certify
    size = cache_bytes(study, inputs, num_classes)
    where = Path(study.output_dir).absolute()
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    what = f"certifying {inputs} inputs with certify.n = {c.n:,} makes a cache of {_human(size)}"
    if 2 * size > free:
        raise CacheError(
            f"{what} (twice that while it is written), but {where} has {_human(free)} free; lower certify.n or the "
            "number of inputs, or set study.output_dir on a larger disk"
        )
    memory = _available_memory()
    if memory is not None and size > memory:
        raise CacheError(
            f"{what}, which must fit in memory once, but {_human(memory)} is available; lower certify.n or the number "
            "of inputs"
        )
    batch = c.batch_size * sample_bytes  # the buffer of noisy inputs that every forward pass fills
    if memory is not None and batch > memory:
        raise CacheError(
            f"certify.batch_size = {c.batch_size:,} noisy inputs of {sample_bytes:,} bytes take {_human(batch)}, but "
            f"{_human(memory)} of memory is available; lower certify.batch_size"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _human(size: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def build_cache(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    split: str,
    *,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> BaseCache:
    """Certify g on the inputs of ``split`` (resuming finished chunks) and write its base cache."""
    settings = certify_settings(study, split)
    return build_base_cache(
        model,
        inputs,
        study.cache_path(split),
        settings,
        batch_size=study.certify.batch_size,
        device=device,
        progress=progress,
    )


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

    Returns the cache and whether it was (re)built (:func:`reusable_cache`, then :func:`build_cache`).
    """
    cache = reusable_cache(study, model, inputs, split, on_rebuild=on_rebuild, on_adopt=on_adopt)
    if cache is not None:
        return cache, False
    return build_cache(study, model, inputs, split, device=device, progress=progress), True


def certify_split(
    study: Study,
    model: nn.Module,
    inputs: Inputs,
    split: str,
    *,
    num_classes: int,
    device: torch.device,
    progress: Callable[[str, int], AbstractContextManager[Callable[[int], None]]],
    say: Callable[[str], None],
    repair: bool = False,
) -> tuple[BaseCache, bool]:
    """The base cache of ``split``: reused when it matches, else certified under a ``progress(description, total)``
    bar once the disk and memory are known to hold it (:func:`check_room`); ``say`` is told what was done.

    Holds the cache's lock (:func:`~approxtune.cache.build_lock`) from the check to the end: a process that starts
    while another certifies this cache waits (saying so), then reuses it.  A damaged cache is set aside and certified
    again when ``repair``, else refused (:func:`reusable_cache`).  Returns the cache and whether it was certified now.
    """
    path = study.cache_path(split)
    sample_bytes = inputs.x[0].numel() * 4  # a float32 noisy input
    if not path.exists():
        check_room(study, len(inputs), num_classes, sample_bytes)  # before anything is written, the lock file included
    with build_lock(path, say=say):
        cache = reusable_cache(
            study,
            model,
            inputs,
            split,
            on_rebuild=lambda why: say(f"Rebuilding {path}: {why}"),
            on_adopt=say,
            repair=repair,
        )
        built = cache is None
        if built:
            check_room(study, len(inputs), num_classes, sample_bytes)
            c = study.certify
            with progress(f"certify g on {len(inputs)} {split} inputs", len(inputs) * (c.n0 + c.n)) as advance:
                cache = build_cache(study, model, inputs, split, device=device, progress=advance)
    say(f"{'Wrote' if built else 'Reusing'} the base cache {path}")
    return cache, built


def report_cache_hint(study: Study) -> str:
    """How to build the report inputs' base cache ahead of time (``export`` certifies against it, building it if
    missing)."""
    c = study.certify
    how = certify_command(study, "report")
    return (
        f"build the held-out report cache ahead of time with {how} ({study.data.report_inputs} inputs x "
        f"{c.n0 + c.n:,} samples of g; `export` builds it otherwise)"
    )
