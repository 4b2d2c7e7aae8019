"""One embedding store per (modality, encoder fingerprint).

Layout of a store directory::

    embeddings.zarr/          a Zarr v3 group; its attributes hold the encoder config, the
                              fingerprint spec, shard sizes and library versions
      tokens/ pooled/ length/ sharded Zarr arrays; rows grow one whole shard at a time
    manifest/part-<shard>-<group>.parquet
                              one file per committed shard: content key -> row.
                              Written last, atomically: it IS the commit.
    claims/<shard>-<group>.json
                              a shard being written: by which writer, and its lease
                              (cache/claims.py), renewed while the writer works
    failures/<run>.parquet    items that could not be embedded, with the reason
    .lock                     the guard: taken only to take, renew, release or commit a claim
                              (an flock, or an object with a lease: cache/storage.py)

The three concerns live apart: the arrays (cache/arrays.py), the manifest
(cache/manifest.py) and the claims (cache/claimbook.py), over one small interface to the
storage (cache/storage.py: a local folder, or a prefix in an object store). :class:`Store`
puts them together and owns the commit, the one step that touches all three.

Rows that no manifest part names are padding or belong to an interrupted write; readers
must go through the manifest. Each shard file is written by exactly one claimant,
streamed chunk by chunk in the bytes zarr-python itself writes (cache/shards.py), under
a hidden temp name that is renamed into place when the shard is complete.
"""
from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from cache.arrays import (DIMENSION_NAMES, GROUP_META, ZARR_DIR, Arrays, ShardSink, array_entries,  # noqa: F401
                          array_metadata, create_kwargs, group_metadata)
from cache.claimbook import CLAIM_RE, Claim, ClaimBook, ClaimLost, ClaimState  # noqa: F401
from cache.keys import FORMAT_VERSION
from cache.manifest import (FAILURE_SCHEMA, MANIFEST, MANIFEST_SCHEMA, PART_RE, Manifest,  # noqa: F401
                            UnreadablePart, part_key)
from cache.marker import ensure_marker
from cache.mirror import storage_at
from cache.paths import portable, root_of_store
from cache.storage import IN_USE, LocalStorage, Storage, StoreError  # noqa: F401
from core.processes import Identity

QUARANTINE = "quarantine"  # manifest parts that could not be read, moved aside by `verify --repair`


@dataclass(frozen=True)
class ShardData:
    """What one shard write carries: N rows of every array plus their manifest fields."""

    keys: list[str]
    views: list[int]
    sources: list[str]
    arrays: dict[str, np.ndarray]  # name -> [N, ...]


def library_versions() -> dict[str, str]:
    names = ["torch", "transformers", "timm", "zarr", "numcodecs", "pyarrow", "xxhash"]
    out = {}
    for n in names:
        with contextlib.suppress(md.PackageNotFoundError):
            out[n] = md.version(n)
    return out


