"""Exporting a chosen approximation f^p: its compressed weights, a standalone deployable and a held-out certificate.

``approxtune export STUDY.toml --trial N --out DIR`` (or a rule: ``--min-acr X`` / ``--max-accuracy-drop Y``, the
smallest front model that satisfies it) writes the directory ``DIR``:

====================  ==============================================================================================
``weights.bin``       every state-dict tensor of f^p, concatenated raw (little-endian, C order, no padding): the
                      :func:`~approxtune.approximation.compress_model` arrays of each compressed layer, in the order it
                      returns them (``scale``, ``values``, ``mask`` where present), and every other floating-point
                      tensor as float32.  Its size is *exactly* :func:`~approxtune.approximation.model_size_bytes`,
                      the ``size_bytes`` the study reported.  No pickle.
``index.json``        the header: for each state-dict tensor its name, shape, dtype and either the arrays it is stored
                      as (offset, byte count, numpy dtype string, element count) or, for integer buffers such as
                      BatchNorm's ``num_batches_tracked`` (not counted in the size), its values inline; plus the
                      payload's byte count and SHA-256.
``config.json``       architecture, approximation config, study name, trial number, sigma, input shape, fingerprints
                      of the base model and of f^p, payload SHA-256 (the model hash) and size.
``model.pt2``         a ``torch.export`` ExportedProgram of f^p (float32 weights, dynamic batch size) that loads with
                      ``torch.export.load(path).module()`` without approxtune.
``certificate.json``  f^p's certificate re-checked on the study's held-out report inputs with noise the search never
                      saw (written by :func:`export_trial`).
====================  ==============================================================================================

Bytes on disk of the compressed weights = ``size_bytes`` (``weights.bin``) + the header (``index.json``), which is
a few hundred bytes per tensor; :attr:`ExportResult.header_bytes` gives the exact figure.

:func:`load_model` rebuilds f^p from ``DIR`` (``build_model(arch)``, then every tensor from the payload, compressed
layers through :func:`~approxtune.approximation.decompress_layer`) and checks that the result is bit for bit the model
that was exported.  The directory is written beside ``DIR`` under a temporary name and moved into place at the end,
so it is never half-written.

Why re-check: the exported trial was chosen as the best of many on the search inputs, so its search-set numbers are
optimistically biased (winner's curse); a certificate that holds for one fixed model at ``1 - alpha`` need not hold
for the best-looking of many.  The held-out certificate is computed for the one exported model, on inputs and noise
that played no part in choosing it, so it holds at its stated confidence.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from approxtune.approximation import (
    ApproximationConfig,
    apply_approximation,
    compress_model,
    decompress_layer,
    fp32_size_bytes,
    model_size_bytes,
)
from approxtune.cache import model_fingerprint
from approxtune.models import ARCHITECTURES, build_model

__all__ = [
    "DEPLOYABLE",
    "EXPORT_FORMAT",
    "ExportError",
    "ExportResult",
    "OutputExistsError",
    "TrialSelectionError",
    "certificate_table",
    "export_model",
    "export_trial",
    "load_model",
    "select_trial",
]

EXPORT_FORMAT = "approxtune-export"
FORMAT_VERSION = 1
PAYLOAD = "weights.bin"
INDEX = "index.json"
CONFIG = "config.json"
DEPLOYABLE = "model.pt2"
CERTIFICATE = "certificate.json"
RECHECK_MODES = ("irs", "scratch")

INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "digits-cnn": (1, 8, 8),
    "cifar_resnet20": (3, 32, 32),
    "cifar_resnet110": (3, 32, 32),
    "resnet50": (3, 224, 224),
}
"""Per-image input shape of the built-in architectures (for tracing the deployable when no inputs are given)."""

WHY_THEY_DIFFER = (
    "The search-set numbers belong to the trial that looked best among {trials} compared on the search inputs and "
    "noise, so they are optimistically biased (winner's curse / multiple comparisons); the held-out certificate "
    "uses inputs and noise the search never saw and holds for this one model at the stated confidence."
)

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
"""``progress(description, total)``: a context manager yielding ``advance(count)`` (like ``cli.progress_bar``)."""


class ExportError(ValueError):
    """An export that cannot be made as asked, or an export directory that cannot be loaded; says how to fix it."""


class TrialSelectionError(ExportError):
    """No trial, an unfinished trial or no trial matching the rule."""


class OutputExistsError(ExportError):
    """The output directory exists (and ``--force`` was not given, or it is not an approxtune export)."""


# ------------------------------------------------------------------------------------------------------ payload


def _le(array: np.ndarray) -> np.ndarray:
    """``array`` as a contiguous little-endian array (byte order is part of the format)."""
    array = np.ascontiguousarray(array)
    return array.astype(array.dtype.newbyteorder("<"), copy=False) if array.dtype.byteorder == ">" else array


def _weight_key(layer: str) -> str:
    return f"{layer}.weight" if layer else "weight"


def _encode(approx: nn.Module, packed: dict[str, dict[str, np.ndarray]]) -> tuple[bytes, list[dict[str, Any]]]:
    """The payload and the index entries of every state-dict tensor of ``approx`` (f^p), in state-dict order."""
    packed_by_key = {_weight_key(name): arrays for name, arrays in packed.items()}
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


def _decode(payload: bytes, entries: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The state dict that ``entries`` (from ``index.json``) and ``payload`` store."""
    state = {}
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
            tensor = decompress_layer(arrays, shape)
        elif encoding == "float32":
            tensor = torch.from_numpy(_array(payload, entry["data"], where).astype(np.float32, copy=False))
        elif encoding == "inline":
            tensor = torch.tensor(entry["values"], dtype=dtype)
        else:
            raise ExportError(f"{where}: unknown encoding {encoding!r}")
        state[key] = tensor.reshape(shape).to(dtype)
    return state


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ExportError(f"{path} is missing: {path.parent} is not a complete approxtune export; export it again")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not valid JSON ({exc}); export the model again") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object; export the model again")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=1) + "\n")


