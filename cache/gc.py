"""`pipe cache gc` and `pipe cache rm`: remove what no dataset needs, never what one uses.

``gc`` removes stores that no dataset index (``datasets/*/stores.json``) references, the
Adaptor outputs of stores that are gone, and temporary files of writers that are gone.
It never removes a referenced store, and skips (and names) a store that a running
``pipe embed`` holds (``Store.in_use``) or claims. A store is first renamed to a hidden
``.removing-*`` folder under its lock, then deleted, so no reader or writer ever sees
half of one; a removal that was cut short is finished by the next ``gc``.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache.atomic import try_exclusive
from cache.claims import claim_is_live, describe
from cache.index import forget_store, referenced_stores
from cache.inspect import dir_bytes
from cache.outputs import OUTPUTS_DIR
from cache.shards import partial_of
from cache.store import IN_USE, ZARR_DIR
from cache.verify import dead_temp, temp_files
from pipeline.errors import PipeError

REMOVING = ".removing-"


class CacheRemoveError(PipeError):
    """A store that cannot be removed as asked; the message says why and what to do."""


@dataclass
class Removal:
    path: Path
    bytes: int
    why: str

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "why": self.why}


@dataclass
class GcReport:
    root: Path
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)   # or, with dry_run, what would be
    skipped: list[Removal] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removed)

    def to_json(self) -> dict:
        return {"cache": str(self.root), "dry_run": self.dry_run, "bytes": self.bytes,
                ("would_remove" if self.dry_run else "removed"): [r.to_json() for r in self.removed],
                "skipped": [r.to_json() for r in self.skipped]}


def store_dirs(root: Path) -> list[Path]:
    """Every store folder under the root, whether or not it opens (hidden ones excluded)."""
    base = Path(root) / "stores"
    return sorted(d for d in base.glob("*/*") if d.is_dir() and not d.name.startswith(".")) if base.is_dir() else []


def in_use(store: Path) -> str | None:
    """Why a store must not be removed now (a running writer holds or claims it), or None."""
    claims = store / "claims"
    for p in sorted(claims.glob("*.json")) if claims.is_dir() else []:
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if claim_is_live(info):
            return f"being written by {describe(info)}"
    with try_exclusive(store / IN_USE) as free:
        return None if free else "held by a running `pipe embed`"


def gc(root: Path, dry_run: bool = False) -> GcReport:
    """Remove (or, with ``dry_run``, list) what no dataset needs."""
    root = Path(root)
    rep = GcReport(root, dry_run)
    refs = referenced_stores(root)
    kept = []
    for d in store_dirs(root):
        if d in refs:
            kept.append(d)
            continue
        busy = in_use(d)
        if busy:
            rep.skipped.append(Removal(d, dir_bytes(d), f"not referenced by any dataset, but {busy}"))
            kept.append(d)
        else:
            rep.removed.append(Removal(d, dir_bytes(d), "no dataset index references this store"))
    for d in sorted((root / "stores").glob(f"*/{REMOVING}*")) if (root / "stores").is_dir() else []:
        rep.removed.append(Removal(d, dir_bytes(d), "left by a removal that was cut short"))
    rep.removed += _orphan_outputs(root, kept)
    rep.removed += _leftover_temps(root, kept)
    if not dry_run:
        rep.removed = [r for r in rep.removed if _remove(root, r, rep)]
    return rep


def _orphan_outputs(root: Path, kept: list[Path]) -> list[Removal]:
    """Adaptor outputs (``<checkpoint>-<fingerprint[:16]>``) of stores that will be gone."""
    prints = {d.name.rsplit("-", 1)[-1] for d in kept}
    base = root / OUTPUTS_DIR
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() else []:
        if d.is_dir() and not d.name.startswith(".") and d.name.rsplit("-", 1)[-1] not in prints:
            out.append(Removal(d, dir_bytes(d), "Adaptor outputs of a store that is not in the cache"))
    return out


def _leftover_temps(root: Path, kept: list[Path]) -> list[Removal]:
    """Temporary files of writers that are gone, outside shards that a live writer claims."""
    now, out = time.time(), []
    for sub in ("datasets", OUTPUTS_DIR, "masks"):
        out += [Removal(p, _size(p), "temporary file of a writer that is gone") for p in temp_files(root / sub, now)]
    for d in kept:
        claimed = set()  # a claimed shard's temp files are verify --repair's to judge, with the claim
        if (d / "claims").is_dir():
            claimed = {int(p.name[:6]) for p in (d / "claims").glob("*.json") if p.name[:6].isdigit()}
        for p in temp_files(d, now) + _dead_partials(d, now, claimed):
            out.append(Removal(p, _size(p), "temporary file of a writer that is gone"))
    return out


def _dead_partials(store: Path, now: float, claimed: set[int]) -> list[Path]:
    out = []
    for dirpath, _, files in os.walk(store / ZARR_DIR):
        for f in files:
            info = partial_of(f)
            if info is None:
                continue
            path = Path(dirpath) / f
            rel = path.relative_to(store / ZARR_DIR).parts  # <array>/c/<shard>/... or <array>/c/.<shard>.partial-*
            shard = rel[2] if len(rel) > 3 else info[0]
            if shard.isdigit() and int(shard) in claimed:
                continue
            if dead_temp(path, now, info[1]):
                out.append(path)
    return sorted(out)


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def _remove(root: Path, r: Removal, rep: GcReport) -> bool:
    """Remove one thing; a store only under its exclusive lock and while still unreferenced."""
    p = r.path
    if p.parent.parent == root / "stores" and not p.name.startswith("."):
        if not _delete_store(p, still_unused=lambda: p not in referenced_stores(root)):
            rep.skipped.append(Removal(p, r.bytes, "came into use while collecting"))
            return False
    elif p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
    return True


def _delete_store(path: Path, still_unused: Callable[[], bool] = lambda: True) -> bool:
    """Delete a store unless a writer holds it (or ``still_unused()`` says no, asked under the
    lock): it is renamed to a hidden ``.removing-*`` folder under its exclusive lock, so no
    reader or writer sees half of it, then removed. Returns whether it was deleted."""
    with try_exclusive(path / IN_USE) as free:
        if not free or not still_unused():
            return False
        hidden = path.with_name(f"{REMOVING}{path.name}-{os.getpid()}")
        os.replace(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)
    return True


# ------------------------------------------------------------------------------ rm
def find_store_dir(root: Path, name: str) -> Path:
    """A store given as a path, a folder name (``tiny-vit-0123…``) or a fingerprint prefix."""
    p = Path(name).expanduser()
    if (p / ZARR_DIR).is_dir() or (p.is_dir() and p.parent.parent.name == "stores"):
        return p.resolve()
    dirs = store_dirs(root)
    hits = [d for d in dirs if d.name == name or d.relative_to(root).as_posix() == name]
    if not hits and len(name) >= 6:
        hits = [d for d in dirs if d.name.rsplit("-", 1)[-1].startswith(name[:16])]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CacheRemoveError(f"no store {name!r} in {root}; `pipe cache ls --cache {root}` lists them "
                               "(give a path, a folder name or a fingerprint prefix)")
    raise CacheRemoveError(f"{name!r} matches {len(hits)} stores ({', '.join(d.name for d in hits)}); "
                           "give more of the fingerprint or the path")


def remove_store(root: Path, name: str, force: bool = False, dry_run: bool = False) -> GcReport:
    """Remove one store (and its Adaptor outputs); refused while a dataset uses it, unless ``force``."""
    root = Path(root)
    path = find_store_dir(root, name)
    if not path.is_relative_to(root / "stores"):
        raise CacheRemoveError(f"{path} is not a store of the cache at {root}; pass --cache for its cache")
    users = referenced_stores(root).get(path, [])
    if users and not force:
        raise CacheRemoveError(f"store {path} holds the embeddings of dataset(s) {', '.join(users)}; removing it "
                               "means re-embedding them. Pass --force to remove it anyway.")
    busy = in_use(path)
    if busy:
        raise CacheRemoveError(f"store {path} is {busy}; run `pipe cache rm` again when it has finished")
    rep = GcReport(root, dry_run, [Removal(path, dir_bytes(path), "removed on request" + (
        f" (used by {', '.join(users)}; their index no longer names it)" if users else ""))])
    rep.removed += _orphan_outputs(root, [d for d in store_dirs(root) if d != path])
    if not dry_run:
        for dataset in users:
            forget_store(root / "datasets" / dataset, path)
        if not _delete_store(path):
            raise CacheRemoveError(f"store {path} came into use; run `pipe cache rm` again when it has finished")
        for r in rep.removed[1:]:
            shutil.rmtree(r.path, ignore_errors=True)
    return rep

