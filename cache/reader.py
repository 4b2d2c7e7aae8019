"""Fast, checked reads of committed rows for training and evaluation: straight from the shard bytes.

zarr-python decodes a chunk through its codec pipeline on every read: about 0.25x the
speed of ``np.memmap`` on the same bytes (``bench/loader.py``; docs/concepts/design.md). Our chunks are raw little-endian
bytes plus a crc32c, so each one is a zero-copy numpy view of a memory-mapped shard file,
and gathering rows costs what a memmap gather costs.

Every chunk is checked against its crc32c the first time a reader maps it (the view is
then kept, so the check runs once per chunk and reader): a damaged chunk stops the read
with a :class:`cache.shards.ShardCorruption` naming the store, array, shard and chunk,
and the command that repairs it. There is no switch to turn the check off.

**Held rows.** A process that trains many Adaptors on the same stores (a sweep's worker)
calls :func:`hold` once per store: from then on every array of that store that any reader
asks for is read once, for all the rows held, and kept in memory; later reads of those
rows, by any reader in the process, are served from memory. :func:`rows_read` counts the
rows this process really read from the cache (per store and array), which is how a sweep
shows that a worker read each array once.
"""
from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from cache.shards import ShardFile, ShardLayout
from cache.store import Store


def _store_key(store: Store) -> tuple[str, str]:
    """Where a store is and what it holds: rows are numbered per store copy, so both name it."""
    return store.storage.where, store.fingerprint


_HOLD: dict[tuple[str, str], np.ndarray] = {}                    # store -> the rows to hold (sorted, unique)
_HELD: dict[tuple[tuple[str, str], str], np.ndarray] = {}        # (store, array) -> those rows' values
_READ: Counter = Counter()                                        # (modality/array) -> rows read from the cache
_READ_SECONDS = [0.0]                                             # time spent reading them
_LOCK = threading.Lock()


def hold(store: Store, rows: np.ndarray) -> None:
    """Keep ``rows`` of every array of ``store`` in this process's memory once first read."""
    key = _store_key(store)
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    with _LOCK:
        have = _HOLD.get(key)
        if have is None or not np.isin(rows, have).all():
            _HOLD[key] = rows if have is None else np.union1d(have, rows)
            for k in [k for k in _HELD if k[0] == key]:  # grown: read again, whole
                del _HELD[k]


def release_held() -> None:
    """Forget every held array (the memory goes back; later reads read the cache)."""
    with _LOCK:
        _HOLD.clear()
        _HELD.clear()


def held_bytes() -> int:
    """Memory the held arrays take in this process."""
    return sum(a.nbytes for a in list(_HELD.values()))


def rows_read() -> dict[str, int]:
    """Rows read from the cache's stores by this process so far, by ``modality/array``."""
    return dict(_READ)


def read_seconds() -> float:
    """Seconds this process has spent reading rows from the cache's stores (mapping, checking, copying)."""
    return _READ_SECONDS[0]