def store_dirname(name: str, fp: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[-48:] or "encoder"
    return f"{slug}-{fp[:16]}"


def _unborn(storage: Storage) -> bool:
    """Is the store still to be created: no group metadata, or (left by an older version
    killed while creating it) a group without attributes and with nothing committed?"""
    try:
        meta = storage.read(GROUP_META)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    try:
        empty = json.loads(meta).get("attributes") == {}
    except (ValueError, AttributeError):
        return False
    return empty and not any(PART_RE.match(n) for n in storage.names(MANIFEST))


class Store:
    """A store: its arrays, manifest and claims. Open with :meth:`open` (read) or :meth:`create` (write)."""

    def __init__(self, storage: Storage | str | os.PathLike):
        self.storage = storage if isinstance(storage, Storage) else storage_at(storage)
        self.path = self.storage.path
        self.zpath = self.path / ZARR_DIR
        self.arrays = Arrays(self.storage)
        self.manifest_ = Manifest(self.storage)
        self.claimbook = ClaimBook(self.storage, self.manifest_.parts)

    @property
    def attrs(self) -> dict:
        return self.arrays.attrs

    @attrs.setter
    def attrs(self, value: dict) -> None:
        self.arrays.attrs = value

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: "str | os.PathLike | Storage") -> "Store":
        """``path``: a store's folder, its folder in the mirror of a cache in a bucket, its
        ``s3://`` URL, or its storage."""
        storage = path if isinstance(path, Storage) else storage_at(path)
        if not storage.exists(GROUP_META):
            raise StoreError(f"{storage.where} is not an embedding store (no {GROUP_META}). "
                             "List stores with `pipe cache ls`.")
        store = cls(storage)
        if store.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{storage.where} has cache format {store.attrs.get('format_version')}, this version reads "
                f"{FORMAT_VERSION}. Re-run `pipe embed` to build a current store."
            )
        return store

    @classmethod
    def create(cls, root: "Path | Storage", modality: str, name: str, fingerprint: str, spec: dict,
               shard_rows: int, chunk_rows: int) -> "Store":
        """Open the store for this fingerprint, creating it if it does not exist yet.

        ``root`` is the cache's folder, or its storage (a folder's, or a bucket's).
        """
        base = root if isinstance(root, Storage) else storage_at(root)
        storage = base.child(f"stores/{modality}/{store_dirname(name, fingerprint)}")
        try:
            ensure_marker(base)  # the cache is ours: `pipe cache gc`/`rm`/`verify --repair` require the marker
            storage.mkdirs(MANIFEST, "claims", "failures")
        except OSError as e:
            raise StoreError(f"cannot create the cache store {storage.where}: {e.strerror}. "
                             "Choose a writable cache with --cache DIR or $PIPE_CACHE.") from e
        with storage.guard():
            if _unborn(storage):  # written whole, so a kill leaves no group without attributes
                storage.mkdirs(ZARR_DIR)
                storage.write(GROUP_META, group_metadata({
                    "format_version": FORMAT_VERSION, "modality": modality, "encoder": name,
                    "fingerprint": fingerprint, "spec": spec, "shard_rows": shard_rows,
                    "chunk_rows": chunk_rows, "versions": library_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }))
        store = cls.open(storage)
        if store.attrs["fingerprint"] != fingerprint:
            raise StoreError(f"{storage.where} holds fingerprint {store.attrs['fingerprint']}, expected {fingerprint}; "
                             "the directory was tampered with. Remove it and re-run `pipe embed`.")
        return store

    # -- properties ----------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        return self.attrs["fingerprint"]

    @property
    def modality(self) -> str:
        return self.attrs["modality"]

    @property
    def shard_rows(self) -> int:
        return int(self.attrs["shard_rows"])

    # -- arrays (cache/arrays.py) ----------------------------------------------------------
    @property
    def array_names(self) -> list[str]:
        return self.arrays.names

    def expected_arrays(self) -> dict[str, dict]:
        return self.arrays.expected()

    def array(self, name: str):
        return self.arrays.array(name)

    def layout(self, name: str):
        return self.arrays.layout(name)

    def record_attribute(self, key: str, value) -> None:
        """An attribute that describes what the arrays hold but that only the loaded model knows (a
        joint space's logit scale): written into the group's attributes once, whole, under the guard."""
        with self.storage.guard():
            attrs = json.loads(self.storage.read(GROUP_META)).get("attributes", {})
            if attrs.get(key) != value:
                attrs[key] = value
                self.storage.write(GROUP_META, group_metadata(attrs))
            self.attrs = attrs

    def ensure_arrays(self, arrays: dict[str, np.ndarray], rows_needed: int) -> None:
        with self.storage.guard():
            self.arrays.ensure(arrays, rows_needed, committed=bool(self.parts()))

    def shard_files(self, shard: int) -> list[Path]:
        return self.arrays.shard_files(shard)

    def clear_shard(self, shard: int) -> None:
        self.arrays.clear_shard(shard)

    # -- manifest (cache/manifest.py) ------------------------------------------------------
    def parts(self) -> list[tuple[int, str, Path]]:
        return self.manifest_.parts()

    def read_part(self, path: Path) -> pa.Table:
        return self.manifest_.read_part(path)

    def manifest(self) -> pa.Table:
        return self.manifest_.table()

    def views(self) -> int:
        """The augmented views per item it holds: its highest view number (0: the plain views alone)."""
        views = self.manifest().column("view").to_numpy()
        return int(views.max()) if len(views) else 0

    def committed_units(self) -> set[tuple[str, int]]:
        t = self.manifest()
        return set(zip(t.column("key").to_pylist(), t.column("view").to_pylist()))

    def row_index(self) -> dict[tuple[str, int], int]:
        t = self.manifest()
        return dict(zip(zip(t.column("key").to_pylist(), t.column("view").to_pylist()), t.column("row").to_pylist()))

    def failures(self) -> pa.Table:
        return self.manifest_.failures()

    def record_failures(self, rows: list[dict], run: str) -> None:
        self.manifest_.record_failures([{**r, "source": self.portable(r.get("source")), "run": run} for r in rows], run)

    # -- claims (cache/claimbook.py) -------------------------------------------------------
    def claims(self) -> list[tuple[int, str, dict]]:
        return self.claimbook.claims()

    def claim(self, group: str, run: str = "", lease_s: float | None = None, now: float | None = None,
              who: Identity | None = None) -> Claim:
        """Try to take the shard for ``group``; the claim's state says whether we got it.

        A new group takes the lowest shard that no part commits and no live writer
        claims: the shard of a dead writer, of a part that `verify --repair` dropped, or
        the next one at the end. So a group re-embedded after a repair lands in the shard
        it had, and the repaired store equals a clean one file for file. The claim holds
        for ``lease_s`` (default :func:`cache.claims.lease_seconds`); renew it with
        :meth:`renew` while working (:class:`cache.claims.LeaseKeeper`). ``now`` and
        ``who`` stand in for the clock and this process in tests.
        """
        claim, shard = self.claimbook.claim(group, run, lease_s, now, who)
        if shard is not None:
            self.clear_shard(shard)
        return claim

    def renew(self, claim: Claim, lease_s: float | None = None, now: float | None = None) -> bool:
        return self.claimbook.renew(claim, lease_s, now)

    def release(self, claim: Claim) -> None:
        self.claimbook.release(claim)

    @contextlib.contextmanager
    def in_use(self) -> Iterator["Store"]:
        """Mark the store as being written for the block (``pipe cache gc`` and ``rm`` skip it)."""
        with self.storage.in_use():
            yield self

    def portable(self, source: str | None) -> str | None:
        """A source path as the store records it: relative to the cache root when inside it."""
        root = root_of_store(self.path)
        return portable(source, root) if source and root is not None else source

    # -- writing -------------------------------------------------------------------------
    def shard_sink(self, shard: int, fsync: bool = True) -> ShardSink:
        """Stream rows into one claimed shard; see :class:`cache.arrays.ShardSink`."""
        return ShardSink(self, shard, fsync)

    def write_shard(self, claim: Claim, data: ShardData, dataset: str, fsync: bool = True) -> None:
        """Write every array of one shard at once, then commit its manifest part."""
        n = len(data.keys)
        if not 0 < n <= self.shard_rows:
            raise ValueError(f"a shard holds 1..{self.shard_rows} rows, got {n}")
        sink = self.shard_sink(claim.shard, fsync)
        try:
            sink.append(data.arrays)
            files = sink.finish()
            self.commit(claim, data.keys, data.views, data.sources, dataset, files, fsync)
        except BaseException:
            sink.abort()
            raise

    def commit(self, claim: Claim, keys: list[str], views: list[int], sources: list[str], dataset: str,
               files: list[tuple[Path, Path]] = (), fsync: bool = True) -> None:
        """Publish a written shard: under the guard, and only while the claim is still ours,
        move its finished files (``files``: temporary name, final name) into place, write
        its manifest part (the commit; written only if absent) and drop the claim.

        A claim that another writer took over (our lease lapsed) raises :class:`ClaimLost`
        and changes nothing: the new owner's files and claim are left alone.
        """
        n, start = len(keys), claim.shard * self.shard_rows
        table = pa.Table.from_pydict({
            "key": keys, "view": views, "row": list(range(start, start + n)),
            "shard": [claim.shard] * n, "source": [self.portable(s) for s in sources], "dataset": [dataset] * n,
            "status": ["ok"] * n,
        }, schema=MANIFEST_SCHEMA)
        with self.storage.guard():
            if self.claimbook.own(claim) is None:
                raise ClaimLost(f"store {self.storage.where}: shard {claim.shard} was taken over by another writer "
                                "after this one's lease lapsed; its work is left to that writer")
            for tmp, final in files:
                self.storage.publish(Path(tmp), Path(final).relative_to(self.path).as_posix(), fsync)
            if not self.manifest_.commit(claim.shard, claim.group, table):
                raise StoreError(f"store {self.storage.where}: {part_key(claim.shard, claim.group)} exists already; "
                                 f"run `pipe cache verify --store {self.storage.where}` to see why")
            self.claimbook.finish(claim)


def find_stores(root: Path) -> list[Path]:
    """Store directories under a cache root (hidden ones, such as a store being removed, are not)."""
    base = Path(root) / "stores"
    if not base.exists():
        return []
    return sorted(p.parent.parent for p in base.glob(f"*/*/{ZARR_DIR}/zarr.json") if not p.parents[1].name.startswith("."))