def load_model(directory: str | Path) -> nn.Module:
    """Rebuild f^p from an export directory: ``build_model(arch)``, then every tensor from ``weights.bin``.

    Compressed layers are decompressed exactly as :func:`~approxtune.approximation.apply_approximation` does, so the
    model is bit for bit the exported f^p; this is checked against the fingerprint in ``config.json``.  Returns the
    model on the CPU in eval mode.  Raises :class:`ExportError` for a missing, corrupt or foreign directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise ExportError(f"no export directory at {directory}; create one with `approxtune export STUDY.toml ...`")
    config = _read_json(directory / CONFIG)
    if config.get("format") != EXPORT_FORMAT:
        raise ExportError(f"{directory / CONFIG} is not an approxtune export config (format {config.get('format')!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{directory} has export format {config.get('format_version')!r}; this approxtune reads {FORMAT_VERSION}"
        )
    index = _read_json(directory / INDEX)
    payload_path = directory / PAYLOAD
    if not payload_path.is_file():
        raise ExportError(f"{payload_path} is missing: {directory} is not a complete export; export it again")
    payload = payload_path.read_bytes()
    if len(payload) != index.get("payload_bytes") or _sha256(payload) != index.get("payload_sha256"):
        raise ExportError(
            f"{payload_path} does not match {INDEX} (size or SHA-256 differ): the file is corrupt or was changed; "
            "export the model again"
        )
    arch = config.get("arch")
    if arch not in ARCHITECTURES:
        raise ExportError(
            f"{directory} holds a {arch!r} model, which this approxtune does not know; "
            f"known: {', '.join(sorted(ARCHITECTURES))}"
        )
    model = build_model(arch)
    state = _decode(payload, index.get("tensors", []))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(f"{directory}: the stored tensors do not fit architecture {arch!r}: {exc}") from None
    model.eval()
    if model_fingerprint(model) != config.get("model_fingerprint"):
        raise ExportError(f"{directory}: the rebuilt model's fingerprint differs from config.json's; export again")
    return model


# ------------------------------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export_model` wrote (``path`` is the final directory)."""

    path: Path
    model: nn.Module = field(repr=False)
    """f^p as :func:`load_model` rebuilt it from the written files (CPU, eval mode)."""
    size_bytes: int
    """``model_size_bytes(base, config)``: the size the study reports."""
    payload_bytes: int
    """Bytes of ``weights.bin`` (equal to ``size_bytes``)."""
    header_bytes: int
    """Bytes of ``index.json``."""
    sha256: str
    """SHA-256 of ``weights.bin``: the model hash."""
    config: dict[str, Any]
    certificate: dict[str, Any] | None = None
    seconds: float = 0.0
    """Wall time of the export, certification included."""


