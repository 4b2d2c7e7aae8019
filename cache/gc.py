"""`pipe cache gc` and `pipe cache rm`: remove what no dataset needs, never what one uses.

``gc`` removes stores that no dataset index (``datasets/*/stores.json``) references, the
Adaptor outputs of stores that are gone, and temporary files of writers that are gone.
It never removes a referenced store, and skips (and names) a store that a running
``pipe embed`` holds (``Store.in_use``) or claims. A store is first renamed to a hidden
``.removing-*`` folder under its lock, then deleted, so no reader or writer ever sees
half of one; a removal that was cut short is finished by the next ``gc``.

Both delete only what the cache owns. They require the cache marker
(:mod:`cache.marker`); ``gc`` stops, naming the file, when a dataset's ``stores.json``
cannot be read (its stores would otherwise look unreferenced); and a folder is removed
only when it is identified as the cache's own: a store (a real folder directly under
``stores/<modality>/`` whose ``embeddings.zarr/zarr.json`` is a store group of that
modality and fingerprint), a store removal cut short (``.removing-<store>-<pid>``), a
folder of Adaptor outputs (``<16 hex>-<16 hex>`` holding only ``meta.json`` and ``.npz``
files), or a temporary file of a writer that is gone. Anything else is listed as skipped,
never removed. ``rm`` takes only a store, by path, folder name or fingerprint prefix; a
path that resolves to anything but a store (``stores/image/..``, a symlink out of the
cache) is refused.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from core.locks import try_exclusive
from core.atomic import is_temp_name
from cache.claims import claim_is_live, describe
from cache.index import forget_store, referenced_stores
from cache.inspect import dir_bytes
from cache.marker import require_marker
from cache.objects import remote_root
from cache.outputs import OUTPUTS_DIR
from cache.shards import partial_of
from cache.store import IN_USE, ZARR_DIR
from cache.verify import dead_temp, temp_files
from core.errors import PipeError

REMOVING = ".removing-"
REMOVING_RE = re.compile(r"^\.removing-.+-[0-9a-f]{16}-\d+$")  # what _delete_store renames a store to
OUTPUTS_RE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}$")  # <checkpoint hash[:16]>-<store fingerprint[:16]>


class CacheRemoveError(PipeError):
    """A store that cannot be removed as asked; the message says why and what to do."""


@dataclass
class Removal:
    path: Path | str  # a URL for a cache in a bucket
    bytes: int
    why: str

    def to_json(self) -> dict:
        return {"path": str(self.path), "bytes": self.bytes, "why": self.why}


@dataclass
class GcReport:
    root: Path | str
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
    """Every folder two levels under ``stores/``, whether or not it is a store (hidden ones excluded)."""
    base = Path(root) / "stores"
    return sorted(d for d in base.glob("*/*") if d.is_dir() and not d.name.startswith(".")) if base.is_dir() else []


def _group_attrs(store: Path) -> dict | None:
    meta = store / ZARR_DIR / "zarr.json"
    if meta.is_symlink() or not meta.is_file():
        return None
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or not isinstance(doc.get("attributes"), dict):
        return None
    return doc["attributes"]


def not_a_store(d: Path, root: Path) -> str | None:
    """Why ``d`` is not identified as one of the cache's stores (None when it is one).

    A store is a real folder (not a symlink) directly under ``stores/<modality>/``, whose
    ``embeddings.zarr/zarr.json`` is a group recording that modality and a fingerprint that
    the folder's name ends with, as :meth:`cache.store.Store.create` makes them.
    """
    if d.parent.parent != Path(root) / "stores" or d.name.startswith("."):
        return "not a folder directly under stores/<modality>/"
    if d.is_symlink() or d.parent.is_symlink() or not d.is_dir():
        return "a symbolic link, not a folder of the cache"
    attrs = _group_attrs(d)
    if attrs is None:
        return f"no readable store group metadata ({ZARR_DIR}/zarr.json)"
    fp = attrs.get("fingerprint")
    if attrs.get("modality") != d.parent.name or not isinstance(fp, str) or not d.name.endswith(f"-{fp[:16]}"):
        return "its metadata does not match the folder (modality or fingerprint)"
    return None


def holds_group_metadata(d: Path, root: Path) -> bool:
    """What `pipe cache rm` accepts: a real folder directly under ``stores/<modality>/`` that
    holds a store's group metadata file (readable or not: a store whose metadata is damaged
    is removed with `rm`)."""
    return (d.parent.parent == Path(root) / "stores" and not d.name.startswith(".") and not d.is_symlink()
            and not d.parent.is_symlink() and d.is_dir() and (d / ZARR_DIR / "zarr.json").is_file()
            and not (d / ZARR_DIR / "zarr.json").is_symlink())


def outputs_owned(d: Path) -> bool:
    """Is ``d`` a folder of Adaptor outputs as :mod:`cache.outputs` writes them?"""
    if d.is_symlink() or not d.is_dir() or not OUTPUTS_RE.match(d.name):
        return False
    for p in d.iterdir():
        if p.is_symlink() or not p.is_file():
            return False
        if not (p.name == "meta.json" or (p.suffix == ".npz" and not p.name.startswith(".")) or is_temp_name(p.name)):
            return False
    return True


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


def local_only(root: Path, command: str) -> None:
    """Stop the folder code on the local mirror of a cache in a bucket (it would only see the
    mirror): a bucket's gc and rm are :mod:`cache.bucket_gc`'s."""
    found = remote_root(root)
    if found is not None:
        raise PipeError(f"{command}: {root} is the local mirror of the cache {found[0]}, not a cache folder; nothing "
                        f"was deleted. Run `{command} --cache {found[0]}` to work on the bucket.")


def gc(root: Path, dry_run: bool = False) -> GcReport:
    """Remove (or, with ``dry_run``, list) what no dataset needs; skip (and list) what is not identified."""
    root = Path(root)
    local_only(root, "pipe cache gc")
    require_marker(root, "pipe cache gc")
    rep = GcReport(root, dry_run)
    refs = referenced_stores(root, strict=True)  # an unreadable index stops gc here, before anything goes
    kept = []
    for d in store_dirs(root):
        kept.append(d)
        if d in refs:
            continue
        why_not = not_a_store(d, root)
        if why_not:
            rep.skipped.append(Removal(d, dir_bytes(d), f"not removed: not identified as a store ({why_not}); "
                                       "remove it yourself if it is yours, or `pipe cache rm` it if it is a damaged store"))
            continue
        busy = in_use(d)
        if busy:
            rep.skipped.append(Removal(d, dir_bytes(d), f"not referenced by any dataset, but {busy}"))
        else:
            kept.pop()
            rep.removed.append(Removal(d, dir_bytes(d), "no dataset index references this store"))
    for d in sorted((root / "stores").glob(f"*/{REMOVING}*")) if (root / "stores").is_dir() else []:
        if REMOVING_RE.match(d.name) and d.is_dir() and not d.is_symlink() and not d.parent.is_symlink():
            rep.removed.append(Removal(d, dir_bytes(d), "left by a removal that was cut short"))
    rep.removed += _orphan_outputs(root, kept, rep)
    rep.removed += _leftover_temps(root, [d for d in kept if not_a_store(d, root) is None])
    if not dry_run:
        rep.removed = [r for r in rep.removed if _remove(root, r, rep)]
    return rep


def _orphan_outputs(root: Path, kept: list[Path], rep: GcReport | None = None) -> list[Removal]:
    """Adaptor outputs (``<checkpoint>-<fingerprint[:16]>``) of stores that will be gone."""
    prints = {d.name.rsplit("-", 1)[-1] for d in kept}
    base = root / OUTPUTS_DIR
    out = []
    for d in sorted(base.iterdir()) if base.is_dir() and not base.is_symlink() else []:
        if not d.is_dir() or d.name.startswith(".") or d.name.rsplit("-", 1)[-1] in prints:
            continue
        if outputs_owned(d):
            out.append(Removal(d, dir_bytes(d), "Adaptor outputs of a store that is not in the cache"))
        elif rep is not None:
            rep.skipped.append(Removal(d, dir_bytes(d), "not removed: not identified as Adaptor outputs (a folder "
                                       "<16 hex>-<16 hex> holding only meta.json and .npz files)"))
    return out


def _leftover_temps(root: Path, kept: list[Path]) -> list[Removal]:
    """Temporary files of writers that are gone (in the cache's own folders and the ``kept``
    stores), outside shards that a live writer claims."""
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
        if not _delete_store(p, still_unused=lambda: p not in referenced_stores(root, strict=True)):
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
    """A store given as a path, a folder name (``tiny-vit-0123…``) or a fingerprint prefix.

    Only a store is ever returned: a real folder directly under ``stores/<modality>/``
    that holds a store's group metadata. A path is resolved first, so ``stores/image/..``
    (the stores folder itself), ``.`` or a symlink that leads elsewhere is refused.
    """
    root = Path(root)
    dirs = [d for d in store_dirs(root) if holds_group_metadata(d, root)]
    p = Path(name).expanduser()
    if os.sep in name or name in (".", "..") or p.is_absolute():
        candidates = [p] if p.is_absolute() else [p, root / p]  # relative to here, or to the cache root
        by_real = {d.resolve(): d for d in dirs}
        for c in candidates:
            if c.exists() and c.resolve() in by_real:
                return by_real[c.resolve()]
        where = next((c.resolve() for c in candidates if c.exists()), None)
        raise CacheRemoveError(
            f"{name!r} is not a store of the cache at {root}" + (f" (it is {where})" if where is not None else "")
            + ": `pipe cache rm` removes only a store, a folder directly under "
            f"{root / 'stores'}/<modality>/ that holds {ZARR_DIR}/zarr.json, given by its path, folder name or "
            f"fingerprint prefix. Nothing was removed; `pipe cache ls --cache {root}` lists the stores.")
    hits = [d for d in dirs if d.name == name]
    if not hits and len(name) >= 6 and re.fullmatch(r"[0-9a-f]+", name):
        hits = [d for d in dirs if d.name.rsplit("-", 1)[-1].startswith(name[:16])]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CacheRemoveError(f"no store {name!r} in {root}; `pipe cache ls --cache {root}` lists them "
                               "(give a path, a folder name or a fingerprint prefix of at least 6 hex digits)")
    raise CacheRemoveError(f"{name!r} matches {len(hits)} stores ({', '.join(d.name for d in hits)}); "
                           "give more of the fingerprint or the path")


def check_removable(store, users: list[str], force: bool, busy: str | None) -> None:
    """`pipe cache rm`'s refusals, for a folder store or a store in a bucket: a store some dataset
    uses (unless ``force``), and one a live writer is busy with (``busy`` says how)."""
    if users and not force:
        raise CacheRemoveError(f"store {store} holds the embeddings of dataset(s) {', '.join(users)}; removing it "
                               "means re-embedding them. Pass --force to remove it anyway.")
    if busy:
        raise CacheRemoveError(f"store {store} is {busy}; run `pipe cache rm` again when it has finished")


def removal_reason(users: list[str]) -> str:
    return "removed on request" + (f" (used by {', '.join(users)}; their index no longer names it)" if users else "")


def remove_store(root: Path, name: str, force: bool = False, dry_run: bool = False) -> GcReport:
    """Remove one store (and its Adaptor outputs); refused while a dataset uses it, unless ``force``."""
    root = Path(root)
    local_only(root, "pipe cache rm")
    require_marker(root, "pipe cache rm")
    path = find_store_dir(root, name)
    users = referenced_stores(root, strict=True).get(path, [])
    check_removable(path, users, force, in_use(path))
    rep = GcReport(root, dry_run, [Removal(path, dir_bytes(path), removal_reason(users))])
    rep.removed += _orphan_outputs(root, [d for d in store_dirs(root) if d != path])  # only identified ones
    if not dry_run:
        for dataset in users:
            forget_store(root / "datasets" / dataset, path)
        if not _delete_store(path):
            raise CacheRemoveError(f"store {path} came into use; run `pipe cache rm` again when it has finished")
        for r in rep.removed[1:]:
            shutil.rmtree(r.path, ignore_errors=True)
    return rep

