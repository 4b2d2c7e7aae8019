"""`pipe cache gc` and `pipe cache rm` on a cache in a bucket (``s3://bucket/prefix``).

The same rules as for a folder (cache/gc.py), with objects instead of files:

- the cache marker must be an object at ``<prefix>/freeze-pipe-cache.json`` in the bucket
  (a copy left in the local mirror does not count);
- a dataset's ``stores.json`` that cannot be read stops both, before anything is listed
  for deletion; the indexes are the ones :func:`cache.objects.attach` fetched from the
  bucket when the command started;
- a store is removed only when it is identified as one: a prefix directly under
  ``stores/<modality>/`` whose ``embeddings.zarr/zarr.json`` object is a store group of
  that modality and of the fingerprint the name ends with; anything else is skipped and
  listed. Adaptor outputs are removed only in folders ``<16 hex>-<16 hex>`` holding only
  ``meta.json`` and ``.npz`` objects;
- a store with a live claim, or whose guard object (``.lock``) holds a live lease, is
  skipped; the last checks (no live claim, still unreferenced) and the deletion of its
  manifest parts (its commits) run under the store's guard, so no writer commits to it
  meanwhile and, once the guard is released, nothing in it reads as committed. Its other
  objects go next, its group metadata last, so a removal cut short leaves a store that
  the next ``gc`` identifies and finishes;
- every listing and deletion goes through the cache's own client, whose prefix is the
  cache's: nothing outside ``<prefix>/`` is listed or deleted. The local mirror of what
  was removed is removed too.

Not covered here: temporary objects of Dask workers that died before their shard was
committed (``.partial-`` objects in a store), and the local ``.inuse`` mark (a bucket has
no shared lock): a `pipe embed` that holds a store between two claims is not seen.
"""
from __future__ import annotations

import contextlib
import json
import re
import shutil
import time
from pathlib import Path
from typing import Iterator

from cache.claims import claim_is_live, describe
from cache.gc import (OUTPUTS_RE, CacheRemoveError, GcReport, Removal, check_removable, gc, removal_reason,
                      remove_store)
from cache.index import STORES_FILE, forget_store, referenced_stores
from cache.marker import KIND, MARKER, NotACacheError
from cache.objects import ObjectStorage, remote_root
from cache.outputs import OUTPUTS_DIR
from cache.paths import plain_name
from cache.storage import LOCK
from cache.store import ZARR_DIR
from core.errors import PipeError

GROUP_META = f"{ZARR_DIR}/zarr.json"


def collect(root: Path, dry_run: bool = False) -> GcReport:
    """`pipe cache gc` on the cache whose folder (or local mirror) is ``root``."""
    found = remote_root(root)
    if found is None:
        return gc(root, dry_run)
    with bucket_errors(found[0], "pipe cache gc"):
        return _collect(root, found, dry_run)


def _collect(root: Path, found: tuple[str, Path], dry_run: bool) -> GcReport:
    cache = _cache(found, "pipe cache gc")
    rep = GcReport(cache.url, dry_run)
    refs = _referenced(root)
    kept = []
    for modality, name in _store_prefixes(cache):
        key = f"stores/{modality}/{name}"
        store = cache.child(key)
        if key in refs:
            kept.append(name)
            continue
        why_not = not_a_store(cache, modality, name)
        busy = None if why_not else bucket_busy(store)
        if why_not or busy:
            kept.append(name)
            why = (f"not removed: not identified as a store ({why_not}); remove it yourself if it is yours, or "
                   "`pipe cache rm` it if it is a damaged store" if why_not else f"not referenced by any dataset, but {busy}")
            rep.skipped.append(Removal(store.url, _bytes(store), why))
            continue
        rep.removed.append(Removal(store.url, _bytes(store), "no dataset index references this store"))
    outputs = _orphan_outputs(cache, kept, rep)
    if not dry_run:
        def unused(key: str) -> bool:  # asked under each store's guard
            return key not in _referenced_now(cache, root)

        deleted = [r for r in rep.removed if _delete_store(cache, _key(cache, r), unused, rep)]
        stayed = {_key(cache, r).rsplit("-", 1)[-1] for r in rep.removed if r not in deleted}
        rep.removed = deleted  # a store that came into use keeps its Adaptor outputs too
        outputs = [(r, folder) for r, folder in outputs if folder.rsplit("-", 1)[-1] not in stayed]
        for _, folder in outputs:
            _delete_tree(cache.child(folder))
    rep.removed += [r for r, _ in outputs]
    return rep


def remove(root: Path, name: str, force: bool = False, dry_run: bool = False) -> GcReport:
    """`pipe cache rm` on the cache whose folder (or local mirror) is ``root``."""
    found = remote_root(root)
    if found is None:
        return remove_store(root, name, force, dry_run)
    with bucket_errors(found[0], "pipe cache rm"):
        return _remove(root, found, name, force, dry_run)


