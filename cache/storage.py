"""Where a store's bytes live: the operations the commit protocol, `gc`, `rm` and `verify` need of their storage.

A store (cache/store.py) is files under one folder, named by ``/``-separated keys relative
to it (``manifest/part-000003-<group>.parquet``, ``embeddings.zarr/tokens/c/3/0/0``); a
cache is the same one level up (``stores/image/<name>/...``, ``datasets/<name>/...``).
Nothing above this module and its backends touches those files itself or asks which
backend it has: it asks a :class:`Storage`, which has two implementations:

- :class:`LocalStorage`, a folder on a POSIX file system: whole files are written under a
  hidden temporary name and renamed into place; :meth:`Storage.guard` is an ``flock`` on
  the store's ``.lock``;
- :class:`cache.objects.ObjectStorage`, a prefix in an S3 bucket: whole objects,
  conditional puts (create only if absent; replace only if unchanged), and a guard that
  is itself an object, created conditionally, with a lease renewed while it is held.

Everything that decides (which shard a writer takes, whether a claim is still its own,
the commit, what `gc` may delete) runs in the same code for both. What differs is said
here once, as operations with one meaning:

- **listing**: :meth:`Storage.entries` (every file below a folder, with its size, version
  and time of its last change), :meth:`Storage.scan` (what is directly in a folder, and
  whether each is a file, a folder or a symbolic link), :meth:`Storage.stat`;
- **conditional writes and deletes**: :meth:`Storage.put_if` (create if absent, or replace
  the version that was read), :meth:`Storage.delete_if` (delete only the version listed);
- **the busy checks**: :meth:`Storage.writing` (a running writer's own mark: a folder's
  ``.inuse`` lock, a bucket's guard with a live lease) and :meth:`Storage.abandoned` (is
  a writer's temporary file a leftover: the rule for a folder and for a bucket);
- **removal**: :meth:`Storage.exclusive` (the store held against every writer),
  :meth:`Storage.retire` (the store reads as empty at once), :meth:`Storage.vacate`;
- **the local copies** (a bucket's read copies; a folder's files are their own):
  :meth:`Storage.fetch`, :meth:`Storage.upload`, :meth:`Storage.forget`.

Shard files are streamed to a local file first (cache/shards.py writes and checks their
bytes in place) and then published under their final key: :meth:`Storage.local` says
where the local copy of a key lives (for a folder, the file itself).
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ContextManager, Iterator

from core.atomic import atomic_write_bytes, fsync_path
from core.errors import PipeError
from core.locks import locked, shared_lock, try_exclusive
from core.processes import pid_running

LOCK = ".lock"      # the guard's name: a file flock()ed, or an object with a lease
IN_USE = ".inuse"  # a writer holds a shared flock on it: `pipe cache gc`/`rm` leave the store alone
REMOVING = ".removing-"  # a store folder renamed out of sight by `gc`/`rm`, being deleted
TEMP_GRACE_S = 600  # a temporary file in a folder younger than this may belong to a writer on another host


class StoreError(PipeError):
    """A store that cannot be used as asked; the message says what to do."""


@dataclass(frozen=True)
class Entry:
    """One file (or object) below a storage, as a listing gives it."""

    key: str        # relative to the storage that listed it
    size: int
    version: str    # changes whenever the bytes do: an object's ETag; a file's inode, size and mtime
    mtime: float    # when it was last written, in seconds since the epoch
    kind: str = "file"  # "file"; in a folder also "link" (a symbolic link, never followed) or "other"

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


class Hold:
    """A store held exclusively (:meth:`Storage.guard`, :meth:`Storage.exclusive`).

    ``lost`` turns true when the hold lapsed while it was held (a bucket's guard whose
    holder was paused past its lease, so another holder took it over): work under it
    must stop before its next change."""

    lost = False


class Storage(ABC):
    """The operations a store (or a cache) makes on its bytes; keys are ``/``-separated, relative to it."""

    #: a local folder that mirrors the store's keys: where shard files are written before
    #: they are published, and (for an object store) where read copies are kept
    path: Path
    #: can a cache here predate the cache marker (`verify --repair` then adds it)? Folders
    #: can; the bucket backend is younger than the marker, so a bucket without one is not a cache
    adoptable: bool = False

    @property
    def where(self) -> str:
        """The store's location as the user would write it, for messages."""
        return str(self.path)

    def where_of(self, key: str) -> str:
        """Where ``key`` is, as the user would write it (a path, or a URL)."""
        return str(self.local(key))

    def local(self, key: str) -> Path:
        """The local file that holds (or will hold) ``key``'s bytes."""
        return self.path.joinpath(*key.split("/")) if key else self.path

    def key_of(self, path: str | os.PathLike) -> str:
        """The key of a local file of this store (the inverse of :meth:`local`)."""
        return Path(path).relative_to(self.path).as_posix()

    # -- reading and listing ---------------------------------------------------------------
    @abstractmethod
    def read(self, key: str) -> bytes:
        """The bytes of ``key`` (FileNotFoundError when there is none)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def names(self, folder: str) -> list[str]:
        """The names directly inside ``folder`` (files and sub-folders), unsorted."""

    @abstractmethod
    def scan(self, folder: str) -> dict[str, str]:
        """What is directly inside ``folder``: name -> "file", "folder", "link" or "other"."""

    @abstractmethod
    def kind(self, key: str) -> str | None:
        """What ``key`` is ("file", "folder", "link", "other"), or None when there is nothing."""

    @abstractmethod
    def entries(self, folder: str = "") -> list[Entry]:
        """Every file below ``folder``, recursively, in one listing (symbolic links are listed, never followed)."""

    @abstractmethod
    def stat(self, key: str) -> Entry | None:
        """The entry of one file, or None when there is none."""

    def listing(self, folder: str) -> dict[str, Entry]:
        """:meth:`entries` by key, for :meth:`fetch` (a folder needs none: {})."""
        return {}

    def fetch(self, key: str, meta: Entry | None = None) -> Path:
        """A local file with ``key``'s current bytes, for reading (an object store downloads it
        when its copy is missing or stale; ``meta``: the entry a listing gave, saving a request)."""
        return self.local(key)

    # -- writing ---------------------------------------------------------------------------
    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write ``key`` whole: a reader sees the old bytes or the new, never a mix."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` whole only if it does not exist yet; False (nothing written) if it does."""

    @abstractmethod
    def put_if(self, key: str, data: bytes, version: str | None) -> bool:
        """Write ``key`` whole only if it is still at ``version`` (None: only if absent), and keep
        the local copy; False (nothing written) when another writer changed it meanwhile."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; one that is not there is fine."""

    def delete_many(self, keys: list[str]) -> None:
        """Remove several keys (an object store does it in bulk requests)."""
        for key in keys:
            self.delete(key)

    @abstractmethod
    def delete_if(self, key: str, version: str) -> bool:
        """Remove ``key`` only while it is still at ``version`` (as listed); whether it was removed."""

    @abstractmethod
    def rename(self, key: str, new: str) -> None:
        """Move ``key`` to ``new`` (its bytes unchanged)."""

    @abstractmethod
    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        """Make the finished local file ``tmp`` the bytes of ``key`` (and drop ``tmp``)."""

    def upload(self, key: str) -> None:
        """Make the local file of ``key``, changed in place, its stored bytes (a folder's file already is)."""

    def forget(self, key: str) -> None:
        """Drop the local read copy of ``key`` (a folder's file is the data itself: kept)."""

    @abstractmethod
    def remove_tree(self, folder: str) -> None:
        """Remove ``folder`` and all below it (nothing there is fine), with its local copies."""

    def mkdirs(self, *folders: str) -> None:
        """Make sure the folders exist (object stores have none to make)."""

    def stage(self, tmp: Path) -> None:
        """Make a finished temporary file visible to a committer elsewhere (a folder shares it already)."""

    @abstractmethod
    def child(self, folder: str) -> "Storage":
        """The storage of ``folder`` below this one (a store below its cache)."""

    def key_for(self, name: str) -> list[tuple[str | None, str | None]]:
        """The keys a user-given path (or URL) may name, for each reading: (key, or None when it
        leads outside this storage; where it leads, for the message, or None)."""
        return [(name.rstrip("/"), None)]

    # -- writers, and the busy checks ------------------------------------------------------
    @abstractmethod
    def guard(self) -> ContextManager[Hold]:
        """Exclusive for the block among every writer of this store, on any host."""

    @abstractmethod
    def in_use(self) -> ContextManager[None]:
        """Mark the store as being written for the block (``pipe cache gc`` and ``rm`` skip it)."""

    @abstractmethod
    def writing(self) -> str | None:
        """Why a running writer's own mark says the store is busy now (claims aside), or None."""

    @abstractmethod
    def abandoned(self, entry: Entry, pid: int | None, now: float) -> bool:
        """Is ``entry``, a writer's temporary file (written by ``pid``, as its name says), left by
        a writer that is gone, so that `gc` and `verify --repair` may remove it?"""

    # -- removing a whole store ----------------------------------------------------------------
    @abstractmethod
    def exclusive(self) -> ContextManager[Hold | None]:
        """Hold the store against every writer for the block (None: a writer holds it now)."""

    @abstractmethod
    def retire(self, commits: str) -> "Storage":
        """Under :meth:`exclusive`: make the store read as holding nothing committed, at once
        (its ``commits`` folder is what says what is committed); returns the storage of what is
        left to delete."""

    @abstractmethod
    def vacate(self) -> None:
        """After a retired store's files are deleted (and its hold released): drop what is left
        of it here (a folder's empty sub-folders and lock files; a bucket's local copies)."""

    @contextlib.contextmanager
    def errors(self, command: str) -> Iterator[None]:
        """A failure of the storage itself (a refused request), said in one message naming ``command``."""
        yield


