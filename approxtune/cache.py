"""The base-certification cache C_f: what IRS reuses from certifying the smoothed base model g once.

On-disk format (version 1): a directory holding ``meta.json`` and one ``.npy`` file per array, no pickle anywhere::

    meta.json         format_version, sigma, n0, n, alpha, seed, block_size, num_classes, num_inputs,
                      model_fingerprint, inputs_fingerprint
    index.npy         int64   (N,)    dataset index of each input (its noise seed derives from it)
    label.npy         int64   (N,)    true label
    c_hat.npy         int64   (N,)    class chosen by CERTIFY's n0 selection samples
    count.npy         int64   (N,)    number of the n estimation samples that f assigned to c_hat
    p_a.npy           float64 (N,)    one-sided (1 - alpha) Clopper-Pearson lower bound on P(f(x + eps) = c_hat)
    radius.npy        float64 (N,)    sigma * Phi^-1(p_a), 0 where CERTIFY abstained (whatever the label)
    seed.npy          int64   (N,)    noise seed of the input (see approxtune.noise)
    predictions.npy   uint8/16 (N, n) f's class on each estimation sample, in sample order

``predictions.npy`` is memory-mapped when loaded.  The directory is written under a temporary name and renamed into
place, so a reader never sees half a cache.  While a base certification runs, finished chunks of inputs are kept in
``<cache>.partial/``; a run that is killed and started again reuses them and ends with the same bytes as a run that
was never interrupted (per-input noise makes every chunk independent of the others).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from approxtune.certification import DEFAULT_BATCH_SIZE, certify
from approxtune.data import Inputs
from approxtune.noise import DEFAULT_BLOCK_SIZE, input_seeds
from approxtune.statistics import acr, certified_accuracy

__all__ = [
    "FORMAT_VERSION",
    "BaseCache",
    "CacheError",
    "CacheMeta",
    "build_base_cache",
    "load_cache",
    "model_fingerprint",
]

FORMAT_VERSION = 1
ARRAYS = ("index", "label", "c_hat", "count", "p_a", "radius", "seed", "predictions")
CHUNK_SAMPLES = 1 << 18
"""A base certification is checkpointed after every chunk of about this many noise samples."""


class CacheError(ValueError):
    """A cache that is missing, malformed or belongs to another model, sigma or input set."""


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's state dict: names, dtypes, shapes and values, in order."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-dim: BN counters
    return h.hexdigest()


@dataclass(frozen=True)
class CacheMeta:
    """Everything that determines a cache's contents."""

    sigma: float
    n0: int
    n: int
    alpha: float
    seed: int
    block_size: int
    num_inputs: int
    model_fingerprint: str
    inputs_fingerprint: str
    num_classes: int = 0
    format_version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> CacheMeta:
        data = json.loads(text)
        names = {f.name for f in fields(cls)}
        if set(data) != names:
            raise CacheError(f"cache metadata has keys {sorted(data)}, expected {sorted(names)}")
        return cls(**data)

    def differences(self, other: CacheMeta) -> list[str]:
        """Human-readable list of the settings in which ``other`` differs (num_classes is not a setting)."""
        labels = {
            "model_fingerprint": "the model (weights fingerprint)",
            "inputs_fingerprint": "the input set (fingerprint of images, labels and indices)",
        }
        out = []
        for f in fields(self):
            if f.name == "num_classes":
                continue
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                out.append(f"{labels.get(f.name, f.name)}: cache has {mine!r}, requested {theirs!r}")
        return out


@dataclass
class BaseCache:
    """A loaded cache; arrays as documented in the module docstring."""

    meta: CacheMeta
    index: np.ndarray
    label: np.ndarray
    c_hat: np.ndarray
    count: np.ndarray
    p_a: np.ndarray
    radius: np.ndarray
    seed: np.ndarray
    predictions: np.ndarray

    def __len__(self) -> int:
        return len(self.index)

    @property
    def certified_radius(self) -> np.ndarray:
        """Radius of each input for ACR: g's radius where it predicts the label, else 0."""
        return np.where(self.c_hat == self.label, self.radius, 0.0)

    @property
    def certified(self) -> np.ndarray:
        """Inputs where g predicts the label without abstaining (the only ones IRS can certify)."""
        return (self.c_hat == self.label) & (self.p_a > 0.5)

    def summary(self, radii: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)) -> dict[str, float]:
        """Base ACR and certified accuracy at a few radii."""
        r = self.certified_radius
        out = {"acr": acr(r)}
        out.update({f"cert_acc@{x:g}": certified_accuracy(r, x) for x in radii})
        return out

    def check(self, expected: CacheMeta) -> None:
        """Raise :class:`CacheError` naming every setting in which this cache differs from ``expected``."""
        diffs = self.meta.differences(expected)
        if diffs:
            raise CacheError("the base cache does not belong to this study:\n  " + "\n  ".join(diffs))


