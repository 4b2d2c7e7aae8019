"""The cache's integrity: checked reads, relocatable caches, repair of every damage
`pipe cache verify` finds, `pipe cache gc`/`rm`, and the files' permissions.

Each damage class gets its own test: damage a copy of a clean cache, see verify name it
(exit 1), repair it, let `pipe embed` re-embed what was dropped, verify clean, and compare
the repaired cache with the clean one file for file.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zarr

from cache.index import load_index
from cache.npz import NpzCorruption
from cache.outputs import OutputCache
from cache.reader import RowReader
from cache.shards import ShardCorruption
from cache.store import ShardData, Store, find_stores
from cache.verify import TEMP_GRACE_S, verify_store
from tests.helpers import SMALL, embed_json, make_table, pipe

ONE_EPOCH = [*SMALL, "epochs=1"]
EMBED = ("--shard-mb", "0.3", "--batch-size", "4")  # 16-row image shards: 40 items make 3 of them


@pytest.fixture(scope="module")
def clean(embedded):
    """40 items embedded once into a cache of several shards per store (shared with
    test_hardening.py); tests damage copies of it."""
    made = embedded(40, *EMBED)
    assert made.summary["embedded"] == 80
    return made.table, made.cache


def stores(cache: Path) -> dict[str, Store]:
    return {Store.open(p).modality: Store.open(p) for p in find_stores(cache)}


def copy_of(clean: Path, dest: Path) -> Path:
    shutil.copytree(clean, dest, symlinks=True)
    return dest


def embed(table: Path, cache: Path, expect: int = 0) -> dict:
    return embed_json(table, cache, *EMBED, expect=expect)


def train(table: Path, cache: Path, out: Path, *extra: str, expect: int = 0):
    return pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
                "--out", str(out), *ONE_EPOCH, *extra, expect=expect)


def verify(cache: Path, *extra: str, expect: int = 0) -> str:
    return pipe("cache", "verify", "--cache", str(cache), *extra, expect=expect).output


def store_files(cache: Path) -> dict[str, object]:
    """What makes two caches equal: every shard file and manifest part (bytes), and each
    array's metadata (parsed). Locks, failure tables and quarantined parts do not count."""
    out: dict[str, object] = {}
    for store in find_stores(cache):
        for p in sorted(store.rglob("*")):
            rel = p.relative_to(cache).as_posix()
            if p.is_dir() or p.name in (".lock", ".inuse") or "/failures/" in rel or "/quarantine/" in rel:
                continue
            out[rel] = json.loads(p.read_text()) if p.name == "zarr.json" else p.read_bytes()
    return out


def assert_same_cache(clean: Path, repaired: Path) -> None:
    a, b = store_files(clean), store_files(repaired)
    assert sorted(a) == sorted(b), (set(a) ^ set(b))
    different = [k for k in a if a[k] != b[k]]
    assert not different, f"files that differ from the clean cache: {different}"


def repair_then_embed(table: Path, cache: Path, clean: Path, reembedded: int) -> str:
    """The cure for every damage class: repair, embed, verify clean, equal to the clean cache."""
    out = verify(cache, "--repair")
    assert "repaired" in out
    assert f"pipe embed --dataset {table.resolve()}" in out or reembedded == 0
    done = embed(table, cache)
    assert done["embedded"] == reembedded and done["failed"] == 0
    after = verify(cache)
    assert "CORRUPT" not in after and "✗" not in after
    assert_same_cache(clean, cache)
    return out


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


# ------------------------------------------------------------------------------ checked reads
def test_a_flipped_byte_in_a_pooled_chunk_stops_training_and_is_repaired(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    flip(img.layout("pooled").shard_path(1), 10)  # inside chunk 0 of shard 1
    r = train(table, cache, tmp_path / "run", expect=2)
    assert f"store {img.path}: array pooled, shard 1, chunk 0 fails its crc32c checksum" in r.output
    assert f"pipe cache verify --repair --cache {cache}" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "run" / "last.safetensors").exists()
    out = verify(cache, expect=1)
    assert "array pooled, shard 1, chunk 0 fails its crc32c checksum" in out and "CORRUPT" in out
    repaired = repair_then_embed(table, cache, clean_cache, reembedded=16)
    assert "dropped manifest part part-000001-" in repaired