class LocalStorage(Storage):
    """A store folder on a POSIX file system (what every cache was before object stores)."""

    adoptable = True

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def read(self, key: str) -> bytes:
        return self.local(key).read_bytes()

    def exists(self, key: str) -> bool:
        return self.local(key).exists()

    def names(self, folder: str) -> list[str]:
        try:
            return [p.name for p in self.local(folder).iterdir()]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def scan(self, folder: str) -> dict[str, str]:
        try:
            with os.scandir(self.local(folder)) as found:
                return {e.name: _kind(e.stat(follow_symlinks=False).st_mode) for e in found}
        except (FileNotFoundError, NotADirectoryError):
            return {}

    def kind(self, key: str) -> str | None:
        try:
            return _kind(os.lstat(self.local(key)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def entries(self, folder: str = "") -> list[Entry]:
        out = []
        for dirpath, dirs, files in os.walk(self.local(folder)):  # links to folders are listed, not walked
            for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
                entry = self._entry(os.path.join(dirpath, name))
                if entry is not None:
                    out.append(entry)
        return out

    def stat(self, key: str) -> Entry | None:
        return self._entry(self.local(key))

    def _entry(self, path: str | os.PathLike) -> Entry | None:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(st.st_mode):
            return None
        return Entry(self.key_of(path), st.st_size, f"{st.st_ino}-{st.st_size}-{st.st_mtime_ns}", st.st_mtime,
                     _kind(st.st_mode))

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.local(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Under :meth:`guard` (the only place it is called for a shared key) nobody races us."""
        if self.local(key).exists():
            return False
        atomic_write_bytes(self.local(key), data)
        return True

    def put_if(self, key: str, data: bytes, version: str | None) -> bool:
        """Checked and written under an ``flock`` on the folder's ``.lock``, which every ``put_if`` there takes."""
        path = self.local(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path.parent / LOCK):
            now = self.stat(key)
            if (now.version if now is not None else None) != version:
                return False
            atomic_write_bytes(path, data)
            return True

    def delete(self, key: str) -> None:
        self.local(key).unlink(missing_ok=True)

    def delete_if(self, key: str, version: str) -> bool:
        """A temporary file's name is its writer's own (pid and token): nobody rewrites it between the check and the unlink."""
        now = self.stat(key)
        if now is None or now.version != version:
            return False
        self.delete(key)
        return True

    def rename(self, key: str, new: str) -> None:
        self.local(new).parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.local(key), self.local(new))

    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        path = self.local(key)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)

    def guard(self) -> ContextManager[Hold]:
        return _held(locked(self.path / LOCK))

    def in_use(self) -> ContextManager[None]:
        return shared_lock(self.path / IN_USE)

    def writing(self) -> str | None:
        with try_exclusive(self.path / IN_USE) as free:
            return None if free else "held by a running `pipe embed`"

    def abandoned(self, entry: Entry, pid: int | None, now: float) -> bool:
        """Its writer is not running here, and it is old enough that it cannot be a write in
        progress on another host sharing the folder (pids there mean nothing here)."""
        return (entry.kind == "file" and pid is not None and not pid_running(pid)
                and now - entry.mtime >= TEMP_GRACE_S)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[Hold | None]:
        """An exclusive ``flock`` on ``.inuse``, without waiting: every `pipe embed` holds it shared."""
        with try_exclusive(self.path / IN_USE) as free:
            yield Hold() if free else None

    def retire(self, commits: str) -> "LocalStorage":
        """Renamed to a hidden ``.removing-<name>-<pid>`` folder beside it: no reader or writer
        sees half of it, and a removal cut short is finished by the next `gc`."""
        hidden = self.path.with_name(f"{REMOVING}{self.path.name}-{os.getpid()}")
        os.replace(self.path, hidden)
        return LocalStorage(hidden)

    def vacate(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def child(self, folder: str) -> "LocalStorage":
        return LocalStorage(self.local(folder))

    def key_for(self, name: str) -> list[tuple[str | None, str | None]]:
        """A path relative to here (the working folder) or to the storage, resolved first: a
        ``..`` or a symbolic link that leads out of the storage names nothing in it."""
        p = Path(name).expanduser()
        base = self.path.resolve()
        out = []
        for c in [p] if p.is_absolute() else [p, self.path / p]:
            if c.exists():
                real = c.resolve()
                out.append((real.relative_to(base).as_posix() if real.is_relative_to(base) else None, str(real)))
        return out

    def remove_tree(self, folder: str) -> None:
        """A writer whose claim was taken over may still create its temporary file in the
        folder meanwhile (it is never committed, and its name is its own): the removal tries again."""
        path = self.local(folder)
        for attempt in range(3):
            try:
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                return
            except FileNotFoundError:
                return
            except OSError as err:
                if err.errno != errno.ENOTEMPTY or attempt == 2:
                    raise

    def mkdirs(self, *folders: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        for f in folders:
            self.local(f).mkdir(parents=True, exist_ok=True)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "link"
    return "folder" if stat.S_ISDIR(mode) else "file" if stat.S_ISREG(mode) else "other"


@contextlib.contextmanager
def _held(lock: ContextManager) -> Iterator[Hold]:
    """A file lock as a :class:`Hold` (the kernel never takes an ``flock`` away: never lost)."""
    with lock:
        yield Hold()
