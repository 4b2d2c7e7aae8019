"""`pipe cache gc` and `pipe cache rm`: remove what no dataset needs, never what one uses.

Written once against :class:`cache.storage.Storage`: a cache in a folder and a cache in a
bucket (``s3://bucket/prefix``, worked on through its local mirror) go through the same
code; what differs (how a store is held, retired and emptied, when a temporary file is a
leftover) is the storage's.

``gc`` removes stores that no dataset index (``datasets/*/stores.json``) references, the
Adaptor outputs of stores that are gone, removals that were cut short, and temporary files
of writers that are gone (a folder's atomic writes and shard files; a bucket's ``.partial-``
objects staged by Dask workers whose committer never published them). It never removes a
referenced store, and skips (and names) a store that a running writer holds (its ``.inuse``
mark: a shared lock in a folder, an object with a live lease in a bucket; or a guard with a
live lease) or claims (a live claim).

A store is removed under :meth:`Storage.exclusive`, after checking again that no live
writer claims it and no dataset records it (the indexes are read again: in a bucket,
fetched again): it is first retired, so that nothing in it reads as committed (a folder is
renamed to a hidden ``.removing-*`` folder; a bucket's manifest parts are deleted), then
its files are deleted, its group metadata last. A removal that was cut short is finished
by the next ``gc``. In a bucket the hold is the store's guard, whose lease is renewed while
the deletion runs: a second ``gc`` never takes it over midway.

Both delete only what the cache owns. They require the cache marker (:mod:`cache.marker`;
for a bucket, the marker object in the bucket); ``gc`` stops, naming the file, when a
dataset's ``stores.json`` cannot be read (its stores would otherwise look unreferenced);
and nothing is removed unless it is identified as the cache's own: a store (a real folder
directly under ``stores/<modality>/`` whose ``embeddings.zarr/zarr.json`` is a store group
of that modality and fingerprint), a store removal cut short (``.removing-<store>-<pid>``),
a folder of Adaptor outputs (``<16 hex>-<16 hex>`` holding only ``meta.json``, ``.npz``
files and its lock), or a temporary file of a writer that is gone (by its name:
``.<name>.<pid>-<tid>-<token>.tmp``, ``.<shard>.partial-<pid>-<token>``), deleted only
while it is still the version that was listed. Anything else is listed as skipped, never
removed. ``rm`` takes only a store, by path, folder name or fingerprint prefix; a path that
resolves to anything but a store (``stores/image/..``, a symlink out of the cache) is refused.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from cache.arrays import GROUP_META, ZARR_DIR
from cache.claimbook import CLAIMS
from cache.claims import claim_is_live, describe
from cache.index import STORES_FILE, forget_store, referenced_stores
from cache.manifest import MANIFEST
from cache.marker import require_marker
from cache.mirror import pull, storage_at
from cache.outputs import OUTPUTS_DIR
from cache.paths import plain_name
from cache.shards import partial_of
from cache.storage import IN_USE, LOCK, Entry, Storage, StoreError
from cache.verify import leftovers
from core.atomic import is_temp_name
from core.errors import PipeError

REMOVING_RE = re.compile(r"^\.removing-.+-[0-9a-f]{16}-\d+$")  # what a folder store is retired to
OUTPUTS_RE = re.compile(r"^[0-9a-f]{16}-[0-9a-f]{16}$")  # <checkpoint hash[:16]>-<store fingerprint[:16]>
DELETE_BATCH = 1000  # files deleted between two checks that the hold on the store still holds


class CacheRemoveError(PipeError):
    """A store that cannot be removed as asked; the message says why and what to do."""


@dataclass
class Removal:
    path: Path | str  # where, as the user writes it (a path, or a URL for a cache in a bucket)
    bytes: int
    why: str
    key: str = field(default="", repr=False)   # relative to the cache
    how: str = field(default="store", repr=False)  # "store", "tree" (a folder and all below) or "file"
    version: str = field(default="", repr=False)  # a file's version as listed (it is deleted only at that version)

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


# ------------------------------------------------------------------------------ what the cache holds
def size(storage: Storage) -> int:
    return sum(e.size for e in storage.entries())


def store_keys(cache: Storage) -> list[tuple[str, bool]]:
    """(key, reached through a symbolic link) of every folder two levels under ``stores/`` with
    plain names, whether or not it is a store (hidden ones excluded)."""
    out = []
    for modality, mk in sorted(cache.scan("stores").items()):
        if plain_name(modality) and mk in ("folder", "link"):
            out += [(f"stores/{modality}/{name}", "link" in (mk, nk))
                    for name, nk in sorted(cache.scan(f"stores/{modality}").items())
                    if plain_name(name) and nk in ("folder", "link")]
    return out


def not_a_store(cache: Storage, key: str, link: bool = False) -> str | None:
    """Why ``key`` (``stores/<modality>/<name>``) is not identified as one of the cache's stores
    (None when it is one): a real folder whose ``embeddings.zarr/zarr.json`` is a group
    recording that modality and a fingerprint that the name ends with, as
    :meth:`cache.store.Store.create` makes them."""
    if link:
        return "a symbolic link, not a folder of the cache"
    meta, (_, modality, name) = f"{key}/{GROUP_META}", key.split("/")
    kind = cache.kind(meta)
    if kind is None:
        return f"no store group metadata ({GROUP_META})"
    try:
        doc = json.loads(cache.read(meta)) if kind == "file" else None
    except (OSError, ValueError):
        doc = None
    attrs = doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None
    if not isinstance(attrs, dict):
        return f"no readable store group metadata ({GROUP_META})"
    fp = attrs.get("fingerprint")
    if attrs.get("modality") != modality or not isinstance(fp, str) or not name.endswith(f"-{fp[:16]}"):
        return "its metadata does not match the folder (modality or fingerprint)"
    return None


def live_claim(store: Storage) -> str | None:
    """Who holds a live claim on the store, or None."""
    for name in sorted(store.names(CLAIMS)):
        if not name.endswith(".json"):
            continue
        try:
            info = json.loads(store.read(f"{CLAIMS}/{name}"))
        except (OSError, ValueError):
            continue
        if isinstance(info, dict) and claim_is_live(info):
            return f"being written by {describe(info)}"
    return None


def busy_with(store: Storage) -> str | None:
    """Why a store must not be removed now (a live claim, or a running writer's own mark), or None."""
    return live_claim(store) or store.writing()


def in_use(store: str | Path) -> str | None:
    """:func:`busy_with` for the store at a path."""
    return busy_with(storage_at(store))


def referenced(cache: Storage, fresh: bool = False) -> dict[str, list[str]]:
    """Store keys (``stores/<modality>/<name>``) that dataset indexes record, with their datasets;
    an unreadable index stops here. ``fresh``: the indexes are fetched again first (a `pipe
    embed` may have recorded a store since the command started)."""
    if fresh:
        pull(cache, "datasets", drop=False)
    out = {}
    for path, users in referenced_stores(cache.path, strict=True).items():
        try:
            out[Path(path).relative_to(cache.path).as_posix()] = users
        except ValueError:
            continue  # a store outside this cache is not one gc could remove
    return out


def outputs_owned(cache: Storage, folder: str) -> bool:
    """Is ``folder`` a folder of Adaptor outputs as :mod:`cache.outputs` writes them?"""
    if not OUTPUTS_RE.match(folder.rsplit("/", 1)[-1]):
        return False
    return all(kind == "file" and (n in ("meta.json", LOCK) or (n.endswith(".npz") and not n.startswith("."))
                                   or is_temp_name(n)) for n, kind in cache.scan(folder).items())


# ------------------------------------------------------------------------------ gc
def gc(root: Path, dry_run: bool = False) -> GcReport:
    """Remove (or, with ``dry_run``, list) what no dataset needs; skip (and list) what is not identified."""
    cache = storage_at(root)
    with cache.errors("pipe cache gc"):
        require_marker(cache, "pipe cache gc")
        return _collect(cache, dry_run)


def _collect(cache: Storage, dry_run: bool) -> GcReport:
    rep = GcReport(cache.where, dry_run)
    refs = referenced(cache)  # an unreadable index stops gc here, before anything goes
    kept, identified, doomed = [], [], []
    for key, link in store_keys(cache):
        why_not = not_a_store(cache, key, link)
        identified += [key] if why_not is None else []
        busy = None if why_not or key in refs else busy_with(cache.child(key))
        if key in refs or why_not or busy:
            kept.append(key)
            if key not in refs:
                why = (f"not removed: not identified as a store ({why_not}); remove it yourself if it is yours, or "
                       "`pipe cache rm` it if it is a damaged store" if why_not else
                       f"not referenced by any dataset, but {busy}")
                rep.skipped.append(Removal(cache.where_of(key), size(cache.child(key)), why, key))
        else:
            doomed.append(Removal(cache.where_of(key), size(cache.child(key)), "no dataset index references this store",
                                  key))
    rest = _cut_short(cache) + _orphan_outputs(cache, kept, rep) + _leftover_temps(cache, [k for k in kept
                                                                                          if k in identified])
    if dry_run:
        rep.removed = doomed + rest
        return rep
    gone = [r for r in doomed if _delete_or_skip(cache, r, rep)]
    stayed = {r.key.rsplit("-", 1)[-1] for r in doomed if r not in gone}  # a store that came into use keeps its outputs
    rest = [r for r in rest if not (r.how == "tree" and r.key.startswith(f"{OUTPUTS_DIR}/")
                                    and r.key.rsplit("-", 1)[-1] in stayed)]
    rep.removed = gone + [r for r in rest if _remove(cache, r, rep)]
    return rep


def _cut_short(cache: Storage) -> list[Removal]:
    """Folder stores retired by a removal that was cut short (``stores/<modality>/.removing-*``)."""
    out = []
    for modality, mk in sorted(cache.scan("stores").items()):
        for name, nk in sorted(cache.scan(f"stores/{modality}").items()) if mk == "folder" else []:
            if nk == "folder" and REMOVING_RE.match(name):
                key = f"stores/{modality}/{name}"
                out.append(Removal(cache.where_of(key), size(cache.child(key)), "left by a removal that was cut short",
                                   key, "tree"))
    return out


def _orphan_outputs(cache: Storage, kept: list[str], rep: GcReport | None = None) -> list[Removal]:
    """Adaptor outputs (``adaptor-outputs/<checkpoint>-<fingerprint[:16]>/``) of stores that will be gone."""
    prints = {k.rsplit("-", 1)[-1] for k in kept}
    out = []
    found = cache.scan(OUTPUTS_DIR) if cache.kind(OUTPUTS_DIR) == "folder" else {}
    for name, kind in sorted(found.items()):
        if kind not in ("folder", "link") or name.startswith(".") or name.rsplit("-", 1)[-1] in prints:
            continue
        folder = f"{OUTPUTS_DIR}/{name}"
        where, nbytes = cache.where_of(folder), size(cache.child(folder)) if kind == "folder" else 0
        if kind == "folder" and outputs_owned(cache, folder):
            out.append(Removal(where, nbytes, "Adaptor outputs of a store that is not in the cache", folder, "tree"))
        elif rep is not None:
            rep.skipped.append(Removal(where, nbytes, "not removed: not identified as Adaptor outputs (a folder "
                                       "<16 hex>-<16 hex> holding only meta.json and .npz files)", folder))
    return out


def _leftover_temps(cache: Storage, stores: list[str]) -> list[Removal]:
    """Temporary files of writers that are gone (:func:`cache.verify.leftovers`), in the cache's
    own folders and the identified ``stores`` that stay, outside shards that a claim names (a
    claimed shard's files are `verify --repair`'s to judge, with the claim)."""
    now, out = time.time(), []
    for sub in ("datasets", OUTPUTS_DIR, "masks"):
        out += [_temp(cache, f"{sub}/{e.key}", e) for e in leftovers(cache.child(sub), now) if is_temp_name(e.name)]
    for key in stores:
        store = cache.child(key)
        claimed = {int(n[:6]) for n in store.names(CLAIMS) if n[:6].isdigit() and n.endswith(".json")}
        out += [_temp(cache, f"{key}/{e.key}", e) for e in leftovers(store, now) if _shard_of(e.key) not in claimed]
    return out


def _temp(cache: Storage, key: str, entry: Entry) -> Removal:
    return Removal(cache.where_of(key), entry.size, "temporary file of a writer that is gone", key, "file",
                   entry.version)


def _shard_of(key: str) -> int | None:
    """The shard a file of a store belongs to (``embeddings.zarr/<array>/c/<shard>/...`` or
    ``embeddings.zarr/<array>/c/.<shard>.partial-*``), or None."""
    parts = key.split("/")
    if parts[0] != ZARR_DIR or len(parts) < 4:
        return None
    info = partial_of(parts[-1])
    shard = parts[3] if len(parts) > 4 else info[0] if info else None
    return int(shard) if shard and shard.isdigit() else None


def _delete_or_skip(cache: Storage, r: Removal, rep: GcReport) -> bool:
    """Delete a store gc listed, unless it came into use meanwhile (then it is skipped, named)."""
    why = delete_store(cache.child(r.key), lambda: r.key not in referenced(cache, fresh=True))
    if why:
        rep.skipped.append(Removal(r.path, r.bytes, f"came into use while collecting ({why})", r.key))
    return why is None


def _remove(cache: Storage, r: Removal, rep: GcReport) -> bool:
    """Remove one thing gc identified: a folder whole, a file only at the version listed."""
    if r.how == "tree":
        cache.remove_tree(r.key)
        return True
    if cache.delete_if(r.key, r.version):
        return True
    rep.skipped.append(Removal(r.path, r.bytes, "changed since it was listed (a writer uses it again)", r.key))
    return False


def delete_store(store: Storage, still_unused: Callable[[], bool] = lambda: True) -> str | None:
    """Delete a store, unless a writer holds or claims it or ``still_unused()`` says no (asked
    under the hold): returns why it was not deleted, or None. Retired first, so no reader or
    writer sees half of it; its group metadata goes last."""
    with store.exclusive() as hold:
        if hold is None:
            return "held by a running `pipe embed`"
        why = live_claim(store) or (None if still_unused() else "a dataset records it now")
        if why:
            return why
        remains = store.retire(MANIFEST)
        keys = [e.key for e in remains.entries() if e.key not in (GROUP_META, LOCK, IN_USE)]
        for i in range(0, len(keys) + 1, DELETE_BATCH):
            if hold.lost:
                raise StoreError(f"{store.where}: the store's guard was taken over while its files were being deleted "
                                 "(this process was paused past the guard's lease); nothing in it reads as committed. "
                                 "Run `pipe cache gc` again to finish its removal.")
            remains.delete_many(keys[i:i + DELETE_BATCH])
        remains.delete(GROUP_META)
    remains.vacate()
    return None


# ------------------------------------------------------------------------------ rm
def find_store(cache: Storage, name: str) -> str:
    """The key of a store given as a path (or URL), a folder name (``tiny-vit-0123…``) or a fingerprint prefix.

    Only a store is ever returned: a real folder directly under ``stores/<modality>/`` that
    holds a store's group metadata. A path is resolved first, so ``stores/image/..`` (the
    stores folder itself), ``.`` or a symlink that leads elsewhere is refused.
    """
    stores = [k for k, link in store_keys(cache) if not link and cache.kind(f"{k}/{GROUP_META}") == "file"]
    if "/" in name or "\\" in name or name in (".", "..") or Path(name).is_absolute():
        found = cache.key_for(name)
        for key, _ in found:
            if key in stores:
                return key
        where = next((shown for _, shown in found if shown), None)
        raise CacheRemoveError(
            f"{name!r} is not a store of the cache at {cache.where}" + (f" (it is {where})" if where else "")
            + ": `pipe cache rm` removes only a store, a folder directly under "
            f"{cache.where_of('stores')}/<modality>/ that holds {GROUP_META}, given by its path (stores/<modality>/"
            f"<name>), folder name or fingerprint prefix. Nothing was removed; `pipe cache ls --cache {cache.where}` "
            "lists the stores.")
    hits = [k for k in stores if k.rsplit("/", 1)[-1] == name]
    if not hits and len(name) >= 6 and re.fullmatch(r"[0-9a-f]+", name):
        hits = [k for k in stores if k.rsplit("-", 1)[-1].startswith(name[:16])]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CacheRemoveError(f"no store {name!r} in {cache.where}. Nothing was removed; `pipe cache ls --cache "
                               f"{cache.where}` lists them (give a path, a folder name or a fingerprint prefix of at "
                               "least 6 hex digits)")
    raise CacheRemoveError(f"{name!r} matches {len(hits)} stores ({', '.join(k.rsplit('/', 1)[-1] for k in hits)}). "
                           "Nothing was removed; give more of the fingerprint or the path")


def check_removable(store, users: list[str], force: bool, busy: str | None) -> None:
    """`pipe cache rm`'s refusals: a store some dataset uses (unless ``force``), and one a live
    writer is busy with (``busy`` says how)."""
    if users and not force:
        raise CacheRemoveError(f"store {store} holds the embeddings of dataset(s) {', '.join(users)}; removing it "
                               "means re-embedding them. Pass --force to remove it anyway.")
    if busy:
        raise CacheRemoveError(f"store {store} is {busy}; run `pipe cache rm` again when it has finished")


def removal_reason(users: list[str]) -> str:
    return "removed on request" + (f" (used by {', '.join(users)}; their index no longer names it)" if users else "")


def remove(root: Path, name: str, force: bool = False, dry_run: bool = False) -> GcReport:
    """Remove one store (and its Adaptor outputs); refused while a dataset uses it, unless ``force``."""
    cache = storage_at(root)
    with cache.errors("pipe cache rm"):
        require_marker(cache, "pipe cache rm")
        return _remove_store(cache, name, force, dry_run)


def _remove_store(cache: Storage, name: str, force: bool, dry_run: bool) -> GcReport:
    key = find_store(cache, name)
    store = cache.child(key)
    users = referenced(cache).get(key, [])
    check_removable(cache.where_of(key), users, force, busy_with(store))
    rep = GcReport(cache.where, dry_run, [Removal(cache.where_of(key), size(store), removal_reason(users), key)])
    outputs = _orphan_outputs(cache, [k for k, _ in store_keys(cache) if k != key])  # only identified ones
    rep.removed += outputs
    if not dry_run:
        for dataset in users:  # the indexes that no longer name it are written before the store goes
            forget_store(cache.path / "datasets" / dataset, cache.path / key)
            cache.upload(f"datasets/{dataset}/{STORES_FILE}")
        if delete_store(store):
            raise CacheRemoveError(f"store {cache.where_of(key)} came into use; run `pipe cache rm` again when it has "
                                   "finished")
        for r in outputs:
            cache.remove_tree(r.key)
    return rep
