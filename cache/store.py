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
    .lock                     flock() taken only to take, renew, release or commit a claim

Rows that no manifest part names are padding or belong to an interrupted write; readers
must go through the manifest. Each shard file is written by exactly one claimant,
streamed chunk by chunk in the bytes zarr-python itself writes (cache/shards.py), under
a hidden temp name that is renamed into place when the shard is complete.
"""
from __future__ import annotations

import contextlib
import enum
import errno
import importlib.metadata as md
import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec
from zarr.storage import MemoryStore

from core.atomic import atomic_write_bytes, write_parquet_atomic
from core.locks import locked, shared_lock
from core.processes import Identity, me
from cache.claims import judge, lease_seconds, new_record, owns, renewed
from cache.keys import FORMAT_VERSION
from cache.marker import ensure_marker
from cache.paths import portable, repair_command, root_of_store
from cache.shards import PARTIAL, ShardLayout, ShardWriter, publish
from core.errors import PipeError

ZARR_DIR = "embeddings.zarr"
IN_USE = ".inuse"  # a writer holds a shared flock on it: `pipe cache gc`/`rm` leave the store alone
QUARANTINE = "quarantine"  # manifest parts that could not be read, moved aside by `verify --repair`
# Zarr v3 dimension names (xarray opens the group by them): the row axis is shared by every array
DIMENSION_NAMES = {"tokens": ("row", "token", "dim"), "pooled": ("row", "dim"), "length": ("row",)}
PART_RE = re.compile(r"^part-(\d{6})-([0-9a-f]{16})\.parquet$")
CLAIM_RE = re.compile(r"^(\d{6})-([0-9a-f]{16})\.json$")

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


class StoreError(PipeError):
    """A store that cannot be used as asked; the message says what to do."""


class ClaimLost(StoreError):
    """A claim that another writer took over after its lease lapsed: this writer's work on it is void."""


