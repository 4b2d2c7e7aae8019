"""A dataset's index in the cache: which content keys its items have, and which stores hold them.

``<cache>/datasets/<name>/items.parquet`` has one row per item: id, split, patient,
labels, image path and key, report key, and why an item could not be keyed.
``stores.json`` records, per modality and encoder name, the store that the latest
``pipe embed`` of this dataset wrote. Stage two finds its inputs through these two files.

Both are relocatable: store paths, and image and mask paths inside the cache (the demo's
phantoms, masks derived from annotations), are recorded relative to the cache root, and
read back under the root the reader was given (:mod:`cache.paths`). Files written by an
older version held absolute paths; those under the root they were written in (known
from their store entries) are read under the current root instead, never the original.
"""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import pandas as pd
import pyarrow as pa
import xxhash

from core.atomic import atomic_write_bytes, write_parquet_atomic
from core.locks import locked
from cache.files import not_regular_reason
from cache.keys import normalise_report, text_key
from cache.marker import ensure_marker
from cache.paths import localise, portable, store_tail
from core.errors import MissingFileError, PipeError

LABEL_PREFIX = "label."
MASK_PREFIX = "mask."
STORES_FILE = "stores.json"


@dataclass(frozen=True)
class Unit:
    """One thing to embed: a content key, its view, and where to read it."""

    key: str
    view: int
    source: str          # image path, or "item <id>" for reports
    payload: str | None = None  # the normalised report text
    item: str = ""       # the id of the first item with this content (named in a failure)


class Items(Protocol):
    """What the index needs of a dataset (``pipeline.datasets.Dataset`` is one)."""

    name: str
    spec: str
    description: str
    items: Sequence[Any]  # each with id, image, report, patient_id, split, labels, masks


@dataclass
class DatasetIndex:
    name: str
    folder: Path
    table: pd.DataFrame

    @property
    def root(self) -> Path:
        return root_of_index(self.folder)

    # what embed_modality reads of a text-only index (the prompts'; IndexBuilder has the same)
    def text_units(self) -> list:
        return _text_units(self.table.id, self.table.report, self.table.report_key)

    def failures_of(self, modality: str) -> list[dict]:
        return []  # a built table: its unkeyable items were reported when it was built

    def record_store(self, modality: str, encoder: str, store: str) -> None:
        """Nothing: a built table (the zero-shot prompts) is embedded into a dataset's store,
        not recorded as a dataset of its own (``datasets/`` holds the real ones)."""


def _text_units(ids, reports, keys) -> list:
    """One unit per distinct report key, in order of first appearance (items without a key skipped)."""
    seen: set[str] = set()
    units = []
    for i, report, key in zip(ids, reports, keys):
        if isinstance(key, str) and key not in seen:
            seen.add(key)
            units.append(Unit(key, 0, f"item {i}", report, str(i)))
    return units


def index_folder(root: Path, name: str) -> Path:
    return Path(root) / "datasets" / name


def root_of_index(folder: Path) -> Path:
    """The cache root of ``<root>/datasets/<name>``."""
    return Path(folder).parent.parent