def test_streaming_and_resident_reads_both_check_every_chunk(tmp_path):
    store = _bench_store(tmp_path, n=64)
    whole = zarr.open_array(str(store.zpath / "tokens"), mode="r")[:]
    rows = np.array([5, 6, 7, 40, 3, 41, 42, 0, 63, 17, 16])  # runs and jumps, across chunks and shards
    np.testing.assert_array_equal(RowReader(store, "tokens").take(rows), whole[rows])
    np.testing.assert_array_equal(RowReader(store, "tokens").take(np.arange(64)), whole)
    lay = store.layout("tokens")
    flip(lay.shard_path(1), (lay.chunk_nbytes + 4) + 7)  # chunk 1 of shard 1
    reader = RowReader(store, "tokens")
    np.testing.assert_array_equal(reader.take(np.arange(0, 32)).shape, (32, 3, 4))  # shard 0 is intact
    with pytest.raises(ShardCorruption, match=r"array tokens, shard 1, chunk 1 fails its crc32c"):
        reader.take(np.array([32 + 16 + 3]))
    with pytest.raises(ShardCorruption) as e:  # a fresh reader over the whole array: the resident load
        RowReader(store, "tokens").take(np.arange(64))
    assert "pipe cache verify --repair --cache" in str(e.value) and "shard 1, chunk 1" in str(e.value)


