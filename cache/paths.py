"""Where the cache lives (--cache, else $PIPE_CACHE, else ~/.cache/freeze-pipe), and how
paths are recorded inside it.

A cache can be copied (``cp -a``) or moved as a whole, so every path it records about
itself is relative to its root: :func:`portable` turns a path inside the root into a
relative one (paths outside it, such as a user's images, stay absolute) and
:func:`localise` turns a recorded path back into one under the root a reader was given.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from cache.mirror import locate, url_scheme, usable_folder  # noqa: F401  (url_scheme: a location's scheme)

DEFAULT_CACHE = Path("~/.cache/freeze-pipe")
STORES_DIR = "stores"


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    """The cache's folder: the one given, or for ``s3://bucket/prefix`` its local mirror
    (:func:`cache.mirror.locate`: the only code that tells a folder from a bucket).

    A location that cannot be a folder (a file, a path under a file, an unreadable folder)
    is refused here, before any command reads or writes, in one message that says so."""
    if explicit:
        return locate(explicit, "--cache")
    env = os.environ.get("PIPE_CACHE")
    if env:
        return locate(env, "$PIPE_CACHE")
    xdg = os.environ.get("XDG_CACHE_HOME")
    where = "$XDG_CACHE_HOME/freeze-pipe" if xdg else "the default cache location"
    return usable_folder((Path(xdg) / "freeze-pipe" if xdg else DEFAULT_CACHE.expanduser()).resolve(), where)


def cache_source() -> str:
    """How the cache location was chosen when no --cache is given (for messages)."""
    if os.environ.get("PIPE_CACHE"):
        return "$PIPE_CACHE"
    return "$XDG_CACHE_HOME/freeze-pipe" if os.environ.get("XDG_CACHE_HOME") else f"the default, {DEFAULT_CACHE}"


def portable(path: str | os.PathLike, root: Path) -> str:
    """``path`` as the cache records it: relative to ``root`` when inside it, else unchanged."""
    p = Path(path)
    if p.is_absolute() and p.is_relative_to(root):
        return p.relative_to(root).as_posix()
    return str(path)


def localise(recorded: str, root: Path, old_root: Path | None = None) -> str:
    """A recorded path as a path under ``root``.

    Relative paths are relative to the root. An absolute path under ``old_root`` (where
    a cache written by an older version lived, see :func:`old_root_of`) is moved to the
    same place under ``root``, so a copied cache never reads its original.
    """
    p = Path(recorded)
    if not p.is_absolute():
        return str(Path(root) / p)
    if old_root is not None and p.is_relative_to(old_root) and not p.is_relative_to(root):
        return str(Path(root) / p.relative_to(old_root))
    return recorded


def store_tail(path: str | os.PathLike) -> Path | None:
    """``stores/<modality>/<name>`` of a store path, or None when it does not look like one."""
    parts = Path(path).parts
    if len(parts) >= 3 and parts[-3] == STORES_DIR:
        return Path(*parts[-3:])
    return None


def root_of_store(store: str | os.PathLike) -> Path | None:
    """The cache root that holds a store directory (``<root>/stores/<modality>/<name>``)."""
    p = Path(store)
    return p.parents[2] if store_tail(p) is not None else None


def repair_command(store: str | os.PathLike | None) -> str:
    """The command that repairs a damaged store (and tells which datasets to re-embed)."""
    root = root_of_store(store) if store is not None else None
    return f"pipe cache verify --repair --cache {root}" if root else f"pipe cache verify --repair --store {store}"


_NOT_PLAIN = re.compile(r"[/\\\x00-\x1f\x7f]")


def plain_name(name: object) -> bool:
    """Is ``name`` usable as one file name inside a folder: no ``/`` or ``\\``, no control
    character, not empty and not starting with a dot (so never ``.``, ``..``, an absolute
    path or a hidden name), at most 255 characters?

    Every name that comes from data (a dataset's ids, a table's mask columns, the array
    names in a store's attributes) and becomes part of a path is checked with this, so a
    hostile value is that item's failure, never a write elsewhere.
    """
    return (isinstance(name, str) and 0 < len(name) <= 255 and not name.startswith(".")
            and not _NOT_PLAIN.search(name))


def child(folder: str | os.PathLike, name: str, what: str = "name") -> Path:
    """``folder / name``, or a ValueError when ``name`` is not a plain file name."""
    if not plain_name(name):
        raise ValueError(f"{what} {name!r} cannot be used as a file name (no '/', '\\', '..', leading '.', "
                         "control character or absolute path)")
    return Path(folder) / name
