"""A study's trial budget shared by every worker: ``search.trials`` finished trials, never more, none lost.

Each worker runs Optuna's loop; :class:`TrialBudget` decides, before each trial starts, whether the study still needs
one.  A study needs another trial while its finished trials (complete, or stopped by racing) and the trials that other
workers are running number fewer than ``search.trials``, or while a retry of a failed trial waits (it runs before the
study counts as done).  The decision and the start of the trial it allows (Optuna's ``ask``, which makes it RUNNING)
happen under one lock file in the study's ``output_dir`` (:func:`approxtune.locking.file_lock`): so two workers can
never both take the last trial, and a study ends with exactly ``search.trials`` finished trials, with any number of
workers on machines that share ``output_dir``.  (Workers that do not share it may each take the last trial: a study
then ends with up to one more per worker.)  Before each decision, a RUNNING trial whose worker on this host is dead is
failed and retried (:func:`approxtune.storage.fail_dead_local_trials`), and trials of workers that stopped sending
heartbeats are failed and retried (Optuna's :func:`~optuna.storages.fail_stale_trials`), so that no dead trial holds
a place in the budget.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from approxtune import storage
from approxtune.locking import file_lock
from approxtune.trials import FINISHED

__all__ = ["TrialBudget"]


class TrialBudget:
    """The trial budget of one worker's run: :meth:`open` counts what is left (and takes the lock), the budget is an
    Optuna callback that takes the lock and decides after each trial, and :meth:`objective` wraps the objective so
    that a trial releases the lock once it has started.  Use it as a context manager: leaving releases the lock.

    ``on_dead`` is told the numbers of trials failed because their worker on this host died.
    """

    def __init__(self, lock: Path, trials: int, on_dead: Callable[[list[int]], None] | None = None) -> None:
        self.lock, self.trials, self.on_dead = Path(lock), trials, on_dead
        self._held: ExitStack | None = None

    def __enter__(self) -> TrialBudget:
        return self

    def __exit__(self, *exc: object) -> None:
        self._release()

    def open(self, optuna_study: optuna.Study) -> int:
        """Take the lock and return how many more trials the study needs (counting waiting retries); the lock is
        kept when that is more than 0, for the first trial to start."""
        self._acquire()
        left = self._left(optuna_study)
        if not left:
            self._release()
        return left

    def __call__(self, optuna_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self._acquire()
        if not self._left(optuna_study):
            optuna_study.stop()
            self._release()

    def objective(self, objective: Callable[[optuna.Trial], Any]) -> Callable[[optuna.Trial], Any]:
        """``objective``, releasing the lock first: its trial is RUNNING now, so the next decision counts it."""

        def started(trial: optuna.Trial) -> Any:
            self._release()
            return objective(trial)

        return started

    def _left(self, optuna_study: optuna.Study) -> int:
        dead = storage.fail_dead_local_trials(optuna_study)
        if dead and self.on_dead is not None:
            self.on_dead(dead)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(optuna_study)
        states = (*FINISHED, TrialState.RUNNING)
        taken = len(optuna_study.get_trials(deepcopy=False, states=states))
        return max(self.trials - taken, storage.pending_retries(optuna_study))

    def _acquire(self) -> None:
        if self._held is None:
            stack = ExitStack()
            stack.enter_context(file_lock(self.lock))
            self._held = stack

    def _release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.close()