def _staging(out_dir: Path) -> Path:
    return out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")


def _is_export(path: Path) -> bool:
    try:
        return json.loads((path / CONFIG).read_text()).get("format") == EXPORT_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def check_output(out_dir: str | Path, force: bool) -> Path:
    """Refuse an existing ``out_dir`` unless ``force``; even with ``force``, refuse one that is not an export."""
    out_dir = Path(out_dir)
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
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
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


def _export_program(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """Save a ``torch.export`` ExportedProgram of ``model`` with a dynamic batch dimension."""
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        except Exception as exc:  # torch.export reports untraceable models with many exception types
            raise ExportError(f"torch.export could not trace the model ({type(exc).__name__}: {exc})") from None
        torch.export.save(program, path)


def _example_input(arch: str, example_input: torch.Tensor | None) -> torch.Tensor:
    if example_input is not None:
        x = example_input.detach().to("cpu", torch.float32)
        return (x if len(x) >= 2 else x.expand(2, *x.shape[1:])).clone()[:2]
    if arch not in INPUT_SHAPES:
        raise ExportError(f"no known input shape for architecture {arch!r}; pass example_input (a batch of inputs)")
    return torch.rand((2, *INPUT_SHAPES[arch]), generator=torch.Generator().manual_seed(0))


def _write_artifact(
    directory: Path,
    base_model: nn.Module,
    config: ApproximationConfig,
    arch: str,
    example: torch.Tensor,
    meta: dict[str, Any],
) -> ExportResult:
    """Write weights.bin, index.json, config.json and model.pt2 of f^p into the (new, empty) ``directory``."""
    base = base_model  # left as it is (device, mode): f^p is a copy, moved to the CPU
    packed = compress_model(base, config)
    approx = apply_approximation(base, config, packed).to("cpu").eval()
    size = model_size_bytes(base, config, packed)
    payload, entries = _encode(approx, packed)
    if len(payload) != size:  # the payload layout is the size formula; anything else is a bug
        raise ExportError(f"internal error: payload of {len(payload)} bytes for a model of {size} bytes")
    sha = _sha256(payload)
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
        "arch": arch,
        "approximation": config.to_dict(),
        "summary": config.summary(),
        "study": meta.get("study"),
        "trial": meta.get("trial"),
        "sigma": meta.get("sigma"),
        "input_shape": list(example.shape[1:]),
        "base_model_fingerprint": model_fingerprint(base),
        "model_fingerprint": model_fingerprint(approx),
        "model_sha256": sha,
        "size_bytes": size,
        "fp32_size_bytes": fp32_size_bytes(base),
        "deployable": DEPLOYABLE,
        "torch_version": torch.__version__,
    }
    _write_json(directory / CONFIG, config_json)
    loaded = load_model(directory)  # reads back what was written; checks the fingerprint of f^p
    _export_program(loaded, example, directory / DEPLOYABLE)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        deployed = torch.export.load(directory / DEPLOYABLE).module()
        if not torch.equal(deployed(example).argmax(1), approx(example).argmax(1)):
            raise ExportError("internal error: the exported program's predictions differ from f^p's")
    return ExportResult(
        path=directory,
        model=loaded,
        size_bytes=size,
        payload_bytes=len(payload),
        header_bytes=(directory / INDEX).stat().st_size,
        sha256=sha,
        config=config_json,
    )


def export_model(
    base_model: nn.Module,
    config: ApproximationConfig,
    out_dir: str | Path,
    *,
    arch: str,
    force: bool = False,
    example_input: torch.Tensor | None = None,
    meta: dict[str, Any] | None = None,
    certify: Callable[[ExportResult], dict[str, Any]] | None = None,
) -> ExportResult:
    """Export f^p = ``apply_approximation(base_model, config)`` of architecture ``arch`` to ``out_dir``.

    ``example_input`` (a batch of inputs; default: random inputs of the architecture's shape) traces the deployable.
    ``meta`` may give ``study``, ``trial`` and ``sigma`` for ``config.json``.  ``certify`` is called with the result
    (its ``model`` rebuilt from the written files) and returns the certificate to write as ``certificate.json``.
    Everything is written under a temporary name beside ``out_dir`` and renamed into place at the end; an existing
    ``out_dir`` is refused unless ``force`` (and even then unless it is an approxtune export).
    """
    out_dir = check_output(out_dir, force)
    if arch not in ARCHITECTURES:
        raise ExportError(f"unknown architecture {arch!r}; choose one of {', '.join(sorted(ARCHITECTURES))}")
    config.validate(base_model)
    example = _example_input(arch, example_input)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _staging(out_dir)
    _remove(tmp)
    tmp.mkdir()
    try:
        result = _write_artifact(tmp, base_model, config, arch, example, meta or {})
        if certify is not None:
            result.certificate = certify(result)
            _write_json(tmp / CERTIFICATE, result.certificate)
        _move_into_place(tmp, out_dir)
    except BaseException:
        _remove(tmp)
        raise
    result.path = out_dir
    return result


