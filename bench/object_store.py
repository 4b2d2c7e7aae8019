"""Epoch read throughput of a store in a bucket against the same store in a folder.

One table of token arrays the size of a ViT-S/14 encoder's ([257, 384] float16 per item)
is written twice through the normal store API: into a cache folder, and into a bucket on
an S3-compatible server started here on localhost (moto, in a thread). An epoch reads
every row once, in the training reader's block-shuffled order, in batches of 256, with a
fresh reader (so every chunk's crc32c is checked inside the timed read):

  first:     a fresh reader; for the bucket, an empty local copy: every shard is fetched
             whole, in parallel range requests, then read as a local one
  later:     further epochs with the same reader (a training run keeps its readers)
  new run:   a fresh reader with the local copies kept (the next run on this machine:
             one HEAD request per shard checks that each copy is current)

Target: bucket >= 0.7x local after the first epoch (later and new run). A real bucket is slower than a server on
localhost for the first epoch; the later epochs read local disk either way.

    python bench/object_store.py [--items 2048] [--epochs 5]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.objects import ObjectStorage  # noqa: E402
from cache.reader import RowReader, block_shuffled_order  # noqa: E402
from cache.store import ShardData, Store  # noqa: E402

ROW = (257, 384)
BATCH = 256


def start_server() -> tuple[object, str]:
    from moto import server as moto_server  # lazy: only this benchmark starts a server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                      AWS_REGION="us-east-1")
    import boto3  # lazy: moto's own dependency, only to make the bucket

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    return server, endpoint


def fill(root, n: int, shard_rows: int, chunk_rows: int) -> Store:
    store = Store.create(root, "image", "bench-vits", "0" * 32, {"bench": True}, shard_rows, chunk_rows)
    rng = np.random.default_rng(0)
    for shard in range(-(-n // shard_rows)):
        rows = min(shard_rows, n - shard * shard_rows)
        tokens = rng.standard_normal((rows, *ROW), dtype=np.float32).astype(np.float16)
        store.write_shard(store.claim(f"{shard:016x}"), ShardData([f"k{shard}-{i}" for i in range(rows)], [0] * rows,
                                                                 [""] * rows, {"tokens": tokens}), "bench", fsync=False)
    return store


def epoch(reader: RowReader, rows: np.ndarray, seed: int) -> float:
    """Rows per second of one epoch (a fresh reader maps and checks chunks as they come)."""
    order = rows[block_shuffled_order(rows, reader.layout.chunk_rows, 16, np.random.default_rng(seed))]
    out = np.empty((BATCH, *ROW), np.float16)
    t = time.perf_counter()
    for s in range(0, len(order), BATCH):
        b = order[s:s + BATCH]
        reader.take(b, out=out[:len(b)])
    return len(order) / (time.perf_counter() - t)


def runs(stores: dict[str, Store], rows: np.ndarray, epochs: int) -> dict[str, dict[str, float]]:
    """first: a fresh reader, nothing fetched yet; later: more epochs with that reader (a training
    run keeps its readers); new run: a fresh reader again, the local copies kept (the next run).
    The stores take turns epoch by epoch, so a busy machine slows both alike."""
    readers = {name: RowReader(store, "tokens") for name, store in stores.items()}
    out = {name: {"first": epoch(readers[name], rows, 0)} for name in stores}
    later: dict[str, list] = {name: [] for name in stores}
    fresh: dict[str, list] = {name: [] for name in stores}
    for e in range(1, epochs):
        for name in stores:
            later[name].append(epoch(readers[name], rows, e))
    for e in range(epochs):
        for name, store in stores.items():
            fresh[name].append(epoch(RowReader(store, "tokens"), rows, epochs + e))
    for name in stores:
        out[name].update(later=float(np.median(later[name])), new_run=float(np.median(fresh[name])))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", type=int, default=2048)
    ap.add_argument("--epochs", type=int, default=5, help="epochs per store and phase")
    ap.add_argument("--shard-rows", type=int, default=256)
    args = ap.parse_args()
    server, _ = start_server()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            t = time.perf_counter()
            local = fill(tmp / "local", args.items, args.shard_rows, 16)
            t_local = time.perf_counter() - t
            t = time.perf_counter()
            fill(ObjectStorage("s3://bench/c", tmp / "writer-copy"), args.items, args.shard_rows, 16)
            t_bucket = time.perf_counter() - t
            # a reader elsewhere: its own, empty local copy
            bucket = Store.open(ObjectStorage(f"s3://bench/c/{local.path.relative_to(tmp / 'local').as_posix()}",
                                              tmp / "reader-copy"))
            rows = np.arange(args.items)
            rates = runs({"local": local, "bucket": bucket}, rows, args.epochs)
    finally:
        server.stop()
    mb = args.items * int(np.prod(ROW)) * 2 / 2**20
    ratio = {k: round(rates["bucket"][k] / rates["local"][k], 3) for k in rates["local"]}
    result = {
        "items": args.items, "MiB": round(mb, 1), "shard_rows": args.shard_rows,
        "write_s": {"local": round(t_local, 2), "bucket": round(t_bucket, 2)},
        "rows_per_s": {f"{s}_{k}": round(v) for s, r in rates.items() for k, v in r.items()},
        "bucket_vs_local": ratio, "target_after_first": 0.7,
        "meets_target": bool(min(ratio["later"], ratio["new_run"]) >= 0.7),
    }
    for k in ("first", "later", "new_run"):
        print(f"{k:>8}: local {rates['local'][k]:>9,.0f} rows/s   bucket {rates['bucket'][k]:>9,.0f} rows/s   "
              f"{ratio[k]:.2f}x")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
