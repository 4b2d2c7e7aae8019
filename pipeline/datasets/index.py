"""A dataset's index in the cache: which content keys its items have, and which stores hold them.

``<cache>/datasets/<name>/items.parquet`` has one row per item: id, split, patient,
labels, image path and key, report key, and why an item could not be keyed.
``stores.json`` records, per modality and encoder name, the store that the latest
``pipe embed`` of this dataset wrote. Stage two finds its inputs through these two files.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa

import xxhash

from cache.keys import normalise_report, text_key
from cache.store import atomic_write_bytes, write_parquet_atomic
from pipeline.console import progress
from pipeline.datasets.base import Dataset

LABEL_PREFIX = "label."
MASK_PREFIX = "mask."


@dataclass
class DatasetIndex:
    name: str
    folder: Path
    table: pd.DataFrame
    failures: list[dict] = field(default_factory=list)

    def image_units(self, views: int = 0):
        from stages.embed import Unit

        ok = self.table[self.table.image_key.notna()]
        first = ok.drop_duplicates("image_key")
        return [Unit(k, v, src) for k, src in zip(first.image_key, first.image) for v in range(views + 1)]

    def text_units(self):
        from stages.embed import Unit

        ok = self.table[self.table.report_key.notna()].drop_duplicates("report_key")
        return [Unit(k, 0, f"item {i}", txt) for k, i, txt in zip(ok.report_key, ok.id, ok.report)]

    def record_store(self, modality: str, encoder: str, store: str) -> None:
        record_store(self.folder, modality, encoder, store)


def index_folder(root: Path, name: str) -> Path:
    return Path(root) / "datasets" / name


def build_index(ds: Dataset, root: Path, modalities: tuple[str, ...] = ("image", "text")) -> DatasetIndex:
    """Key every item; reuse keys of files whose size and mtime did not change.

    Only the modalities being embedded report failures: a dataset without reports is
    fine for an image-only run.
    """
    folder = index_folder(root, ds.name)
    folder.mkdir(parents=True, exist_ok=True)
    previous = _previous_keys(folder)
    failures: list[dict] = []
    rows = []
    with progress(transient=True) as bar:
        task = bar.add_task(f"hash {ds.name}", total=len(ds.items))
        keys = _image_keys([it.image for it in ds.items], previous, lambda n: bar.advance(task, n))
        for it, (key, size, mtime, error) in zip(ds.items, keys):
            report = normalise_report(it.report)
            if error and "image" in modalities:
                failures.append({"item": it.id, "source": str(it.image), "key": None, "dataset": ds.name,
                                 "reason": error, "modality": "image"})
            if not report and "text" in modalities:
                failures.append({"item": it.id, "source": f"item {it.id}", "key": None, "dataset": ds.name,
                                 "reason": "empty report: the report text is missing or blank; fill it in "
                                           "or drop the row", "modality": "text"})
            rows.append({
                "id": it.id, "split": it.split, "patient_id": it.patient_id, "image": str(it.image),
                "image_key": key, "image_size": size, "image_mtime_ns": mtime,
                "report": report or None, "report_key": text_key(report) if report else None,
                **{LABEL_PREFIX + k: v for k, v in it.labels.items()},
                **{MASK_PREFIX + k: str(v) for k, v in it.masks.items()},
            })
    table = pd.DataFrame(rows)
    write_parquet_atomic(pa.Table.from_pandas(table, preserve_index=False), folder / "items.parquet")
    meta = {"name": ds.name, "spec": ds.spec, "description": ds.description, "items": len(rows),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_bytes(folder / "dataset.json", json.dumps(meta, indent=1).encode())
    return DatasetIndex(ds.name, folder, table, failures)


def load_index(root: Path, name: str) -> DatasetIndex:
    folder = index_folder(root, name)
    if not (folder / "items.parquet").exists():
        raise FileNotFoundError(f"dataset {name!r} has not been embedded into {root} yet")
    return DatasetIndex(name, folder, pd.read_parquet(folder / "items.parquet"))


def _previous_keys(folder: Path) -> dict[str, tuple[int, int, str]]:
    path = folder / "items.parquet"
    if not path.exists():
        return {}
    with contextlib.suppress(Exception):
        t = pd.read_parquet(path, columns=["image", "image_size", "image_mtime_ns", "image_key"]).dropna()
        return {p: (int(s), int(m), k) for p, s, m, k in zip(t.image, t.image_size, t.image_mtime_ns, t.image_key)}
    return {}


def _image_keys(paths: list[Path], previous: dict, advance, threads: int = 4) -> list[tuple]:
    """Key many files: each thread takes a contiguous slice and reuses one read buffer."""
    out: list[tuple] = [()] * len(paths)

    def work(lo: int, hi: int) -> None:
        buf = memoryview(bytearray(1 << 20))
        for i in range(lo, hi):
            out[i] = _image_key(paths[i], previous, buf)
            if (i - lo) % 64 == 63 or i == hi - 1:
                advance((i - lo) % 64 + 1)

    step = max(1, -(-len(paths) // threads))
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(work, lo, min(lo + step, len(paths))) for lo in range(0, len(paths), step)]:
            f.result()
    return out


def _image_key(path: Path, previous: dict, buf: memoryview) -> tuple:
    """(key, size, mtime_ns, error) of one file; unchanged files (size, mtime) keep their key."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None, None, (f"file not found: {path}. Fix the path in the table (paths are relative "
                                  "to the table's folder) or remove the row")
    except OSError as e:
        return None, None, None, f"cannot read {path}: {e.strerror}"
    prev = previous.get(str(path))
    if prev and prev[0] == st.st_size and prev[1] == st.st_mtime_ns:
        return prev[2], st.st_size, st.st_mtime_ns, None
    h = xxhash.xxh3_128()  # streamed: the same digest as hashing the whole file at once
    try:
        with open(path, "rb", buffering=0) as f:
            while (n := f.readinto(buf)) > 0:
                h.update(buf[:n])
    except OSError as e:
        return None, None, None, f"cannot read {path}: {e.strerror}"
    return h.hexdigest(), st.st_size, st.st_mtime_ns, None


def record_store(folder: Path, modality: str, encoder: str, store: str) -> None:
    """Remember which store holds this dataset's embeddings for an encoder (under a lock)."""
    lock = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = folder / "stores.json"
        stores = json.loads(path.read_text()) if path.exists() else {}
        stores.setdefault(modality, {})[encoder] = {"store": store, "updated": time.time()}
        atomic_write_bytes(path, json.dumps(stores, indent=1).encode())
    finally:
        os.close(lock)