def _bench_store(tmp_path: Path, n: int) -> Store:
    """A store of [n, 3, 4] float16 tokens in shards of 32 rows and chunks of 16, written directly."""
    store = Store.create(tmp_path / "cache", "image", "unit", "1" * 32, {"unit": True}, 32, 16)
    rng = np.random.default_rng(0)
    for shard in range(n // 32):
        claim = store.claim(f"{shard:016x}")
        rows = rng.standard_normal((32, 3, 4)).astype(np.float16)
        store.write_shard(claim, ShardData([f"k{shard}-{i}" for i in range(32)], [0] * 32, [""] * 32,
                                           {"tokens": rows}), "unit", fsync=False)
    return Store.open(store.path)


def test_a_deleted_shard_file_names_the_shard_not_errno_2(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    img.layout("pooled").shard_path(2).unlink()
    r = train(table, cache, tmp_path / "run", "--resident", "none", expect=2)
    assert f"store {img.path}: array pooled, shard 2 is missing its shard file" in r.output
    assert "Errno" not in r.output
    assert "array pooled, shard 2 is missing its shard file" in verify(cache, expect=1)
    repair_then_embed(table, cache, clean_cache, reembedded=8)  # the last shard holds 8 images


# ------------------------------------------------------------------------------ metadata
def test_a_deleted_array_metadata_file_fails_verify_and_is_rebuilt(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    txt = stores(cache)["text"]
    (txt.zpath / "pooled" / "zarr.json").unlink()
    out = verify(cache, expect=1)
    assert "array pooled: embeddings.zarr/pooled/zarr.json is missing" in out
    r = train(table, cache, tmp_path / "run", expect=2)
    assert "array pooled has no metadata" in r.output and "pipe cache verify --repair" in r.output
    repaired = repair_then_embed(table, cache, clean_cache, reembedded=0)  # the data was intact
    assert "rewrote embeddings.zarr/pooled/zarr.json" in repaired


def test_array_metadata_that_disagrees_with_the_store_attributes_fails_verify(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    meta = stores(cache)["image"].zpath / "tokens" / "zarr.json"
    m = json.loads(meta.read_text())
    m["data_type"] = "float32"
    meta.write_text(json.dumps(m))
    out = verify(cache, expect=1)
    assert 'array tokens: zarr.json says data_type "float32", the store\'s attributes say "float16"' in out
    repair_then_embed(table, cache, clean_cache, reembedded=0)


def test_a_store_from_an_older_version_reads_and_repair_adds_what_it_lacks(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    for store in stores(cache).values():  # no recorded arrays, no dimension names: as written before
        group = json.loads((store.zpath / "zarr.json").read_text())
        del group["attributes"]["arrays"]
        (store.zpath / "zarr.json").write_text(json.dumps(group))
        for meta in store.zpath.glob("*/zarr.json"):
            m = json.loads(meta.read_text())
            del m["dimension_names"]
            meta.write_text(json.dumps(m))
    train(table, cache, tmp_path / "run")  # it reads as before
    out = verify(cache)  # and verify says what is missing, without failing
    assert "do not record its arrays" in out and "dimension names None" in out and "✗" not in out
    verify(cache, "--repair")
    assert "dimension names" not in verify(cache)
    assert_same_cache(clean_cache, cache)


# ------------------------------------------------------------------------------ manifest parts
def test_a_deleted_manifest_part_fails_verify_and_its_shard_is_rewritten(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    txt = stores(cache)["text"]
    part = txt.parts()[0][2]
    units = pq.read_table(part).num_rows
    part.unlink()
    out = verify(cache, expect=1)
    assert "shard 0 of length, pooled, tokens holds data that no manifest part commits" in out
    repair_then_embed(table, cache, clean_cache, reembedded=units)
    # without the repair, `pipe embed` itself writes the group back into the shard it had
    again = copy_of(clean_cache, tmp_path / "again")
    stores(again)["text"].parts()[0][2].unlink()
    assert embed(table, again)["embedded"] == units
    assert "✗" not in verify(again)
    assert_same_cache(clean_cache, again)


def test_a_manifest_part_with_garbage_appended_is_quarantined_not_fatal(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    part = img.parts()[1][2]
    with open(part, "ab") as f:
        f.write(b"garbage" * 10)
    # one message naming the part and the repair, not pyarrow's alone
    msg = pipe("embed", "--dataset", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
               *EMBED, expect=2).output
    assert f"manifest part {part.name} is unreadable" in msg and "pipe cache verify --repair" in msg
    out = verify(cache, expect=1)
    assert f"manifest part {part.name} is unreadable" in out
    repaired = repair_then_embed(table, cache, clean_cache, reembedded=16)
    assert f"moved the unreadable manifest part {part.name} to {img.path / 'quarantine'}" in repaired
    assert len(list((img.path / "quarantine").iterdir())) == 1
    assert "kept in" in verify(cache)  # named, not a problem


# ------------------------------------------------------------------------------ leftovers
def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _kill_mid_write(store: Store) -> tuple[int, int]:
    """Make the last shard look like a writer was killed just before its commit: a dead
    claim, and every array's file still under its hidden temporary name."""
    shard, group, part = store.parts()[-1]
    part.unlink()
    pid = _dead_pid()
    for f in store.shard_files(shard):
        f.rename(f.with_name(f".{f.name}.partial-{pid}"))
    info = {"host": socket.gethostname(), "pid": pid, "start": "0", "group": group, "shard": shard, "run": "x"}
    (store.path / "claims" / f"{shard:06d}-{group}.json").write_text(json.dumps(info))
    return shard, pid


def test_a_killed_text_shard_leaves_no_temp_file_behind(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    txt = stores(cache)["text"]
    shard, pid = _kill_mid_write(txt)
    assert (txt.zpath / "length" / "c" / f".{shard}.partial-{pid}").exists()
    embed(table, cache)  # takes the dead claim over and clears every file of the shard first
    assert not list(txt.zpath.rglob("*.partial-*"))
    assert_same_cache(clean_cache, cache)
    # and `verify --repair` removes the same leftovers without an embed
    again = copy_of(clean_cache, tmp_path / "again")
    txt = stores(again)["text"]
    shard, pid = _kill_mid_write(txt)
    out = verify(again)  # an interrupted run is not damage: named, exit 0
    assert f"shard {shard} is claimed by pid {pid}" in out and "interrupted run (its process is gone), with 3 temporary file(s)" in out
    assert "removed the dead claim" in verify(again, "--repair")
    assert not list(txt.zpath.rglob("*.partial-*")) and not list((txt.path / "claims").iterdir())
    embed(table, again)
    assert_same_cache(clean_cache, again)


def test_temp_files_of_writers_that_are_gone_are_removed_after_a_grace_period(clean, tmp_path):
    _, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    pid = _dead_pid()
    fresh = img.path / "manifest" / f".part-000009-{'a' * 16}.parquet.{pid}-1.tmp"
    old = img.path / "manifest" / f".part-000008-{'b' * 16}.parquet.{pid}-1.tmp"
    for p in (fresh, old):
        p.write_bytes(b"half a part")
    os.utime(old, (0, os.stat(old).st_mtime - TEMP_GRACE_S - 5))
    out = verify(cache)
    assert old.name in out and fresh.name not in out  # a fresh one may be another host's write in progress
    verify(cache, "--repair")
    assert fresh.exists() and not old.exists()


# ------------------------------------------------------------------------------ derived caches
def test_adaptor_outputs_carry_checksums_that_every_read_checks(tmp_path):
    folder = tmp_path / "cache" / "adaptor-outputs" / "abc-def"
    cache = OutputCache(folder, "image_pooled")
    values, computed = cache.get(np.arange(5), lambda r: np.ones((len(r), 4), np.float32) * r[:, None])
    assert computed == 5
    again, computed = cache.get(np.array([4, 1]), lambda r: 1 / 0)
    assert computed == 0 and again[:, 0].tolist() == [4.0, 1.0]
    raw = bytearray(cache.path.read_bytes())
    i = raw.rfind(np.float32(4.0).tobytes())
    raw[i + 1] ^= 0x01
    cache.path.write_bytes(bytes(raw))
    with pytest.raises(NpzCorruption, match=r"image_pooled.npz.*pipe cache verify --repair --cache"):
        cache.get(np.array([4]), lambda r: 1 / 0)
    from cache.verify import verify_derived

    rep = verify_derived(tmp_path / "cache", repair=True)
    assert rep.problems and "image_pooled.npz" in rep.problems[0] and rep.ok and not cache.path.exists()


# ------------------------------------------------------------------------------ relocation
def _no_forward(monkeypatch) -> None:
    import cache.index
    import pipeline.encoders as encoders
    import pipeline.encoders.registry as registry
    import pipeline.imaging as imaging

    def boom(*a, **k):
        raise AssertionError("an encoder ran, an image was decoded or a file hashed")

    for mod, name in [(encoders, "create_encoder"), (registry, "create_encoder"), (imaging, "read_and_decode")]:
        monkeypatch.setattr(mod, name, boom)
    monkeypatch.setattr(cache.index, "xxhash", SimpleNamespace(xxh3_128=boom))  # the index's file hashing


def _retrieval(table: Path, cache: Path, ckpt: Path, out: Path, cached: bool = False, monkeypatch=None) -> str:
    if cached:  # the frozen Adaptor's outputs must come from the (copied) cache
        from pipeline.models.adaptor import Adaptor

        monkeypatch.setattr(Adaptor, "encode_image", lambda *a, **k: 1 / 0)
    return pipe("evaluate", "--task", "retrieval", "-d", str(table), "--adaptor", str(ckpt), "--cache", str(cache),
                "--out", str(out), "bootstrap=50").output


@pytest.mark.slow
def test_a_copied_cache_works_without_its_original(clean, tmp_path, monkeypatch):
    table, clean_cache = clean
    original = copy_of(clean_cache, tmp_path / "original")
    train(table, original, tmp_path / "run")
    ckpt = tmp_path / "run" / "last.safetensors"
    assert "adaptor forwards: 0" not in _retrieval(table, original, ckpt, tmp_path / "eval1")
    subprocess.run(["cp", "-a", str(original), str(tmp_path / "copy")], check=True)
    original.rename(tmp_path / "moved-away")
    stored = json.loads(next((tmp_path / "copy" / "datasets").glob("*/stores.json")).read_text())
    assert all(not Path(e["store"]).is_absolute() for m in stored.values() for e in m.values())
    _no_forward(monkeypatch)
    copy = tmp_path / "copy"
    again = embed(table, copy)  # nothing re-hashed, nothing embedded
    assert (again["embedded"], again["reused"], again["failed"]) == (0, 80, 0)
    train(table, copy, tmp_path / "run2")
    assert "adaptor forwards: 0 (cached)" in _retrieval(table, copy, ckpt, tmp_path / "eval2", True, monkeypatch)
    assert "✗" not in verify(copy)


@pytest.mark.slow
def test_a_moved_cache_works_where_it_now_is(clean, tmp_path, monkeypatch):
    table, clean_cache = clean
    first = copy_of(clean_cache, tmp_path / "first")
    train(table, first, tmp_path / "run")
    ckpt = tmp_path / "run" / "last.safetensors"
    _retrieval(table, first, ckpt, tmp_path / "eval1")
    moved = tmp_path / "elsewhere" / "cache"
    moved.parent.mkdir()
    first.rename(moved)
    _no_forward(monkeypatch)
    assert embed(table, moved)["embedded"] == 0
    train(table, moved, tmp_path / "run2")
    assert "adaptor forwards: 0 (cached)" in _retrieval(table, moved, ckpt, tmp_path / "eval2", True, monkeypatch)


def test_absolute_store_paths_of_older_caches_resolve_inside_the_cache(clean, tmp_path):
    """Caches written before paths were relative held absolute ones: a copy reads its own stores."""
    table, clean_cache = clean
    original = copy_of(clean_cache, tmp_path / "original")
    copy = copy_of(clean_cache, tmp_path / "copy")
    for folder in (copy / "datasets").iterdir():
        path = folder / "stores.json"
        if path.exists():
            stored = json.loads(path.read_text())
            for entries in stored.values():
                for e in entries.values():
                    e["store"] = str(original / e["store"])  # as an older version wrote it
            path.write_text(json.dumps(stored))
    shutil.rmtree(original / "stores")  # the original is gone: reading it would fail
    from cache.pairs import load_pairs

    name = next(p.name for p in (copy / "datasets").iterdir() if (p / "stores.json").exists())
    data = load_pairs(copy, name, str(table), "tiny-vit", "tiny-bert")
    assert data.image.path.is_relative_to(copy) and data.text.path.is_relative_to(copy)
    assert len(data.items) == 40


@pytest.mark.slow
def test_the_demo_cache_with_images_inside_it_moves_without_rehashing(tmp_path, monkeypatch):
    spec = "demo?n=24"
    first = tmp_path / "first"
    pipe("embed", "-d", spec, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(first), "--json")
    items = pq.read_table(next((first / "datasets").glob("demo-*/items.parquet"))).to_pandas()
    assert not any(Path(p).is_absolute() for p in items.image)  # the phantoms live inside the cache
    moved = tmp_path / "moved"
    first.rename(moved)
    _no_forward(monkeypatch)
    r = pipe("embed", "-d", spec, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(moved), "--json")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["embedded"] == 0 and out["failed"] == 0
    index = load_index(moved, next(p.name for p in (moved / "datasets").glob("demo-*")))
    assert all(Path(p).is_relative_to(moved) and Path(p).exists() for p in index.table.image)


# ------------------------------------------------------------------------------ gc and rm
def test_gc_removes_only_what_no_dataset_references(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    before = stores(cache)
    for folder in (cache / "datasets").iterdir():  # forget the dataset: both stores are unreferenced
        shutil.rmtree(folder)
    other = make_table(tmp_path / "other", 3)
    pipe("embed", "-d", str(other), "-b", "none", "-t", "tiny-bert", "--cache", str(cache), "--json")
    orphan = cache / "adaptor-outputs" / f"{'c' * 16}-{before['image'].fingerprint[:16]}"
    kept = cache / "adaptor-outputs" / f"{'c' * 16}-{before['text'].fingerprint[:16]}"
    for d in (orphan, kept):
        d.mkdir(parents=True)
        (d / "meta.json").write_text("{}")
    temp = next((cache / "datasets").iterdir()) / f".items.parquet.{_dead_pid()}-1.tmp"
    temp.write_bytes(b"x" * 100)
    os.utime(temp, (0, os.stat(temp).st_mtime - TEMP_GRACE_S - 5))
    dry = json.loads(pipe("cache", "gc", "--cache", str(cache), "--dry-run", "--json").stdout)
    assert [r["path"] for r in dry["would_remove"]] == [str(before["image"].path), str(orphan), str(temp)]
    assert dry["bytes"] > 100 and before["image"].path.exists() and temp.exists()
    with before["text"].in_use(), before["image"].in_use():  # a running `pipe embed` holds them
        busy = json.loads(pipe("cache", "gc", "--cache", str(cache), "--json").stdout)
    assert [r["path"] for r in busy["removed"]] == [str(temp)]  # the store and its outputs stay
    assert "held by a running" in busy["skipped"][0]["why"] and orphan.exists()
    done = json.loads(pipe("cache", "gc", "--cache", str(cache), "--json").stdout)
    assert [r["path"] for r in done["removed"]] == [str(before["image"].path), str(orphan)]
    assert not before["image"].path.exists() and before["text"].path.exists() and kept.exists()
    assert not orphan.exists() and not temp.exists()
    assert "✗" not in verify(cache)


def test_rm_refuses_a_store_in_use_by_a_dataset_unless_forced(clean, tmp_path):
    table, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    r = pipe("cache", "rm", img.path.name, "--cache", str(cache), expect=2)
    assert "holds the embeddings of dataset(s) pairs-" in r.output and "--force" in r.output
    assert img.path.exists()
    pipe("cache", "rm", img.fingerprint[:10], "--cache", str(cache), "--force")
    assert not img.path.exists()
    r = train(table, cache, tmp_path / "run", expect=2)
    assert "no cached image embeddings from 'tiny-vit'" in r.output and "pipe embed" in r.output


# ------------------------------------------------------------------------------ verify --json, formats
def test_verify_json_reports_problems_and_repairs_per_store(clean, tmp_path):
    _, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    img = stores(cache)["image"]
    flip(img.layout("tokens").shard_path(0), 100)
    rep = json.loads(pipe("cache", "verify", "--cache", str(cache), "--json", expect=1).stdout)
    assert rep["ok"] is False
    by_path = {s["store"]: s for s in rep["stores"]}
    assert "array tokens, shard 0, chunk 0 fails its crc32c checksum" in by_path[str(img.path)]["problems"]
    fixed = json.loads(pipe("cache", "verify", "--cache", str(cache), "--repair", "--json").stdout)
    entry = {s["store"]: s for s in fixed["stores"]}[str(img.path)]
    assert fixed["ok"] and entry["dropped_units"] == 16 and entry["after_repair"]["problems"] == []
    assert len(fixed["reembed"]) == 1 and "--backbone tiny-vit --text-encoder none" in fixed["reembed"][0]


def test_plain_tools_open_a_store_by_its_dimension_names(clean):
    _, cache = clean
    img = stores(cache)["image"]
    txt = stores(cache)["text"]
    row = int(img.manifest().column("row")[3].as_py())
    ours = RowReader(img, "tokens").take(np.array([row]))[0]
    xr = pytest.importorskip("xarray")
    ds = xr.open_zarr(str(img.zpath), consolidated=False, mask_and_scale=False)
    assert ds["tokens"].dims == ("row", "token", "dim") and ds["pooled"].dims == ("row", "dim")
    np.testing.assert_array_equal(ds["tokens"][row].values, ours)
    assert xr.open_zarr(str(txt.zpath), consolidated=False)["length"].dims == ("row",)
    import dask.array as da

    np.testing.assert_array_equal(da.from_zarr(str(img.zpath / "tokens"))[row].compute(), ours)
    np.testing.assert_array_equal(zarr.open_group(str(img.zpath), mode="r")["tokens"][row], ours)
    ts = pytest.importorskip("tensorstore", reason="TensorStore is not installable here")
    t = ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": str(img.zpath / "tokens")}}).result()
    assert list(t.domain.labels) == ["row", "token", "dim"]
    np.testing.assert_array_equal(t[row].read().result(), ours)


def test_store_paths_and_sources_inside_the_cache_are_relative(clean):
    _, cache = clean
    stored = json.loads(next((cache / "datasets").glob("*/stores.json")).read_text())
    assert {e["store"].split("/")[0] for m in stored.values() for e in m.values()} == {"stores"}


def test_verify_repair_leaves_a_healthy_store_untouched(clean, tmp_path):
    _, clean_cache = clean
    cache = copy_of(clean_cache, tmp_path / "cache")
    before = store_files(cache)
    rep = verify_store(stores(cache)["image"].path, repair=True)
    assert rep.ok and rep.repairs == [] and store_files(cache) == before


# ------------------------------------------------------------------------------ ids and permissions
def test_csv_ids_keep_their_leading_zeros(tmp_path):
    table = make_table(tmp_path / "data", 3)
    df = pd.read_csv(table)
    df["id"] = ["000000", "000001", "0100"]
    df["patient_id"] = ["007", "007", "010"]
    df.to_csv(table, index=False)
    pipe("embed", "-d", str(table), "-b", "none", "-t", "tiny-bert", "--cache", str(tmp_path / "cache"), "--json")
    items = pq.read_table(next((tmp_path / "cache" / "datasets").glob("*/items.parquet"))).to_pandas()
    assert items.id.tolist() == ["000000", "000001", "0100"] and items.patient_id.tolist() == ["007", "007", "010"]
    assert "effusion" in [c.split(".", 1)[-1] for c in items.columns]  # numeric labels stay labels


@pytest.mark.slow
def test_every_file_follows_the_umask(tmp_path):
    table = make_table(tmp_path / "data", 8)
    cache, run, res = tmp_path / "cache", tmp_path / "run", tmp_path / "eval"
    old = os.umask(0o002)  # group-writable: a team sharing a file system
    try:
        embed_json(table, cache, *EMBED)
        train(table, cache, run)
        pipe("evaluate", "--task", "retrieval", "-d", str(table), "--adaptor", str(run), "--cache", str(cache),
             "--out", str(res), "bootstrap=20")
    finally:
        os.umask(old)
    files = [run / "config.yaml", run / "last.safetensors", run / "last.optim.safetensors", run / "metrics.csv",
             res / "results.json", *cache.glob("stores/*/*/manifest/part-*.parquet"),
             *cache.glob("stores/*/*/embeddings.zarr/*/c/**/*"), *cache.glob("datasets/*/*.json"),
             *cache.glob("datasets/*/items.parquet"), *cache.glob("adaptor-outputs/*/*")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in files if p.is_file()}
    assert len(modes) > 10 and set(modes.values()) == {oct(0o664)}, modes
