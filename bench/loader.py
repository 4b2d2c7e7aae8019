"""Random-batch read throughput of the training reader, against np.memmap on the same bytes.

A store holds token arrays the size of a ViT-S/14 encoder's ([257, 384] float16 per
item), written through the normal shard writer. In one run we time random batches of
256 rows read:
  reader:   cache.reader.RowReader (chunk bytes mapped straight from the shard files), its
            chunks already mapped and checked: the steady state of training
  checked:  a fresh RowReader per repetition, so every chunk's crc32c is computed inside
            the timed reads (the first epoch; a resident load checks the same bytes once)
  memmap:   np.memmap over a flat copy of the same rows (the bound)
  zarr:     zarr-python indexing of the same array (for reference)
  stream:   the training loader's streaming path (block-shuffled chunks, one batch ahead)
Targets: reader >= 0.7x memmap, checked >= 0.9x memmap.

No arithmetic is timed here, so the roofline is the memory's (bench/roofline.py): each way's
bytes per second (every row read from the mapped pages and written into the batch, so twice
its 197 KB) over the copy bandwidth of a large buffer with the same single thread, measured in
this run (``*_bandwidth_share``). The crc32c check reads each chunk once more, the first time
a reader maps it, at the rate google_crc32c reaches here (``crc32c_gbs``, timed in this run):
``checked_bound_vs_memmap`` is the best ratio the checked reader can reach, its copies at the
memmap's speed plus the checksums of the chunks each repetition touches at that rate.

    python bench/loader.py [--items 4096] [--batches 40]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import google_crc32c
import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.roofline import measure_bandwidth  # noqa: E402
from cache.reader import RowReader, block_shuffled_order  # noqa: E402
from cache.store import ShardData, Store  # noqa: E402

ROW = (257, 384)


def build_store(root: Path, n: int, shard_rows: int = 512, chunk_rows: int = 16) -> Store:
    store = Store.create(root, "image", "bench-vits", "0" * 32, {"bench": True}, shard_rows, chunk_rows)
    rng = np.random.default_rng(0)
    for shard in range(-(-n // shard_rows)):
        rows = min(shard_rows, n - shard * shard_rows)
        claim = store.claim(f"{shard:016x}")
        tokens = rng.standard_normal((rows, *ROW), dtype=np.float32).astype(np.float16)
        store.write_shard(claim, ShardData([f"k{shard}-{i}" for i in range(rows)], [0] * rows, [""] * rows,
                                           {"tokens": tokens}), "bench", fsync=False)
    return Store.open(store.path)


def rate(fn, batches: list[np.ndarray]) -> float:
    t = time.perf_counter()
    for b in batches:
        fn(b)
    return sum(len(b) for b in batches) / (time.perf_counter() - t)


def _resident_load(store: Store, flat: Path, n: int) -> dict:
    """Loading every row into RAM, as --resident does: a fresh reader checks each chunk once;
    against copying a freshly opened memmap of the same bytes (both from the page cache)."""
    dest = np.empty((n, *ROW), np.float16)
    t = time.perf_counter()
    RowReader(store, "tokens").take(np.arange(n), out=dest)
    checked = time.perf_counter() - t
    t = time.perf_counter()
    np.copyto(dest, np.load(flat, mmap_mode="r"))
    plain = time.perf_counter() - t
    return {"resident_load_checked_s": round(checked, 3), "resident_load_memmap_s": round(plain, 3)}


def crc32c_rate(mib: int = 256) -> float:
    """GB/s of google_crc32c over a buffer of ``mib`` MiB, the best of 3."""
    buf = np.ones(mib << 20, np.uint8)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        google_crc32c.value(buf)
        best = min(best, time.perf_counter() - t)
    return buf.nbytes / best / 1e9


def checked_bound(batches: list[np.ndarray], memmap_rate: float, crc_gbs: float, chunk_rows: int = 16) -> float:
    """The checked reader's best ratio to memmap: the same copies, plus one checksum of every
    chunk the batches touch."""
    rows = np.concatenate(batches)
    chunk_bytes = chunk_rows * int(np.prod(ROW)) * 2
    copy_s = len(rows) / memmap_rate
    crc_s = len(np.unique(rows // chunk_rows)) * chunk_bytes / (crc_gbs * 1e9)
    return copy_s / (copy_s + crc_s)


def memory_roofline(bandwidth: list[float], rates: dict[str, list[float]]) -> dict:
    """Each way's GB/s (a row read and written: twice its bytes) and its share of the copy bandwidth."""
    row_bytes, peak = 2 * int(np.prod(ROW)) * 2, max(bandwidth)  # float16, read + written
    out = {"bandwidth_gbs": round(peak, 1)}
    for name, rate in rates.items():
        gbs = statistics.median(rate) * row_bytes / 1e9
        out.update({f"{name}_gbs": round(gbs, 2), f"{name}_bandwidth_share": round(gbs / peak, 3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    bandwidth = [measure_bandwidth("cpu")]
    with tempfile.TemporaryDirectory() as d:
        store = build_store(Path(d), args.items)
        reader = RowReader(store, "tokens")
        flat = np.lib.format.open_memmap(Path(d) / "flat.npy", mode="w+", dtype=np.float16, shape=(args.items, *ROW))
        for s in range(0, args.items, 1024):
            flat[s:s + 1024] = reader.take(np.arange(s, min(s + 1024, args.items)))
        flat.flush()
        mm = np.load(Path(d) / "flat.npy", mmap_mode="r")
        z = zarr.open_array(str(store.zpath / "tokens"), mode="r")
        out = np.empty((args.batch, *ROW), np.float16)
        rng = np.random.default_rng(1)
        ratios, checked, rd, ck, mmr, bound = [], [], [], [], [], []
        crc_gbs = crc32c_rate()
        for _ in range(args.reps):  # interleaved, so drift on a noisy machine hits both alike
            batches = [rng.integers(0, args.items, args.batch) for _ in range(args.batches)]
            r = rate(lambda b: reader.take(b, out=out), batches)
            fresh = RowReader(store, "tokens")  # maps, and so checks, each chunk on first use
            c = rate(lambda b: fresh.take(b, out=out), batches)
            # the faster of two ways to gather from a memmap, so the bound is a fair one
            m = max(rate(lambda b: np.take(mm, np.sort(b), axis=0, out=out), batches),
                    rate(lambda b: mm[np.sort(b)], batches))
            ratios.append(r / m)
            checked.append(c / m)
            rd.append(r)
            ck.append(c)
            mmr.append(m)
            bound.append(checked_bound(batches, m, crc_gbs))
        load = _resident_load(store, Path(d) / "flat.npy", args.items)
        bandwidth.append(measure_bandwidth("cpu"))
        zr = rate(lambda b: z.get_orthogonal_selection((np.sort(b),)), batches[:5])
        order = block_shuffled_order(np.arange(args.items), 16, 8, rng)
        st = rate(lambda b: reader.take(b, out=out), [order[s:s + args.batch] for s in
                                                       range(0, args.items - args.batch + 1, args.batch)])
    res = {"bench": "loader", "ratio_vs_memmap": round(statistics.median(ratios), 3),
           **memory_roofline(bandwidth, {"reader": rd, "checked": ck, "memmap": mmr}),
           "crc32c_gbs": round(crc_gbs, 2), "checked_bound_vs_memmap": round(statistics.median(bound), 3),
           "ratio_vs_memmap_checked": round(statistics.median(checked), 3),
           "reader_samples_s": round(statistics.median(rd)), "checked_samples_s": round(statistics.median(ck)),
           "memmap_samples_s": round(statistics.median(mmr)),
           "zarr_python_samples_s": round(zr), "block_shuffled_samples_s": round(st), **load,
           "row": list(ROW), "items": args.items, "batch": args.batch, "ratios": [round(x, 3) for x in ratios],
           "ratios_checked": [round(x, 3) for x in checked]}
    print(json.dumps(res))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
