"""What an export leaves on its Optuna trial: the exported files as artifacts, the held-out numbers as attributes.

Optuna's storages refuse attributes on finished trials, and an exported trial is always finished; an artifact link or
the held-out numbers are metadata about the trial, not a change to its results, so they are written through a storage
that lets exactly this through (an artifact link is an ordinary ``artifacts:<id>`` trial system attribute, as
``optuna.artifacts.upload_artifact`` writes it for a running trial).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact
from optuna.storages import RDBStorage

__all__ = ["ARTIFACT_MAX_BYTES", "attach_artifacts", "set_export_attrs"]

ARTIFACT_MAX_BYTES = 32 * 2**20
"""Exported files larger than this (32 MiB) are not copied into the artifact store: the export directory has them."""


class _FinishedTrialStorage(RDBStorage):
    def check_trial_is_updatable(self, trial_id: int, trial_state: Any) -> None:
        return None


@contextmanager
def _storage(study: Any) -> Iterator[RDBStorage]:
    url = study.storage
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    storage = _FinishedTrialStorage(url, engine_kwargs=kwargs)
    try:
        yield storage
    finally:
        storage.remove_session()
        storage.engine.dispose()


def attach_artifacts(study: Any, trial: Any, files: list[Path]) -> tuple[list[str], list[Path]]:
    """Upload ``files`` as Optuna artifacts of the (finished) ``trial``: ``(artifact ids, files left out as too big)``.

    A file larger than :data:`ARTIFACT_MAX_BYTES` is left out.  A file whose name and bytes equal an artifact the
    trial already has is not uploaded again (a repeated export).
    """
    store_dir = study.artifact_dir
    store_dir.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(base_path=store_dir)
    ids, too_big = [], []
    with _storage(study) as storage:
        attached = get_all_artifact_meta(trial, storage=storage)
        for path in files:
            if Path(path).stat().st_size > ARTIFACT_MAX_BYTES:
                too_big.append(Path(path))
                continue
            data = Path(path).read_bytes()
            same = [m.artifact_id for m in attached if m.filename == Path(path).name and _stored(store, m) == data]
            if same:  # exported again with the same result: keep one copy
                ids.append(same[0])
            else:
                ids.append(
                    upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=trial, storage=storage)
                )
    return ids, too_big


def _stored(store: Any, meta: Any) -> bytes | None:
    try:
        with store.open_reader(meta.artifact_id) as reader:
            return reader.read()
    except Exception:  # a missing or unreadable stored file is simply not a duplicate
        return None


def set_export_attrs(study: Any, trial: Any, attrs: dict[str, Any]) -> None:
    """Set user attributes of the (finished) exported ``trial``: its held-out numbers and the export's path."""
    with _storage(study) as storage:
        for key, value in attrs.items():
            storage.set_trial_user_attr(trial._trial_id, key, value)
