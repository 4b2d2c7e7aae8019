"""Direct access to the bytes of Zarr v3 shards, as the sharding spec defines them.

Our arrays use one layout only: a ``sharding_indexed`` codec whose inner chunks are
``bytes`` (little endian) followed by ``crc32c``, with the shard index at the end of the
file (``n_chunks`` pairs of uint64 offset/nbytes, then its own crc32c). Reading that
layout directly lets ``pipe cache verify`` name the exact chunk that is damaged, and lets
the training reader map chunk bytes straight into numpy without a decode pipeline.
"""
from __future__ import annotations

import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

from core.atomic import fsync_path
from core.processes import me
from cache.paths import repair_command
from core.errors import PipeError

EMPTY = np.uint64(2**64 - 1)
_CRC = 4
# a shard file being written: .<name>.partial-<pid>-<writer token> (older versions wrote no token)
PARTIAL = re.compile(r"^\.(.+)\.partial-(\d+)(?:-[0-9a-f]{16})?$")


def partial_of(name: str) -> tuple[str, int] | None:
    """(final file name, writer pid) of a shard writer's temporary file, else None."""
    m = PARTIAL.match(name)
    return (m[1], int(m[2])) if m else None


class ShardCorruption(PipeError, ValueError):
    """Bytes of a store that are missing or do not match their checksums.

    ``detail`` says what is wrong and ``where`` which store, array, shard and chunk; the
    message adds the command that repairs the store.
    """

    def __init__(self, detail: str, layout: "ShardLayout | None" = None, shard: int | None = None,
                 chunk: int | None = None):
        self.detail, self.shard, self.chunk = detail, shard, chunk
        self.store = layout.store_path if layout is not None else None
        self.array = layout.array_dir.name if layout is not None else None
        super().__init__(self._message())

    @property
    def where(self) -> str:
        parts = [f"array {self.array}" if self.array else "",
                 f"shard {self.shard}" if self.shard is not None else "",
                 f"chunk {self.chunk}" if self.chunk is not None else ""]
        return ", ".join(p for p in parts if p)

    def _message(self) -> str:
        if self.store is None:
            return self.detail
        return (f"store {self.store}: {self.where} {self.detail}. Run `{repair_command(self.store)}`, then "
                "`pipe embed` on the datasets it names, to re-embed the damaged items.")


@dataclass(frozen=True)
class ShardLayout:
    """How rows of one array map onto shard files and inner chunks."""

    array_dir: Path
    row_shape: tuple[int, ...]  # shape of one row, e.g. (257, 384) for tokens
    dtype: np.dtype
    shard_rows: int
    chunk_rows: int

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_rows // self.chunk_rows

    @property
    def chunk_nbytes(self) -> int:
        return self.chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def store_path(self) -> Path:
        """The store directory (the array lives in ``<store>/embeddings.zarr/<name>``)."""
        return self.array_dir.parent.parent

    def shard_path(self, shard: int) -> Path:
        # default chunk key encoding with "/" separator: c/<i>/0/0... for the other axes
        return self.array_dir.joinpath("c", str(shard), *(["0"] * len(self.row_shape)))

    @classmethod
    def from_zarr(cls, arr, array_dir: Path) -> "ShardLayout":
        sharding = arr.metadata.codecs[0]
        return cls(
            array_dir=Path(array_dir),
            row_shape=tuple(arr.shape[1:]),
            dtype=np.dtype(arr.dtype),
            shard_rows=arr.metadata.chunk_grid.chunk_shape[0],
            chunk_rows=sharding.chunk_shape[0],
        )


def read_index(data: memoryview | bytes, n_chunks: int, layout: ShardLayout | None = None,
               shard: int | None = None) -> np.ndarray:
    """Return the shard index as [n_chunks, 2] uint64 (offset, nbytes), checksum-verified."""
    size = n_chunks * 16
    if len(data) < size + _CRC:
        raise ShardCorruption(f"is {len(data)} bytes, too short for its index (the file is truncated)", layout, shard)
    raw = bytes(data[len(data) - size - _CRC : len(data) - _CRC])
    stored = int.from_bytes(data[len(data) - _CRC :], "little")
    if google_crc32c.value(raw) != stored:
        raise ShardCorruption("has a shard index that fails its crc32c checksum", layout, shard)
    return np.frombuffer(raw, dtype="<u8").reshape(n_chunks, 2)


