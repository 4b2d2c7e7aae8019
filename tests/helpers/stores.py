"""Stores for the tests: one written from a fixed table through the Store API (in a folder or a
bucket), and the readings that compare two stores."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import zarr

from cache.objects import ObjectStorage
from cache.store import ShardData, Store, find_stores
from core.processes import Identity

STORE = "stores/image/fixed-encoder-0123456789abcdef"  # where the fixed table's store lies in its cache


def fixed_table() -> list[tuple[str, ShardData]]:
    """Three groups of rows: two full shards and a short last one (its last chunk padded)."""
    rng = np.random.default_rng(20240617)
    out = []
    for g, n in enumerate((8, 8, 5)):
        keys = [f"{g:02d}{i:02d}" + "ab" * 7 for i in range(n)]
        out.append((f"{g:016x}", ShardData(
            keys=keys, views=[0] * n, sources=[f"data/img/{k}.png" for k in keys],
            arrays={"tokens": rng.standard_normal((n, 5, 4)).astype(np.float16),
                    "pooled": rng.standard_normal((n, 4)).astype(np.float32),
                    "length": np.full(n, 5, np.int32)})))
    return out


def create_store(root) -> Store:
    """The store of the fixed table under a cache folder (or in the given storage)."""
    return Store.create(root, "image", "fixed-encoder", "0123456789abcdef" * 4, {"model": "fixed", "dim": 4},
                        shard_rows=8, chunk_rows=2)


def build(root, failed_source: str | None = None) -> Path:
    """The fixed table's store, written through the Store API; returns its path."""
    store = create_store(root)
    for group, data in fixed_table():
        claim = store.claim(group, "run-fixed")
        if claim.state.value == "taken":  # a resumed build finds some groups done
            store.write_shard(claim, data, "fixed-dataset", fsync=False)
    again = store.claim(fixed_table()[0][0], "run-fixed")  # a committed group is not claimed twice
    assert again.state.value == "done"
    store.record_failures([{"item": "x", "source": failed_source or str(root / "data" / "x.png"), "key": "", "dataset": "fixed-dataset",
                            "reason": "unreadable"}], "run-fixed")
    return store.path


def other_host() -> Identity:
    return Identity("node-b", 4242, "777", "another-boot-id", "pid:[4026531111]", "b" * 16)


def stores_by_modality(cache: Path) -> dict[str, Store]:
    return {Store.open(p).modality: Store.open(p) for p in find_stores(cache)}


def read_rows(store: Store, name: str) -> dict[tuple[str, int], np.ndarray]:
    arr = zarr.open_group(str(store.zpath), mode="r")[name]
    return {k: arr[r] for k, r in store.row_index().items()}


def bucket_objects(storage: ObjectStorage) -> dict[str, bytes]:
    return {o["path"]: storage.read(o["path"]) for o in storage.keys()}


def comparable(files: dict[str, bytes]) -> dict[str, str]:
    """Digests of each file, with the two timestamps (the marker's and the group's ``created``) blanked."""
    out = {}
    for key, data in files.items():
        if key.endswith("freeze-pipe-cache.json") or key.endswith("embeddings.zarr/zarr.json"):
            meta = json.loads(data)
            meta.get("attributes", meta).pop("created")
            data = json.dumps(meta, sort_keys=True).encode()
        out[key] = hashlib.sha256(data).hexdigest()
    return out
