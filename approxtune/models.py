"""Model architectures known to approxtune, addressed by name from a study file.

Every model takes inputs in pixel space ([0, 1]) and returns logits; any normalisation is a layer inside the model,
so noise is always added before normalisation, as in Cohen et al. (2019).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

__all__ = ["ARCHITECTURES", "CheckpointError", "DigitsCNN", "build_model", "load_checkpoint", "save_checkpoint"]


class DigitsCNN(nn.Module):
    """A small CNN for scikit-learn's 8x8 digits (38,282 parameters)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.pool(self.relu(self.conv2(x)))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "digits-cnn": DigitsCNN,
}


def build_model(arch: str) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (one of :data:`ARCHITECTURES`)."""
    try:
        return ARCHITECTURES[arch]()
    except KeyError:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}") from None


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded safely or does not fit its architecture."""


def load_checkpoint(path: str | Path, arch: str | None = None) -> nn.Module:
    """Load a model from ``path`` on the CPU, never running code from the file (``weights_only=True``).

    Accepts Cohen et al.'s format ``{"arch": ..., "state_dict": ...}`` (the format ``approxtune train`` writes) and
    plain state dicts; ``arch`` is required for the latter and must agree with the file's when both are given.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `approxtune train STUDY.toml`")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"refusing to load {path}: it is not a plain-data checkpoint ({exc})") from None
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    file_arch = obj.get("arch") if isinstance(obj, dict) else None
    if state is None or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict")
    arch = arch or file_arch
    if arch is None:
        raise CheckpointError(f"{path} does not name its architecture; set model.arch in the study file")
    if file_arch is not None and file_arch != arch:
        raise CheckpointError(f"{path} holds a {file_arch!r} model, but the study asks for {arch!r}")
    model = build_model(arch)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not fit architecture {arch!r}: "
            f"missing keys {list(missing)}, unexpected keys {list(unexpected)}"
        )
    return model.eval()


def save_checkpoint(model: nn.Module, arch: str, path: str | Path) -> None:
    """Write ``{"arch", "state_dict"}`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"arch": arch, "state_dict": model.state_dict()}, tmp)
    os.replace(tmp, path)
