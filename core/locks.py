"""File locks, and run folders that one process owns at a time.

``flock`` locks are dropped by the kernel when their holder dies (even by SIGKILL), so
a lock never outlives its process. A file system that refuses ``flock`` gets a clear
error (:class:`LocksUnsupported`) rather than silent, unlocked writes.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Iterator

from core.errors import PipeError
from core.atomic import atomic_write_bytes
from core.processes import this_process

class LockError(OSError):
    """A lock file that cannot be created (the directory is not writable)."""


class LocksUnsupported(PipeError):
    """A file system that refuses ``flock`` (Lustre mounted without ``-o flock``, NFS without locking)."""


_NO_FLOCK = {errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK}


def _flock(fd: int, op: int, path: str | os.PathLike) -> None:
    """``flock``, with a file system that has no locks named as such (the cache's claims depend on them)."""
    try:
        fcntl.flock(fd, op)
    except OSError as e:
        if e.errno not in _NO_FLOCK:
            raise
        raise LocksUnsupported(f"the file system holding {path} does not support flock ({e.strerror}); the cache's "
                               "claims and commits rely on it. Mount it with locking (Lustre: `-o flock`; NFS: v4, "
                               "or v3 with lockd and without `nolock`), or use a cache on another file system "
                               "(--cache DIR or $PIPE_CACHE).") from None


def _unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _open_lock(path: str | os.PathLike) -> int:
    """The lock file's descriptor (created if needed), or a :class:`LockError` that says why not."""
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
        raise LockError(e.errno, f"cannot lock {path}: {e.strerror}. Is the cache directory writable?") from e


@contextlib.contextmanager
def locked(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block."""
    fd = _open_lock(path)
    try:
        _flock(fd, fcntl.LOCK_EX, path)
        yield
    finally:
        _unlock(fd)


@contextlib.contextmanager
def shared_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold a shared ``flock`` on ``path`` (created if needed): "in use", for :func:`try_exclusive`.

    The lock file must still be the one at ``path`` once the lock is held: one that was
    renamed away meanwhile (its directory being removed) is an error, not a silent write
    into a directory on its way out.
    """
    fd = _open_lock(path)
    try:
        _flock(fd, fcntl.LOCK_SH, path)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            raise PipeError(f"{Path(path).parent} was removed while it was being opened (by `pipe cache gc` or "
                            "`pipe cache rm`?); run the command again")
        yield
    finally:
        _unlock(fd)


@contextlib.contextmanager
def try_exclusive(path: str | os.PathLike) -> Iterator[bool]:
    """Try to take an exclusive ``flock`` on ``path`` without waiting; yields whether we got it."""
    try:
        fd = _open_lock(path)
    except LockError:
        yield False
        return
    try:
        try:
            _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, path)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        _unlock(fd)


# ---------------------------------------------------------------------- run folders
OWNER_LOCK = ".owner.lock"   # a run folder's lock: an exclusive flock held by the run that owns it
OWNER_NOTE = ".owner.json"   # who holds it (host, pid, start time, command), for the refusal's message


class FolderBusyError(PipeError):
    """A run folder that another live process owns."""


def _owner_note(folder: Path) -> dict:
    try:
        note = json.loads((folder / OWNER_NOTE).read_text())
        return note if isinstance(note, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def owned_folder(folder: str | os.PathLike, command: str) -> Iterator[dict]:
    """Own a run folder (``--out``) for the block: one `train-adaptor` or `evaluate` at a time.

    The owner holds an exclusive ``flock`` on ``<folder>/.owner.lock`` and records who it is
    in ``<folder>/.owner.json``. A second process is refused at once with the owner's host,
    pid and start time. The kernel drops the lock when its holder dies (even by SIGKILL), so
    a run killed at any point leaves a folder the next run takes over and resumes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        fd = _open_lock(folder / OWNER_LOCK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            note = _owner_note(folder)
            for _ in range(20):  # the owner writes its note just after taking the lock
                if note:
                    break
                time.sleep(0.05)
                note = _owner_note(folder)
            who = (f"pid {note.get('pid')} on host {note.get('host')}, started {note.get('started')}"
                   if note else "another process (its note is not written yet)")
            raise FolderBusyError(
                f"{folder} is in use by `pipe {note.get('command', command)}` ({who}); one run owns a run folder "
                "at a time. Wait for it to finish (or stop it: the next run then resumes from its last "
                "checkpoint), or give another --out.") from None
        try:  # the lock file must still be the one at that path (not unlinked by an owner leaving)
            same = os.path.samestat(os.fstat(fd), os.stat(folder / OWNER_LOCK))
        except FileNotFoundError:
            same = False
        if same:
            break
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    try:
        me = {**this_process(), "command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(folder / OWNER_NOTE, json.dumps(me).encode())
        yield me
    finally:
        with contextlib.suppress(OSError):
            (folder / OWNER_NOTE).unlink()
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def release_empty_folder(folder: str | os.PathLike) -> None:
    """Remove a run folder that holds nothing but its owner's lock (a refused run leaves no folder).

    Call it while still owning the folder: the lock file is unlinked under the lock, which the
    next owner's check of the path notices.
    """
    folder = Path(folder)
    with contextlib.suppress(OSError):
        if {p.name for p in folder.iterdir()} <= {OWNER_LOCK, OWNER_NOTE}:
            for name in (OWNER_NOTE, OWNER_LOCK):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