def _remove(root: Path, found: tuple[str, Path], name: str, force: bool, dry_run: bool) -> GcReport:
    cache = _cache(found, "pipe cache rm")
    key = find_store(cache, found[1], name)
    store = cache.child(key)
    users = _referenced(root).get(key, [])
    check_removable(store.url, users, force, bucket_busy(store))
    rep = GcReport(cache.url, dry_run, [Removal(store.url, _bytes(store), removal_reason(users))])
    kept = [n for m, n in _store_prefixes(cache) if f"stores/{m}/{n}" != key]
    outputs = _orphan_outputs(cache, kept)
    rep.removed += [r for r, _ in outputs]
    if not dry_run:
        for dataset in users:  # the indexes that no longer name it go up before the store goes
            forget_store(found[1] / "datasets" / dataset, found[1] / key)
            index = f"datasets/{dataset}/{STORES_FILE}"
            cache.write(index, cache.local(index).read_bytes())
        if not _delete_store(cache, key, lambda k: True, rep):
            raise CacheRemoveError(f"store {store.url} came into use; run `pipe cache rm` again when it has finished")
        for _, folder in outputs:
            _delete_tree(cache.child(folder))
    return rep


@contextlib.contextmanager
def bucket_errors(url: str, command: str) -> Iterator[None]:
    """An error of the bucket (an object key the client cannot parse, a refused request) as one message."""
    from obstore.exceptions import BaseError  # lazy: only object-store caches need it

    try:
        yield
    except BaseError as e:
        reason = str(e).splitlines()[0][:300]
        raise PipeError(f"{command} on {url} stopped: the bucket answered {type(e).__name__}: {reason}. Keys with an "
                        "empty, '.' or '..' segment cannot be listed: move or delete such objects with your S3 tools "
                        "(they are not the cache's), check the credentials otherwise, then run the command again; "
                        "it removes nothing it has not identified.") from None


def require_bucket_marker(root: Path, command: str) -> bool:
    """For a cache in a bucket (``root`` its local mirror): stop unless the bucket holds the
    marker object; True. False for a cache folder (:mod:`cache.marker` checks those)."""
    found = remote_root(root)
    if found is not None:
        _cache(found, command)
    return found is not None


def _cache(found: tuple[str, Path], command: str) -> ObjectStorage:
    """The cache's storage (its mirror at ``found[1]``), once its marker object is seen in the bucket."""
    url, mirror = found
    cache = ObjectStorage(url, mirror)
    try:
        ok = json.loads(cache.read(MARKER)).get("kind") == KIND
    except (FileNotFoundError, ValueError, AttributeError):
        ok = False
    if not ok:
        raise NotACacheError(f"{command}: {url} is not a freeze-pipe cache: the bucket holds no cache marker "
                             f"({url}/{MARKER}) there. Nothing was deleted. Pass --cache (or set $PIPE_CACHE) to the "
                             "cache you mean; a cache in a bucket gets its marker from `pipe embed`.")
    return cache


def _referenced(root: Path) -> dict[str, list[str]]:
    """Store keys (``stores/<modality>/<name>``) that dataset indexes record; an unreadable index stops here."""
    out = {}
    for path, users in referenced_stores(root, strict=True).items():
        try:
            out[Path(path).relative_to(root).as_posix()] = users
        except ValueError:
            continue  # a store outside this cache is not one gc could remove
    return out


def _referenced_now(cache: ObjectStorage, root: Path) -> dict[str, list[str]]:
    """:func:`_referenced` after fetching the dataset indexes again (a `pipe embed` may have
    recorded a store since the command started)."""
    for o in cache.keys("datasets"):
        cache.fetch(o["path"], o)
    return _referenced(root)


def _store_prefixes(cache: ObjectStorage) -> list[tuple[str, str]]:
    """(modality, name) of every prefix two levels under ``stores/`` whose names are plain."""
    return sorted((m, n) for m in cache.names("stores") if plain_name(m)
                  for n in cache.names(f"stores/{m}") if plain_name(n))


def not_a_store(cache: ObjectStorage, modality: str, name: str) -> str | None:
    """Why ``stores/<modality>/<name>`` is not identified as a store (None when it is one)."""
    try:
        doc = json.loads(cache.read(f"stores/{modality}/{name}/{GROUP_META}"))
    except FileNotFoundError:
        return f"no store group metadata ({GROUP_META})"
    except ValueError:
        return f"no readable store group metadata ({GROUP_META})"
    attrs = doc.get("attributes") if isinstance(doc, dict) and doc.get("node_type") == "group" else None
    if not isinstance(attrs, dict):
        return f"no readable store group metadata ({GROUP_META})"
    fp = attrs.get("fingerprint")
    if attrs.get("modality") != modality or not isinstance(fp, str) or not name.endswith(f"-{fp[:16]}"):
        return "its metadata does not match the folder (modality or fingerprint)"
    return None


def bucket_busy(store: ObjectStorage) -> str | None:
    """Why a store in a bucket must not be removed now (a live claim, or a guard with a live lease), or None."""
    busy = _live_claim(store)
    if busy:
        return busy
    try:
        guard = json.loads(store.read(LOCK))
        if float(guard.get("expires", 0)) > time.time():
            return f"being committed to by {guard.get('writer', 'a writer')} on {guard.get('host', 'a host')}"
    except (FileNotFoundError, ValueError, TypeError, AttributeError):
        pass
    return None


