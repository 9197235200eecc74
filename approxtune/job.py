"""A study ready to run: its settings, the base model f, f's architecture spec and its data, checked together.

:func:`prepare` is the one place where a study's model and data come together, for the command line (from the study
file) and for the Python API (from the objects the user passes) alike.  Everything that can be checked without
certifying is checked here, before any certification starts: the settings, the output directory, the data (lengths,
finite inputs, integer labels, enough inputs for the splits), the model (a module, with layers to compress, mapping a
batch of the data to logits ``(N, classes)``) and the labels against those classes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxtune import pipeline
from approxtune.approximation import compressible_layers
from approxtune.config import Study
from approxtune.data import DataError, Inputs, UserData
from approxtune.errors import ApproxtuneError
from approxtune.models import ModelError, build_model
from approxtune.usercode import qualified_name

__all__ = ["Job", "check_layers", "check_model", "check_writable", "prepare"]

SPLITS = ("search", "report")


@dataclass
class Job:
    """What every command runs on: ``study`` settings, the base model ``model`` (f, eval mode, on ``device``), the
    spec that rebuilds its architecture (:mod:`approxtune.models`), and the user's data if they brought it."""

    study: Study
    model: nn.Module
    architecture: dict[str, Any]
    device: torch.device
    num_classes: int
    data: UserData | None = None
    _inputs: dict[str, Inputs] = field(default_factory=dict, repr=False)

    def inputs(self, split: str) -> Inputs:
        """The ``search`` or ``report`` inputs (read once)."""
        if split not in self._inputs:
            self._inputs[split] = pipeline.load_inputs(self.study, split, self.data)
        return self._inputs[split]


def check_writable(directory: Path) -> None:
    """Refuse an output directory that cannot be created or written, without creating anything."""
    path = Path(directory).absolute()
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ApproxtuneError(
                    f"cannot write to {directory}: {parent} is a file, not a directory; set study.output_dir elsewhere"
                )
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ApproxtuneError(
                    f"cannot write to {directory}: {parent} is not writable; set study.output_dir elsewhere"
                )
            return


def check_layers(model: nn.Module, study: Study) -> None:
    """Check that ``model`` is an ``nn.Module`` with a compressible layer (``Conv1d/2d/3d``, ``Linear``) and that
    every pattern of ``search.include`` and ``search.exclude`` matches one; raises :class:`ModelError`."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"the model is a {type(model).__name__}, not a torch.nn.Module")
    if not compressible_layers(model):
        raise ModelError(
            "the model has no layer to compress: approxtune compresses the weights of nn.Conv1d, nn.Conv2d, "
            "nn.Conv3d and nn.Linear modules, and the model has none"
        )
    compressible_layers(model, study.search.include, study.search.exclude or None)  # every pattern must match


def check_model(model: nn.Module, inputs: list[Inputs], study: Study) -> int:
    """Check that ``model`` fits the study and its data; returns the number of classes it predicts.

    It must pass :func:`check_layers`, map a batch ``(N, *shape)`` of the inputs to finite logits ``(N, classes)``
    with at least two classes, and every label must lie in ``[0, classes)``.  Raises :class:`ModelError` otherwise.
    """
    check_layers(model, study)
    batch = inputs[0].x[:2]
    device = next(iter(model.parameters()), torch.empty(0)).device
    try:
        with torch.inference_mode():
            out = model.eval()(batch.to(device))
    except Exception as exc:  # the user's forward pass failed on the data
        raise ModelError(
            f"the model cannot run on the data: a batch of shape {tuple(batch.shape)} raised "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != len(batch) or out.shape[1] < 2:
        got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
        raise ModelError(
            f"the model must map a batch (N, *shape) to logits (N, classes) with at least 2 classes; a batch of shape "
            f"{tuple(batch.shape)} gave {got}"
        )
    classes = int(out.shape[1])
    for part in inputs:
        if len(part) and int(part.y.max()) >= classes:
            bad = sorted({int(v) for v in part.y[part.y >= classes].tolist()})[:10]
            raise DataError(
                f"labels {bad} lie outside [0, {classes}): the model predicts {classes} classes; fix the labels or the "
                "model's output layer"
            )
    return classes


def prepare(
    study: Study,
    *,
    model: nn.Module | None = None,
    data: object | None = None,
    device: str | torch.device | None = None,
    train_progress: Callable[[str, int], Any] | None = None,
    no_training: str | None = None,
    say: Callable[[str], None] | None = None,
) -> Job:
    """The :class:`Job` of ``study``: ``model`` and ``data`` as given, or as the study's [model] and [data] say.

    Checks the data first, then builds or loads the model (training the embedded digits model when its checkpoint
    is missing, with ``train_progress(description, epochs)`` as a progress context; ``no_training`` instead makes a
    missing checkpoint an error with that message), then checks the two together (:func:`check_model`).  Before
    training, the layer patterns are checked on the untrained architecture and the search cache against the free
    disk and memory (:func:`~approxtune.pipeline.check_room`), so that a refusal writes nothing.  Only one process
    trains a study's model; others started at once wait for its checkpoint (``say`` is told).  The given ``model`` is
    not modified: f is a copy, in eval mode, on the device.
    """
    check_writable(study.output_dir)
    device = pipeline.resolve_device(study, str(device) if device is not None else None)
    train = model is None and pipeline.needs_training(study)
    if train and no_training is not None:
        raise ApproxtuneError(no_training)
    if model is not None:
        named = [key for key in ("arch", "factory", "torchvision", "checkpoint") if getattr(study.model, key)]
        if named:
            raise ModelError(
                f"the model is given as an object and in [model] ({', '.join('model.' + k for k in named)} in "
                f"{study.origin}); give it one way, not both"
            )
        if not isinstance(model, nn.Module):
            raise ModelError(f"the model is a {type(model).__name__}, not a torch.nn.Module")
        spec = {"kind": "module", "class": qualified_name(type(model))}
        base = copy.deepcopy(model).eval()
    elif not train:  # loading a checkpoint is cheap: its problems are reported first
        spec, base = pipeline.architecture(study), pipeline.ensure_model(study)
    user = pipeline.user_data(study, data)
    inputs = {split: pipeline.load_inputs(study, split, user) for split in SPLITS}
    if train:  # the data, the layers and the room for the cache are checked before training starts
        check_layers(build_model(study.model.builtin_arch), study)
        if not study.cache_path("search").exists():
            search = inputs["search"]  # the least a cache takes: 1 byte per sample (2 classes)
            pipeline.check_room(study, len(search), num_classes=2, sample_bytes=search.x[0].numel() * 4)
        spec, base = pipeline.architecture(study), _train(study, train_progress, say)
    base = base.to(device)
    classes = check_model(base, list(inputs.values()), study)
    return Job(study, base, spec, device, classes, user, dict(inputs))


def _train(study: Study, progress: Callable[[str, int], Any] | None, say: Callable[[str], None] | None) -> nn.Module:
    """Train the study's model, or load it when another process trained it while this one waited for the lock."""
    with pipeline.checkpoint_lock(study, say):
        if not pipeline.needs_training(study):
            if say is not None:
                say(f"Loading the model {study.checkpoint}, trained by the process this one waited for")
            return pipeline.ensure_model(study)
        description = f"train {study.model.builtin_arch} (sigma={study.certify.sigma:g})"
        if progress is None:
            return pipeline.train_study_model(study)
        with progress(description, study.train.epochs) as advance:
            return pipeline.train_study_model(study, progress=lambda epoch, loss: advance(1))
