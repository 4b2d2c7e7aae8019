"""Where a store's bytes live: the few operations the commit protocol needs of its storage.

A store (cache/store.py) is files under one folder, named by ``/``-separated keys relative
to it (``manifest/part-000003-<group>.parquet``, ``embeddings.zarr/tokens/c/3/0/0``). The
store never touches those files itself: it asks a :class:`Storage`, which has two
implementations:

- :class:`LocalStorage`, a folder on a POSIX file system: whole files are written under a
  hidden temporary name and renamed into place; :meth:`Storage.guard` is an ``flock`` on
  the store's ``.lock``;
- :class:`cache.objects.ObjectStorage`, a prefix in an S3 bucket: whole objects,
  conditional puts (create only if absent; replace only if unchanged), and a guard that
  is itself an object, created conditionally, with a lease.

Everything that decides (which shard a writer takes, whether a claim is still its own,
the commit) runs under the guard, in the same code for both.

Shard files are streamed to a local file first (cache/shards.py writes and checks their
bytes in place) and then published under their final key: :meth:`Storage.local` says
where the local copy of a key lives (for a folder, the file itself).
"""
from __future__ import annotations

import errno
import os
import shutil
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ContextManager

from core.atomic import atomic_write_bytes, fsync_path
from core.errors import PipeError
from core.locks import locked, shared_lock

LOCK = ".lock"      # the guard's name: a file flock()ed, or an object with a lease
IN_USE = ".inuse"  # a writer holds a shared flock on it: `pipe cache gc`/`rm` leave the store alone


class StoreError(PipeError):
    """A store that cannot be used as asked; the message says what to do."""


class Storage(ABC):
    """The operations a store makes on its bytes; keys are ``/``-separated, relative to the store."""

    #: a local folder that mirrors the store's keys: where shard files are written before
    #: they are published, and (for an object store) where read copies are kept
    path: Path

    @property
    def where(self) -> str:
        """The store's location as the user would write it, for messages."""
        return str(self.path)

    def local(self, key: str) -> Path:
        """The local file that holds (or will hold) ``key``'s bytes."""
        return self.path.joinpath(*key.split("/"))

    @abstractmethod
    def read(self, key: str) -> bytes:
        """The bytes of ``key`` (FileNotFoundError when there is none)."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def names(self, folder: str) -> list[str]:
        """The names directly inside ``folder`` (files and sub-folders), unsorted."""

    @abstractmethod
    def write(self, key: str, data: bytes) -> None:
        """Write ``key`` whole: a reader sees the old bytes or the new, never a mix."""

    @abstractmethod
    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` whole only if it does not exist yet; False (nothing written) if it does."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; one that is not there is fine."""

    @abstractmethod
    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        """Make the finished local file ``tmp`` the bytes of ``key`` (and drop ``tmp``)."""

    @abstractmethod
    def guard(self) -> ContextManager[None]:
        """Exclusive for the block among every writer of this store, on any host."""

    @abstractmethod
    def in_use(self) -> ContextManager[None]:
        """Mark the store as being written for the block (``pipe cache gc`` and ``rm`` skip it)."""

    @abstractmethod
    def remove_tree(self, folder: str) -> None:
        """Remove ``folder`` and all below it (nothing there is fine)."""

    def mkdirs(self, *folders: str) -> None:
        """Make sure the folders exist (object stores have none to make)."""

    @abstractmethod
    def child(self, folder: str) -> "Storage":
        """The storage of ``folder`` below this one (a store below its cache)."""

    def key_of(self, path: str | os.PathLike) -> str:
        """The key of a local file of this store (the inverse of :meth:`local`)."""
        return Path(path).relative_to(self.path).as_posix()

    def stage(self, tmp: Path) -> None:
        """Make a finished temporary file visible to a committer elsewhere (a folder shares it already)."""

    def mirror(self) -> int:
        """Make every file of the store readable locally (a folder's are already); the count, or -1."""
        return -1

    def fetch(self, key: str, meta: dict | None = None) -> Path:
        """A local file with ``key``'s current bytes, for reading (an object store downloads it;
        ``meta``: the object's size and ETag from :meth:`listing`, saving a request)."""
        return self.local(key)

    def listing(self, folder: str) -> dict[str, dict]:
        """Size and ETag of every object below ``folder``, by key, in one listing ({} for a folder)."""
        return {}


class LocalStorage(Storage):
    """A store folder on a POSIX file system (what every cache was before object stores)."""

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

    def write(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.local(key), data)

    def create(self, key: str, data: bytes) -> bool:
        """Under :meth:`guard` (the only place it is called for a shared key) nobody races us."""
        if self.local(key).exists():
            return False
        atomic_write_bytes(self.local(key), data)
        return True

    def delete(self, key: str) -> None:
        self.local(key).unlink(missing_ok=True)

    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        path = self.local(key)
        os.replace(tmp, path)
        if fsync:
            fsync_path(path.parent)

    def guard(self) -> ContextManager[None]:
        return locked(self.path / LOCK)

    def in_use(self) -> ContextManager[None]:
        return shared_lock(self.path / IN_USE)

    def child(self, folder: str) -> "LocalStorage":
        return LocalStorage(self.local(folder))

    def remove_tree(self, folder: str) -> None:
        """A writer whose claim was taken over may still create its temporary file in the
        folder meanwhile (it is never committed, and its name is its own): the removal tries again."""
        path = self.local(folder)
        for attempt in range(3):
            try:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
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
