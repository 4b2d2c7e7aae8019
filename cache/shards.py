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
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np

EMPTY = np.uint64(2**64 - 1)
_CRC = 4


class ShardCorruption(ValueError):
    """A shard file whose bytes do not match their checksums."""


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


def read_index(data: memoryview | bytes, n_chunks: int, where: str = "shard") -> np.ndarray:
    """Return the shard index as [n_chunks, 2] uint64 (offset, nbytes), checksum-verified."""
    size = n_chunks * 16
    if len(data) < size + _CRC:
        raise ShardCorruption(f"{where}: file is {len(data)} bytes, too short for its index")
    raw = bytes(data[len(data) - size - _CRC : len(data) - _CRC])
    stored = int.from_bytes(data[len(data) - _CRC :], "little")
    if google_crc32c.value(raw) != stored:
        raise ShardCorruption(f"{where}: the shard index fails its crc32c checksum")
    return np.frombuffer(raw, dtype="<u8").reshape(n_chunks, 2)


class ShardFile:
    """A memory-mapped shard: verified index, zero-copy chunk views."""

    def __init__(self, layout: ShardLayout, shard: int):
        self.layout, self.shard = layout, shard
        self.path = layout.shard_path(shard)
        with open(self.path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self.index = read_index(memoryview(self._mm), layout.chunks_per_shard, str(self.path))

    def has_chunk(self, c: int) -> bool:
        return self.index[c, 0] != EMPTY

    def chunk(self, c: int, verify: bool = False) -> np.ndarray:
        """Rows [c*chunk_rows, (c+1)*chunk_rows) of this shard, as a read-only array."""
        lay = self.layout
        off, nbytes = (int(v) for v in self.index[c])
        if self.index[c, 0] == EMPTY:
            raise ShardCorruption(f"{self.path}: chunk {c} was never written")
        if nbytes != lay.chunk_nbytes + _CRC or off + nbytes > len(self._mm):
            raise ShardCorruption(f"{self.path}: chunk {c} has {nbytes} bytes, expected {lay.chunk_nbytes + _CRC}")
        buf = memoryview(self._mm)[off : off + lay.chunk_nbytes]
        if verify:
            stored = int.from_bytes(self._mm[off + lay.chunk_nbytes : off + nbytes], "little")
            if google_crc32c.value(bytes(buf)) != stored:
                raise ShardCorruption(f"{self.path}: chunk {c} fails its crc32c checksum")
        return np.frombuffer(buf, dtype=lay.dtype.newbyteorder("<")).reshape(lay.chunk_rows, *lay.row_shape)

    def verify(self, chunks: list[int]) -> None:
        for c in chunks:
            self.chunk(c, verify=True)
