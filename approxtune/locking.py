"""Processes that share a study's files: which of them are alive, and locks that let one build while others wait.

Several approxtune processes may work on one study at once: ``tune`` started twice, workers on several machines
whose ``output_dir`` is shared storage (NFS and the like), ``certify --shard`` on each machine.  What is expensive to
make (the trained model, a base cache) is made by one of them while the others wait for it, under a
:func:`file_lock` beside it, and then read by all.

The locks are ``flock`` locks on a small file.  The operating system releases a lock when its holder exits or is
killed (SIGKILL included), so a dead process never blocks the others; on NFS, Linux takes flock locks as the server's
byte-range locks (NFSv4, or NFSv3 with lockd), which the server releases when the holder's lease ends.  An exclusive
holder writes ``host:pid`` into the file, so that a waiting process can say whom it waits for.  The last holder
removes the file when it is done; a process that locked a file which was removed meanwhile locks the new one, so a
lock is never held by two processes through two files.  Shared locks (several ``certify --shard`` at once) exclude
only the exclusive ones.  A process takes one lock at a time (a nested request for a lock it already holds is granted at
once), so no two processes can wait for each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "file_lock",
    "holder_gone",
    "leftovers",
    "process_alive",
    "remove_leftovers",
    "temporary_name",
    "this_process",
]


def this_process() -> str:
    """``host:pid`` of this process: what a lock holder and a trial's worker record."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holder_gone(tag: str) -> bool:
    """Whether the process ``tag`` (``host:pid``, as :func:`this_process` writes it) is known to be dead: it ran on
    this host and its pid no longer exists.  A process of another host is never known to be dead."""
    host, _, pid = tag.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def temporary_name(path: str | Path, kind: str = "tmp") -> Path:
    """``<path>.<kind>-<host>-<pid>``: where this process writes what it renames to ``path``, a name no other process
    uses, which :func:`leftovers` can tell is a dead process's.  (``<name>.<kind>-<host>-<pid>.npz`` for a ``.npz``
    file: ``np.savez`` insists on the extension.)"""
    path = Path(path)
    tag = this_process().replace(":", "-")
    suffix = ".npz" if path.suffix == ".npz" else ""
    return path.with_name(f"{path.name.removesuffix(suffix)}.{kind}-{tag}{suffix}")


def leftovers(folder: str | Path, name: str, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """The :func:`temporary_name` files and folders in ``folder`` (of paths whose name, without a ``.npz`` extension,
    matches the regular expression ``name``) that processes of this host left when they were killed: their pid no
    longer exists.  Those of live processes and of other hosts are not listed."""
    kind = "|".join(map(re.escape, kinds))
    pattern = re.compile(rf"(?:{name})\.(?:{kind})-(?P<host>.+)-(?P<pid>\d+)(?:\.npz)?")
    try:
        entries = sorted(Path(folder).iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = ((entry, pattern.fullmatch(entry.name)) for entry in entries)
    return [entry for entry, match in found if match and holder_gone(f"{match['host']}:{match['pid']}")]


def remove_leftovers(folder: str | Path, name: str, kinds: tuple[str, ...] = ("tmp",)) -> list[Path]:
    """Remove the :func:`leftovers` of dead processes; returns what was removed."""
    removed = leftovers(folder, name, kinds)
    for entry in removed:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return removed


_held = threading.local()
"""Per thread: the locks it holds, path -> shared."""

_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)
"""What flock raises on a file system without working locks (NFS mounted with nolock, some FUSE file systems)."""


@contextlib.contextmanager
def file_lock(
    path: str | Path, *, shared: bool = False, say: Callable[[str], None] | None = None, what: str = ""
) -> Iterator[None]:
    """Hold the lock file ``path`` (exclusive, or ``shared``) for the ``with`` block, waiting as long as another
    process holds it.

    ``say`` is told, once, whom the lock is waited for (``what`` names the work: ``"trains the model"``), and that a
    file system without locks leaves the block unprotected.  The file's folder is created if missing.
    """
    path = Path(path)
    held = getattr(_held, "paths", None)
    if held is None:
        held = _held.paths = {}
    key = str(path.absolute())
    if key in held:
        if held[key] and not shared:
            raise RuntimeError(f"{path}: a shared lock cannot be made exclusive")
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, shared, say, what)
    held[key] = shared
    try:
        yield
    finally:
        del held[key]
        if fd is not None:
            _release(path, fd, shared)


def _release(path: Path, fd: int, shared: bool) -> None:
    """Unlock ``fd``; the file is removed by its last holder (a shared one when it can take the lock alone)."""
    if shared:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process holds or awaits it: the file stays for it
            os.close(fd)
            return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)  # before unlocking: a process waiting on this file then finds it gone and locks a new one
    os.close(fd)


def _acquire(path: Path, shared: bool, say: Callable[[str], None] | None, what: str) -> int | None:
    """An open descriptor of ``path`` holding its lock, or None on a file system without locks."""
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    told = False
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if say is not None and not told:
                    holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "another process"
                    say(f"Waiting for {holder}, which {what or 'holds ' + str(path)} ...")
                    told = True
                fcntl.flock(fd, mode)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ESTALE:  # the file was removed on another NFS client while we waited: lock anew
                continue
            if exc.errno not in _NO_LOCKS:
                raise
            if say is not None:
                say(f"{path.parent} does not support file locks: processes started at once may repeat work")
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except OSError as exc:  # removed by its holder (here, or on another NFS client: a stale handle)
            if exc.errno not in (errno.ENOENT, errno.ESTALE):
                os.close(fd)
                raise
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file we waited on: lock the current one
    if not shared:
        os.ftruncate(fd, 0)
        os.pwrite(fd, this_process().encode(), 0)
    return fd