class UnreadablePart(StoreError):
    """A manifest part that cannot be read; ``reason`` is the reader's complaint."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ShardData:
    """What one shard write carries: N rows of every array plus their manifest fields."""

    keys: list[str]
    views: list[int]
    sources: list[str]
    arrays: dict[str, np.ndarray]  # name -> [N, ...]


class ClaimState(enum.Enum):
    """What :meth:`Store.claim` found for a group of work."""

    TAKEN = "taken"   # this process now owns the shard: write it, then commit or release
    DONE = "done"     # another run committed this group already
    BUSY = "busy"     # a live process is writing this group now


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    shard: int = -1
    group: str = ""
    path: Path | None = None
    writer: str = ""   # who took it (Identity.writer) and the claim's own token: what ownership means
    token: str = ""


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


def _unborn(path: Path) -> bool:
    """Is the store at ``path`` still to be created: no group metadata, or (left by an older
    version killed while creating it) a group without attributes and with nothing committed?"""
    meta = path / ZARR_DIR / "zarr.json"
    if not meta.exists():
        return True
    try:
        empty = json.loads(meta.read_text()).get("attributes") == {}
    except (OSError, ValueError, AttributeError):
        return False
    return empty and not any(PART_RE.match(p.name) for p in (path / "manifest").iterdir())


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


class Store:
    """A store directory. Open with :meth:`open` (read) or :meth:`create` (write)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.zpath = self.path / ZARR_DIR
        self.group = zarr.open_group(str(self.zpath), mode="r")
        self.attrs = dict(self.group.attrs)
        self._finished: set[Claim] = set()  # claims this object committed or released: nothing to renew

    # -- opening -----------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Store":
        path = Path(path)
        if not (path / ZARR_DIR / "zarr.json").exists():
            raise StoreError(f"{path} is not an embedding store (no {ZARR_DIR}/zarr.json). List stores with `pipe cache ls`.")
        store = cls(path)
        if store.attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(
                f"{path} has cache format {store.attrs.get('format_version')}, this version reads {FORMAT_VERSION}. "
                "Re-run `pipe embed` to build a current store."
            )
        return store

    @classmethod
    def create(cls, root: Path, modality: str, name: str, fingerprint: str, spec: dict,
               shard_rows: int, chunk_rows: int) -> "Store":
        """Open the store for this fingerprint, creating it if it does not exist yet."""
        path = Path(root) / "stores" / modality / store_dirname(name, fingerprint)
        try:
            ensure_marker(root)  # the cache is ours: `pipe cache gc`/`rm`/`verify --repair` require the marker
            path.mkdir(parents=True, exist_ok=True)
            for sub in ("manifest", "claims", "failures"):
                (path / sub).mkdir(exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the cache store {path}: {e.strerror}. "
                             "Choose a writable cache with --cache DIR or $PIPE_CACHE.") from e
        with locked(path / ".lock"):
            if _unborn(path):  # written whole, so a kill leaves no group without attributes
                (path / ZARR_DIR).mkdir(exist_ok=True)
                atomic_write_bytes(path / ZARR_DIR / "zarr.json", group_metadata({
                    "format_version": FORMAT_VERSION, "modality": modality, "encoder": name,
                    "fingerprint": fingerprint, "spec": spec, "shard_rows": shard_rows,
                    "chunk_rows": chunk_rows, "versions": library_versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                }))
        store = cls.open(path)
        if store.attrs["fingerprint"] != fingerprint:
            raise StoreError(f"{path} holds fingerprint {store.attrs['fingerprint']}, expected {fingerprint}; "
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

    @property
    def array_names(self) -> list[str]:
        """The arrays with metadata on disk (see :meth:`expected_arrays` for those there should be)."""
        return sorted(p.parent.name for p in self.zpath.glob("*/zarr.json"))

    def expected_arrays(self) -> dict[str, dict]:
        """Row shape, dtype and dimension names of every array, as the attributes record them.

        Stores written before these were recorded describe the arrays they have, from their
        own metadata.
        """
        recorded = self.attrs.get("arrays")
        if recorded is None:
            recorded = dict(zarr.open_group(str(self.zpath), mode="r").attrs).get("arrays")
        if recorded is not None:
            return recorded
        arrays = {name: self.array(name) for name in self.array_names}
        out = array_entries({n: np.zeros((0, *a.shape[1:]), a.dtype) for n, a in arrays.items()})
        for name, a in arrays.items():  # names an older version wrote win over the ones we would give
            if a.metadata.dimension_names:
                out[name]["dimension_names"] = list(a.metadata.dimension_names)
        return out

    def array(self, name: str):
        return zarr.open_array(str(self.zpath / name), mode="r")

    def layout(self, name: str) -> ShardLayout:
        """The byte layout of an array, from its metadata, checked against the store's attributes."""
        try:
            lay = ShardLayout.from_zarr(self.array(name), self.zpath / name)
        except FileNotFoundError:
            raise StoreError(f"store {self.path}: array {name} has no metadata ({ZARR_DIR}/{name}/zarr.json is "
                             f"missing). Run `{repair_command(self.path)}` to rebuild it.") from None
        entry = self.expected_arrays().get(name)
        if entry is not None:
            want = (tuple(entry["row_shape"]), np.dtype(entry["dtype"]), self.shard_rows, int(self.attrs["chunk_rows"]))
            have = (lay.row_shape, lay.dtype, lay.shard_rows, lay.chunk_rows)
            if have != want:
                raise StoreError(f"store {self.path}: array {name}'s metadata says rows {have[0]} {have[1]} in shards of "
                                 f"{have[2]} and chunks of {have[3]}, the store's attributes say {want[0]} {want[1]}, "
                                 f"{want[2]} and {want[3]}. Run `{repair_command(self.path)}` to rewrite it.")
        return lay

    # -- manifest ------------------------------------------------------------------------
    def parts(self) -> list[tuple[int, str, Path]]:
        """Committed shards as (shard, group id, part path), in shard order."""
        out = []
        for p in (self.path / "manifest").iterdir():
            m = PART_RE.match(p.name)
            if m:
                out.append((int(m[1]), m[2], p))
        return sorted(out)

    def read_part(self, path: Path) -> pa.Table:
        """One manifest part; an unreadable one stops with the command that moves it aside."""
        try:
            return pq.read_table(path, schema=MANIFEST_SCHEMA)
        except (OSError, pa.ArrowException) as e:
            reason = f"{type(e).__name__}: {e}"
            raise UnreadablePart(f"store {self.path}: manifest part {path.name} is unreadable ({reason}). "
                                 f"Run `{repair_command(self.path)}` to move it aside; the next `pipe embed` then "
                                 "re-embeds its items.", reason) from None

    def manifest(self) -> pa.Table:
        """Every committed row. Hidden temp files are never read (leading dot)."""
        parts = self.parts()
        if not parts:
            return MANIFEST_SCHEMA.empty_table()
        return pa.concat_tables([self.read_part(p) for _, _, p in parts])

    def committed_units(self) -> set[tuple[str, int]]:
        t = self.manifest()
        return set(zip(t.column("key").to_pylist(), t.column("view").to_pylist()))

    def row_index(self) -> dict[tuple[str, int], int]:
        t = self.manifest()
        return dict(zip(zip(t.column("key").to_pylist(), t.column("view").to_pylist()), t.column("row").to_pylist()))

    def failures(self) -> pa.Table:
        files = sorted(p for p in (self.path / "failures").glob("*.parquet") if not p.name.startswith("."))
        if not files:
            return FAILURE_SCHEMA.empty_table()
        return pa.concat_tables([pq.read_table(p, schema=FAILURE_SCHEMA) for p in files])

    def record_failures(self, rows: list[dict], run: str) -> None:
        if rows:
            table = pa.Table.from_pylist([{**r, "source": self.portable(r.get("source")), "run": run} for r in rows],
                                         schema=FAILURE_SCHEMA)
            write_parquet_atomic(table, self.path / "failures" / f"{run}.parquet")

    # -- claims --------------------------------------------------------------------------
    def claims(self) -> list[tuple[int, str, dict]]:
        out = []
        for p in (self.path / "claims").iterdir():
            m = CLAIM_RE.match(p.name)
            if m:
                with contextlib.suppress(OSError, ValueError):
                    out.append((int(m[1]), m[2], json.loads(p.read_text())))
        return sorted(out, key=lambda c: c[0])

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
        lease_s, who = lease_seconds(lease_s), who or me()
        with locked(self.path / ".lock"):
            parts = self.parts()
            if any(g == group for _, g, _ in parts):
                return Claim(ClaimState.DONE, group=group)
            committed = {s for s, _, _ in parts}
            claims = []
            for s, g, info in self.claims():
                if s in committed:  # killed between commit and release: the claim is stale
                    (self.path / "claims" / f"{s:06d}-{g}.json").unlink(missing_ok=True)
                else:
                    claims.append((s, g, info, judge(info, now, who).live))
            shard = None
            for s, g, _, live in claims:
                if g == group:
                    if live:
                        return Claim(ClaimState.BUSY, group=group)
                    shard = s  # an interrupted write of this very group: redo it in place
            if shard is None:
                taken = committed | {s for s, _, _, live in claims if live}
                shard = next(i for i in range(len(taken) + 1) if i not in taken)
            for s, g, _, _ in claims:
                if s == shard:
                    (self.path / "claims" / f"{s:06d}-{g}.json").unlink(missing_ok=True)
            path = self.path / "claims" / f"{shard:06d}-{group}.json"
            token = secrets.token_hex(8)
            atomic_write_bytes(path, json.dumps(new_record(group, shard, run, token, lease_s, now, who)).encode())
        self.clear_shard(shard)
        return Claim(ClaimState.TAKEN, shard, group, path, who.writer, token)

    def _own(self, claim: Claim) -> dict | None:
        """The claim's record if it is still ``claim``'s own (call under the lock), else None."""
        try:
            info = json.loads(claim.path.read_text())
        except FileNotFoundError:
            return None
        except ValueError:  # not ours: we only ever write whole records
            return None
        return info if owns(info, claim.writer, claim.token) else None

    def renew(self, claim: Claim, lease_s: float | None = None, now: float | None = None) -> bool:
        """Extend the claim's lease; False (and nothing written) if another writer has taken it
        over. (True, and nothing written, once this store committed or released it.)"""
        with locked(self.path / ".lock"):
            if claim in self._finished:
                return True
            info = self._own(claim)
            if info is None:
                return False
            atomic_write_bytes(claim.path, json.dumps(renewed(info, lease_seconds(lease_s), now)).encode())
            return True

    def release(self, claim: Claim) -> None:
        """Give a claim up (its shard was not written); a claim another writer took over is left to it."""
        with locked(self.path / ".lock"):
            if self._own(claim) is not None:
                claim.path.unlink(missing_ok=True)
                self._finished.add(claim)

    def _shard_entries(self, shard: int) -> list[Path]:
        """What one shard occupies in every array: ``c/<shard>`` (a folder, or for a 1-D array
        the file itself) and writers' temporary files beside it (``c/.<shard>.partial-<pid>``)."""
        out = []
        for cdir in self.zpath.glob("*/c"):
            c = cdir / str(shard)
            if c.exists():
                out.append(c)
            out += [p for p in cdir.glob(f".{shard}.partial-*") if PARTIAL.match(p.name)]
        return out

    def shard_files(self, shard: int) -> list[Path]:
        """Everything on disk for one shard of every array: its files, and writers' temporary files."""
        out = []
        for e in self._shard_entries(shard):
            out += [p for p in e.rglob("*") if not p.is_dir()] if e.is_dir() else [e]
        return out

    def clear_shard(self, shard: int) -> None:
        """Remove whatever an interrupted writer (or a dropped commit) left in this shard's files.

        A writer whose claim was taken over may still create its temporary file here
        meanwhile (it is never committed, and its name is its own): the removal tries again.
        """
        for e in self._shard_entries(shard):
            for attempt in range(3):
                try:
                    shutil.rmtree(e) if e.is_dir() else e.unlink(missing_ok=True)
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if err.errno != errno.ENOTEMPTY or attempt == 2:
                        raise

    @contextlib.contextmanager
    def in_use(self) -> Iterator["Store"]:
        """Mark the store as being written for the block (``pipe cache gc`` and ``rm`` skip it)."""
        with shared_lock(self.path / IN_USE):
            yield self

    def portable(self, source: str | None) -> str | None:
        """A source path as the store records it: relative to the cache root when inside it."""
        root = root_of_store(self.path)
        return portable(source, root) if source and root is not None else source

    # -- writing -------------------------------------------------------------------------
    def _ensure_arrays(self, arrays: dict[str, np.ndarray], rows_needed: int) -> None:
        """Create the arrays on first use (recording them in the attributes) and grow them to ``rows_needed``."""
        with locked(self.path / ".lock"):
            g = zarr.open_group(str(self.zpath), mode="r+")
            recorded = dict(g.attrs).get("arrays") or self.expected_arrays()
            have = set(self.array_names)
            entries = array_entries(arrays)
            for name, entry in entries.items():
                if name in have:
                    continue
                if name in recorded and self.parts():
                    raise StoreError(f"store {self.path}: array {name} has no metadata ({ZARR_DIR}/{name}/zarr.json is "
                                     f"missing) but the store holds committed rows. Run "
                                     f"`{repair_command(self.path)}`, then `pipe embed` again.")
                g.create_array(name, **create_kwargs(recorded.get(name, entry), self.shard_rows,
                                                     int(self.attrs["chunk_rows"]), 0))
            merged = {**entries, **recorded}
            attrs = dict(g.attrs)
            if attrs.get("arrays") != merged:  # the group's metadata rewritten whole, never in place
                attrs["arrays"] = merged
                atomic_write_bytes(self.zpath / "zarr.json", group_metadata(attrs))
            self.attrs = attrs
            for name, arr in arrays.items():
                self._grow(name, arr, rows_needed)

    def _grow(self, name: str, arr: np.ndarray, rows_needed: int) -> None:
        z = zarr.open_array(str(self.zpath / name), mode="r+")
        if tuple(z.shape[1:]) != tuple(arr.shape[1:]) or np.dtype(z.dtype) != arr.dtype:
            raise StoreError(f"{self.path}/{name} holds rows of {z.shape[1:]} {z.dtype}, "
                             f"got {arr.shape[1:]} {arr.dtype}; the fingerprint should have differed. "
                             "Remove the store and re-run `pipe embed`.")
        if z.shape[0] < rows_needed:
            z.resize((rows_needed, *z.shape[1:]))

    def shard_sink(self, shard: int, fsync: bool = True) -> "ShardSink":
        """Stream rows into one claimed shard; see :class:`ShardSink`."""
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
        """Publish a written shard: under the lock, and only while the claim is still ours,
        move its finished files (``files``: temporary name, final name) into place, write
        its manifest part (the commit) and drop the claim.

        A claim that another writer took over (our lease lapsed) raises :class:`ClaimLost`
        and changes nothing: the new owner's files and claim are left alone.
        """
        n, start = len(keys), claim.shard * self.shard_rows
        table = pa.Table.from_pydict({
            "key": keys, "view": views, "row": list(range(start, start + n)),
            "shard": [claim.shard] * n, "source": [self.portable(s) for s in sources], "dataset": [dataset] * n,
            "status": ["ok"] * n,
        }, schema=MANIFEST_SCHEMA)
        with locked(self.path / ".lock"):
            if self._own(claim) is None:
                raise ClaimLost(f"store {self.path}: shard {claim.shard} was taken over by another writer after "
                                "this one's lease lapsed; its work is left to that writer")
            for tmp, final in files:
                publish(Path(tmp), Path(final), fsync)
            write_parquet_atomic(table, self.path / "manifest" / f"part-{claim.shard:06d}-{claim.group}.parquet")
            claim.path.unlink(missing_ok=True)
            self._finished.add(claim)


class ShardSink:
    """One shard's rows, streamed into every array's shard file as batches arrive.

    The first batch fixes the arrays (names, row shapes, dtypes). Each array's file is
    written under a hidden temp name and renamed into place by :meth:`close`; nothing
    is visible to readers before :meth:`Store.commit`. :meth:`abort` drops it all.
    """

    def __init__(self, store: Store, shard: int, fsync: bool = True):
        self.store, self.shard, self.fsync = store, shard, fsync
        self.writers: dict[str, ShardWriter] = {}
        self.rows = 0

    def append(self, arrays: dict[str, np.ndarray]) -> None:
        sizes = {len(a) for a in arrays.values()}
        if len(sizes) != 1:
            raise ValueError(f"arrays of one batch must have the same number of rows, got {sorted(sizes)}")
        if not self.writers:
            self.store._ensure_arrays(arrays, (self.shard + 1) * self.store.shard_rows)
            self.writers = {n: ShardWriter(self.store.layout(n), self.shard, self.fsync) for n in arrays}
        elif arrays.keys() != self.writers.keys():
            raise ValueError(f"this shard holds arrays {sorted(self.writers)}, got {sorted(arrays)}")
        for name, a in arrays.items():
            self.writers[name].append(a)
        self.rows += sizes.pop()

    def finish(self) -> list[tuple[Path, Path]]:
        """Complete every array's file under its temporary name; returns (temporary, final) pairs
        for :meth:`Store.commit` to move into place."""
        return [(w.finish(), w.path) for w in self.writers.values()]

    def close(self) -> None:
        for w in self.writers.values():
            w.close()

    def abort(self) -> None:
        for w in self.writers.values():
            w.abort()



def find_stores(root: Path) -> list[Path]:
    """Store directories under a cache root (hidden ones, such as a store being removed, are not)."""
    base = Path(root) / "stores"
    if not base.exists():
        return []
    return sorted(p.parent.parent for p in base.glob(f"*/*/{ZARR_DIR}/zarr.json") if not p.parents[1].name.startswith("."))