class RowReader:
    """Gather rows of one array of a store by global row id (from memory, where :func:`hold` says)."""

    def __init__(self, store: Store, name: str):
        self.layout: ShardLayout = store.layout(name)
        self._key = _store_key(store)
        self._counted = f"{store.modality}/{name}"
        self.storage = store.storage
        self._listed: dict[str, dict] | None = None  # the shards' sizes and ETags, listed once per reader
        self.name = name
        self._shards: dict[int, ShardFile] = {}
        self._chunks: dict[tuple[int, int], np.ndarray] = {}

    @property
    def row_shape(self) -> tuple[int, ...]:
        return self.layout.row_shape

    @property
    def dtype(self) -> np.dtype:
        return self.layout.dtype

    def _chunk(self, chunk_id: int) -> np.ndarray:
        """Global chunk id -> [chunk_rows, ...] view, mapped (and checksum-checked) once and kept."""
        arr = self._chunks.get(chunk_id)
        if arr is None:
            per = self.layout.chunks_per_shard
            shard, c = divmod(chunk_id, per)
            sf = self._shards.get(shard)
            if sf is None:  # an object store's shard is fetched whole into its local copy first
                key = self.storage.key_of(self.layout.shard_path(shard))
                if self._listed is None:
                    self._listed = self.storage.listing(self.storage.key_of(self.layout.array_dir / "c"))
                self.storage.fetch(key, self._listed.get(key))
                sf = self._shards[shard] = ShardFile(self.layout, shard)
            arr = self._chunks[chunk_id] = sf.chunk(c)
        return arr

    def take(self, rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Rows in the order given: from memory when this process holds them all, else from the shards."""
        rows = np.asarray(rows, dtype=np.int64)
        held = self._held()
        if held is not None:
            have, values = held
            at = np.searchsorted(have, rows)
            if len(rows) == 0 or (at < len(have)).all() and (have[np.minimum(at, len(have) - 1)] == rows).all():
                if out is None:
                    return values[at]
                out[...] = values[at]
                return out
        return self._read(rows, out)

    def _held(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(rows, values) of this array where this process holds its store: read whole the first time."""
        have = _HOLD.get(self._key)
        if have is None:
            return None
        with _LOCK:
            values = _HELD.get((self._key, self.name))
            if values is None:
                values = _HELD[(self._key, self.name)] = self._read(have, None)
        return have, values

    def _read(self, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Rows from the shard files, counted (:func:`rows_read`, :func:`read_seconds`)."""
        t0 = time.perf_counter()
        _READ[self._counted] += len(rows)
        out = self._gather(rows, out)
        _READ_SECONDS[0] += time.perf_counter() - t0
        return out

    def _gather(self, rows: np.ndarray, out: np.ndarray | None) -> np.ndarray:
        """Rows that share a chunk are gathered together."""
        if out is None:
            out = np.empty((len(rows), *self.row_shape), dtype=self.dtype)
        cr = self.layout.chunk_rows
        chunk_of = rows // cr
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        bounds = np.flatnonzero(np.diff(sorted_chunks)) + 1
        for sel in np.split(order, bounds):
            if len(sel):
                chunk = self._chunk(int(chunk_of[sel[0]]))
                local = rows[sel] - chunk_of[sel[0]] * cr
                if _is_run(sel) and _is_run(local):  # a run of rows into a run of outputs: one block copy
                    out[sel[0]:sel[0] + len(sel)] = chunk[local[0]:local[0] + len(sel)]
                else:
                    out[sel] = chunk[local]
        return out

    def nbytes(self, n_rows: int) -> int:
        return n_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize


def _is_run(a: np.ndarray) -> bool:
    """Is ``a`` consecutive integers (k, k+1, ...)?"""
    return int(a[-1]) - int(a[0]) == len(a) - 1 and (len(a) < 3 or bool((np.diff(a) == 1).all()))


def block_shuffled_order(rows: np.ndarray, chunk_rows: int, buffer_chunks: int, rng: np.random.Generator) -> np.ndarray:
    """An epoch order that visits whole chunks, in random chunk order, shuffled within a buffer.

    Positions (indices into ``rows``) are returned. Reading chunk by chunk keeps reads
    sequential on cold storage; shuffling inside a buffer of several chunks keeps batches
    mixed. With ``buffer_chunks`` >= the number of chunks this is a full shuffle.
    """
    rows = np.asarray(rows)
    chunk_of = rows // chunk_rows
    uniq, inverse = np.unique(chunk_of, return_inverse=True)
    perm = rng.permutation(len(uniq))
    rank = np.empty_like(perm)
    rank[perm] = np.arange(len(perm))
    order = np.argsort(rank[inverse], kind="stable")
    block = np.maximum(1, buffer_chunks) * chunk_rows
    for s in range(0, len(order), block):
        rng.shuffle(order[s : s + block])
    return order


def available_ram() -> int:
    """Bytes the kernel says can be allocated without swapping."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def store_path_for(path: str | Path) -> Store:
    return Store.open(path)
