"""The held-out certificate of an export: every shipped artifact certified in its own runtime on the report inputs.

Why again.  The exported trial was chosen as the best-looking of many on the search inputs, so its search-set
numbers are optimistically biased (winner's curse); a certificate that holds for one fixed model at ``1 - alpha``
need not hold for the best of many.  The held-out certificate is computed for the one exported model, on inputs and
noise that played no part in choosing it, so it holds at its stated confidence.

Why in the runtime.  IRS and CERTIFY bound the probability that *the function they evaluate* predicts a class under
noise: whatever f^p is, the certificate is about the smoothed version of that function.  Here f^p is the shipped
artifact run by its runtime (:class:`~approxtune.export.runtimes.Deployable`: an ONNX Runtime session, or the loaded
ExportedProgram) -- so the certificate is exactly about what ships.  Assuming instead that ONNX Runtime computes
torch's function is not exact: their kernels accumulate in other orders, so on some noise samples near a decision
boundary the runtime predicts another class (``benchmarks/deploy_results.md`` measures how often), and a certificate
of torch's f^p says nothing about those samples.

``--recheck irs`` (default) runs IRS against the base cache of the report inputs (g certified once, cached and
reused); ``--recheck scratch`` runs Cohen's CERTIFY of the artifact on noise stream FRESH.  :class:`Recheck` holds
everything either needs, and is recorded in ``certificate.json`` so that ``approxtune verify`` repeats it exactly.

Several exports on one report set.  A user who exports several models and keeps the one with the best held-out
numbers selects again, on the report set: its numbers are then the best of k.  Each certificate therefore records how
many distinct models (and methods) the report set has certified so far (:func:`count_certifications`, kept in
``<output_dir>/report_certifications.json``); by the union bound, an input's radii under all k models hold together
with probability at least ``1 - k * alpha_total``, which is what the chosen model's radii can claim.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.table import Table

from approxtune.cache import BaseCache
from approxtune.certification import predict_under_noise
from approxtune.data import Inputs
from approxtune.export.format import ExportError, file_record
from approxtune.export.runtimes import Deployable
from approxtune.irs import IRSSettings, Mode, Zeta, certify_irs
from approxtune.noise import Stream, input_seeds
from approxtune.search import REPORT_RADII, clean_accuracy
from approxtune.statistics import acr, certified_accuracy, certified_accuracy_curve, lower_confidence_bound, radius

__all__ = [
    "CERTIFICATE_FORMAT",
    "CERTIFICATE_VERSION",
    "RECHECK_MODES",
    "RECORD",
    "Recheck",
    "certificate_table",
    "count_certifications",
    "measure_rate",
    "no_progress",
    "recertify",
    "runtime_certificate",
]

CERTIFICATE_FORMAT = "approxtune-certificate"
CERTIFICATE_VERSION = 2
RECHECK_MODES = ("irs", "scratch")
RECORD = "report_certifications.json"
"""The file in a study's output_dir that lists every model its report inputs have certified."""

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]
"""``progress(description, total)``: a context manager yielding ``advance(count)`` (like ``cli.progress_bar``)."""


@contextlib.contextmanager
def no_progress(description: str, total: int) -> Iterator[Callable[[int], None]]:
    yield lambda count: None


@dataclass(frozen=True)
class Recheck:
    """How a held-out certificate is computed: method, the base certification's settings, IRS settings, batch size.

    :meth:`levels` is what ``certificate.json`` records (flat, readable); :meth:`from_certificate` reads it back.
    """

    method: str
    sigma: float
    n0: int
    n: int
    alpha: float
    batch_size: int
    irs: IRSSettings | None = None

    def __post_init__(self) -> None:
        if self.method not in RECHECK_MODES:
            raise ExportError(f"--recheck must be one of {', '.join(RECHECK_MODES)}, got {self.method!r}")
        if (self.method == "irs") != (self.irs is not None):
            raise ExportError("internal error: IRS settings are given exactly when the method is irs")

    @property
    def total_alpha(self) -> float:
        """The level of every radius: IRS's ``settings.total_alpha(alpha)``, or CERTIFY's ``alpha``."""
        return self.irs.total_alpha(self.alpha) if self.irs is not None else self.alpha

    def levels(self) -> dict[str, Any]:
        """The certificate's settings fields (in tail mode with the resolved tail length)."""
        s = self.irs
        out = {
            "method": self.method,
            "sigma": self.sigma,
            "alpha": self.alpha,
            "alpha_zeta": s and s.alpha_zeta,
            "alpha_d": s and s.alpha_d,
            "n0": self.n0,
            "n": self.n,
            "n_p": s and s.n_p,
            "irs_mode": s and s.mode.value,
            "irs_zeta": s and s.zeta.value,
            "gamma": s and s.gamma,
            "batch_size": self.batch_size,
        }
        if s is not None and s.mode is Mode.TAIL:
            out.update(n_tail=s.tail_length(self.n), allocate=s.allocate, block=s.block, pilot=s.pilot)
        return out

    @classmethod
    def from_certificate(cls, cert: dict[str, Any]) -> Recheck:
        """The recheck a certificate records (raises :class:`ExportError` if it records none)."""
        try:
            irs = None
            if cert["method"] == "irs":
                tail = cert["irs_mode"] == Mode.TAIL.value
                irs = IRSSettings(
                    n_p=int(cert["n_p"]),
                    alpha_zeta=float(cert["alpha_zeta"]),
                    alpha_d=float(cert["alpha_d"]),
                    mode=Mode(cert["irs_mode"]),
                    gamma=float(cert["gamma"]),
                    zeta=Zeta(cert["irs_zeta"]),
                    **({key: cert[key] for key in ("n_tail", "allocate", "block", "pilot")} if tail else {}),
                )
            return cls(
                cert["method"], cert["sigma"], cert["n0"], cert["n"], cert["alpha"], int(cert["batch_size"]), irs
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"certificate.json does not record how it was computed ({exc!r}); export again") from None


