"""A store's manifest: which rows are committed, under which content keys; and its failures.

``manifest/part-<shard>-<group>.parquet`` is one file per committed shard (content key,
view -> row). It is written last, whole and only if absent: it IS the commit (see
:meth:`cache.store.Store.commit`). ``failures/<run>.parquet`` lists the items a run could
not embed, with the reason. Hidden temporary files are never read (leading dot).
"""
from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cache.paths import repair_command
from cache.storage import Storage, StoreError

PART_RE = re.compile(r"^part-(\d{6})-([0-9a-f]{16})\.parquet$")
MANIFEST = "manifest"
FAILURES = "failures"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("view", pa.int16()),
        ("row", pa.int64()),
        ("shard", pa.int32()),
        ("source", pa.string()),
        ("dataset", pa.string()),
        ("status", pa.string()),
    ]
)
FAILURE_SCHEMA = pa.schema(
    [
        ("item", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("dataset", pa.string()),
        ("reason", pa.string()),
        ("run", pa.string()),
    ]
)


class UnreadablePart(StoreError):
    """A manifest part that cannot be read; ``reason`` is the reader's complaint."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


def part_key(shard: int, group: str) -> str:
    return f"{MANIFEST}/part-{shard:06d}-{group}.parquet"


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def read_parquet(data: bytes, schema: pa.Schema) -> pa.Table:
    return pq.read_table(pa.BufferReader(data), schema=schema)


class Manifest:
    """The committed rows of one store and its failure records."""

    def __init__(self, storage: Storage):
        self.storage = storage

    def parts(self) -> list[tuple[int, str, Path]]:
        """Committed shards as (shard, group id, part path), in shard order."""
        out = []
        for name in self.storage.names(MANIFEST):
            m = PART_RE.match(name)
            if m:
                out.append((int(m[1]), m[2], self.storage.local(f"{MANIFEST}/{name}")))
        return sorted(out)

    def read_part(self, path: Path) -> pa.Table:
        """One manifest part; an unreadable one stops with the command that moves it aside."""
        try:
            return read_parquet(self.storage.read(f"{MANIFEST}/{Path(path).name}"), MANIFEST_SCHEMA)
        except (OSError, pa.ArrowException) as e:
            reason = f"{type(e).__name__}: {e}"
            where = self.storage.where
            raise UnreadablePart(f"store {where}: manifest part {Path(path).name} is unreadable ({reason}). "
                                 f"Run `{repair_command(where)}` to move it aside; the next `pipe embed` then "
                                 "re-embeds its items.", reason) from None

    def table(self) -> pa.Table:
        """Every committed row."""
        parts = self.parts()
        if not parts:
            return MANIFEST_SCHEMA.empty_table()
        return pa.concat_tables([self.read_part(p) for _, _, p in parts])

    def commit(self, shard: int, group: str, table: pa.Table) -> bool:
        """Write one shard's part, only if no part of that name exists (False then)."""
        return self.storage.create(part_key(shard, group), parquet_bytes(table))

    def failures(self) -> pa.Table:
        names = sorted(n for n in self.storage.names(FAILURES) if n.endswith(".parquet") and not n.startswith("."))
        if not names:
            return FAILURE_SCHEMA.empty_table()
        return pa.concat_tables([read_parquet(self.storage.read(f"{FAILURES}/{n}"), FAILURE_SCHEMA) for n in names])

    def record_failures(self, rows: list[dict], run: str) -> None:
        if rows:
            self.storage.write(f"{FAILURES}/{run}.parquet", parquet_bytes(pa.Table.from_pylist(rows, schema=FAILURE_SCHEMA)))
