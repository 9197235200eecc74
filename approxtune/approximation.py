"""The per-layer approximation space: weight-only quantization and L1 pruning of a classifier ``f``.

An :class:`ApproximationConfig` maps compressible layers (``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` and
``nn.Linear``, addressed by their qualified names from ``named_modules()``; output channels along dim 0 of the weight)
to a :class:`LayerChoice` — a precision in :data:`PRECISIONS` and a
within-layer L1 pruning amount in [0, 1) — plus an optional *global* L1 pruning amount across all of the config's
layers.  Layers that the config does not name are left exactly as they are; only weights change (biases, BatchNorm
and every other tensor stay fp32).

Pruning (applied first).  Pruning an amount ``a`` of a tensor of ``n`` weights zeroes exactly ``round(a * n)`` of
them (Python's ``round``, half to even, as ``torch.nn.utils.prune``): those of smallest ``|w|``, ties broken by
flattened (C-order) position, earliest first.  Global pruning ranks the weights of all the config's layers together
(concatenated in config order) and zeroes exactly ``round(a * N)`` of the ``N``, i.e. one threshold on ``|w|``.
Global and per-layer pruning are mutually exclusive in one config.

Quantization (applied to the kept weights; pruned zeros stay zero).

* ``fp16`` / ``bf16``: round to nearest (even) in that dtype; the value computed with is that number in fp32.
* ``int8`` / ``int4``: per-output-channel (dim 0) symmetric: ``s_c = max_c |w| / qmax`` (``qmax`` = 127 / 7),
  ``q = clamp(round(w / s_c), -qmax, qmax)`` (round half to even), value ``q * s_c`` in fp32.  An all-zero channel
  gets ``s_c = 1`` and ``q = 0``.

The compressed weights are explicit arrays (:func:`compress_layer`), and :func:`apply_approximation` builds ``f^p``
by decompressing exactly those arrays, so ``f^p`` is the function that an export of them ships.  Computation stays
in fp32.  Layout of one layer's arrays (``n`` weights, ``k`` kept, ``C`` output channels, all flattened in C order):

=========  ==========================================================  ==============
key        contents                                                    present
=========  ==========================================================  ==============
values     fp32: float32; fp16: float16; bf16: uint16 (bit patterns);  always
           int8: int8; int4: uint8, two per byte (element ``2i`` in
           the low nibble, ``2i+1`` in the high one, two's complement;
           an odd count leaves the last high nibble 0)
scale      float32 ``(C,)``, one per output channel                    int8, int4
mask       ``np.packbits`` of the kept positions (``n`` bits, 1=kept)  sparse only
=========  ==========================================================  ==============

Dense encoding stores all ``n`` values (pruned ones as 0); sparse stores ``mask`` and only the ``k`` kept values.
A pruned layer uses sparse when that is strictly smaller, dense otherwise; an unpruned layer is always dense.  The
precision is read back from the dtype of ``values``.

Model size (the exact formula; integer buffers such as BatchNorm's ``num_batches_tracked`` are not counted, since
inference does not use them)::

    size(f^p) = sum over the config's layers l of  sum(a.nbytes for a in compress_layer(W_l, choice_l, mask_l))
              + 4 * (number of elements of every other floating-point tensor in f's state dict)

    bytes(l)  = min(dense, sparse) if l is pruned else dense,  dense = V(n),  sparse = ceil(n / 8) + V(k)
    V(m)      = 4m (fp32), 2m (fp16, bf16), m + 4C (int8), ceil(m / 2) + 4C (int4)

``fp32_size_bytes(f)`` is 4 bytes per element of every floating-point state-dict tensor (the all-fp32, unpruned
config's size), and ``size_ratio = size(f^p) / fp32_size_bytes(f)``.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from approxtune.config import PRECISIONS
from approxtune.errors import ApproxtuneError

__all__ = [
    "COMPRESSIBLE_TYPES",
    "PRECISIONS",
    "PRESETS",
    "ApproximationConfig",
    "ApproximationError",
    "LayerChoice",
    "apply_approximation",
    "compress_layer",
    "compress_model",
    "compressible_layers",
    "decompress_layer",
    "fp32_size_bytes",
    "global_l1_masks",
    "l1_mask",
    "model_size_bytes",
    "packed_precision",
    "preset",
    "pruning_masks",
    "size_ratio",
]

COMPRESSIBLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_QMAX = {"int8": 127, "int4": 7}
_VALUE_DTYPES = {
    "fp32": np.dtype(np.float32),
    "fp16": np.dtype(np.float16),
    "bf16": np.dtype(np.uint16),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8),
}
_PRECISION_OF_DTYPE = {dtype: precision for precision, dtype in _VALUE_DTYPES.items()}
_PACKED_KEYS = ("values", "scale", "mask")

Packed = dict[str, np.ndarray]


class ApproximationError(ApproxtuneError):
    """An approximation config, layer selection or packed layer that does not fit (with the valid choices)."""


def _choices(names: Iterable[str], limit: int = 40) -> str:
    names = list(names)
    if not names:
        return "(none)"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(repr(n) for n in names[:limit]) + more


def _suggest(word: str, valid: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(valid), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------------------------------- selection


def compressible_layers(
    model: nn.Module, include: list[str] | None = None, exclude: list[str] | None = None
) -> list[str]:
    """Qualified names of ``model``'s Conv1d/Conv2d/Conv3d/Linear modules (subclasses too), in module order.

    ``include`` keeps only layers matching at least one glob pattern (``fnmatch``, case-sensitive; ``*`` also matches
    dots); ``None`` or ``[]`` keeps all.  ``exclude`` then drops layers matching any of its patterns.  Every pattern
    must match at least one compressible layer.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, COMPRESSIBLE_TYPES)]
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                raise ApproximationError(
                    f"{kind} pattern {pattern!r} matches no compressible layer; the layers are {_choices(names)}"
                )
    if include:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    if exclude:
        names = [n for n in names if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    return names


# ------------------------------------------------------------------------------------------------------- configs


def _check_amount(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
        raise ApproximationError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LayerChoice:
    """How one layer is approximated: weight precision (one of :data:`PRECISIONS`) and L1 pruning amount in [0, 1)."""

    precision: str = "fp32"
    prune: float = 0.0

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ApproximationError(
                f"unknown precision {self.precision!r}{_suggest(str(self.precision).lower(), PRECISIONS)}; "
                f"choose one of {', '.join(PRECISIONS)}"
            )
        object.__setattr__(self, "prune", _check_amount(self.prune, "prune"))

    def __str__(self) -> str:
        return self.precision + (f"/p{self.prune:g}" if self.prune else "")


@dataclass(frozen=True)
class ApproximationConfig:
    """Per-layer choices (layers not named are left untouched) and a global L1 pruning amount over those layers.

    ``global_prune > 0`` ranks the weights of all of ``layers`` together; it excludes per-layer pruning.
    """

    layers: dict[str, LayerChoice] = field(default_factory=dict)
    global_prune: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.layers, Mapping):
            raise ApproximationError(f"layers must map layer names to LayerChoice, got {type(self.layers).__name__}")
        for name, choice in self.layers.items():
            if not isinstance(name, str) or not isinstance(choice, LayerChoice):
                raise ApproximationError(f"layer {name!r}: expected a str name and a LayerChoice, got {choice!r}")
        object.__setattr__(self, "layers", dict(self.layers))
        object.__setattr__(self, "global_prune", _check_amount(self.global_prune, "global_prune"))
        if self.global_prune:
            pruned = [name for name, choice in self.layers.items() if choice.prune]
            if pruned:
                raise ApproximationError(
                    f"global_prune={self.global_prune:g} excludes per-layer pruning, but {_choices(pruned)} set prune"
                )

    def __hash__(self) -> int:
        return hash((frozenset(self.layers.items()), self.global_prune))  # equality ignores layer order, so does this

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: ``{"layers": {name: {"precision", "prune"}}, "global_prune"}``, layers in config order."""
        return {
            "layers": {name: {"precision": c.precision, "prune": c.prune} for name, c in self.layers.items()},
            "global_prune": self.global_prune,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApproximationConfig:
        """Inverse of :meth:`to_dict`; a missing ``precision``/``prune``/``global_prune`` takes its default."""
        if not isinstance(data, Mapping):
            raise ApproximationError(f"an approximation config is a mapping, got {type(data).__name__}")
        _check_keys(data, ("layers", "global_prune"), "approximation config")
        layers_data = data.get("layers", {})
        if not isinstance(layers_data, Mapping):
            raise ApproximationError(f"'layers' must map layer names to choices, got {type(layers_data).__name__}")
        layers = {}
        for name, choice in layers_data.items():
            if not isinstance(choice, Mapping):
                raise ApproximationError(f"layer {name!r}: a choice is a mapping with precision/prune, got {choice!r}")
            _check_keys(choice, ("precision", "prune"), f"layer {name!r}")
            try:
                layers[name] = LayerChoice(**choice)
            except ApproximationError as exc:
                raise ApproximationError(f"layer {name!r}: {exc}") from None
        return cls(layers, data.get("global_prune", 0.0))

    def validate(self, model: nn.Module) -> None:
        """Raise :class:`ApproximationError` unless every named layer is a compressible layer of ``model``.

        Two named layers must not share one weight tensor (tied weights): name only one of them.
        """
        valid = compressible_layers(model)
        valid_set = set(valid)
        owners: dict[int, str] = {}
        for name in self.layers:
            if name not in valid_set:
                raise ApproximationError(
                    f"unknown layer {name!r}{_suggest(name, valid)}; the compressible layers are {_choices(valid)}"
                )
            owner = owners.setdefault(id(model.get_submodule(name).weight), name)
            if owner != name:
                raise ApproximationError(
                    f"layers {owner!r} and {name!r} share one weight tensor; name only one of them"
                )

    def summary(self) -> str:
        """Short human description, e.g. ``"conv1 int8, conv2 int4/p0.2, fc1 fp16, fc2 fp32"``."""
        text = ", ".join(f"{name} {choice}" for name, choice in self.layers.items()) or "(no layers)"
        return text + (f"; global prune {self.global_prune:g}" if self.global_prune else "")


def _check_keys(data: Mapping[str, Any], valid: tuple[str, ...], what: str) -> None:
    for key in data:
        if key not in valid:
            raise ApproximationError(
                f"{what}: unknown key {key!r}{_suggest(str(key), valid)}; valid keys: {', '.join(valid)}"
            )


PRESETS: dict[str, LayerChoice] = {
    "fp32": LayerChoice("fp32"),
    "fp16": LayerChoice("fp16"),
    "bf16": LayerChoice("bf16"),
    "int8": LayerChoice("int8"),
    "prune5": LayerChoice("fp32", 0.05),
    "prune10": LayerChoice("fp32", 0.10),
    "prune20": LayerChoice("fp32", 0.20),
}
"""The uniform approximations of the IRS paper: one choice for every layer."""


def preset(
    name: str, model: nn.Module, layers: list[str] | None = None, *, global_pruning: bool = False
) -> ApproximationConfig:
    """The uniform config ``name`` (a key of :data:`PRESETS`) over ``layers`` (default: all compressible layers).

    With ``global_pruning`` a pruning preset prunes its amount globally across the layers instead of per layer.
    """
    if name not in PRESETS:
        raise ApproximationError(
            f"unknown preset {name!r}{_suggest(name, PRESETS)}; choose one of {', '.join(PRESETS)}"
        )
    choice = PRESETS[name]
    names = compressible_layers(model) if layers is None else list(layers)
    if global_pruning and choice.prune:
        config = ApproximationConfig(dict.fromkeys(names, LayerChoice(choice.precision)), choice.prune)
    else:
        config = ApproximationConfig(dict.fromkeys(names, choice))
    config.validate(model)
    return config


# ------------------------------------------------------------------------------------------------------- pruning


def _smallest(magnitudes: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask of the ``k`` smallest entries, ties broken by position (as a stable argsort would); O(n).

    NaN counts as larger than every number (as in a sort), so it is pruned only once all numbers are.
    """
    a = np.where(np.isnan(magnitudes), np.inf, magnitudes)
    pruned = np.zeros(a.size, dtype=bool)
    if k >= a.size:
        pruned[:] = True
    elif k > 0:
        threshold = np.partition(a, k - 1)[k - 1]
        np.less(a, threshold, out=pruned)
        pruned[np.flatnonzero(a == threshold)[: k - int(pruned.sum())]] = True
    return pruned


def _magnitudes(weight: torch.Tensor) -> np.ndarray:
    return np.abs(weight.detach().to("cpu", torch.float32).numpy().reshape(-1))


def l1_mask(weight: torch.Tensor, amount: float) -> torch.Tensor:
    """Boolean keep-mask zeroing exactly ``round(amount * numel)`` smallest-``|w|`` entries (ties: earliest first)."""
    amount = _check_amount(amount, "prune")
    magnitudes = _magnitudes(weight)
    keep = ~_smallest(magnitudes, round(amount * magnitudes.size))
    return torch.from_numpy(keep).reshape(weight.shape)


def global_l1_masks(weights: Mapping[str, torch.Tensor], amount: float) -> dict[str, torch.Tensor]:
    """Keep-masks zeroing exactly ``round(amount * N)`` of all ``N`` weights together, one threshold on ``|w|``.

    Ties are broken by position in the concatenation of the flattened weights in ``weights``' order.
    """
    amount = _check_amount(amount, "global_prune")
    if not weights:
        return {}
    magnitudes = np.concatenate([_magnitudes(w) for w in weights.values()])
    keep = ~_smallest(magnitudes, round(amount * magnitudes.size))
    parts = np.split(keep, np.cumsum([w.numel() for w in weights.values()])[:-1])
    return {
        name: torch.from_numpy(part).reshape(w.shape) for (name, w), part in zip(weights.items(), parts, strict=True)
    }


def pruning_masks(model: nn.Module, config: ApproximationConfig) -> dict[str, torch.Tensor | None]:
    """The keep-mask of every layer of ``config`` (``None`` where the layer is not pruned)."""
    weights = {name: model.get_submodule(name).weight for name in config.layers}
    if config.global_prune:
        return dict(global_l1_masks(weights, config.global_prune))
    return {
        name: l1_mask(weights[name], choice.prune) if choice.prune else None for name, choice in config.layers.items()
    }


# ----------------------------------------------------------------------------------------------- packed layers


def _pack_int4(q: np.ndarray) -> np.ndarray:
    nibbles = q.astype(np.uint8) & 0x0F  # two's complement low nibble
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, count: int) -> np.ndarray:
    if packed.size != -(-count // 2):
        raise ApproximationError(f"int4 values: {packed.size} bytes cannot hold exactly {count} values")
    nibbles = np.empty(2 * packed.size, dtype=np.uint8)
    nibbles[0::2] = packed & 0x0F
    nibbles[1::2] = packed >> 4
    return (nibbles[:count] ^ 8).astype(np.int8) - np.int8(8)


def _to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounding to nearest even (NaN -> the quiet NaN 0x7FC0), as torch does."""
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def _round_half_precision(values: np.ndarray, precision: str) -> np.ndarray:
    """``values`` (float32) rounded to fp16 (as float16) or bf16 (as uint16 bit patterns); overflow is an error."""
    if precision == "fp16":
        with np.errstate(over="ignore"):
            stored = values.astype(np.float16)
        overflow = np.isinf(stored)
    else:
        stored = _to_bf16_bits(values)
        overflow = (stored & np.uint16(0x7FFF)) == np.uint16(0x7F80)
    if overflow.any() and not np.isinf(values).any():
        raise ApproximationError(f"weights up to {np.abs(values).max():g} overflow {precision}")
    return stored


def compress_layer(weight: torch.Tensor, choice: LayerChoice, mask: torch.Tensor | None = None) -> Packed:
    """The stored arrays of one weight tensor (layout in the module docstring).

    ``mask`` is a boolean keep-mask of ``weight``'s shape (``True`` = kept); masked-out weights become exact zeros
    before quantization, and the per-channel int scales are taken over the kept weights.  (The arithmetic is numpy's,
    single-threaded: torch's intra-op threads stall on a busy machine, and the result is the same IEEE arithmetic.)
    """
    w = weight.detach().to("cpu", torch.float32).numpy().reshape(-1)
    keep = None
    if mask is not None:
        if mask.dtype != torch.bool or tuple(mask.shape) != tuple(weight.shape):
            raise ApproximationError(
                f"mask must be a bool tensor of the weight's shape {tuple(weight.shape)}, "
                f"got {mask.dtype} of shape {tuple(mask.shape)}"
            )
        keep = mask.detach().cpu().numpy().reshape(-1)
        w = np.where(keep, w, np.float32(0))
    arrays: Packed = {}
    precision = choice.precision
    if precision in _QMAX:
        qmax = np.float32(_QMAX[precision])
        rows = weight.shape[0] if weight.dim() else 1
        channels = w.reshape(rows, w.size // rows if rows else 0)
        amax = np.abs(channels).max(axis=1, initial=np.float32(0))
        scale = np.where(amax > 0, amax / qmax, np.float32(1)).astype(np.float32)
        codes = np.clip(np.round(channels / scale[:, None]), -qmax, qmax).astype(np.int8).reshape(-1)
        arrays["scale"] = scale
        pack = _pack_int4 if precision == "int4" else np.asarray
        dense = pack(codes)
        kept = None if keep is None else pack(codes[keep])
    else:
        dense = np.array(w, dtype=np.float32) if precision == "fp32" else _round_half_precision(w, precision)
        kept = None if keep is None else dense[keep]
    if keep is not None and kept is not None:
        packed_mask = np.packbits(keep)
        if packed_mask.nbytes + kept.nbytes < dense.nbytes:
            arrays.update(values=kept, mask=packed_mask)
            return arrays
    arrays["values"] = dense
    return arrays


def packed_precision(packed: Mapping[str, np.ndarray]) -> str:
    """The precision that a packed layer stores, read from the dtype of its ``values``."""
    values = packed.get("values")
    precision = None if values is None else _PRECISION_OF_DTYPE.get(np.asarray(values).dtype)
    if precision is None:
        found = "no 'values'" if values is None else f"'values' of dtype {np.asarray(values).dtype}"
        raise ApproximationError(f"packed layer: {found}, not one of the stored dtypes")
    return precision


def decompress_layer(packed: Mapping[str, np.ndarray], shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """The fp32 weight tensor of shape ``shape`` that ``packed`` (from :func:`compress_layer`) stores."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    _check_keys(packed, _PACKED_KEYS, "packed layer")
    precision = packed_precision(packed)
    values = np.asarray(packed["values"]).reshape(-1)
    keep = None
    if "mask" in packed:
        bits = np.asarray(packed["mask"], dtype=np.uint8).reshape(-1)
        if bits.size != -(-n // 8):
            raise ApproximationError(f"packed layer: mask of {bits.size} bytes does not fit {n} weights")
        keep = np.unpackbits(bits, count=n).astype(bool)
    count = n if keep is None else int(keep.sum())
    if precision == "int4":
        decoded = _unpack_int4(values, count)
    elif precision == "bf16":
        decoded = (values.astype(np.uint32) << 16).view(np.float32)
    else:
        decoded = values
    if decoded.size != count:
        raise ApproximationError(f"packed layer: {decoded.size} {precision} values where {count} are expected")
    if keep is None:
        flat = decoded.copy()
    else:
        flat = np.zeros(n, dtype=decoded.dtype)
        flat[keep] = decoded
    if precision in _QMAX:
        if "scale" not in packed:
            raise ApproximationError(f"packed layer: {precision} values need a 'scale' array")
        scale = np.asarray(packed["scale"], dtype=np.float32).reshape(-1)
        rows = shape[0] if shape else 1
        if scale.size != rows:
            raise ApproximationError(f"packed layer: {scale.size} scales for {rows} output channels")
        out = flat.reshape(rows, n // rows if rows else 0).astype(np.float32) * scale[:, None]
    elif "scale" in packed:
        raise ApproximationError(f"packed layer: {precision} values take no 'scale' array")
    else:
        out = flat.astype(np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(shape))


# --------------------------------------------------------------------------------------------------------- models


def compress_model(model: nn.Module, config: ApproximationConfig) -> dict[str, Packed]:
    """The stored arrays of every layer of ``config`` (pruning, then quantization), in config order."""
    config.validate(model)
    masks = pruning_masks(model, config)
    return {
        name: compress_layer(model.get_submodule(name).weight, choice, masks[name])
        for name, choice in config.layers.items()
    }


def apply_approximation(
    model: nn.Module, config: ApproximationConfig, packed: dict[str, Packed] | None = None
) -> nn.Module:
    """A copy of ``model`` whose config layers compute with the decompressed arrays of :func:`compress_model`.

    ``model`` is not modified; no pruning hooks or masks are attached; parameters keep their dtype and device.  The
    new weights are handed to ``copy.deepcopy`` through its memo, so the original weights are never copied.
    ``packed`` reuses a :func:`compress_model` result of the same model and config.
    """
    if packed is None:
        packed = compress_model(model, config)
    memo: dict[int, Any] = {}
    pending = []
    for name, arrays in packed.items():
        weight = model.get_submodule(name).weight
        values = decompress_layer(arrays, weight.shape)
        if type(weight) is nn.Parameter and weight.is_contiguous():
            memo[id(weight)] = nn.Parameter(values.to(weight.device, weight.dtype), weight.requires_grad)
        else:  # a Parameter subclass or a channels-last weight: copy into the deep copy's own tensor
            pending.append((name, values))
    approx = copy.deepcopy(model, memo)
    with torch.no_grad():
        for name, values in pending:
            approx.get_submodule(name).weight.copy_(values)
    return approx


def _floating_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if torch.is_floating_point(v)}


def fp32_size_bytes(model: nn.Module) -> int:
    """4 bytes per element of every floating-point tensor of ``model``'s state dict."""
    return 4 * sum(t.numel() for t in _floating_state(model).values())


def model_size_bytes(model: nn.Module, config: ApproximationConfig, packed: dict[str, Packed] | None = None) -> int:
    """Bytes of ``f^p`` by the formula of the module docstring; ``packed`` reuses a :func:`compress_model` result."""
    if packed is None:
        packed = compress_model(model, config)
    weight_keys = {f"{name}.weight" if name else "weight" for name in packed}
    layers = sum(a.nbytes for arrays in packed.values() for a in arrays.values())
    others = sum(t.numel() for key, t in _floating_state(model).items() if key not in weight_keys)
    return int(layers + 4 * others)


def size_ratio(model: nn.Module, config: ApproximationConfig, packed: dict[str, Packed] | None = None) -> float:
    """``model_size_bytes / fp32_size_bytes``: 1 for the all-fp32 unpruned config, about 0.25 for int8."""
    return model_size_bytes(model, config, packed) / fp32_size_bytes(model)
