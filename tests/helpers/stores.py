"""Stores for the tests: one written from a fixed table through the Store API (in a folder or a
bucket), and the readings that compare two stores."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import zarr

from cache.marker import MARKER, marker_bytes
from cache.objects import ObjectStorage
from cache.storage import LOCK
from cache.store import ShardData, Store, find_stores
from core.processes import Identity
from tests.helpers import ROOT, forked, pipe

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

ORPHAN = "stores/image/other-encoder-fedcba9876543210"
KEPT_OUT = "adaptor-outputs/aaaaaaaaaaaaaaaa-0123456789abcdef"
ORPHAN_OUT = "adaptor-outputs/bbbbbbbbbbbbbbbb-fedcba9876543210"
SIBLINGS = ("c-other/x", "cx/stores/image/other-encoder-fedcba9876543210/embeddings.zarr/zarr.json",
            "stores/image/other-encoder-fedcba9876543210/embeddings.zarr/zarr.json", "c-other/c/stores/y")


def local_objects(cache: Path) -> dict[str, bytes]:
    """Every file of a cache folder, by key (the flock file ``.lock`` is a folder's guard, not data)."""
    return {p.relative_to(cache).as_posix(): p.read_bytes() for p in sorted(cache.rglob("*"))
            if p.is_file() and p.name != LOCK}


def run_writer(storage: ObjectStorage, *args: str) -> subprocess.Popen:
    """tests/helpers/object_writer.py in its own process, on ``storage`` (its stdout a pipe)."""
    return forked.popen([sys.executable, "-m", "tests.helpers.object_writer", storage.url, str(storage.path), *args],
                        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ.copy())


def whole(bucket: str, tmp_path: Path) -> ObjectStorage:
    """The whole bucket, its top included."""
    return ObjectStorage(f"s3://{bucket}", tmp_path / "whole")


def digests(storage: ObjectStorage) -> dict[str, str]:
    """Every object's SHA-256, by key."""
    return {o["path"]: hashlib.sha256(storage.read(o["path"])).hexdigest() for o in storage.keys()}


def gc_json(url: str, *args: str, expect: int = 0) -> dict:
    """`pipe cache gc --json` on ``url``: its JSON summary."""
    r = pipe("cache", "gc", "--cache", url, "--json", *args, expect=expect)
    return json.loads(r.stdout.strip().splitlines()[-1])


def gc_cache(bucket: str, tmp_path: Path, monkeypatch) -> ObjectStorage:
    """A cache under ``s3://<bucket>/c`` for gc: two stores (one a dataset index references, one
    orphaned), Adaptor outputs of each, a prefix under ``stores/`` that is not a store, and objects
    next to the cache (``c-other/``, ``cx/``, the bucket's top) that must survive every command.
    Returns the writer's storage of it."""
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    c = ObjectStorage(f"s3://{bucket}/c", tmp_path / "writer")
    build(c, failed_source="/data/x.png")
    other = Store.create(c, "image", "other-encoder", "fedcba9876543210" * 4, {"model": "other", "dim": 4},
                         shard_rows=8, chunk_rows=2)
    group, data = fixed_table()[0]
    other.write_shard(other.claim(group, "r"), data, "fixed-dataset", fsync=False)
    c.write(MARKER, marker_bytes())
    c.write("datasets/ds/stores.json", json.dumps({"image": {"fixed-encoder": {"store": STORE, "updated": 1}}}).encode())
    for out in (KEPT_OUT, ORPHAN_OUT):
        c.write(f"{out}/meta.json", b"{}")
        c.write(f"{out}/00.npz", b"npz bytes")
    c.write("stores/image/not-a-store/x", b"someone's file")
    top = whole(bucket, tmp_path)
    for key in SIBLINGS:
        top.write(key, b"not the cache's: " + key.encode())
    return c


def store_objects(where) -> dict[str, str]:
    """The stores of a cache (a folder, or an ObjectStorage), comparable object for object."""
    files = local_objects(where) if isinstance(where, Path) else bucket_objects(where)
    return comparable({k: v for k, v in files.items() if k.startswith("stores/") and not k.endswith("/.inuse")})
