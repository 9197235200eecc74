"""``approxtune verify DIR``: recompute an export's certificate on this machine, from the files that ship.

For a person who received an export and wants to see its certificate hold where they run it.  Before any noise
sample it checks that

1. ``DIR`` is an export of this format and every file ``config.json`` records has its recorded size and SHA-256,
   and every certified artifact is the file its certificate names (SHA-256) -- otherwise it is refused;
2. the chosen runtimes (``--runtime``, default all that the certificate holds) are certified in ``DIR`` and installed;
3. the study's report inputs are the certified ones (fingerprint) and, for an IRS certificate, the study's report
   base cache is the one certified against (fingerprint; build it with ``approxtune certify STUDY --split report``).

Then it runs each artifact in its runtime exactly as ``export`` did (:meth:`~approxtune.export.certificate.Recheck.
from_certificate`: same method, levels, noise, batch size) and compares every input's certified class and radius,
the ACR and the accuracy with the recorded ones.  Nothing is written.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from approxtune import pipeline
from approxtune.cache import CacheDamagedError, CacheError, cache_fingerprint, load_cache
from approxtune.config import Study, load_study
from approxtune.export.certificate import (
    CERTIFICATE_FORMAT,
    CERTIFICATE_VERSION,
    Progress,
    Recheck,
    no_progress,
    recertify,
)
from approxtune.export.format import CERTIFICATE, ExportError, check_files, file_record, read_config, read_json
from approxtune.export.runtimes import load_deployable, select_runtimes

__all__ = ["RuntimeCheck", "VerifyResult", "verify"]

_SHOWN = 5  # differing inputs named in a message


@dataclass
class RuntimeCheck:
    """One runtime's certificate recomputed: what differs from the recorded one (nothing when it reproduced)."""

    runtime: str
    artifact: str
    recorded: dict[str, Any] = field(repr=False)
    recomputed: dict[str, Any] = field(repr=False)
    differences: list[str]
    notes: list[str]
    """Where this run's runtime version, settings or machine differ from the recorded ones (a likely cause)."""

    @property
    def reproduced(self) -> bool:
        return not self.differences


@dataclass
class VerifyResult:
    directory: Path
    checks: list[RuntimeCheck]

    @property
    def reproduced(self) -> bool:
        return all(check.reproduced for check in self.checks)


def _differences(recorded: dict[str, Any], recomputed: dict[str, Any]) -> list[str]:
    out = []
    for key in ("acr", "accuracy"):
        if not math.isclose(recorded[key], recomputed[key], rel_tol=0.0, abs_tol=1e-12):
            out.append(f"{key} {recomputed[key]:.6f}, recorded {recorded[key]:.6f}")
    if len(recorded["per_input"]) != len(recomputed["per_input"]):
        return [*out, f"{len(recomputed['per_input'])} inputs, recorded {len(recorded['per_input'])}"]
    pairs = list(zip(recorded["per_input"], recomputed["per_input"], strict=True))
    differing = [
        f"input {new['index']}: class {new['predicted']} radius {new['radius']:.4f}, recorded class "
        f"{old['predicted']} radius {old['radius']:.4f}"
        for old, new in pairs
        if (old["index"], old["predicted"], old["radius"]) != (new["index"], new["predicted"], new["radius"])
    ]
    if differing:
        more = f"; {len(differing) - _SHOWN} more" if len(differing) > _SHOWN else ""
        out.append(f"{len(differing)} of {len(pairs)} inputs differ ({'; '.join(differing[:_SHOWN])}{more})")
    return out


