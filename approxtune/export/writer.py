"""Writing an export directory: the compressed weights, the deployables of the chosen runtimes, the certificate.

``DIR`` is written beside itself under a temporary name (``.DIR.tmp-<host>-<pid>``) and renamed into place at the
end, so it is never half-written; an existing ``DIR`` is replaced only with ``force`` and only if it is an approxtune
export.  What an export killed on this host left beside ``DIR`` is cleaned up by the next export to ``DIR``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from approxtune.approximation import (
    ApproximationConfig,
    Packed,
    apply_approximation,
    compress_model,
    fp32_size_bytes,
    model_size_bytes,
)
from approxtune.cache import model_fingerprint
from approxtune.export.format import (
    CERTIFICATE,
    CONFIG,
    EXPORT_FORMAT,
    FORMAT_VERSION,
    INDEX,
    PAYLOAD,
    ExportError,
    OutputExistsError,
    describe_architecture,
    encode_payload,
    file_record,
    read_export,
    sha256_bytes,
    write_json,
)
from approxtune.export.onnx import write_onnx
from approxtune.export.program import write_program
from approxtune.export.runtimes import Runtime, load_deployable, select_runtimes
from approxtune.locking import leftovers, remove_leftovers, temporary_name

__all__ = ["ExportResult", "check_output", "export_model"]


@dataclass
class ExportResult:
    """What :func:`export_model` wrote (``path``: the final directory; the staging directory while certifying)."""

    path: Path
    model: nn.Module = field(repr=False)
    """f^p as :func:`~approxtune.export.format.load_model` rebuilt it from the written files (CPU, eval mode)."""
    size_bytes: int
    """``model_size_bytes(base, config)``: the size the study reports."""
    payload_bytes: int
    """Bytes of ``weights.bin`` (equal to ``size_bytes``)."""
    header_bytes: int
    """Bytes of ``index.json``."""
    sha256: str
    """SHA-256 of ``weights.bin``: the model hash."""
    config: dict[str, Any]
    runtimes: list[Runtime] = field(default_factory=list)
    """The runtimes whose artifacts were written (and certified)."""
    deployable_bytes: dict[str, int] = field(default_factory=dict)
    """Bytes of each deployable file (``model.onnx``, ``model.pt2``)."""
    certificate: dict[str, Any] | None = None
    artifacts: list[str] = field(default_factory=list)
    """Optuna artifact ids of the files attached to the trial (:func:`~approxtune.export.trial.export_trial`)."""
    not_attached: list[Path] = field(default_factory=list)
    """Exported files too large to attach as artifacts."""
    seconds: float = 0.0
    """Wall time of the export, certification included."""


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _hidden(final: Path) -> Path:
    """``.<DIR>``, whose :func:`~approxtune.locking.temporary_name` an export of ``DIR`` writes beside it."""
    return final.with_name(f".{final.name}")


def _clean_leftovers(final: Path) -> None:
    """Remove what exports of ``final`` killed on this host left beside it: their staging folders, and the previous
    export they had moved aside to replace it (put back instead when ``final`` is missing: killed mid-swap).  Those
    of live processes and of other hosts are kept."""
    name = re.escape(_hidden(final).name)
    for old in leftovers(final.parent, name, ("old",)):
        if final.exists() or final.is_symlink():
            _remove(old)
        else:
            os.replace(old, final)
    remove_leftovers(final.parent, name)


def check_output(out_dir: str | Path, force: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``force``; even with ``force``, refuse one that is not an export.

    What exports of ``out_dir`` killed on this host left beside it is cleaned up first (:func:`_clean_leftovers`).
    """
    out_dir = Path(out_dir)
    _clean_leftovers(out_dir)
    if out_dir.exists() or out_dir.is_symlink():
        if not force:
            raise OutputExistsError(f"output directory {out_dir} already exists; pass --force to replace it")
        if not out_dir.is_dir() or not _is_export(out_dir):
            raise OutputExistsError(
                f"{out_dir} exists and is not an approxtune export (no {CONFIG} of format {EXPORT_FORMAT!r}); "
                "refusing to replace it even with --force; choose another --out"
            )
    return out_dir


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first and removed afterwards."""
    old = temporary_name(_hidden(final), "old")
    _remove(old)
    if final.exists() or final.is_symlink():
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except OSError:
        if old.exists():
            os.replace(old, final)  # put the previous export back
        raise
    _remove(old)


def _example(example_input: torch.Tensor) -> torch.Tensor:
    """Two inputs of the study's data (their shape gives the deployables' input shape; batch size stays dynamic)."""
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 2 or not len(example_input):
        raise ExportError("example_input must be a non-empty batch of inputs (shape (N, ...)) from the study's data")
    x = example_input.detach().to("cpu", torch.float32)
    return (x if len(x) >= 2 else x.expand(2, *x.shape[1:])).clone()[:2]


def _write_deployable(runtime: Runtime, directory: Path, stored: Any, example: torch.Tensor, sha: str) -> int:
    """Write ``runtime``'s artifact of f^p and check, in that runtime, that it computes f^p's logits (to rounding)."""
    path = directory / runtime.artifact
    if runtime.name == "onnxruntime":
        write_onnx(stored.model, stored.packed, example, path, {"approxtune.model_sha256": sha})
    else:
        write_program(stored.model, stored.packed, example, path)
    deployable = load_deployable(runtime, directory)
    with torch.inference_mode():
        want = stored.model(example)
    got = deployable(example)
    if got.shape != want.shape or (got - want).abs().max() > 1e-3 * (1.0 + want.abs().max()):
        raise ExportError(f"internal error: {runtime.artifact} in {runtime.name} does not compute f^p's logits")
    return path.stat().st_size


def _write_weights(
    directory: Path, base: nn.Module, config: ApproximationConfig, packed: dict[str, Packed], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write weights.bin, index.json and config.json (without ``files``); return config.json's contents."""
    approx = apply_approximation(base, config, packed).to("cpu").eval()
    size = model_size_bytes(base, config, packed)
    payload, entries = encode_payload(approx, packed)
    if len(payload) != size:  # the payload layout is the size formula; anything else is a bug
        raise ExportError(f"internal error: payload of {len(payload)} bytes for a model of {size} bytes")
    sha = sha256_bytes(payload)
    (directory / PAYLOAD).write_bytes(payload)
    index = {
        "format": "approxtune-weights",
        "format_version": FORMAT_VERSION,
        "payload": PAYLOAD,
        "payload_bytes": len(payload),
        "payload_sha256": sha,
        "tensors": entries,
    }
    (directory / INDEX).write_text(json.dumps(index, separators=(",", ":")) + "\n")
    config_json = {
        "format": EXPORT_FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": meta["architecture"],
        "approximation": config.to_dict(),
        "summary": config.summary(),
        "study": meta.get("study"),
        "study_file": meta.get("study_file"),
        "trial": meta.get("trial"),
        "sigma": meta.get("sigma"),
        "input_shape": meta["input_shape"],
        "base_model_fingerprint": model_fingerprint(base),
        "model_fingerprint": model_fingerprint(approx),
        "model_sha256": sha,
        "size_bytes": size,
        "fp32_size_bytes": fp32_size_bytes(base),
        "torch_version": torch.__version__,
    }
    write_json(directory / CONFIG, config_json)
    return config_json


