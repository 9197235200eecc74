"""How long work reports itself: progress bars and messages on stderr (rich), or nothing at all.

The command line and the Python API share one :class:`Reporter`, so both show the same bars and lines; the API's
``verbose=False`` gives a silent one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import optuna
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["Reporter"]


class Reporter:
    """Progress bars and messages for long work; ``quiet`` shows nothing; ``verbosity`` (0, 1, 2) lets Optuna's own
    log through (INFO, DEBUG), which is otherwise limited to warnings (``quiet``: errors)."""

    def __init__(self, console: Console | None = None, *, quiet: bool = False, verbosity: int = 0) -> None:
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.verbosity = verbosity

    def set_optuna_verbosity(self) -> None:
        """Optuna's logging level as this reporter's verbosity asks."""
        levels = {0: optuna.logging.WARNING, 1: optuna.logging.INFO}
        level = optuna.logging.ERROR if self.quiet else levels.get(self.verbosity, optuna.logging.DEBUG)
        optuna.logging.set_verbosity(level)

    @contextmanager
    def progress(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        """A progress bar of ``total`` steps; yields ``advance(count)``."""
        if self.quiet:
            yield lambda count: None
            return
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=self.console, transient=False) as bar:
            task = bar.add_task(description, total=total)
            yield lambda count: bar.advance(task, count)

    def info(self, message: str) -> None:
        """A line of plain text (no markup is interpreted)."""
        if not self.quiet:
            self.console.print(message, highlight=False, markup=False, soft_wrap=True)

    def warn(self, message: str) -> None:
        """A warning line, in yellow."""
        if not self.quiet:
            self.console.print(message, style="yellow", highlight=False, markup=False, soft_wrap=True)