def _write_arrays(directory: Path, arrays: dict[str, np.ndarray], meta: CacheMeta) -> None:
    directory.mkdir(parents=True)
    for name in ARRAYS:
        np.save(directory / f"{name}.npy", arrays[name], allow_pickle=False)
    (directory / "meta.json").write_text(meta.to_json())


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is set aside first and removed afterwards."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def load_cache(path: str | Path, mmap: bool = True) -> BaseCache:
    """Load a cache directory written by :func:`build_base_cache` (``predictions`` memory-mapped if ``mmap``)."""
    path = Path(path)
    if not (path / "meta.json").is_file():
        raise CacheError(f"no base cache at {path}; create it with `approxtune certify STUDY.toml`")
    meta = CacheMeta.from_json((path / "meta.json").read_text())
    if meta.format_version != FORMAT_VERSION:
        raise CacheError(f"{path} has cache format {meta.format_version}; this approxtune reads {FORMAT_VERSION}")
    arrays = {}
    for name in ARRAYS:
        file = path / f"{name}.npy"
        if not file.is_file():
            raise CacheError(f"base cache {path} is incomplete: {file.name} is missing")
        arrays[name] = np.load(file, mmap_mode="r" if mmap and name == "predictions" else None, allow_pickle=False)
    if arrays["predictions"].shape != (meta.num_inputs, meta.n):
        raise CacheError(f"base cache {path} is malformed: predictions have shape {arrays['predictions'].shape}")
    return BaseCache(meta=meta, **arrays)


def _chunks(num_inputs: int, samples_per_input: int) -> list[tuple[int, int]]:
    size = max(1, CHUNK_SAMPLES // samples_per_input)
    return [(lo, min(lo + size, num_inputs)) for lo in range(0, num_inputs, size)]


def build_base_cache(
    model: nn.Module,
    inputs: Inputs,
    path: str | Path,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    seed: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: Callable[[int], None] | None = None,
) -> BaseCache:
    """Certify g = smoothed ``model`` on every input once (CERTIFY at level ``1 - alpha``) and write the cache.

    Resumable: chunks already finished in ``<path>.partial/`` for the same settings are reused, so a run killed at any
    moment and started again continues where it stopped and writes the same bytes.  ``progress`` is called with the
    number of noise samples evaluated (reused chunks included).  Returns the loaded cache.
    """
    path = Path(path)
    meta = CacheMeta(
        sigma=float(sigma),
        n0=int(n0),
        n=int(n),
        alpha=float(alpha),
        seed=int(seed),
        block_size=int(block_size),
        num_inputs=len(inputs),
        model_fingerprint=model_fingerprint(model),
        inputs_fingerprint=inputs.fingerprint(),
    )
    partial = path.with_name(path.name + ".partial")
    meta_file = partial / "meta.json"
    if partial.exists() and (not meta_file.is_file() or CacheMeta.from_json(meta_file.read_text()) != meta):
        shutil.rmtree(partial)  # left over from other settings: useless
    partial.mkdir(parents=True, exist_ok=True)
    if not meta_file.is_file():
        meta_file.write_text(meta.to_json())

    seeds = input_seeds(seed, inputs.index)
    parts = []
    for lo, hi in _chunks(len(inputs), n0 + n):
        file = partial / f"chunk-{lo:09d}-{hi:09d}.npz"
        if not file.is_file():
            result = certify(
                model,
                inputs.x[lo:hi],
                seeds[lo:hi],
                sigma,
                n0,
                n,
                alpha,
                batch_size=batch_size,
                block_size=block_size,
                device=device,
                progress=progress,
            )
            tmp = file.with_name(file.name + ".tmp.npz")
            np.savez(
                tmp,
                c_hat=result.c_hat,
                count=result.count,
                p_a=result.p_a,
                radius=result.radius,
                predictions=result.predictions,
            )
            os.replace(tmp, file)
        elif progress is not None:
            progress((hi - lo) * (n0 + n))
        with np.load(file, allow_pickle=False) as data:
            parts.append({k: data[k] for k in data.files})

    arrays = {k: np.concatenate([p[k] for p in parts]) for k in ("c_hat", "count", "p_a", "radius", "predictions")}
    arrays.update(index=inputs.index.astype(np.int64), label=inputs.y.numpy().astype(np.int64), seed=seeds)
    final_meta = CacheMeta(**{**asdict(meta), "num_classes": _num_classes(model, inputs, device)})
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    _write_arrays(tmp, arrays, final_meta)
    _replace_dir(tmp, path)
    shutil.rmtree(partial)
    return load_cache(path)


def _num_classes(model: nn.Module, inputs: Inputs, device: torch.device | str | None) -> int:
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.inference_mode():
        return int(model.eval()(inputs.x[:1].to(device)).shape[1])
