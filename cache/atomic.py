"""Writes that are all or nothing, locks, and process liveness: the cache's file discipline.

Every file the project writes for later reading goes through :func:`atomic_path`:
the bytes go to a hidden temporary name in the same directory (so the rename cannot
cross file systems), the file is fsynced, renamed over its final name, and the directory
is fsynced so the rename itself survives a power cut. A reader therefore sees the old
file or the new one, never half of one. Temporary names start with a dot and end in
``.tmp``; :func:`is_temp_name` recognises them so verify/gc can remove the leftovers of
killed writers.

Files are created with mode 0666 and the process umask applied, like any other file a
tool writes (``tempfile.mkstemp`` would force 0600, which a team on a shared file
system cannot read).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipeError

_TEMP = re.compile(r"^\..+\.(\d+)(?:-\d+)?\.tmp(\.[A-Za-z0-9]+)?$")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary sibling this process (and thread) writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp{suffix}")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.match(name))


def temp_owner(name: str) -> int | None:
    """The pid that wrote a temporary file, from its name (None if it is not one)."""
    m = _TEMP.match(name)
    return int(m[1]) if m else None


def _create(path: Path):
    # O_EXCL: a stale file of a reused pid is replaced, never appended to
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    For writers that want a file name (``np.savez``, safetensors' ``save_file``): the
    temporary file exists (empty, mode from the umask) when the block starts. ``suffix``
    keeps an extension some writers insist on (``.npz``). On an exception the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path, suffix)
    fd = _create(tmp)
    mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask
    os.close(fd)
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors writes 0600)
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> None:
    """Call ``write(tmp_path)``, then move the result into place all or nothing."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class LockError(OSError):
    """A lock file that cannot be created (the directory is not writable)."""


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
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


@contextlib.contextmanager
def shared_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold a shared ``flock`` on ``path`` (created if needed): "in use", for :func:`try_exclusive`.

    The lock file must still be the one at ``path`` once the lock is held: one that was
    renamed away meanwhile (its directory being removed) is an error, not a silent write
    into a directory on its way out.
    """
    fd = _open_lock(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if not same:
            raise PipeError(f"{Path(path).parent} was removed while it was being opened (by `pipe cache gc` or "
                            "`pipe cache rm`?); run the command again")
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


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
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---------------------------------------------------------------------- process liveness
def process_start(pid: int) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a live one from a reused pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def this_process() -> dict:
    """Who we are, as recorded in claims and lock files: host, pid and start time."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": process_start(os.getpid())}


def same_host(info: dict) -> bool:
    return info.get("host") == socket.gethostname()


def process_alive(info: dict) -> bool:
    """Is the process that wrote ``info`` (see :func:`this_process`) still running?

    A process on another host cannot be seen from here and counts as alive. On this host
    the pid must exist and have the recorded start time, so a pid reused by another
    program does not keep a dead writer's claim alive.
    """
    if not same_host(info):
        return True
    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    start = process_start(pid)
    return start is not None and start == info.get("start")


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
