"""Hand-made mutants: a function of approxtune compiled again with one piece of its source replaced.

Tests use them to show that a check fails on broken code (the check is a function the real test also uses).  The
replaced text must occur exactly once, so a mutant cannot silently stop mutating when the code changes.
"""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable


def mutant(function: Callable, old: str, new: str) -> Callable:
    """``function`` (a module-level function or a method) with ``old`` replaced by ``new`` in its source, compiled in
    a copy of its module's namespace."""
    source = textwrap.dedent(inspect.getsource(function))
    assert source.count(old) == 1, f"{old!r} occurs {source.count(old)} times in {function.__qualname__}"
    namespace = dict(function.__globals__)
    exec(compile(source.replace(old, new), f"<mutant of {function.__qualname__}>", "exec"), namespace)
    return namespace[function.__name__]