# ---------------------------------------------------------------------------------------------- re-certification


def _certify_fresh(
    function: Callable[[torch.Tensor], torch.Tensor],
    inputs: Inputs,
    recheck: Recheck,
    run_seed: int,
    device: torch.device,
    advance: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cohen's CERTIFY on noise stream FRESH: selection samples 0..n0-1, estimation n0..n0+n-1.

    Returns ``(c_hat, p_a, radius)``.  Stream FRESH is never used by a base cache or IRS, so this noise is
    independent of everything the search and the report cache saw.
    """
    r = recheck
    kwargs = {"batch_size": r.batch_size, "device": device, "progress": advance}
    seeds = input_seeds(run_seed, inputs.index)
    selection = predict_under_noise(function, inputs.x, seeds, Stream.FRESH, 0, r.n0, r.sigma, **kwargs)
    minlength = int(np.iinfo(selection.dtype).max) + 1
    c_hat = np.array([np.bincount(row, minlength=minlength).argmax() for row in selection], dtype=np.int64)
    estimation = predict_under_noise(function, inputs.x, seeds, Stream.FRESH, r.n0, r.n0 + r.n, r.sigma, **kwargs)
    count = (estimation == c_hat[:, None]).sum(axis=1)
    p_a = lower_confidence_bound(count, r.n, r.alpha)
    return c_hat, p_a, radius(p_a, r.sigma)


def recertify(
    function: Deployable | Callable[[torch.Tensor], torch.Tensor],
    inputs: Inputs,
    recheck: Recheck,
    *,
    cache: BaseCache | None = None,
    run_seed: int | None = None,
    device: torch.device | str = "cpu",
    progress: Progress = no_progress,
    label: str = "f^p",
) -> dict[str, Any]:
    """The held-out numbers of ``function`` (any batch -> logits) on the report ``inputs``.

    ``recheck.method == "irs"``: IRS against ``cache`` (the report inputs' base cache, same order); each radius holds
    at ``1 - recheck.total_alpha``.  ``"scratch"``: CERTIFY on stream FRESH of ``run_seed``, at ``1 - alpha``.
    Returns ``acr``, ``accuracy`` (clean), ``certified_accuracy``, the curve, the noise samples used and, per input,
    its index, label, certified class (-1: abstain or not the label) and radius.
    """
    device = torch.device(device)
    if recheck.irs is not None:
        if cache is None:
            raise ExportError("internal error: IRS re-certification needs the report inputs' base cache")
        budget = int(cache.certified.sum()) * recheck.irs.n_p  # tail mode spends at most this, the pilot included
        with progress(f"IRS of {label} on {len(inputs)} report inputs", budget) as advance:
            result = certify_irs(
                function, inputs, cache, recheck.irs, batch_size=recheck.batch_size, device=device, progress=advance
            )
        radii, predicted = result.radius, np.where(result.radius > 0, cache.c_hat, -1)
        samples = f"the first {recheck.irs.n_p} estimation samples, replayed"
        if result.n_tail:  # tail mode: per-input counts decided from the last n_tail cached samples
            counts = result.counts[result.evaluated]
            samples = (
                f"the first k_i estimation samples of input i, replayed (k_i from {counts.min(initial=0)} to "
                f"{counts.max(initial=0)}, {result.samples} samples in all with {result.pilot_samples} pilot "
                f"samples), k_i and the branch decided from the last {result.n_tail} cached samples, which are never "
                "replayed"
            )
        spent = result.samples
    else:
        if run_seed is None:
            raise ExportError("internal error: re-certification from scratch needs the report run seed")
        total = len(inputs) * (recheck.n0 + recheck.n)
        with progress(f"CERTIFY {label} on {len(inputs)} report inputs", total) as advance:
            c_hat, p_a, r = _certify_fresh(function, inputs, recheck, run_seed, device, advance)
        radii, predicted = np.where(c_hat == inputs.y.numpy(), r, 0.0), np.where(p_a > 0.5, c_hat, -1)
        samples = (
            f"{recheck.n0} selection samples (FRESH 0..{recheck.n0 - 1}) and {recheck.n} estimation samples "
            f"(FRESH {recheck.n0}..{recheck.n0 + recheck.n - 1}) per input"
        )
        spent = total
    return {
        "acr": acr(radii),
        "accuracy": clean_accuracy(function, inputs, device),
        "certified_accuracy": {f"{r:g}": certified_accuracy(radii, r) for r in REPORT_RADII},
        "certified_accuracy_curve": [[r, a] for r, a in certified_accuracy_curve(radii)],
        "samples": samples,
        "samples_evaluated": int(spent),
        "per_input": [
            {"index": int(i), "label": int(y), "predicted": int(p), "radius": float(r)}
            for i, y, p, r in zip(inputs.index, inputs.y.tolist(), predicted, radii, strict=True)
        ],
    }


def runtime_certificate(deployable: Deployable, numbers: dict[str, Any]) -> dict[str, Any]:
    """One entry of ``certificates``: the runtime (:meth:`Deployable.describe`), the artifact and its hash, numbers."""
    record = file_record(deployable.path)
    return {
        **deployable.describe(),
        "artifact": deployable.path.name,
        "artifact_bytes": record["bytes"],
        "artifact_sha256": record["sha256"],
        **numbers,
    }


def measure_rate(
    function: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor, batch: int, device: torch.device | str
) -> float:
    """Forward passes per second of ``function`` on a batch of ``batch`` copies of ``example[0]`` (a short run:
    one warm-up, then the faster of two timed batches), for estimating how long a certification takes."""
    x = example[:1].expand(batch, *example.shape[1:]).contiguous().to(device)
    best = float("inf")
    with torch.inference_mode():
        for attempt in range(3):
            start = time.perf_counter()
            function(x)
            if attempt:
                best = min(best, time.perf_counter() - start)
    return batch / max(best, 1e-9)


# ---------------------------------------------------------------------------------------- the report set's count


def count_certifications(output_dir: Path, entry: dict[str, Any]) -> int:
    """Record ``entry`` in ``<output_dir>/report_certifications.json``; return how many distinct models its report set
    has certified, this one included.

    ``entry`` holds ``study``, ``inputs_fingerprint`` (the report set), ``model_sha256`` and ``method`` plus anything
    useful to a reader (trial, path, time).  Distinct means another ``(model_sha256, method)`` on the same study and
    report set: certifying the same model again by the same method gives the same numbers, so it selects nothing.
    The file is read, extended and replaced under an exclusive lock (``fcntl.flock`` on a lock file beside it), so
    concurrent exports on one machine each count the other.
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / RECORD
    with open(output_dir / f".{RECORD}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ExportError(f"{path} is not valid JSON; move it aside (it lists earlier exports) and retry") from None
        entries = [*data.get("certifications", []), entry]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"format": "approxtune-report-certifications", "certifications": entries}, indent=1))
        os.replace(tmp, path)
    same_set = (entry["study"], entry["inputs_fingerprint"])
    return len(
        {(e["model_sha256"], e["method"]) for e in entries if (e.get("study"), e.get("inputs_fingerprint")) == same_set}
    )