# --------------------------------------------------------------------------------------------- trial selection


def _rule_text(min_acr: float | None, max_accuracy_drop: float | None) -> str:
    parts = []
    if min_acr is not None:
        parts.append(f"search ACR >= {min_acr:g}")
    if max_accuracy_drop is not None:
        parts.append(f"accuracy drop <= {max_accuracy_drop:g}")
    return " and ".join(parts)


def select_trial(
    optuna_study: Any,
    *,
    trial: int | None = None,
    min_acr: float | None = None,
    max_accuracy_drop: float | None = None,
    study_file: str = "STUDY.toml",
) -> tuple[Any, str]:
    """The trial to export and why: trial number ``trial``, or the smallest front model satisfying the rule.

    The rule keeps Pareto-front trials (``search.front``: feasible, non-dominated) with search ACR >= ``min_acr``
    and clean accuracy >= the study's base accuracy - ``max_accuracy_drop`` (both when both are given), and picks the
    smallest; ties go to the higher ACR, then the higher accuracy, then the lower trial number.
    """
    from optuna.trial import TrialState

    from approxtune.search import front

    has_rule = min_acr is not None or max_accuracy_drop is not None
    if trial is not None and has_rule:
        raise TrialSelectionError("give either --trial N or a rule (--min-acr / --max-accuracy-drop), not both")
    if trial is None and not has_rule:
        raise TrialSelectionError(
            f"choose the trial to export: --trial N, or a rule --min-acr X and/or --max-accuracy-drop Y "
            f"(`approxtune front {study_file}` lists the front)"
        )
    name = optuna_study.study_name
    if trial is not None:
        trials = {t.number: t for t in optuna_study.get_trials(deepcopy=False)}
        if trial not in trials:
            span = f"trials are numbered 0 to {max(trials)}" if trials else "it has no trials"
            raise TrialSelectionError(
                f"study {name!r} has no trial {trial} ({span}); see `approxtune front {study_file}`"
            )
        chosen = trials[trial]
        if chosen.state != TrialState.COMPLETE:
            raise TrialSelectionError(
                f"trial {trial} of study {name!r} is {chosen.state.name}, not COMPLETE: it has no scores to export; "
                f"choose a COMPLETE trial (see `approxtune front {study_file}`)"
            )
        if "config" not in chosen.user_attrs:
            raise TrialSelectionError(f"trial {trial} of study {name!r} records no approximation config to export")
        return chosen, f"trial {trial} as requested"
    for label, value in (("--min-acr", min_acr), ("--max-accuracy-drop", max_accuracy_drop)):
        if value is not None and not np.isfinite(value):
            raise TrialSelectionError(f"{label} must be a finite number, got {value}")
    base_accuracy = optuna_study.user_attrs.get("base_accuracy")
    if max_accuracy_drop is not None and base_accuracy is None:
        raise TrialSelectionError(f"study {name!r} records no base accuracy; use --trial N or --min-acr")
    candidates = front(optuna_study)
    if not candidates:
        raise TrialSelectionError(
            f"study {name!r} has no feasible complete trial on its Pareto front yet; run `approxtune tune {study_file}`"
        )
    eps = 1e-12  # accuracies are ratios of counts: do not let rounding decide an equality
    matching = [
        t
        for t in candidates
        if (min_acr is None or t.values[0] >= min_acr - eps)
        and (max_accuracy_drop is None or base_accuracy - t.values[1] <= max_accuracy_drop + eps)
    ]
    rule = _rule_text(min_acr, max_accuracy_drop)
    if not matching:
        acrs = [t.values[0] for t in candidates]
        drops = [base_accuracy - t.values[1] for t in candidates] if base_accuracy is not None else []
        span = f"the {len(candidates)} front trials have search ACR {min(acrs):.4f} to {max(acrs):.4f}"
        if drops:
            span += f" and accuracy drops {min(drops):.3f} to {max(drops):.3f}"
        raise TrialSelectionError(
            f"no trial on the Pareto front of study {name!r} has {rule}: {span}; relax the rule or pick one with "
            f"--trial N (`approxtune front {study_file}`)"
        )
    chosen = min(matching, key=lambda t: (t.values[2], -t.values[0], -t.values[1], t.number))
    return chosen, f"the smallest of {len(matching)} front trials with {rule}"


