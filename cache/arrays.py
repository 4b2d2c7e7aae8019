"""A store's arrays: the Zarr v3 group ``embeddings.zarr`` and its sharded arrays, as metadata and shard files.

The group's attributes hold the encoder config, the fingerprint spec, shard sizes and
library versions, and (``arrays``) each array's row shape, dtype and dimension names.
``tokens/ pooled/ length/`` are sharded Zarr arrays whose rows grow one whole shard at a
time. Every metadata file is written whole, in the bytes zarr-python itself writes, and
never edited in place; shard files are streamed into a local temporary file
(cache/shards.py) and published whole under their final key by the commit.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import MemoryStore

from cache.paths import repair_command
from cache.shards import PARTIAL, ShardLayout, ShardWriter
from cache.storage import Storage, StoreError

ZARR_DIR = "embeddings.zarr"
GROUP_META = f"{ZARR_DIR}/zarr.json"
# Zarr v3 dimension names (xarray opens the group by them): the row axis is shared by every array
DIMENSION_NAMES = {"tokens": ("row", "token", "dim"), "pooled": ("row", "dim"), "length": ("row",),
                   "native": ("row", "native_dim")}


def array_entries(arrays: dict[str, np.ndarray]) -> dict[str, dict]:
    """What the store's attributes record about each array: row shape, dtype, dimension names.

    ``pooled`` shares the ``dim`` axis with ``tokens`` only when their widths agree (xarray
    requires one size per dimension name).
    """
    token_width = arrays["tokens"].shape[-1] if "tokens" in arrays and arrays["tokens"].ndim > 1 else None
    out = {}
    for name, arr in arrays.items():
        row = tuple(int(d) for d in arr.shape[1:])
        dims = list(DIMENSION_NAMES.get(name, ()))
        if len(dims) != len(row) + 1:
            dims = ["row"] + [f"{name}_{i}" for i in range(1, len(row) + 1)]
        elif name != "tokens" and dims[-1] == "dim" and row[-1] != token_width:
            dims[-1] = f"{name}_dim"
        out[name] = {"row_shape": list(row), "dtype": np.dtype(arr.dtype).name, "dimension_names": dims}
    return out


def create_kwargs(entry: dict, shard_rows: int, chunk_rows: int, rows: int) -> dict:
    """The arguments of ``zarr.create_array`` for one of our arrays: the one layout we write."""
    row = tuple(entry["row_shape"])
    return dict(shape=(rows, *row), dtype=entry["dtype"], chunks=(chunk_rows, *row), shards=(shard_rows, *row),
                compressors=[Crc32cCodec()], fill_value=0, dimension_names=tuple(entry["dimension_names"]))


def group_metadata(attributes: dict) -> bytes:
    """The ``zarr.json`` that zarr-python writes for a group with these attributes."""
    files: dict = {}
    zarr.create_group(store=MemoryStore(store_dict=files), zarr_format=3, attributes=attributes)
    return files["zarr.json"].to_bytes()


def array_metadata(entry: dict, shard_rows: int, chunk_rows: int, rows: int) -> bytes:
    """The ``zarr.json`` that zarr-python writes for this array with ``rows`` rows."""
    files: dict = {}
    zarr.create_array(store=MemoryStore(store_dict=files), zarr_format=3,
                      **create_kwargs(entry, shard_rows, chunk_rows, rows))
    return files["zarr.json"].to_bytes()


def array_from_metadata(data: bytes):
    """A read-only zarr array that has only its metadata (``zarr.json`` bytes): shape, dtype, codecs."""
    files = {"zarr.json": _buffer(data)}
    return zarr.open_array(store=MemoryStore(store_dict=files), mode="r", zarr_format=3)


class Arrays:
    """The group metadata, the arrays' metadata and the shard files of one store."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.attrs = json.loads(storage.read(GROUP_META)).get("attributes", {})

    @property
    def shard_rows(self) -> int:
        return int(self.attrs["shard_rows"])

    @property
    def chunk_rows(self) -> int:
        return int(self.attrs["chunk_rows"])

    @property
    def names(self) -> list[str]:
        """The arrays with metadata (see :meth:`expected` for those there should be)."""
        return sorted(n for n in self.storage.names(ZARR_DIR) if self.storage.exists(f"{ZARR_DIR}/{n}/zarr.json"))

    def array(self, name: str):
        return array_from_metadata(self.storage.read(f"{ZARR_DIR}/{name}/zarr.json"))

    def expected(self) -> dict[str, dict]:
        """Row shape, dtype and dimension names of every array, as the attributes record them.

        Stores written before these were recorded describe the arrays they have, from their
        own metadata.
        """
        recorded = self.attrs.get("arrays")
        if recorded is None:
            recorded = json.loads(self.storage.read(GROUP_META)).get("attributes", {}).get("arrays")
        if recorded is not None:
            return recorded
        arrays = {name: self.array(name) for name in self.names}
        out = array_entries({n: np.zeros((0, *a.shape[1:]), a.dtype) for n, a in arrays.items()})
        for name, a in arrays.items():  # names an older version wrote win over the ones we would give
            if a.metadata.dimension_names:
                out[name]["dimension_names"] = list(a.metadata.dimension_names)
        return out

    def layout(self, name: str) -> ShardLayout:
        """The byte layout of an array, from its metadata, checked against the store's attributes."""
        where = self.storage.where
        try:
            lay = ShardLayout.from_zarr(self.array(name), self.storage.local(f"{ZARR_DIR}/{name}"))
        except FileNotFoundError:
            raise StoreError(f"store {where}: array {name} has no metadata ({ZARR_DIR}/{name}/zarr.json is "
                             f"missing). Run `{repair_command(where)}` to rebuild it.") from None
        entry = self.expected().get(name)
        if entry is not None:
            want = (tuple(entry["row_shape"]), np.dtype(entry["dtype"]), self.shard_rows, self.chunk_rows)
            have = (lay.row_shape, lay.dtype, lay.shard_rows, lay.chunk_rows)
            if have != want:
                raise StoreError(f"store {where}: array {name}'s metadata says rows {have[0]} {have[1]} in shards of "
                                 f"{have[2]} and chunks of {have[3]}, the store's attributes say {want[0]} {want[1]}, "
                                 f"{want[2]} and {want[3]}. Run `{repair_command(where)}` to rewrite it.")
        return lay

    def ensure(self, arrays: dict[str, np.ndarray], rows_needed: int, committed: bool) -> None:
        """Create the arrays on first use (recording them in the attributes) and grow them to
        ``rows_needed`` (call under the guard; ``committed``: the store holds committed rows)."""
        attrs = json.loads(self.storage.read(GROUP_META)).get("attributes", {})
        recorded = attrs.get("arrays") or self.expected()
        have = set(self.names)
        entries = array_entries(arrays)
        for name, entry in entries.items():
            if name in have:
                continue
            if name in recorded and committed:
                raise StoreError(f"store {self.storage.where}: array {name} has no metadata ({ZARR_DIR}/{name}/zarr.json "
                                 f"is missing) but the store holds committed rows. Run "
                                 f"`{repair_command(self.storage.where)}`, then `pipe embed` again.")
            self.storage.mkdirs(f"{ZARR_DIR}/{name}")
            self.storage.write(f"{ZARR_DIR}/{name}/zarr.json",
                               array_metadata(recorded.get(name, entry), self.shard_rows, self.chunk_rows, 0))
        merged = {**entries, **recorded}
        if attrs.get("arrays") != merged:  # the group's metadata rewritten whole, never in place
            attrs["arrays"] = merged
            self.storage.write(GROUP_META, group_metadata(attrs))
        self.attrs = attrs
        for name, arr in arrays.items():
            self._grow(name, arr, rows_needed)

    def _grow(self, name: str, arr: np.ndarray, rows_needed: int) -> None:
        z = self.array(name)
        if tuple(z.shape[1:]) != tuple(arr.shape[1:]) or np.dtype(z.dtype) != arr.dtype:
            raise StoreError(f"{self.storage.where}/{name} holds rows of {z.shape[1:]} {z.dtype}, "
                             f"got {arr.shape[1:]} {arr.dtype}; the fingerprint should have differed. "
                             "Remove the store and re-run `pipe embed`.")
        if z.shape[0] < rows_needed:  # zarr itself rewrites the metadata, as a resize on disk would
            files = {"zarr.json": _buffer(self.storage.read(f"{ZARR_DIR}/{name}/zarr.json"))}
            zarr.open_array(store=MemoryStore(store_dict=files), mode="r+", zarr_format=3).resize(
                (rows_needed, *z.shape[1:]))
            self.storage.write(f"{ZARR_DIR}/{name}/zarr.json", files["zarr.json"].to_bytes())

    def shard_entries(self, shard: int) -> list[str]:
        """What one shard occupies in every array: ``c/<shard>`` (a folder, or for a 1-D array
        the file itself) and writers' temporary files beside it (``c/.<shard>.partial-<pid>``)."""
        out = []
        for name in sorted(self.storage.names(ZARR_DIR)):
            folder = f"{ZARR_DIR}/{name}/c"
            for entry in self.storage.names(folder):
                if entry == str(shard) or (entry.startswith(f".{shard}.partial-") and PARTIAL.match(entry)):
                    out.append(f"{folder}/{entry}")
        return sorted(out)

    def shard_files(self, shard: int) -> list[Path]:
        """Everything on disk for one shard of every array: its files, and writers' temporary files."""
        out = []
        for key in self.shard_entries(shard):
            e = self.storage.local(key)
            out += [p for p in e.rglob("*") if not p.is_dir()] if e.is_dir() else [e]
        return out

    def clear_shard(self, shard: int) -> None:
        """Remove whatever an interrupted writer (or a dropped commit) left in this shard's files."""
        for key in self.shard_entries(shard):
            self.storage.remove_tree(key)


