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
import errno
import fcntl
import json
import os
import re
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import PipeError

# .<name>.<pid>-<thread>-<token>.tmp[.ext]; older versions wrote no token (and once no thread)
_TEMP = re.compile(r"^\..+\.(\d+)(?:-\d+)?(?:-[0-9a-f]{16})?\.tmp(\.[A-Za-z0-9]+)?$")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary sibling this process (and thread) writes ``path`` under.

    The writer's token makes the name unique even between processes of equal pid in two
    pid namespaces or on two hosts sharing the cache.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{me().token}.tmp{suffix}")


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


# ---------------------------------------------------------------------- who we are, and liveness
# The one place that decides whether a process is running. A pid means something only in
# the pid namespace it was issued in, on the machine (and boot) it was issued on; anywhere
# else the process cannot be seen from here and its liveness is unknown. Claims add a
# lease on top (cache/claims.py), which settles the unknown case.
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start(pid: int | str) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a live one from a reused pid."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return stat.rsplit(")", 1)[1].split()[19] if stat else None
    except IndexError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[inode]``), if ``/proc`` shows our own namespace.

    A ``/proc`` mounted for another pid namespace (a container started without its own)
    would answer pid questions about other processes, so then we claim no namespace and
    never judge another process by its pid.
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Identity:
    """Who a process is: host name, pid, start time, boot id, pid namespace and a random token.

    ``writer`` is unique to the process (the token is drawn per process, and again in a
    forked child); two processes are on the same machine *and* see each other's pids only
    when host, boot id and pid namespace all agree (:meth:`sees`).
    """

    host: str
    pid: int
    start: str | None
    boot: str | None
    pidns: str | None
    token: str

    @property
    def writer(self) -> str:
        return f"{self.boot or '-'}:{self.pidns or '-'}:{self.pid}:{self.token}"

    def record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "start": self.start, "boot": self.boot, "pidns": self.pidns,
                "writer": self.writer}

    def sees(self, info: dict) -> bool:
        """Can this process check the pid of the process that wrote ``info``?

        Records from before boot ids and namespaces were kept (no ``boot``) count as seen
        when the host name matches: the old rule.
        """
        if info.get("host") != self.host:
            return False
        if "boot" not in info and "pidns" not in info:
            return True
        return bool(self.boot and self.pidns) and info.get("boot") == self.boot and info.get("pidns") == self.pidns


_ME: list[Identity] = []


def me() -> Identity:
    """This process's :class:`Identity` (computed once per process: a forked child gets its own token)."""
    if not _ME or _ME[0].pid != os.getpid():
        _ME[:] = [Identity(socket.gethostname(), os.getpid(), process_start("self"),
                           _read("/proc/sys/kernel/random/boot_id"), _pid_namespace(), secrets.token_hex(8))]
    return _ME[0]


def this_process() -> dict:
    """Who we are, as recorded in claims and lock files (see :class:`Identity`)."""
    return me().record()


def pid_running(pid: int) -> bool:
    """Does ``pid`` exist in this pid namespace (whoever it belongs to)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def process_alive(info: dict, who: Identity | None = None) -> bool:
    """Is the process that wrote ``info`` (see :func:`this_process`) still running?

    A process this one cannot see (another host, boot or pid namespace: :meth:`Identity.sees`)
    counts as alive: its liveness is unknown here. One it can see must exist with the
    recorded start time, so a pid reused by another program does not keep a dead
    writer's record alive.
    """
    if not (who or me()).sees(info):
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
