"""Where a study lives and how its workers share it: the Optuna storage, heartbeats, dead and retried trials.

SQLite (the default, ``<output_dir>/study.db``) for one process; a database server (PostgreSQL) for workers on
several machines.  Every worker records ``host:pid`` on the trial it runs (:func:`worker_id`); a trial whose worker
stops sending heartbeats for ``search.grace_period`` seconds, or whose worker on this host is gone, is failed and
enqueued again (:func:`fail_dead_local_trials`) without what the dead run recorded, and a study counts as done only
once no such retry is waiting (:class:`approxtune.budget.TrialBudget`).  Imports no torch, so showing a front stays
fast.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import optuna

from approxtune.config import Study
from approxtune.locking import holder_gone, this_process
from approxtune.trials import RESULT_ATTR

__all__ = [
    "fail_dead_local_trials",
    "is_shared_storage",
    "load_existing_study",
    "masked_url",
    "pending_retries",
    "storage",
    "study_storage",
    "worker_id",
]


def is_shared_storage(url: str) -> bool:
    """Whether ``url`` names a database server that workers on several machines can share (anything but SQLite)."""
    return not url.startswith("sqlite")


def masked_url(url: str) -> str:
    """``url`` with its password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def worker_id() -> str:
    """``host:pid`` of this process, recorded on every trial it runs (user attribute ``worker``)."""
    return this_process()


def pending_retries(optuna_study: optuna.Study) -> int:
    """WAITING copies of failed trials (retries enqueued by Optuna's stale-trial callback)."""
    waiting = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    return sum("failed_trial" in t.system_attrs for t in waiting)


def fail_dead_local_trials(optuna_study: optuna.Study) -> list[int]:
    """Fail, and enqueue a retry of, every RUNNING trial whose worker ran on this host and is no longer alive.

    A worker records ``host:pid`` (:func:`worker_id`) when its trial starts; on this host, a pid that no longer
    exists means the trial is dead now, so it need not wait for the heartbeat's grace period (which still applies to
    other hosts).  The retry is Optuna's own (the storage's stale-trial callback), so the copy runs next and
    records which trial it replaces.  Returns the numbers of the trials failed.
    """
    backend = optuna_study._storage  # the public API has no way to fail another process's trial
    retry = getattr(backend, "get_heartbeat_stale_trial_callback", lambda: None)()
    failed = []
    for trial in optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not holder_gone(str(trial.user_attrs.get("worker", ""))):
            continue
        try:
            if not backend.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:  # another process failed it first
            continue
        failed.append(trial.number)
        if retry is not None:
            retry(optuna_study, backend.get_trial(trial._trial_id))
    return failed


_SCHEMA_LOCK = 0x617070726F78  # pg_advisory_lock key ("approx") serialising Optuna's table creation


@contextmanager
def _schema_lock(url: str) -> Iterator[None]:
    """On PostgreSQL, hold an advisory lock while Optuna creates its tables: workers starting at once on an empty
    database would otherwise race on CREATE TABLE (duplicate pg_type rows) and on the schema version rows."""
    if not url.startswith("postgresql"):
        yield
        return
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    engine = sqlalchemy.create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 10})
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": _SCHEMA_LOCK})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": _SCHEMA_LOCK})
    finally:
        engine.dispose()


RETRY_KEEPS = ("baseline",)
"""The user attributes a retry of a dead trial inherits; the others describe a run that did not finish."""


def _fresh_retry(
    retry: Callable[[optuna.Study, optuna.trial.FrozenTrial], None],
) -> Callable[[optuna.Study, optuna.trial.FrozenTrial], None]:
    """Optuna's retry of a dead trial (a WAITING copy of its parameters and attributes), without what the dead trial
    recorded of a result: its :data:`RESULT_ATTR`, its constraint values and its user attributes other than
    :data:`RETRY_KEEPS`.  (A copy that inherited them would start with another run's result, and Optuna would ignore
    its own constraint values as already set.)"""

    def retry_afresh(optuna_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        clean = copy.copy(trial)
        clean.system_attrs = {
            k: v for k, v in trial.system_attrs.items() if k != RESULT_ATTR and not k.startswith("constraints")
        }
        clean.user_attrs = {k: v for k, v in trial.user_attrs.items() if k in RETRY_KEEPS}
        retry(optuna_study, clean)

    return retry_afresh


def storage(
    url: str, heartbeat_interval: int = 30, grace_period: int = 90, max_retry: int = 2
) -> optuna.storages.BaseStorage:
    """An RDB storage with heartbeats: a trial whose worker died is marked FAIL and enqueued again (twice at most).

    Every ``heartbeat_interval`` seconds a running trial's worker records a heartbeat; a RUNNING trial without one for
    ``grace_period`` seconds is stale: the next worker to start a trial fails it and enqueues a copy.  A storage that
    cannot be reached or whose driver is missing raises ValueError naming the fix.
    """
    import sqlalchemy.exc
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = _fresh_retry(RetryHeartbeatStaleTrialCallback(max_retry=max_retry))
    # SQLite: wait for the file lock; a server: a worker outlives server restarts and idle-connection timeouts.
    engine_kwargs: dict = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    if url.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": 10}  # an unreachable host fails, instead of hanging
    attempts = 5
    for attempt in range(attempts):
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=heartbeat_interval,
                    grace_period=grace_period,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs=engine_kwargs,
                )
        except ImportError as exc:
            fix = _DRIVER_HINTS.get(url.split(":", 1)[0].split("+", 1)[0], "install the driver SQLAlchemy names")
            raise ValueError(
                f"the study storage {masked_url(url)} needs a database driver that is not installed ({exc}); {fix}"
            ) from None
        except (sqlalchemy.exc.SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
            # Another process creating the tables at the same moment (SQLite, MySQL), or a server that is not up.
            if attempt == attempts - 1:
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                raise ValueError(f"cannot open the study storage {masked_url(url)}: {reason}") from None
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


_DRIVER_HINTS = {
    "postgresql": "for PostgreSQL: pip install 'approxtune[postgres]' (URL postgresql+psycopg2://...)",
    "mysql": "for MySQL: pip install pymysql and use a mysql+pymysql://... URL",
}


def study_storage(study: Study) -> optuna.storages.BaseStorage:
    """The storage of ``study`` (``search.storage``, with its heartbeat settings)."""
    return storage(study.storage, study.search.heartbeat_interval, study.search.grace_period)


def load_existing_study(study: Study) -> optuna.Study | None:
    """The study's Optuna study if it exists (an SQLite file is not created when it is missing)."""
    url = study.storage
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        return None
    try:
        return optuna.load_study(study_name=study.name, storage=study_storage(study))
    except KeyError:
        return None