# ------------------------------------------------------------------------------------------------ certificate


def _certify_fresh(
    model: nn.Module,
    x: torch.Tensor,
    seeds: np.ndarray,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    *,
    batch_size: int,
    device: torch.device,
    progress: Callable[[int], None] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's CERTIFY of ``model`` on noise stream FRESH: selection samples 0..n0-1, estimation n0..n0+n-1.

    Returns ``(c_hat, p_a, radius)``.  Stream FRESH is never used by a base cache or IRS, so this noise is
    independent of everything the search and the report cache saw.
    """
    from approxtune.certification import predict_under_noise
    from approxtune.noise import Stream
    from approxtune.statistics import lower_confidence_bound, radius

    kwargs = {"batch_size": batch_size, "device": device, "progress": progress}
    selection = predict_under_noise(model, x, seeds, Stream.FRESH, 0, n0, sigma, **kwargs)
    minlength = int(np.iinfo(selection.dtype).max) + 1
    c_hat = np.array([np.bincount(row, minlength=minlength).argmax() for row in selection], dtype=np.int64)
    estimation = predict_under_noise(model, x, seeds, Stream.FRESH, n0, n0 + n, sigma, **kwargs)
    count = (estimation == c_hat[:, None]).sum(axis=1)
    p_a = lower_confidence_bound(count, n, alpha)
    return c_hat, p_a, radius(p_a, sigma)


def _numbers(radii: np.ndarray, accuracy: float) -> dict[str, Any]:
    from approxtune.search import REPORT_RADII
    from approxtune.statistics import acr, certified_accuracy, certified_accuracy_curve

    return {
        "acr": acr(radii),
        "accuracy": accuracy,
        "certified_accuracy": {f"{r:g}": certified_accuracy(radii, r) for r in REPORT_RADII},
        "certified_accuracy_curve": [[r, a] for r, a in certified_accuracy_curve(radii)],
    }


Recheck = tuple[np.ndarray, np.ndarray, float, dict[str, Any], dict[str, Any]]
"""``(radius counted for ACR, certified class or -1, total alpha, noise description, levels)`` of a re-check."""


def _recheck_irs(
    study: Any,
    base: nn.Module,
    model: nn.Module,
    inputs: Any,
    device: torch.device,
    progress: Progress,
    say: Callable[[str], None],
) -> Recheck:
    """IRS of ``model`` against the base cache of the report inputs (built by ``pipeline.ensure_cache`` if needed)."""
    from approxtune import pipeline
    from approxtune.irs import certify_irs
    from approxtune.search import cache_fingerprint

    c, settings = study.certify, study.irs_settings
    with progress(f"certify g on {len(inputs)} report inputs", len(inputs) * (c.n0 + c.n)) as advance:
        cache, built = pipeline.ensure_cache(
            study,
            base,
            inputs,
            "report",
            device=device,
            progress=advance,
            on_rebuild=lambda why: say(f"Rebuilding {study.cache_path('report')}: {why}"),
            on_adopt=say,
        )
    say(f"{'Wrote' if built else 'Reusing'} the base cache {study.cache_path('report')}")
    budget = int(cache.certified.sum()) * settings.n_p  # tail mode spends at most this, the pilot included
    with progress("IRS of f^p on the report inputs", budget) as advance:
        result = certify_irs(model, inputs, cache, settings, batch_size=c.batch_size, device=device, progress=advance)
    replayed = f"the first {settings.n_p} estimation samples, replayed"
    if result.n_tail:  # tail mode: per-input counts decided from the last n_tail cached samples
        counts = result.counts[result.evaluated]
        replayed = (
            f"the first k_i estimation samples of input i, replayed (k_i from {counts.min(initial=0)} to "
            f"{counts.max(initial=0)}, {result.samples} samples in all with {result.pilot_samples} pilot samples), "
            f"k_i and the branch decided from the last {result.n_tail} cached samples, which are never replayed"
        )
    noise = {
        "run_seed": cache.meta.seed,
        "streams": ["SELECTION", "ESTIMATION"],
        "samples": f"base model: {c.n0} selection + {c.n} estimation samples per input; f^p: {replayed}",
        "base_cache": str(study.cache_path("report")),
        "base_cache_fingerprint": cache_fingerprint(cache),
    }
    levels = {
        "alpha": c.alpha,
        "alpha_zeta": settings.alpha_zeta,
        "alpha_d": settings.alpha_d,
        "n0": c.n0,
        "n": c.n,
        "n_p": settings.n_p,
        "irs_mode": settings.mode.value,
        "irs_zeta": settings.zeta.value,
        "gamma": settings.gamma,
    }
    if result.n_tail:
        levels.update(n_tail=result.n_tail, allocate=settings.allocate, block=settings.block, pilot=settings.pilot)
    predicted = np.where(result.radius > 0, cache.c_hat, -1)
    return result.radius, predicted, settings.total_alpha(c.alpha), noise, levels


def _recheck_scratch(study: Any, model: nn.Module, inputs: Any, device: torch.device, progress: Progress) -> Recheck:
    """Cohen's CERTIFY of ``model`` from scratch on the report inputs, noise stream FRESH of the report run seed."""
    from approxtune import pipeline
    from approxtune.noise import input_seeds

    c = study.certify
    run_seed = pipeline.noise_seed(study, "report")
    seeds = input_seeds(run_seed, inputs.index)
    with progress(f"CERTIFY f^p on {len(inputs)} report inputs", len(inputs) * (c.n0 + c.n)) as advance:
        c_hat, p_a, r = _certify_fresh(
            model,
            inputs.x,
            seeds,
            c.sigma,
            c.n0,
            c.n,
            c.alpha,
            batch_size=c.batch_size,
            device=device,
            progress=advance,
        )
    noise = {
        "run_seed": run_seed,
        "streams": ["FRESH"],
        "samples": f"{c.n0} selection samples (FRESH 0..{c.n0 - 1}) and {c.n} estimation samples "
        f"(FRESH {c.n0}..{c.n0 + c.n - 1}) per input",
    }
    levels = {
        "alpha": c.alpha,
        "alpha_zeta": None,
        "alpha_d": None,
        "n0": c.n0,
        "n": c.n,
        "n_p": None,
        "irs_mode": None,
        "irs_zeta": None,
        "gamma": None,
    }
    radii = np.where(c_hat == inputs.y.numpy(), r, 0.0)
    return radii, np.where(p_a > 0.5, c_hat, -1), c.alpha, noise, levels


@contextlib.contextmanager
def _no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda count: None


def export_trial(
    study: Any,
    out_dir: str | Path,
    *,
    trial: int | None = None,
    min_acr: float | None = None,
    max_accuracy_drop: float | None = None,
    recheck: str = "irs",
    force: bool = False,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    log: Callable[[str], None] | None = None,
    on_chosen: Callable[[Any, str], None] | None = None,
) -> ExportResult:
    """Export a trial of ``study`` (a :class:`~approxtune.config.Study`) with a held-out certificate; attach artifacts.

    Every check (output directory, study, trial, search cache, checkpoint) runs before anything is written.  Then
    f^p is exported (:func:`export_model`), re-certified on the study's report inputs — ``recheck="irs"``: IRS against
    the report base cache (built by ``pipeline.ensure_cache`` if needed); ``"scratch"``: Cohen's CERTIFY of f^p on
    noise stream FRESH — and ``certificate.json`` and the front plot are attached to the trial as Optuna artifacts.
    """
    import optuna

    from approxtune import pipeline, report
    from approxtune.cache import CacheError, load_cache
    from approxtune.irs import certify_irs
    from approxtune.models import load_checkpoint
    from approxtune.search import cache_fingerprint, clean_accuracy, load_existing_study

    progress = progress or _no_progress
    say = log or (lambda message: None)
    if recheck not in RECHECK_MODES:
        raise ExportError(f"--recheck must be one of {', '.join(RECHECK_MODES)}, got {recheck!r}")
    out_dir = check_output(out_dir, force)
    study_file = str(study.path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna_study = load_existing_study(study)
    if optuna_study is None:
        raise ExportError(f"no study {study.name!r} in {study.storage}; run `approxtune tune {study_file}` first")
    chosen, reason = select_trial(
        optuna_study, trial=trial, min_acr=min_acr, max_accuracy_drop=max_accuracy_drop, study_file=study_file
    )
    attrs, recorded = chosen.user_attrs, optuna_study.user_attrs
    config = ApproximationConfig.from_dict(attrs["config"])
    if on_chosen is not None:
        on_chosen(chosen, reason)

    base = load_checkpoint(study.checkpoint, study.model.arch)
    search_inputs = pipeline.load_inputs(study, "search")
    expected = pipeline.expected_meta(study, base, search_inputs, "search")
    pipeline.adopt_legacy_cache(study, "search", expected, say)
    cache_path = study.cache_path("search")
    try:
        search_cache = load_cache(cache_path)
    except CacheError:
        raise ExportError(
            f"the search cache {cache_path} is missing or unreadable; it holds the base certification trial "
            f"{chosen.number} was scored against. Recreate it with `approxtune certify {study_file}` (the same "
            "settings give the same cache), then export again"
        ) from None
    if recorded.get("cache_format", 1) != search_cache.meta.format_version:
        raise ExportError(
            f"study {study.name!r} was tuned against a base cache of format {recorded.get('cache_format', 1)}, whose "
            "noise this approxtune no longer draws, so its trials cannot be replayed: tune a new study (another "
            "study.name) and export from it"
        )
    if recorded.get("cache_fingerprint") != cache_fingerprint(search_cache):
        raise ExportError(
            f"the search cache {cache_path} is not the one study {study.name!r} was tuned against (its fingerprint "
            f"differs from the study's); recreate it with `approxtune certify {study_file}` and the study's settings"
        )
    if expected.model_fingerprint != search_cache.meta.model_fingerprint:
        raise ExportError(
            f"the checkpoint {study.checkpoint} is not the model study {study.name!r} was tuned with (its fingerprint "
            "differs from the search cache's); restore that checkpoint"
        )
    device = torch.device(device)
    report_inputs = pipeline.load_inputs(study, "report")
    c, settings = study.certify, study.irs_settings
    complete = len(optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    started = time.perf_counter()

    def certify(result: ExportResult) -> dict[str, Any]:
        model = result.model.to(device)
        # The exported model, read back from disk, must reproduce the trial's search certificate (same replayed noise).
        with progress(
            f"replay trial {chosen.number} on the search set", int(search_cache.certified.sum()) * settings.n_p
        ) as advance:
            replayed = certify_irs(
                model, search_inputs, search_cache, settings, batch_size=c.batch_size, device=device, progress=advance
            )
        if recheck == "irs":
            held = _recheck_irs(study, base.to(device), model, report_inputs, device, progress, say)
        else:
            held = _recheck_scratch(study, model, report_inputs, device, progress)
        radii, predicted, total_alpha, noise, levels = held
        noise.update(
            block_size=search_cache.meta.block_size,
            search_run_seed=search_cache.meta.seed,
            search_streams=["SELECTION", "ESTIMATION"],
        )
        return {
            "format": "approxtune-certificate",
            "format_version": FORMAT_VERSION,
            "model_sha256": result.sha256,
            "study": study.name,
            "trial": chosen.number,
            "summary": config.summary(),
            "method": recheck,
            "sigma": c.sigma,
            **levels,
            "confidence": 1.0 - total_alpha,
            **_numbers(radii, clean_accuracy(model, report_inputs, device)),
            "inputs": {
                "split": "report",
                "dataset": study.data.dataset,
                "count": len(report_inputs),
                "fingerprint": report_inputs.fingerprint(),
                "indices": report_inputs.index.tolist(),
            },
            "noise": noise,
            "search": {
                "acr": attrs.get("acr", chosen.values[0]),
                "accuracy": attrs.get("accuracy", chosen.values[1]),
                "certified_accuracy": attrs.get("certified_accuracy"),
                "confidence": attrs.get("confidence"),
                "inputs": len(search_inputs),
                "inputs_fingerprint": search_inputs.fingerprint(),
                "trials_compared": complete,
                "reproduced_acr": replayed.acr,
            },
            "explanation": WHY_THEY_DIFFER.format(trials=complete),
            "per_input": [
                {"index": int(i), "label": int(y), "predicted": int(p), "radius": float(r)}
                for i, y, p, r in zip(report_inputs.index, report_inputs.y.tolist(), predicted, radii, strict=True)
            ],
        }

    result = export_model(
        base,
        config,
        out_dir,
        arch=study.model.arch,
        force=force,
        example_input=report_inputs.x[:2],
        meta={"study": study.name, "trial": chosen.number, "sigma": c.sigma},
        certify=certify,
    )
    result.seconds = time.perf_counter() - started
    front_png = study.output_dir / "front.png"
    if not front_png.is_file():
        report.plot_front(optuna_study, front_png)
    attach_artifacts(study, chosen, [result.path / CERTIFICATE, front_png])
    return result


# -------------------------------------------------------------------------------------------------- artifacts


def artifact_dir(study: Any) -> Path:
    """Where the study's Optuna artifacts live: ``<output_dir>/artifacts`` (``optuna-dashboard --artifact-dir``)."""
    return study.output_dir / "artifacts"


def attach_artifacts(study: Any, trial: Any, files: list[Path]) -> list[str]:
    """Upload ``files`` as Optuna artifacts of the (finished) ``trial``; returns their artifact ids.

    A file whose name and bytes equal an artifact the trial already has is not uploaded again (a repeated export).

    Optuna's storages refuse attributes on finished trials, and an exported trial is always finished; an artifact
    link is metadata about the trial, not a change to its results, so it is written through a storage that lets
    exactly this through (the link is an ordinary ``artifacts:<id>`` trial system attribute, as
    ``optuna.artifacts.upload_artifact`` writes it for a running trial).
    """
    from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
    from optuna.storages import RDBStorage

    class _LinkStorage(RDBStorage):
        def check_trial_is_updatable(self, trial_id: int, trial_state: Any) -> None:
            return None

    url = study.storage
    store_dir = artifact_dir(study)
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(base_path=store_dir)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    storage = _LinkStorage(url, engine_kwargs=kwargs)
    try:
        attached = get_all_artifact_meta(trial, storage=storage)
        ids = []
        for path in files:
            data = Path(path).read_bytes()
            same = [m.artifact_id for m in attached if m.filename == Path(path).name and _stored(store, m) == data]
            if same:  # exported again with the same result: keep one copy
                ids.append(same[0])
            else:
                ids.append(
                    upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, storage=storage)
                )
        return ids
    finally:
        storage.remove_session()
        storage.engine.dispose()


def _stored(store: Any, meta: Any) -> bytes | None:
    try:
        with store.open_reader(meta.artifact_id) as reader:
            return reader.read()
    except Exception:  # a missing or unreadable stored file is simply not a duplicate
        return None


# ---------------------------------------------------------------------------------------------------- display


def certificate_table(cert: dict[str, Any]) -> Any:
    """A rich table of the search-set numbers beside the held-out certificate's."""
    from rich.table import Table

    search = cert["search"]
    table = Table(
        title=f"Trial {cert['trial']} of {cert['study']!r}: search set vs held-out certificate ({cert['method']})"
    )
    table.add_column("")
    table.add_column(f"search set ({search['inputs']} inputs, best of {search['trials_compared']})", justify="right")
    table.add_column(f"held-out report set ({cert['inputs']['count']} inputs, fresh noise)", justify="right")
    table.add_row("ACR", f"{search['acr']:.4f}", f"{cert['acr']:.4f}")
    table.add_row("clean accuracy of f^p", f"{search['accuracy']:.3f}", f"{cert['accuracy']:.3f}")
    for r, value in cert["certified_accuracy"].items():
        before = (search.get("certified_accuracy") or {}).get(r)
        table.add_row(f"certified accuracy at r = {r}", "-" if before is None else f"{before:.3f}", f"{value:.3f}")
    conf = search.get("confidence")
    table.add_row(
        "stated confidence", "-" if conf is None else f"{conf:.4g} (before selection)", f"{cert['confidence']:.4g}"
    )
    return table