def _buffer(data: bytes):
    return zarr.core.buffer.default_buffer_prototype().buffer.from_bytes(data)


class ShardSink:
    """One shard's rows, streamed into every array's shard file as batches arrive.

    The first batch fixes the arrays (names, row shapes, dtypes). Each array's file is
    written under a hidden temp name; nothing is visible to readers before
    :meth:`cache.store.Store.commit` publishes them. :meth:`abort` drops it all.
    """

    def __init__(self, store, shard: int, fsync: bool = True):
        self.store, self.shard, self.fsync = store, shard, fsync
        self.writers: dict[str, ShardWriter] = {}
        self.rows = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays of one batch must have the same number of rows, got {sorted(sizes)}")
        if not self.writers:
            self.store.ensure_arrays(arrays, (self.shard + 1) * self.store.shard_rows)
            self.writers = {n: ShardWriter(self.store.layout(n), self.shard, self.fsync) for n in arrays}
        elif arrays.keys() != self.writers.keys():
            raise ValueError(f"this shard holds arrays {sorted(self.writers)}, got {sorted(arrays)}")
        for name, a in arrays.items():
            self.writers[name].append(a)
        self.rows += sizes.pop()

    def finish(self) -> list[tuple[Path, Path]]:
        """Complete every array's file under its temporary name; returns (temporary, final) pairs
        for :meth:`cache.store.Store.commit` to move into place."""
        return [(w.finish(), w.path) for w in self.writers.values()]

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()