def export_model(
    base_model: nn.Module,
    config: ApproximationConfig,
    out_dir: str | Path,
    *,
    architecture: Mapping[str, Any] | str,
    example_input: torch.Tensor,
    runtime: str = "all",
    force: bool = False,
    meta: dict[str, Any] | None = None,
    certify: Callable[[ExportResult], dict[str, Any]] | None = None,
) -> ExportResult:
    """Export f^p = ``apply_approximation(base_model, config)`` to ``out_dir``.

    ``architecture`` is the spec that rebuilds ``base_model``'s module (:func:`.format.describe_architecture`; a
    string names a built-in architecture); it is recorded, and the written files are read back into a copy of
    ``base_model``, so an architecture that cannot be rebuilt without arguments exports all the same.

    ``example_input`` is a batch of the study's inputs: the deployables take inputs of its shape (any batch size).
    ``runtime`` (``"onnxruntime"``, ``"torch"`` or ``"all"``) chooses the deployables written besides the compressed
    weights: ``model.onnx`` and/or ``model.pt2``.  ``meta`` may give ``study``, ``study_file``, ``trial`` and
    ``sigma`` for ``config.json``.  ``certify`` is called with the result (its ``model`` rebuilt from the written
    files, its ``path`` the staging directory holding every artifact) and returns the certificate to write as
    ``certificate.json``.  Everything is checked before anything is written, and written under a temporary name
    beside ``out_dir`` and renamed into place at the end.
    """
    out_dir = check_output(out_dir, force)
    runtimes = select_runtimes(runtime)
    config.validate(base_model)
    example = _example(example_input)
    meta = {**(meta or {}), "architecture": describe_architecture(architecture), "input_shape": list(example.shape[1:])}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(_hidden(out_dir))
    _remove(tmp)
    tmp.mkdir()
    try:
        packed = compress_model(base_model, config)
        config_json = _write_weights(tmp, base_model, config, packed, meta)
        # reads back what was written, into a copy of the base model's module; checks the fingerprint of f^p
        stored = read_export(tmp, copy.deepcopy(base_model).to("cpu"))
        sha = config_json["model_sha256"]
        sizes = {rt.artifact: _write_deployable(rt, tmp, stored, example, sha) for rt in runtimes}
        config_json["files"] = {name: file_record(tmp / name) for name in (PAYLOAD, INDEX, *sizes)}
        write_json(tmp / CONFIG, config_json)
        result = ExportResult(
            path=tmp,
            model=stored.model,
            size_bytes=config_json["size_bytes"],
            payload_bytes=(tmp / PAYLOAD).stat().st_size,
            header_bytes=(tmp / INDEX).stat().st_size,
            sha256=sha,
            config=config_json,
            runtimes=runtimes,
            deployable_bytes=sizes,
        )
        if certify is not None:
            result.certificate = certify(result)
            write_json(tmp / CERTIFICATE, result.certificate)
        _move_into_place(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise
    result.path = out_dir
    return result
