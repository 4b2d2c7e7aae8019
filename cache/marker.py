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
dataset index. ``gc`` and ``rm`` never add it: they say which command does.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from core.atomic import atomic_write_bytes
from core.errors import PipeError

MARKER = "freeze-pipe-cache.json"
KIND = "freeze-pipe cache"
# everything a cache root may hold (hidden files: locks and temporary files of atomic writes)
CACHE_ENTRIES = frozenset({"stores", "datasets", "adaptor-outputs", "masks", "splits", "derived", "demo", MARKER})


class NotACacheError(PipeError):
    """A folder that a deleting command was pointed at is not (recognisably) a cache."""


def marker_path(root: Path) -> Path:
    return Path(root) / MARKER


def has_marker(root: Path) -> bool:
    """Is there a readable marker of our kind at the root?"""
    try:
        return json.loads(marker_path(root).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def ensure_marker(root: Path) -> None:
    """Mark ``root`` as a cache (a writing command calls this; an existing marker is kept)."""
    root = Path(root)
    if marker_path(root).is_file():
        return
    root.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        atomic_write_bytes(marker_path(root), marker_bytes())


def marker_bytes() -> bytes:
    """What a marker holds (an object store's cache has the same object at ``<prefix>/`` + MARKER)."""
    return json.dumps(
        {"kind": KIND, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
         "note": "This folder is a freeze-pipe cache: `pipe cache gc`, `rm` and `verify --repair` "
                 "delete only inside it, and only what they can identify as the cache's own."},
        indent=1).encode()


def recognisable(root: Path) -> tuple[bool, str]:
    """Does ``root`` look like a cache written by an older version? (yes/no, and why not)"""
    root = Path(root)
    if not root.is_dir():
        return False, f"{root} is not a folder"
    foreign = sorted(p.name for p in root.iterdir() if not p.name.startswith(".") and p.name not in CACHE_ENTRIES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        return False, f"it holds {', '.join(repr(n) for n in foreign[:3])}{more}, which a cache never does"
    stores = root / "stores"
    has_store = stores.is_dir() and any(p.is_file() for p in stores.glob("*/*/embeddings.zarr/zarr.json"))
    has_index = (root / "datasets").is_dir() and any((root / "datasets").glob("*/items.parquet"))
    if not (has_store or has_index):
        return False, "it holds no store (stores/<modality>/<name>/embeddings.zarr) and no dataset index"
    return True, ""


def require_marker(root: Path, command: str) -> None:
    """Stop a deleting command unless ``root`` carries the cache marker."""
    root = Path(root)
    if has_marker(root):
        return
    if not root.exists():
        raise NotACacheError(f"{command}: there is no cache at {root}; pass --cache (or set $PIPE_CACHE) to the "
                             "cache you mean")
    ok, why = recognisable(root)
    if ok:
        raise NotACacheError(
            f"{command}: {root} has no cache marker ({MARKER}); caches written by older versions have none. It looks like one: run `pipe cache verify --repair --cache {root}` (or any `pipe embed` into "
            f"it) to add the marker, then run {command} again.")
    raise NotACacheError(
        f"{command}: {root} is not a freeze-pipe cache: it has no cache marker ({MARKER}) and {why}. Nothing was "
        "deleted. Pass --cache (or set $PIPE_CACHE) to the cache you mean.")


def adopt_or_require(root: Path, command: str) -> bool:
    """For ``verify --repair``: add the marker to a recognisable cache that lacks it (True if
    added), or stop as :func:`require_marker` does."""
    if has_marker(root):
        return False
    ok, _ = recognisable(root)
    if not ok:
        require_marker(root, command)
    ensure_marker(root)
    return True
