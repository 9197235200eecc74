"""Datasets: the embedded scikit-learn digits default, split into train / search / held-out report inputs.

Images are float32 tensors in [0, 1] of shape (N, C, H, W); labels are int64.  ``index`` holds each image's index in
its dataset: it names the input (its noise seed derives from it) and goes into the cache.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["DIGITS_SPLIT", "Inputs", "digits_splits"]

DIGITS_SPLIT = {"report": 300, "search": 300}
"""Sizes of the held-out parts of the digits split; the remaining 1,197 images are for training."""


@dataclass(frozen=True)
class Inputs:
    """A set of labelled images: ``x`` (N, C, H, W) float32 in [0, 1], ``y`` (N,) int64, ``index`` (N,) int64."""

    x: torch.Tensor
    y: torch.Tensor
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.y)

    def head(self, count: int) -> Inputs:
        """The first ``count`` inputs."""
        return Inputs(self.x[:count], self.y[:count], self.index[:count])

    def fingerprint(self) -> str:
        """SHA-256 of the images, labels and indices (what a cache was computed on)."""
        h = hashlib.sha256()
        for arr in (self.x.contiguous().numpy(), self.y.numpy(), self.index):
            h.update(str((arr.dtype.str, arr.shape)).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()


def digits_splits(split_seed: int = 0) -> dict[str, Inputs]:
    """scikit-learn's bundled 8x8 digits (1,797 images), scaled to [0, 1], split by a fixed seeded permutation.

    Returns ``{"train", "search", "report"}``; the report inputs are held out from both training and search.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(digits.target.astype(np.int64))
    order = np.random.default_rng(split_seed).permutation(len(y))
    bounds = {"report": (0, DIGITS_SPLIT["report"])}
    bounds["search"] = (bounds["report"][1], bounds["report"][1] + DIGITS_SPLIT["search"])
    bounds["train"] = (bounds["search"][1], len(y))
    out = {}
    for name, (lo, hi) in bounds.items():
        idx = np.sort(order[lo:hi])
        out[name] = Inputs(x[idx], y[idx], idx.astype(np.int64))
    return out
