"""The cache marker: the file that says "this folder is a freeze-pipe cache".

``<cache>/freeze-pipe-cache.json`` is written by every command that writes to a cache
(``pipe embed`` when it creates or first uses a cache; the Adaptor-output and mask caches
of training and evaluation). The commands that delete — ``pipe cache gc``, ``pipe cache
rm`` and ``pipe cache verify --repair`` — require it, so a mistyped ``--cache`` (a home
folder, a data folder) is refused before anything is looked at for deletion.

A cache written by a version before the marker existed has none. It keeps working:
reading and embedding need no marker (and ``pipe embed`` adds it), and ``pipe cache
verify --repair`` adds it when the folder is recognisably a cache: it holds nothing but
the cache's own entries (``stores/``, ``datasets/``, ``adaptor-outputs/``, ``masks/``,
``splits/``, ``derived/``, ``demo/``) and at least one store with group metadata or one
dataset index. ``gc`` and ``rm`` never add it: they say which command does. A cache in a
bucket is younger than the marker: there, the marker object must be in the bucket.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from cache.mirror import storage_at
from cache.storage import Storage
from core.errors import PipeError

MARKER = "freeze-pipe-cache.json"
KIND = "freeze-pipe cache"
# everything a cache root may hold (hidden files: locks and temporary files of atomic writes)
CACHE_ENTRIES = frozenset({"stores", "datasets", "adaptor-outputs", "masks", "splits", "derived", "demo", MARKER})


class NotACacheError(PipeError):
    """A folder that a deleting command was pointed at is not (recognisably) a cache."""


def marker_path(root: Path) -> Path:
    return Path(root) / MARKER


def _storage(where: "Path | Storage") -> Storage:
    return where if isinstance(where, Storage) else storage_at(where)


def has_marker(where: "Path | Storage") -> bool:
    """Is there a readable marker of our kind at the root (for a bucket: the object, never a local copy)?"""
    try:
        return json.loads(_storage(where).read(MARKER)).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def ensure_marker(where: "Path | Storage") -> None:
    """Mark the cache at ``where`` (its folder or storage) as a cache: a writing command calls
    this; an existing marker is kept."""
    storage = _storage(where)
    if storage.kind(MARKER) == "file":
        return
    storage.mkdirs()
    with contextlib.suppress(FileExistsError):
        storage.create(MARKER, marker_bytes())


def marker_bytes() -> bytes:
    """What a marker holds (an object store's cache has the same object at ``<prefix>/`` + MARKER)."""
    return json.dumps(
        {"kind": KIND, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "note": "This folder is a freeze-pipe cache: `pipe cache gc`, `rm` and `verify --repair` "
                 "delete only inside it, and only what they can identify as the cache's own."},
        indent=1).encode()


def recognisable(where: "Path | Storage") -> tuple[bool, str]:
    """Does the cache at ``where`` look like one written by an older version? (yes/no, and why not)"""
    storage = _storage(where)
    if storage.kind("") != "folder":
        return False, f"{storage.where} is not a folder"
    foreign = sorted(n for n in storage.names("") if not n.startswith(".") and n not in CACHE_ENTRIES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return False, f"it holds {', '.join(repr(n) for n in foreign[:3])}{more}, which a cache never does"
    has_store = any(storage.kind(f"stores/{m}/{n}/embeddings.zarr/zarr.json") == "file"
                    for m in storage.names("stores") for n in storage.names(f"stores/{m}"))
    has_index = any(storage.kind(f"datasets/{d}/items.parquet") == "file" for d in storage.names("datasets"))
    if not (has_store or has_index):
        return False, "it holds no store (stores/<modality>/<name>/embeddings.zarr) and no dataset index"
    return True, ""


def require_marker(where: "Path | Storage", command: str) -> None:
    """Stop a deleting command unless the cache at ``where`` carries the cache marker."""
    storage = _storage(where)
    if has_marker(storage):
        return
    root, why = storage.where, ""
    if storage.adoptable:  # a folder may predate the marker
        if storage.kind("") is None:
            raise NotACacheError(f"{command}: there is no cache at {root}; pass --cache (or set $PIPE_CACHE) to the "
                                 "cache you mean")
        ok, why = recognisable(storage)
        if ok:
            raise NotACacheError(
                f"{command}: {root} has no cache marker ({MARKER}); caches written by older versions have none. It "
                f"looks like one: run `pipe cache verify --repair --cache {root}` (or any `pipe embed` into "
                f"it) to add the marker, then run {command} again.")
    raise NotACacheError(
        f"{command}: {root} is not a freeze-pipe cache: it has no cache marker ({storage.where_of(MARKER)})"
        + (f" and {why}" if why else "") + ". Nothing was deleted. Pass --cache (or set $PIPE_CACHE) to the cache you "
        "mean; a cache gets its marker from `pipe embed`.")


def adopt_or_require(where: "Path | Storage", command: str) -> bool:
    """For ``verify --repair``: add the marker to a recognisable cache that lacks it (True if
    added), or stop as :func:`require_marker` does."""
    storage = _storage(where)
    if has_marker(storage):
        return False
    if not (storage.adoptable and recognisable(storage)[0]):
        require_marker(storage, command)
    ensure_marker(storage)
    return True