# ---------------------------------------------------------------------------------------------------- display


def certificate_table(cert: dict[str, Any]) -> Table:
    """A rich table of the search-set numbers beside each runtime's held-out certificate."""
    search, held = cert["search"], cert["certificates"]
    table = Table(
        title=f"Trial {cert['trial']} of {cert['study']!r}: search set vs held-out certificate ({cert['method']})"
    )
    table.add_column("")
    table.add_column(f"search set ({search['inputs']} inputs, best of {search['trials_compared']})", justify="right")
    for c in held:
        table.add_column(
            f"held-out: {c['artifact']} in {c['runtime']} {c['runtime_version']} ({cert['inputs']['count']} inputs)",
            justify="right",
        )
    table.add_row("ACR", f"{search['acr']:.4f}", *(f"{c['acr']:.4f}" for c in held))
    table.add_row("clean accuracy of f^p", f"{search['accuracy']:.3f}", *(f"{c['accuracy']:.3f}" for c in held))
    for r in held[0]["certified_accuracy"] if held else ():
        before = (search.get("certified_accuracy") or {}).get(r)
        table.add_row(
            f"certified accuracy at r = {r}",
            "-" if before is None else f"{before:.3f}",
            *(f"{c['certified_accuracy'][r]:.3f}" for c in held),
        )
    conf = search.get("confidence")
    table.add_row(
        "stated confidence",
        "-" if conf is None else f"{conf:.4g} (before selection)",
        *(f"{cert['confidence']:.4g}" for _ in held),
    )
    return table
