"""Reading PyTorch's pickle files (checkpoints, ``.pt`` tensor files) without ever running code from them.

:func:`load_plain` is ``torch.load(weights_only=True)``: only tensors, numbers, strings and containers are built.  A
file that needs anything else raises :class:`UnsafeFile` naming the Python global it refers to (``posix.system``,
``numpy._core.multiarray._reconstruct``, a class of the program that saved it).  torch names the global itself when
its restricted unpickler meets it; for a plain ``pickle.dump`` file (protocol 4 or 5) it stops earlier, at an opcode
it does not read, so the global is found by reading the file's opcodes with :mod:`pickletools`, which parses without
building anything.  torch's warning about such a file's pickle protocol is not shown: the refusal says it all.
"""

from __future__ import annotations

import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path

import torch

__all__ = ["UnreadableFile", "UnsafeFile", "load_plain"]


class UnsafeFile(Exception):
    """A file that refers to a Python global (``blocked``) which unpickling would call or build."""

    def __init__(self, blocked: str) -> None:
        super().__init__(blocked)
        self.blocked = blocked


class UnreadableFile(Exception):
    """A file that is not a whole PyTorch pickle (``reason``: what failed)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_BLOCKED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # how torch.load(weights_only=True) names what it refused


def load_plain(path: str | Path) -> object:
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`UnsafeFile` or :class:`UnreadableFile` otherwise."""
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4 in the checkpoint, ..."
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            text = str(exc)
            named = _BLOCKED_GLOBAL.search(text)
            blocked = named.group(1) if named else _first_global(path)
            if blocked is not None:
                raise UnsafeFile(blocked) from None
            detail = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()
            raise UnreadableFile(detail[0].strip() if detail else type(exc).__name__) from None
        except Exception as exc:  # a truncated or foreign file fails anywhere inside torch.load
            raise UnreadableFile(f"{type(exc).__name__}: {exc}") from None


def _first_global(path: Path) -> str | None:
    """The first global a pickle file refers to that ``torch.load(weights_only=True)`` does not allow, read from its
    opcodes without unpickling; None when there is none (or the file cannot be parsed that far)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                data = archive.read(name) if name else b""
        else:
            data = path.read_bytes()
    except (OSError, zipfile.BadZipFile):
        return None
    found, strings = [], []
    memo: dict[int, str | None] = {}
    last: str | None = None  # the string the previous opcode left on top of the stack, if any
    try:
        for opcode, arg, _ in pickletools.genops(data):
            name, top = opcode.name, None
            if name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL" and len(strings) >= 2:  # module and name: the two strings pushed last
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif "UNICODE" in name and isinstance(arg, str):
                strings.append(arg)
                top = arg
            elif name == "MEMOIZE":  # memoizes the top of the stack, which stays
                memo[len(memo)] = top = last
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = top = last
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                top = memo.get(int(arg))
                if top is not None:
                    strings.append(top)
            last = top
    except Exception:  # a truncated or malformed stream: report what was found before it
        pass
    allowed = _allowed_globals()
    return next((g for g in found if g not in allowed), None)


def _allowed_globals() -> set[str]:
    """What ``torch.load(weights_only=True)`` builds (torch keeps the list private; empty if it moved)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except (ImportError, AttributeError):
        return set()
