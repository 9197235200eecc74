"""File locks between processes (exclusive, shared, released by a kill), and the temporary names of dead processes."""

import errno
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from approxtune import locking
from approxtune.locking import (
    file_lock,
    holder_gone,
    leftovers,
    process_alive,
    remove_leftovers,
    temporary_name,
    this_process,
)

HOLD = textwrap.dedent(
    """
    import sys, time
    from approxtune.locking import file_lock
    with file_lock(sys.argv[1], shared=sys.argv[2] == "shared"):
        print("locked", flush=True)
        time.sleep(float(sys.argv[3]))
    """
)


def _hold(path, seconds=60.0, shared=False):
    """A process that holds the lock ``path`` for ``seconds``; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path), "shared" if shared else "exclusive", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "locked\n"
    return proc


def _try_lock(path, shared=False, timeout=10.0):
    """Take the lock in a thread; returns (acquired event, messages, thread)."""
    got, said = threading.Event(), []

    def take():
        with file_lock(path, shared=shared, say=said.append, what="does something"):
            got.set()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return got, said, thread


def test_a_lock_held_by_a_killed_process_is_released(tmp_path):
    lock = tmp_path / "x.lock"
    holder = _hold(lock)
    assert lock.read_text() == f"{socket.gethostname()}:{holder.pid}", "the holder is recorded"
    got, said, thread = _try_lock(lock)
    assert not got.wait(0.5), "an exclusive lock excludes"
    assert said == [f"Waiting for {socket.gethostname()}:{holder.pid}, which does something ..."]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert got.wait(10), "the kernel released the dead holder's lock"
    thread.join(10)
    assert not lock.exists(), "an exclusive holder removes the file when it is done"


def test_shared_locks_exclude_only_an_exclusive_one(tmp_path):
    lock = tmp_path / "x.lock"
    first = _hold(lock, shared=True)
    got, _, thread = _try_lock(lock, shared=True)
    assert got.wait(10), "shards share the lock"
    thread.join(10)
    got, said, thread = _try_lock(lock)
    assert not got.wait(0.5) and said == ["Waiting for another process, which does something ..."]
    first.terminate()
    first.wait()
    assert got.wait(10)
    thread.join(10)


def test_a_waiter_follows_the_file_its_holder_removed_so_two_processes_never_hold_the_lock(tmp_path):
    """The holder removes the file it locked; a process that waited on that file must lock the file at the path
    instead, which a process arriving later may have created and locked meanwhile."""
    lock = tmp_path / "x.lock"
    holder = _hold(lock, seconds=0.5)
    inside = []

    def take(name):
        with file_lock(lock):
            inside.append(("in", name))
            time.sleep(0.5)
            inside.append(("out", name))

    waiter = threading.Thread(target=take, args=("waiter",))
    waiter.start()  # waits on the holder's file
    holder.wait()  # which the holder has removed now
    late = threading.Thread(target=take, args=("late",))
    late.start()  # creates a new file at the path
    for thread in (waiter, late):
        thread.join(30)
    assert [kind for kind, _ in inside] == ["in", "out", "in", "out"], f"one at a time: {inside}"


def test_nested_requests_of_one_thread_are_granted_and_a_shared_lock_is_not_upgraded(tmp_path):
    lock = tmp_path / "x.lock"
    with file_lock(lock), file_lock(lock), file_lock(lock, shared=True):
        assert lock.exists()
    assert not lock.exists()
    with file_lock(lock, shared=True), pytest.raises(RuntimeError, match="cannot be made exclusive"), file_lock(lock):
        pass


def test_a_file_system_without_locks_degrades_with_a_message(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(fd, mode):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    said = []
    with file_lock(tmp_path / "x.lock", say=said.append):
        pass
    assert said == [f"{tmp_path} does not support file locks: processes started at once may repeat work"]


def test_temporary_names_of_dead_processes_are_removed_and_no_others(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {
        "dead": f"cache.tmp-{host}-{dead.pid}",
        "dead_chunk": f"chunk-000000000-000000003.tmp-{host}-{dead.pid}.npz",
        "alive": f"cache.tmp-{host}-{os.getpid()}",
        "other_host": f"cache.tmp-elsewhere-{dead.pid}",
        "other_name": f"cachex.tmp-{host}-{dead.pid}",
        "old": f"cache.old-{host}-{dead.pid}",
    }
    for key, name in names.items():
        (tmp_path / name).mkdir() if key != "dead_chunk" else (tmp_path / name).write_bytes(b"x")
        if key == "dead":
            (tmp_path / name / "inside.npy").write_bytes(b"x")
    assert leftovers(tmp_path, "cache", ("tmp", "old")) == sorted([tmp_path / names["dead"], tmp_path / names["old"]])
    assert remove_leftovers(tmp_path, r"cache|chunk-\d{9}-\d{9}") == sorted(
        [tmp_path / names["dead"], tmp_path / names["dead_chunk"]]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("alive", "other_host", "other_name", "old")
    )
    assert remove_leftovers(tmp_path / "missing", "cache") == []


def test_names_and_liveness():
    tag = this_process()
    assert tag == f"{socket.gethostname()}:{os.getpid()}" and not holder_gone(tag)
    assert process_alive(os.getpid()) and not holder_gone("elsewhere:1") and not holder_gone("garbage")
    assert temporary_name("/x/model.pt").name == f"model.pt.tmp-{tag.replace(':', '-')}"
    assert temporary_name("/x/c-1.npz").name == f"c-1.tmp-{tag.replace(':', '-')}.npz", "np.savez keeps .npz"
    assert temporary_name("/x/.out", "old").name == f".out.old-{tag.replace(':', '-')}"


def test_a_stale_nfs_handle_of_a_removed_lock_file_is_locked_anew(tmp_path, monkeypatch):
    """On NFS, a waiter whose lock file another client removed gets ESTALE: it locks the current file instead."""
    real_fstat, calls = os.fstat, []

    def stale_once(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ESTALE, "Stale file handle")
        return real_fstat(fd)

    monkeypatch.setattr(locking.os, "fstat", stale_once)
    with file_lock(tmp_path / "x.lock"):
        assert (tmp_path / "x.lock").read_text() == this_process()
    assert len(calls) == 2 and not (tmp_path / "x.lock").exists()
