"""Importing a user's own code named in a study file: ``package.module:callable``.

A study file that names a ``[model] factory`` or a ``[data] loader`` runs that code, as a Python script would.  The
module is imported from the study file's folder first, then from ``sys.path``; the folder stays on ``sys.path`` for
the rest of the process, so the module's own imports of its neighbours work too.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from approxtune.errors import ApproxtuneError

__all__ = ["UserCodeError", "import_callable", "qualified_name"]


class UserCodeError(ApproxtuneError):
    """User code named in a study that cannot be imported or called as asked."""


def import_callable(spec: str, key: str, folders: Sequence[Path] = ()) -> Callable[..., Any]:
    """The callable ``spec`` = ``"package.module:name"`` names (``name`` may be dotted: ``Class.method``).

    ``folders`` are searched before ``sys.path``.  ``key`` names the study setting in messages
    (``model.factory``).  Raises :class:`UserCodeError` saying what could not be found and where it was looked for.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserCodeError(f"{key} = {spec!r} must be 'package.module:callable'")
    folders = [Path(f).resolve() for f in folders]
    for folder in reversed(folders):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
    where = ", ".join(str(f) for f in folders)
    where = f"{where} and the Python path" if where else "the Python path"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):  # the module itself (or its package) is missing
            raise UserCodeError(
                f"{key} = {spec!r}: no module named {exc.name!r} (looked in {where}); put {module_name}.py next to "
                "the study file or install its package"
            ) from None
        raise UserCodeError(f"{key} = {spec!r}: importing {module_name} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while it was imported
        raise UserCodeError(f"{key} = {spec!r}: importing {module_name} failed ({type(exc).__name__}: {exc})") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserCodeError(f"{key} = {spec!r}: module {module_name} ({module.__file__}) has no {attr!r}")
        target = getattr(target, part)
    if not callable(target):
        raise UserCodeError(f"{key} = {spec!r} is a {type(target).__name__}, not a callable")
    return target


def qualified_name(obj: Any) -> str:
    """``"package.module:QualName"`` of a class or function (what :func:`import_callable` takes back)."""
    return f"{obj.__module__}:{obj.__qualname__}"