def _live_claim(store: ObjectStorage) -> str | None:
    """Who holds a live claim on the store (the guard is not looked at), or None."""
    for o in store.keys("claims"):
        try:
            info = json.loads(store.read(o["path"]))
        except (FileNotFoundError, ValueError):
            continue
        if isinstance(info, dict) and claim_is_live(info):
            return f"being written by {describe(info)}"
    return None


def find_store(cache: ObjectStorage, mirror: Path, name: str) -> str:
    """The key (``stores/<modality>/<name>``) of a store given by its key, URL, mirror path, folder
    name or fingerprint prefix; only a prefix that holds a store's group metadata object."""
    stores = [f"stores/{m}/{n}" for m, n in _store_prefixes(cache) if cache.exists(f"stores/{m}/{n}/{GROUP_META}")]
    if "/" in name or name in (".", ".."):
        rel = name.rstrip("/")
        for base in (cache.url + "/", str(mirror) + "/"):
            rel = rel[len(base):] if rel.startswith(base) else rel
        if rel in stores:
            return rel
        raise CacheRemoveError(
            f"{name!r} is not a store of the cache at {cache.url}: `pipe cache rm` removes only a store, a prefix "
            f"directly under {cache.url}/stores/<modality>/ that holds {GROUP_META}, given by its path "
            f"(stores/<modality>/<name>), folder name or fingerprint prefix. Nothing was removed; "
            f"`pipe cache ls --cache {cache.url}` lists the stores.")
    hits = [k for k in stores if k.rsplit("/", 1)[-1] == name]
    if not hits and len(name) >= 6 and re.fullmatch(r"[0-9a-f]+", name):
        hits = [k for k in stores if k.rsplit("-", 1)[-1].startswith(name[:16])]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise CacheRemoveError(f"no store {name!r} in {cache.url}. Nothing was removed; `pipe cache ls --cache {cache.url}` lists them "
                               "(give a path, a folder name or a fingerprint prefix of at least 6 hex digits)")
    raise CacheRemoveError(f"{name!r} matches {len(hits)} stores ({', '.join(hits)}). Nothing was removed; give more "
                           "of the fingerprint or the path")


def _orphan_outputs(cache: ObjectStorage, kept: list[str], rep: GcReport | None = None) -> list[tuple[Removal, str]]:
    """Adaptor outputs (``adaptor-outputs/<checkpoint>-<fingerprint[:16]>/``) of stores that will be gone."""
    prints = {n.rsplit("-", 1)[-1] for n in kept}
    out = []
    for name in sorted(cache.names(OUTPUTS_DIR)):
        folder = f"{OUTPUTS_DIR}/{name}"
        if name.startswith(".") or name.rsplit("-", 1)[-1] in prints:
            continue
        objects = cache.child(folder).keys()
        if not objects:
            continue  # a single object, not a folder
        files = [o["path"] for o in objects]
        size = sum(int(o["size"]) for o in objects)
        if OUTPUTS_RE.match(name) and all(f == "meta.json" or (f.endswith(".npz") and "/" not in f
                                                                  and not f.startswith(".")) for f in files):
            out.append((Removal(f"{cache.url}/{folder}", size, "Adaptor outputs of a store that is not in the cache"),
                        folder))
        elif rep is not None:
            rep.skipped.append(Removal(f"{cache.url}/{folder}", size, "not removed: not identified as Adaptor "
                                       "outputs (a folder <16 hex>-<16 hex> holding only meta.json and .npz files)"))
    return out


def _key(cache: ObjectStorage, r: Removal) -> str:
    return str(r.path)[len(cache.url) + 1:]


def _bytes(store: ObjectStorage) -> int:
    return sum(int(o["size"]) for o in store.keys())


def _delete_store(cache: ObjectStorage, key: str, still_unused, rep: GcReport) -> bool:
    """Delete one store's objects: under its guard (no live claim, ``still_unused(key)``) its
    commits first, then the rest, its group metadata last; then its local mirror."""
    store = cache.child(key)
    with store.guard():
        busy = _live_claim(store)
        if busy or not still_unused(key):
            rep.skipped.append(Removal(store.url, _bytes(store), f"came into use while collecting ({busy or 'a dataset'})"))
            return False
        parts = [o["path"] for o in store.keys("manifest")]
        if parts:
            store.obs.delete(store.client, parts)
    rest = [o["path"] for o in store.keys() if o["path"] not in (GROUP_META, LOCK)]
    if rest:
        store.obs.delete(store.client, rest)
    store.delete(GROUP_META)
    shutil.rmtree(store.path, ignore_errors=True)
    return True


def _delete_tree(folder: ObjectStorage) -> None:
    """Every object under a folder of the cache, and its local mirror."""
    found = [o["path"] for o in folder.keys()]
    if found:
        folder.obs.delete(folder.client, found)
    shutil.rmtree(folder.path, ignore_errors=True)