def _notes(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    return [
        f"{key} {now[key]!r}, recorded {recorded.get(key)!r}"
        for key in ("runtime_version", "settings", "machine")
        if recorded.get(key) != now[key]
    ]


def _study(directory: Path, config: dict[str, Any], study: Study | str | Path | None) -> Study:
    if isinstance(study, Study):
        return study
    path = Path(study) if study is not None else Path(config.get("study_file") or "")
    if not path.is_file():
        raise ExportError(
            f"{directory} was exported from the study file {config.get('study_file')!r}, which is not here; pass the "
            "study file whose report inputs and cache to use: --study STUDY.toml"
        )
    return load_study(path)


def verify(
    directory: str | Path,
    *,
    study: Study | str | Path | None = None,
    data: object | None = None,
    runtime: str = "all",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> VerifyResult:
    """Recompute the certificates of ``directory`` (an export) and compare them with ``certificate.json``.

    ``study`` gives the report inputs and base cache (default: the study file recorded at export); ``data`` the
    user's own data when the model was tuned on data given from Python (as to :func:`approxtune.tune`).  Raises
    :class:`ExportError` for bad input (tampered or truncated files, unknown or uncertified runtime, a missing
    runtime package, other report inputs or cache); returns a :class:`VerifyResult` saying what differs otherwise.
    """
    directory = Path(directory)
    progress = progress or no_progress
    config = read_config(directory)
    check_files(directory, config)
    cert = read_json(directory / CERTIFICATE)
    if (cert.get("format"), cert.get("format_version")) != (CERTIFICATE_FORMAT, CERTIFICATE_VERSION):
        raise ExportError(f"{directory / CERTIFICATE} is not an approxtune certificate of this version; export again")
    if cert.get("model_sha256") != config.get("model_sha256"):
        raise ExportError(f"{directory / CERTIFICATE} certifies another model than {directory} holds; refusing it")
    entries = {entry.get("runtime"): entry for entry in cert.get("certificates", [])}
    runtimes = select_runtimes(runtime, available=list(entries))
    for rt in runtimes:
        recorded = {"bytes": entries[rt.name].get("artifact_bytes"), "sha256": entries[rt.name].get("artifact_sha256")}
        if entries[rt.name].get("artifact") != rt.artifact or file_record(directory / rt.artifact) != recorded:
            raise ExportError(
                f"{directory / rt.artifact} is not the artifact its certificate names (size or SHA-256 differ): "
                "refusing it"
            )
    recheck = Recheck.from_certificate(cert)
    study = _study(directory, config, study)
    inputs = pipeline.load_inputs(study, "report", pipeline.user_data(study, data))
    if inputs.fingerprint() != cert.get("inputs", {}).get("fingerprint"):
        raise ExportError(
            f"the report inputs of {study.origin} are not the ones {directory} was certified on (fingerprints differ); "
            "pass the study file it was exported from: --study STUDY.toml"
        )
    cache = None
    if recheck.irs is not None:
        path = study.cache_path("report")
        try:
            cache = load_cache(path)
        except CacheDamagedError as exc:
            raise pipeline.damaged(study, "report", exc, ", then verify again") from None
        except CacheError:
            raise ExportError(
                f"the report base cache {path} is missing; the certificate was computed against it: build it with "
                f"`approxtune certify {study.origin} --split report` (the same settings give the same cache)"
            ) from None
        if cache_fingerprint(cache) != cert["noise"].get("base_cache_fingerprint"):
            raise ExportError(
                f"the report base cache {path} is not the one {directory} was certified against (fingerprints "
                f"differ); rebuild it with `approxtune certify {study.origin} --split report` and the study's settings"
            )
    checks = []
    for rt in runtimes:
        deployable = load_deployable(rt, directory, device)
        recorded = entries[rt.name]
        recomputed = recertify(
            deployable,
            inputs,
            recheck,
            cache=cache,
            run_seed=cert["noise"].get("run_seed"),
            progress=progress,
            label=f"{rt.artifact} in {rt.name}",
        )
        checks.append(
            RuntimeCheck(
                rt.name,
                rt.artifact,
                recorded,
                recomputed,
                _differences(recorded, recomputed),
                _notes(recorded, deployable.describe()),
            )
        )
    return VerifyResult(directory, checks)