class IndexBuilder:
    """A dataset's index as ``pipe embed`` builds it: report keys at once, image keys streamed.

    Image files are hashed in table order by background threads, at most ``ahead`` items
    past the last item asked for. So the first shard starts once its own files are keyed,
    not the whole dataset's, and each file is hashed shortly before the decoder reads it
    again (from the page cache, on a dataset larger than memory). Files whose size and
    mtime match the previous index keep their key without being read.

    Only the modalities being embedded report failures: a dataset without reports is fine
    for an image-only run. :meth:`finish` waits for every key and writes ``items.parquet``.
    """

    def __init__(self, ds: Items, root: Path, modalities: tuple[str, ...] = ("image", "text"),
                 threads: int = 4, ahead: int = 2048):
        self.ds, self.modalities = ds, modalities
        self.root = Path(root)
        self.folder = index_folder(root, ds.name)
        ensure_marker(self.root)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.reports = [normalise_report(it.report) for it in ds.items]
        self._report_keys = [text_key(r) if r else None for r in self.reports]
        self._hasher = _Hasher([it.image for it in ds.items], _previous_keys(self.folder), threads, ahead)

    def __len__(self) -> int:
        return len(self.ds.items)

    def image_units(self, views: int = 0) -> Iterator:
        """(key, view) units of each distinct image, in order of first appearance, as keys arrive."""
        seen: set[str] = set()
        for i, it in enumerate(self.ds.items):
            key = self._hasher.get(i)[0]
            if key is not None and key not in seen:
                seen.add(key)
                yield from (Unit(key, v, str(it.image), item=str(it.id)) for v in range(views + 1))

    def text_units(self) -> list:
        return _text_units([it.id for it in self.ds.items], self.reports, self._report_keys)

    def failures_of(self, modality: str | None = None) -> list[dict]:
        """Items that cannot be keyed: missing or unreadable files, empty reports (waits for all keys)."""
        out = []
        wanted = [m for m in ("image", "text") if m in self.modalities and modality in (None, m)]
        for i, (it, report) in enumerate(zip(self.ds.items, self.reports)):
            error = self._hasher.get(i)[3] if "image" in wanted else None
            if error:
                out.append({"item": it.id, "source": str(it.image), "key": None, "dataset": self.ds.name,
                            "reason": error, "modality": "image"})
            if not report and "text" in wanted:
                out.append({"item": it.id, "source": f"item {it.id}", "key": None, "dataset": self.ds.name,
                            "reason": "empty report: the report text is missing or blank; fill it in "
                                      "or drop the row", "modality": "text"})
        return out

    def record_store(self, modality: str, encoder: str, store: str) -> None:
        record_store(self.folder, modality, encoder, store)

    def finish(self) -> None:
        """Wait for every image key, then write the index atomically."""
        rows = []
        for i, (it, report, rkey) in enumerate(zip(self.ds.items, self.reports, self._report_keys)):
            key, size, mtime, _ = self._hasher.get(i)
            rows.append({
                "id": it.id, "split": it.split, "patient_id": it.patient_id, "image": portable(it.image, self.root),
                "image_key": key, "image_size": size, "image_mtime_ns": mtime,
                "report": report or None, "report_key": rkey,
                **{LABEL_PREFIX + k: v for k, v in it.labels.items()},
                **{MASK_PREFIX + k: portable(v, self.root) for k, v in it.masks.items()},
            })
        table = pd.DataFrame(rows)
        write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), self.folder / "items.parquet")
        meta = {"name": self.ds.name, "spec": self.ds.spec, "description": self.ds.description, "items": len(rows),
                "split_rule": getattr(self.ds, "split_rule", None), "version": getattr(self.ds, "version", None),
                "split_source": getattr(self.ds, "split_source", None),
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        atomic_write_bytes(self.folder / "dataset.json", json.dumps(meta, indent=1).encode())

    def close(self) -> None:
        self._hasher.close()


class _Hasher:
    """Keys files in list order on a few threads, running at most ``ahead`` past the last one asked for."""

    def __init__(self, paths: list[Path], previous: dict, threads: int, ahead: int):
        self.paths, self.previous, self.ahead = paths, previous, ahead
        self.out: list[tuple | None] = [None] * len(paths)
        self.cond = threading.Condition()
        self.next, self.wanted, self.stopped = 0, -1, False
        self.threads = [threading.Thread(target=self._work, name="hash", daemon=True)
                        for _ in range(min(threads, len(paths)))]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        buf = memoryview(bytearray(1 << 20))
        while True:
            with self.cond:
                while not self.stopped and self.next < len(self.paths) and self.next > self.wanted + self.ahead:
                    self.cond.wait()
                if self.stopped or self.next >= len(self.paths):
                    return
                i, self.next = self.next, self.next + 1
            try:
                result = _image_key(self.paths[i], self.previous, buf)
            except BaseException as e:  # handed to whoever asks for this item
                result = e
            with self.cond:
                self.out[i] = result
                self.cond.notify_all()

    def get(self, i: int) -> tuple:
        with self.cond:
            if i > self.wanted:
                self.wanted = i
                self.cond.notify_all()
            while self.out[i] is None:
                if self.stopped:
                    raise RuntimeError("the index builder was closed")
                self.cond.wait()
            result = self.out[i]
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        for t in self.threads:
            t.join()


def load_index(root: Path, name: str) -> DatasetIndex:
    """A dataset's index, with its image and mask paths as paths under ``root``."""
    folder = index_folder(root, name)
    if not (folder / "items.parquet").exists():
        raise MissingFileError(f"dataset {name!r} has not been embedded into {root} yet; run `pipe embed` on it")
    table = pd.read_parquet(folder / "items.parquet")
    old = legacy_root(folder)
    for col in [c for c in table.columns if c == "image" or c.startswith(MASK_PREFIX)]:
        table[col] = [localise(p, Path(root), old) if isinstance(p, str) else p for p in table[col]]
    return DatasetIndex(name, folder, table)


def _previous_keys(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Keys of the last index by image path (under the current root), to reuse for unchanged files."""
    path = folder / "items.parquet"
    if not path.exists():
        return {}
    root, old = root_of_index(folder), legacy_root(folder)
    with contextlib.suppress(Exception):
        t = pd.read_parquet(path, columns=["image", "image_size", "image_mtime_ns", "image_key"]).dropna()
        return {localise(p, root, old): (int(s), int(m), k)
                for p, s, m, k in zip(t.image, t.image_size, t.image_mtime_ns, t.image_key)}
    return {}


def _image_key(path: Path, previous: dict, buf: memoryview) -> tuple:
    """(key, size, mtime_ns, error) of one file; unchanged files (size, mtime) keep their key."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None, None, (f"file not found: {path}. Fix the path in the table (paths are relative "
                                  "to the table's folder) or remove the row")
    except OSError as e:
        return None, None, None, f"cannot read {path}: {e.strerror}"
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block and /dev/zero never end: only regular files are read
        return None, None, None, _not_regular(path, st.st_mode)
    prev = previous.get(str(path))
    if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
        return prev[2], st.st_size, st.st_mtime_ns, None
    h = xxhash.xxh3_128()  # streamed: the same digest as hashing the whole file at once
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # never blocks, whatever replaced the file since the stat
        with open(fd, "rb", buffering=0) as f:
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                return None, None, None, _not_regular(path, mode)
            os.set_blocking(f.fileno(), True)
            while (n := f.readinto(buf)) > 0:
                h.update(buf[:n])
    except OSError as e:
        return None, None, None, f"cannot read {path}: {e.strerror}"
    return h.hexdigest(), st.st_size, st.st_mtime_ns, None


def _not_regular(path: Path, mode: int) -> str:
    return f"{path} is {not_regular_reason(mode)}. Fix the path in the table or remove the row"


def read_stores(folder: Path) -> dict:
    """``stores.json`` as recorded: {modality: {encoder: {"store": path, "updated": time}}}."""
    path = Path(folder) / STORES_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_store(folder: Path, modality: str, encoder: str, store: str) -> None:
    """Remember which store holds this dataset's embeddings for an encoder (under a lock).

    The path is recorded relative to the cache root, so a copied or moved cache reads
    its own stores. (Other entries are left as they are: an older version's absolute
    entries are how :func:`legacy_root` knows where that version's paths pointed.)
    """
    root = root_of_index(folder)
    Path(folder).mkdir(parents=True, exist_ok=True)
    with locked(Path(folder) / ".lock"):
        stores = read_stores(folder)
        stores.setdefault(modality, {})[encoder] = {"store": portable(store, root), "updated": time.time()}
        atomic_write_bytes(Path(folder) / STORES_FILE, json.dumps(stores, indent=1).encode())


def forget_store(folder: Path, store: Path) -> None:
    """Remove a dataset's entries that name ``store`` (it is being deleted), under the index's lock."""
    with locked(Path(folder) / ".lock"):
        stores = read_stores(folder)
        for entries in stores.values():
            for encoder in [e for e, entry in entries.items() if resolve_store(folder, entry["store"]) == Path(store)]:
                del entries[encoder]
        atomic_write_bytes(Path(folder) / STORES_FILE, json.dumps(stores, indent=1).encode())


def legacy_root(folder: Path) -> Path | None:
    """Where a cache lived when an older version wrote this index with absolute store paths
    (``<root>/stores/<modality>/<name>``); None for a relocatable index."""
    for entries in read_stores(folder).values():
        for entry in entries.values():
            p = Path(entry.get("store", ""))
            if p.is_absolute() and store_tail(p) is not None:
                return p.parents[2]
    return None


def resolve_store(folder: Path, recorded: str) -> Path:
    """The store a ``stores.json`` entry names, under the cache root of ``folder``.

    A relative entry is relative to the root. An absolute one (an older version wrote
    those) is read as the store with the same ``stores/<modality>/<name>`` under this
    root: a copied cache never reads its original, and a store that is not in this
    cache is missing, not borrowed from another one.
    """
    root, p = root_of_index(folder), Path(recorded)
    if not p.is_absolute():
        return root / p
    tail = store_tail(p)
    return root / tail if tail is not None else p


def dataset_folders(root: Path) -> list[Path]:
    """Every dataset index folder of a cache (``<root>/datasets/<name>``)."""
    base = Path(root) / "datasets"
    return sorted(p for p in (base.iterdir() if base.is_dir() else []) if p.is_dir())


def store_entries(folder: Path) -> list[tuple[str, str, str, Path]]:
    """(modality, encoder, recorded path, store under this cache) of every ``stores.json`` entry of a dataset."""
    return [(modality, encoder, entry["store"], resolve_store(folder, entry["store"]))
            for modality, entries in read_stores(folder).items() for encoder, entry in entries.items()]


class UnreadableIndexError(PipeError):
    """A dataset's ``stores.json`` that cannot be read: a deleting command stops on it."""


def checked_store_entries(folder: Path) -> list[tuple[str, str, str, Path]]:
    """:func:`store_entries`, but a ``stores.json`` that cannot be read or is not shaped as
    this project writes it (a truncated or hand-edited file) is an :class:`UnreadableIndexError`
    that names the file and the fix, never an empty list: a deleting command must not
    take "cannot read which stores this dataset uses" for "it uses none"."""
    path = Path(folder) / STORES_FILE
    try:
        stores = json.loads(path.read_text()) if path.exists() or path.is_symlink() else {}
        if not isinstance(stores, dict):
            raise ValueError(f"expected an object of modalities, found {type(stores).__name__}")
        for modality, entries in stores.items():
            if not isinstance(entries, dict):
                raise ValueError(f"entry {modality!r} is not an object of encoders")
            for encoder, entry in entries.items():
                if not isinstance(entry, dict) or not isinstance(entry.get("store"), str) or not entry["store"]:
                    raise ValueError(f"entry {modality}.{encoder} has no store path")
        return store_entries(folder)
    except (OSError, ValueError, TypeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        spec = _dataset_spec(folder)
        again = (f"`pipe embed --dataset {shlex.quote(spec)} ...` with its encoders" if spec else
                 "`pipe embed` on that dataset")
        raise UnreadableIndexError(
            f"the dataset index {path} cannot be read ({reason}), so which stores dataset {Path(folder).name!r} "
            f"uses is unknown; nothing was removed. Restore the file from a backup, or delete it (`rm {path}`) and "
            f"run {again} to record its stores again (its embeddings are reused), then run this command again."
        ) from None


def referenced_stores(root: Path, strict: bool = False) -> dict[Path, list[str]]:
    """Every store some dataset index records, with the names of those datasets.

    ``strict`` (what gc and rm use): an unreadable index stops with
    :class:`UnreadableIndexError` instead of being skipped.
    """
    out: dict[Path, list[str]] = {}
    for folder in dataset_folders(root):
        if strict:
            entries = checked_store_entries(folder)
        else:
            entries = []
            with contextlib.suppress(OSError, ValueError, TypeError, KeyError, AttributeError):
                entries = store_entries(folder)
        for _, _, _, store in entries:
            out.setdefault(store, []).append(folder.name)
    return out


def embed_commands(root: Path, stores: list[Path]) -> list[str]:
    """The `pipe embed` commands that complete ``stores`` again: one per dataset that uses them."""
    wanted = {Path(s) for s in stores}
    out = []
    for folder in dataset_folders(root):
        encoders: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            encoders = {modality: encoder for modality, encoder, _, store in store_entries(folder) if store in wanted}
        spec = _dataset_spec(folder)
        if encoders and spec:
            out.append(f"pipe embed --dataset {shlex.quote(spec)} --backbone {encoders.get('image', 'none')} "
                       f"--text-encoder {encoders.get('text', 'none')} --cache {shlex.quote(str(root))}")
    return out


def _dataset_spec(folder: Path) -> str | None:
    with contextlib.suppress(OSError, ValueError):
        return json.loads((Path(folder) / "dataset.json").read_text()).get("spec")
    return None
