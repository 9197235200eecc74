"""The export directory's own format: the compressed weights (``weights.bin`` + ``index.json``) and ``config.json``.

``weights.bin`` holds every state-dict tensor of f^p, concatenated raw (little-endian, C order, no padding): the
:func:`~approxtune.approximation.compress_model` arrays of each compressed layer, in the order it returns them
(``scale``, ``values``, ``mask`` where present), and every other floating-point tensor as float32.  Its size is
*exactly* :func:`~approxtune.approximation.model_size_bytes`, the ``size_bytes`` the study reported.  No pickle.

``index.json`` is its header: for each state-dict tensor its name, shape, dtype and either the arrays it is stored as
(offset, byte count, numpy dtype string, element count) or, for integer buffers such as BatchNorm's
``num_batches_tracked`` (not counted in the size), its values inline; plus the payload's byte count and SHA-256.

``config.json`` records the architecture (:func:`describe_architecture`), the approximation config, study, trial,
sigma, the input shape (from the study's data), fingerprints of the base model and of f^p, the payload SHA-256 (the
model hash), the size, and the byte count and SHA-256 of every other file of the export (``files``), which
:func:`check_files` compares before anything is loaded.

:func:`load_model` rebuilds f^p from a directory (:func:`rebuild_architecture`, then every tensor from the payload,
compressed layers through :func:`~approxtune.approximation.decompress_layer`) and checks that the result is bit for bit
the model that was exported.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from approxtune.approximation import Packed, decompress_layer
from approxtune.cache import model_fingerprint
from approxtune.errors import ApproxtuneError
from approxtune.models import ARCHITECTURES, ModelError, build_architecture

__all__ = [
    "CERTIFICATE",
    "CONFIG",
    "EXPORT_FORMAT",
    "FORMAT_VERSION",
    "INDEX",
    "PAYLOAD",
    "ExportError",
    "OutputExistsError",
    "StoredModel",
    "check_files",
    "describe_architecture",
    "encode_payload",
    "file_record",
    "load_model",
    "read_config",
    "read_export",
    "read_json",
    "rebuild_architecture",
    "sha256_bytes",
    "summary",
    "weight_key",
    "write_json",
]

EXPORT_FORMAT = "approxtune-export"
FORMAT_VERSION = 2
"""Version 2: deployables compressed (``model.onnx``, ``model.pt2``), ``architecture`` and ``files`` in config.json,
one certificate per shipped artifact."""
PAYLOAD = "weights.bin"
INDEX = "index.json"
CONFIG = "config.json"
CERTIFICATE = "certificate.json"


class ExportError(ApproxtuneError):
    """An export that cannot be made as asked, or an export directory that cannot be used; says how to fix it."""


class OutputExistsError(ExportError):
    """The output directory exists (and ``--force`` was not given, or it is not an approxtune export)."""


def summary(exc: BaseException) -> str:
    """``Type: first line`` of an exception from a library (torch's exporters write pages), for a one-line error."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # terminal colours
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


# ------------------------------------------------------------------------------------------------- architecture


ARCHITECTURE_KINDS = ("builtin", "factory", "torchvision", "module")


def describe_architecture(architecture: Mapping[str, Any] | str) -> dict[str, Any]:
    """What ``config.json`` records under ``architecture`` to rebuild f^p's module: the architecture spec of
    :mod:`approxtune.models` (a built-in name, a factory and its arguments, a torchvision name, or a model class);
    a string is a built-in architecture's name.

    :func:`rebuild_architecture` is its inverse.  The deployables (``model.onnx``, ``model.pt2``) carry their graph and
    need neither approxtune nor the user's code.
    """
    spec = {"kind": "builtin", "arch": architecture} if isinstance(architecture, str) else dict(architecture)
    if spec.get("kind") not in ARCHITECTURE_KINDS:
        raise ExportError(f"unknown architecture kind {spec.get('kind')!r}; one of {', '.join(ARCHITECTURE_KINDS)}")
    if spec["kind"] == "builtin" and spec.get("arch") not in ARCHITECTURES:
        raise ExportError(
            f"unknown architecture {spec.get('arch')!r}; choose one of {', '.join(sorted(ARCHITECTURES))}"
        )
    return spec


def rebuild_architecture(config: Mapping[str, Any]) -> nn.Module:
    """A freshly built module of the architecture that ``config`` (a ``config.json``) records.

    The user's code (a factory, a model class) is imported when it can be; when it cannot, the message says so and
    how to load the weights into an architecture built by hand (``load_model(DIR, model=...)``).
    """
    record = config.get("architecture")
    if not isinstance(record, Mapping) or record.get("kind") not in ARCHITECTURE_KINDS:
        raise ExportError(f"config.json records an architecture this approxtune cannot rebuild: {record!r}")
    try:
        return build_architecture(record)
    except ModelError as exc:
        raise ExportError(
            f"cannot rebuild the exported architecture ({exc}); build it yourself and load the weights into it: "
            "approxtune.load_model(DIR, model=YourNet(...))"
        ) from None


# ------------------------------------------------------------------------------------------------------ payload


def _le(array: np.ndarray) -> np.ndarray:
    """``array`` as a contiguous little-endian array (byte order is part of the format)."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder == ">" else array


def weight_key(layer: str) -> str:
    """The state-dict key of a compressible layer's weight."""
    return f"{layer}.weight" if layer else "weight"


def encode_payload(approx: nn.Module, packed: dict[str, Packed]) -> tuple[bytes, list[dict[str, Any]]]:
    """The payload and the index entries of every state-dict tensor of ``approx`` (f^p), in state-dict order."""
    packed_by_key = {weight_key(name): arrays for name, arrays in packed.items()}
    chunks: list[bytes] = []
    offset = 0
    entries = []

    def put(array: np.ndarray) -> dict[str, Any]:
        nonlocal offset
        data = _le(array).tobytes()
        chunks.append(data)
        ref = {"offset": offset, "nbytes": len(data), "dtype": _le(array).dtype.str, "count": int(array.size)}
        offset += len(data)
        return ref

    for key, tensor in approx.state_dict().items():
        t = tensor.detach().to("cpu")
        entry: dict[str, Any] = {"name": key, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        if key in packed_by_key:
            entry["encoding"] = "packed"
            entry["layer"] = key.removesuffix("weight").removesuffix(".")
            entry["arrays"] = {name: put(a) for name, a in packed_by_key[key].items()}
        elif torch.is_floating_point(t):
            entry["encoding"] = "float32"
            entry["data"] = put(t.to(torch.float32).contiguous().numpy())
        else:  # integer/bool buffers (BatchNorm's num_batches_tracked): not part of the model size, kept in the header
            entry["encoding"] = "inline"
            entry["values"] = t.reshape(-1).tolist()
        entries.append(entry)
    return b"".join(chunks), entries


def _array(payload: bytes, ref: dict[str, Any], where: str) -> np.ndarray:
    try:
        dtype = np.dtype(ref["dtype"])
        offset, nbytes, count = int(ref["offset"]), int(ref["nbytes"]), int(ref["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{where}: malformed array reference {ref!r} ({exc})") from None
    if offset < 0 or nbytes != count * dtype.itemsize or offset + nbytes > len(payload):
        raise ExportError(f"{where}: array reference {ref!r} does not fit the {len(payload)}-byte payload")
    return np.frombuffer(payload, dtype=dtype, count=count, offset=offset).copy()


def _decode(payload: bytes, entries: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, Packed]]:
    """The state dict that ``entries`` (from ``index.json``) and ``payload`` store, and the packed layers' arrays."""
    state, packed = {}, {}
    for entry in entries:
        key = entry.get("name")
        where = f"{INDEX}: tensor {key!r}"
        try:
            shape = tuple(int(s) for s in entry["shape"])
            dtype = getattr(torch, entry["dtype"])
            encoding = entry["encoding"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ExportError(f"{where}: malformed entry ({exc!r})") from None
        if encoding == "packed":
            arrays = {name: _array(payload, ref, f"{where}.{name}") for name, ref in entry["arrays"].items()}
            packed[entry.get("layer", key.removesuffix(".weight"))] = arrays
            tensor = decompress_layer(arrays, shape)
        elif encoding == "float32":
            tensor = torch.from_numpy(_array(payload, entry["data"], where).astype(np.float32, copy=False))
        elif encoding == "inline":
            tensor = torch.tensor(entry["values"], dtype=dtype)
        else:
            raise ExportError(f"{where}: unknown encoding {encoding!r}")
        state[key] = tensor.reshape(shape).to(dtype)
    return state, packed


# -------------------------------------------------------------------------------------------------------- files


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """``{"bytes", "sha256"}`` of a file (what ``config.json`` and ``certificate.json`` record of each artifact)."""
    data = Path(path).read_bytes()
    return {"bytes": len(data), "sha256": sha256_bytes(data)}


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing: {path.parent} is not a complete approxtune export; export it again")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); export the model again") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object; export the model again")
    return data


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def read_config(directory: str | Path) -> dict[str, Any]:
    """``config.json`` of an export directory, checked to be an approxtune export of this format version."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"no export directory at {directory}; create one with `approxtune export STUDY.toml ...`")
    config = read_json(directory / CONFIG)
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{directory / CONFIG} is not an approxtune export config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{directory} has export format {config.get('format_version')!r}; this approxtune reads "
            f"{FORMAT_VERSION}: export the model again"
        )
    return config


def check_files(directory: str | Path, config: Mapping[str, Any]) -> None:
    """Raise :class:`ExportError` unless every file ``config["files"]`` records has its recorded size and SHA-256."""
    directory = Path(directory)
    files = config.get("files")
    if not isinstance(files, Mapping) or not files:
        raise ExportError(f"{directory / CONFIG} records no file hashes; export the model again")
    for name, recorded in files.items():
        path = directory / name
        if Path(name).name != name or not path.is_file():
            raise ExportError(f"{path} is missing: {directory} is not a complete export; export it again")
        if file_record(path) != recorded:
            raise ExportError(
                f"{path} does not match the size and SHA-256 recorded in {CONFIG}: the file was changed or truncated; "
                "refusing it (export the model again, or get an intact copy)"
            )


# ---------------------------------------------------------------------------------------------------- loading


@dataclass
class StoredModel:
    """An export directory read back: f^p rebuilt from its payload, the packed arrays of its layers, config.json."""

    model: nn.Module
    packed: dict[str, Packed]
    config: dict[str, Any]


def read_export(directory: str | Path, model: nn.Module | None = None) -> StoredModel:
    """Read f^p and its packed layers from ``weights.bin``/``index.json``, checked against ``config.json``.

    The tensors are loaded into ``model`` (an instance of the exported architecture) when given, else into the
    architecture :func:`rebuild_architecture` builds."""
    directory = Path(directory)
    config = read_config(directory)
    index = read_json(directory / INDEX)
    payload_path = directory / PAYLOAD
    if not payload_path.is_file():
        raise ExportError(f"{payload_path} is missing: {directory} is not a complete export; export it again")
    payload = payload_path.read_bytes()
    if len(payload) != index.get("payload_bytes") or sha256_bytes(payload) != index.get("payload_sha256"):
        raise ExportError(
            f"{payload_path} does not match {INDEX} (size or SHA-256 differ): the file is corrupt or was changed; "
            "export the model again"
        )
    rebuilt = model is None
    model = rebuild_architecture(config) if rebuilt else model
    state, packed = _decode(payload, index.get("tensors", []))
    fix = (
        f"; the architecture recorded ({config['architecture'].get('class')}) cannot be rebuilt without its "
        "arguments: build it yourself and load the weights into it, approxtune.load_model(DIR, model=YourNet(...))"
        if rebuilt and config["architecture"].get("kind") == "module"
        else ""
    )
    try:
        fit = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensors of other shapes
        reason = " ".join(str(exc).split())
        raise ExportError(f"{directory}: the stored tensors do not fit the architecture ({reason}){fix}") from None
    if fit.missing_keys or fit.unexpected_keys:
        raise ExportError(
            f"{directory}: the stored tensors do not fit the architecture (missing: {fit.missing_keys[:5]}, "
            f"unexpected: {fit.unexpected_keys[:5]}){fix}"
        )
    model.eval()
    if model_fingerprint(model) != config.get("model_fingerprint"):
        raise ExportError(f"{directory}: the rebuilt model's fingerprint differs from config.json's; export again")
    return StoredModel(model, packed, config)


def load_model(directory: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild f^p from an export directory: its architecture, then every tensor from ``weights.bin``.

    The architecture is the one ``config.json`` records (a built-in one, the study's factory or torchvision name, or a
    model's class, imported when that code is importable); ``model``, an instance of that architecture you built,
    takes its place (its weights are replaced).  Compressed layers are decompressed exactly as
    :func:`~approxtune.approximation.apply_approximation` does, so the model is bit for bit the exported f^p; this is
    checked against the fingerprint in ``config.json``.  Returns the model on the CPU in eval mode.  Raises
    :class:`ExportError` for a missing, corrupt or foreign directory, or an architecture that cannot be rebuilt.
    """
    return read_export(directory, None if model is None else model.to("cpu")).model