class ShardFile:
    """A memory-mapped shard: verified index, checksum-verified zero-copy chunk views.

    Every chunk handed out has passed its crc32c check: callers that keep the views
    (the training reader does) check each chunk once, the first time they map it.
    """

    def __init__(self, layout: ShardLayout, shard: int):
        self.layout, self.shard = layout, shard
        self.path = layout.shard_path(shard)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        except FileNotFoundError:
            raise ShardCorruption(f"is missing its shard file {self.path}", layout, shard) from None
        self.index = read_index(memoryview(self._mm), layout.chunks_per_shard, layout, shard)

    def has_chunk(self, c: int) -> bool:
        return self.index[c, 0] != EMPTY

    def chunk(self, c: int) -> np.ndarray:
        """Rows [c*chunk_rows, (c+1)*chunk_rows) of this shard, as a read-only array, after
        checking the chunk's crc32c (several GB/s: the bytes are read once either way)."""
        lay = self.layout
        if self.index[c, 0] == EMPTY:
            raise ShardCorruption("was never written", lay, self.shard, c)
        off, nbytes = (int(v) for v in self.index[c])
        if nbytes != lay.chunk_nbytes + _CRC or off + nbytes > len(self._mm):
            raise ShardCorruption(f"has {nbytes} bytes at offset {off}, expected {lay.chunk_nbytes + _CRC} "
                                  f"inside the {len(self._mm)}-byte file", lay, self.shard, c)
        data = np.frombuffer(self._mm, dtype=np.uint8, count=lay.chunk_nbytes, offset=off)
        stored = int.from_bytes(self._mm[off + lay.chunk_nbytes : off + nbytes], "little")
        if google_crc32c.value(data) != stored:  # a numpy view: no copy of the chunk
            raise ShardCorruption("fails its crc32c checksum", lay, self.shard, c)
        return data.view(lay.dtype.newbyteorder("<")).reshape(lay.chunk_rows, *lay.row_shape)

    def verify(self, chunks: list[int]) -> None:
        for c in chunks:
            self.chunk(c)


class ShardWriter:
    """Writes one shard file of one array, chunk by chunk as rows arrive.

    The bytes are those zarr-python writes for our layout (each inner chunk, then its
    crc32c; the checksummed index at the end), so plain zarr reads the result. Rows go
    to a hidden ``.partial`` file beside the shard; :meth:`close` adds the index, fsyncs
    and renames it into place, so a shard file is either complete or absent. A partial
    last chunk is padded with zeros (the array's fill value), as zarr pads it.
    """

    def __init__(self, layout: ShardLayout, shard: int, fsync: bool = True):
        self.layout, self.shard, self.fsync = layout, shard, fsync
        self.path = layout.shard_path(shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}-{me().token}")
        self._f = open(self.tmp, "wb")
        self._index = np.full((layout.chunks_per_shard, 2), EMPTY, dtype="<u8")
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        self._chunks = 0
        self._offset = 0
        self.rows = 0
        self._dtype = layout.dtype.newbyteorder("<")

    def append(self, rows: np.ndarray) -> None:
        lay = self.layout
        if tuple(rows.shape[1:]) != lay.row_shape:
            raise ValueError(f"{self.path}: rows of shape {tuple(rows.shape[1:])}, the array holds {lay.row_shape}")
        if np.dtype(rows.dtype) != lay.dtype:  # never cast silently: the fingerprint names the dtype
            raise ValueError(f"{self.path}: rows of dtype {rows.dtype}, the array holds {lay.dtype}")
        if self.rows + len(rows) > lay.shard_rows:
            raise ValueError(f"{self.path}: a shard holds {lay.shard_rows} rows, got {self.rows + len(rows)}")
        self.rows += len(rows)
        self._pending.append(np.asarray(rows, dtype=self._dtype))
        self._pending_rows += len(rows)
        while self._pending_rows >= lay.chunk_rows:
            block = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
            self._write_chunk(block[: lay.chunk_rows])
            rest = block[lay.chunk_rows:]
            self._pending, self._pending_rows = ([rest] if len(rest) else []), len(rest)

    def _write_chunk(self, block: np.ndarray) -> None:
        data = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
        crc = google_crc32c.value(data)  # accepts numpy arrays, not memoryviews
        self._f.write(data)
        self._f.write(crc.to_bytes(_CRC, "little"))
        self._index[self._chunks] = (self._offset, len(data) + _CRC)
        self._offset += len(data) + _CRC
        self._chunks += 1

    def finish(self) -> Path:
        """Complete the temporary file (pad, index, fsync); :meth:`publish` moves it into place."""
        lay = self.layout
        if self._pending_rows:
            block = np.zeros((lay.chunk_rows, *lay.row_shape), self._dtype)
            block[: self._pending_rows] = np.concatenate(self._pending)
            self._write_chunk(block)
            self._pending, self._pending_rows = [], 0
        raw = self._index.reshape(-1).view(np.uint8)
        self._f.write(raw)
        self._f.write(google_crc32c.value(raw).to_bytes(_CRC, "little"))
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        return self.tmp

    def publish(self) -> Path:
        return publish(self.tmp, self.path, self.fsync)

    def close(self) -> Path:
        """Finish the file (pad, index, fsync) and move it into place."""
        self.finish()
        return self.publish()

    def abort(self) -> None:
        """Drop what was written; the shard is left as if never started."""
        if not self._f.closed:
            self._f.close()
        self.tmp.unlink(missing_ok=True)


def publish(tmp: Path, path: Path, fsync: bool = True) -> Path:
    """Move a finished shard file into place (the rename made durable with its directory)."""
    os.replace(tmp, path)
    if fsync:
        fsync_path(path.parent)
    return path
