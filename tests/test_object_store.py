"""Stores in a bucket, against a real S3-compatible server started on localhost (moto, in a thread).

The same commit protocol as on a file system, made of objects: whole objects, a manifest
part created only if absent (the commit), claims taken under a guard object with a lease.
A store written to a bucket equals, object for object and byte for byte, the store the
same table makes in a folder; killed and resumed, it equals one written without a kill;
two writers in two processes commit every group once; a dead writer's claim, and a dead
writer's guard, are taken over once their leases lapse.
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.objects import ObjectStorage
from cache.reader import RowReader
from cache.shards import ShardCorruption
from cache.storage import LOCK
from cache.store import ClaimLost, ClaimState, Store
from tests.helpers import forked
from tests.helpers import embed_json, make_table, pipe
from tests.helpers.kills import ENV, embed_args, pipe_cmd
from tests.helpers.stores import (STORE, bucket_objects, build, comparable, create_store, fixed_table,
                                  local_objects, run_writer,
                                  other_host)

ROOT = Path(__file__).resolve().parents[1]



def cache_in(bucket: str, tmp_path: Path, name: str = "mirror") -> ObjectStorage:
    return ObjectStorage(f"s3://{bucket}/c", tmp_path / name)



# ------------------------------------------------------------------------------ one writer
def test_a_store_in_a_bucket_equals_the_one_in_a_folder_object_for_object(bucket, tmp_path):
    local = tmp_path / "local"
    build(local)
    cache = cache_in(bucket, tmp_path)
    build(cache, failed_source=str(cache.path / "data" / "x.png"))
    want, got = comparable(local_objects(local)), comparable(bucket_objects(cache))
    assert sorted(got) == sorted(want)
    assert got == want
    assert not [k for k in got if "/claims/" in k] and LOCK not in got and f"{STORE}/{LOCK}" not in got


def test_nothing_is_written_to_a_local_folder_named_after_the_url(bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    build(cache_in(bucket, tmp_path / "elsewhere"), failed_source="/data/x.png")
    assert sorted(os.listdir(tmp_path)) == ["elsewhere"]


def test_the_commit_is_a_put_that_fails_when_the_part_exists(bucket, tmp_path):
    cache = cache_in(bucket, tmp_path)
    store = create_store(cache)
    group, data = fixed_table()[0]
    claim = store.claim(group, "r")
    assert store.storage.create(f"manifest/part-{claim.shard:06d}-{group}.parquet", b"someone else's")
    with pytest.raises(Exception, match="exists already"):
        store.write_shard(claim, data, "fixed-dataset", fsync=False)
    assert store.storage.read(f"manifest/part-{claim.shard:06d}-{group}.parquet") == b"someone else's"


# ------------------------------------------------------------------------------ claims and leases
def test_a_live_lease_from_another_host_is_waited_for_and_a_lapsed_one_taken_over(bucket, tmp_path):
    store = create_store(cache_in(bucket, tmp_path))
    group, data = fixed_table()[0]
    now = time.time()
    theirs = store.claim(group, "theirs", lease_s=120, now=now, who=other_host())
    assert theirs.state is ClaimState.TAKEN
    assert store.claim(group, "ours").state is ClaimState.BUSY  # their lease holds
    store.claim(group, "theirs", lease_s=120, now=now - 1000, who=other_host())  # as if written long ago
    ours = store.claim(group, "ours")
    assert ours.state is ClaimState.TAKEN and ours.shard == theirs.shard
    assert not store.renew(theirs, now=now)  # the dead writer, come back, cannot renew ...
    with pytest.raises(ClaimLost):  # ... nor commit
        store.commit(theirs, data.keys, data.views, data.sources, "fixed-dataset")
    store.write_shard(ours, data, "fixed-dataset", fsync=False)
    assert [g for _, g, _ in store.parts()] == [group]


def test_a_guard_left_by_a_dead_writer_is_taken_over_once_its_lease_lapses(bucket, tmp_path):
    cache = cache_in(bucket, tmp_path)
    store = create_store(cache)
    stale = {"writer": "gone", "token": "0" * 16, "time": time.time() - 100, "expires": time.time() + 1.5}
    store.storage.write(LOCK, json.dumps(stale).encode())
    t0 = time.monotonic()
    group, data = fixed_table()[0]
    claim = store.claim(group, "r")  # waits for the lease, then takes the guard over
    assert claim.state is ClaimState.TAKEN and time.monotonic() - t0 >= 1.0
    store.write_shard(claim, data, "fixed-dataset", fsync=False)
    assert not store.storage.exists(LOCK)  # released by its new holder


# ------------------------------------------------------------------------------ processes
def test_two_writers_in_two_processes_commit_every_group_once(bucket, tmp_path):
    cache = cache_in(bucket, tmp_path)
    writers = [run_writer(cache_in(bucket, tmp_path, f"m{i}"), "all", *(["reverse"] if i else [])) for i in (0, 1)]
    outs = [w.communicate(timeout=300)[0] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outs
    wrote = [line.split()[1] for out in outs for line in out.splitlines() if line.startswith("wrote")]
    groups = sorted(g for g, _ in fixed_table())
    assert sorted(wrote) == groups  # each group written by exactly one of them
    store = Store.open(cache.child(STORE))
    assert sorted(g for _, g, _ in store.parts()) == groups and not store.claims()
    index = store.row_index()
    for _, data in fixed_table():  # every committed row reads back as written, checksums checked
        rows = np.array([index[(k, 0)] for k in data.keys])
        np.testing.assert_array_equal(RowReader(store, "tokens").take(rows), data.arrays["tokens"])


def test_a_killed_writer_leaves_nothing_valid_and_the_resumed_store_equals_an_uninterrupted_one(bucket, tmp_path):
    cache = cache_in(bucket, tmp_path)
    w = run_writer(cache_in(bucket, tmp_path, "killed"), "hang")
    assert w.stdout.readline().split()[0] == "claimed"
    w.send_signal(signal.SIGKILL)
    w.wait()
    store = Store.open(cache.child(STORE))
    assert len(store.parts()) == 1 and len(store.claims()) == 1  # its second shard: claimed, never committed
    assert store.manifest().num_rows == 8  # its uploaded shard objects are there, and nothing reads them
    assert cache.exists(f"{STORE}/embeddings.zarr/tokens/c/1/0/0")
    build(cache, failed_source=str(cache.path / "data" / "x.png"))  # resumed here: the dead writer's pid is gone
    local = tmp_path / "local"
    build(local)
    assert comparable(bucket_objects(cache)) == comparable(local_objects(local))


# ------------------------------------------------------------------------------ reading
def test_reads_go_through_a_local_copy_that_follows_the_object_and_checks_every_chunk(bucket, tmp_path):
    cache = cache_in(bucket, tmp_path)
    build(cache, failed_source="/data/x.png")
    store = Store.open(ObjectStorage(cache.url + "/" + STORE, tmp_path / "reader"))  # a reader with an empty mirror
    data = fixed_table()[1][1]
    rows = np.arange(8, 16)
    np.testing.assert_array_equal(RowReader(store, "pooled").take(rows), data.arrays["pooled"])
    copy = store.storage.local("embeddings.zarr/pooled/c/1/0")
    assert copy.read_bytes() == store.storage.read("embeddings.zarr/pooled/c/1/0")
    raw = bytearray(copy.read_bytes())
    raw[5] ^= 1
    store.storage.write("embeddings.zarr/pooled/c/1/0", bytes(raw))  # the object changes: its copy is fetched again
    with pytest.raises(ShardCorruption, match="array pooled, shard 1, chunk 0 fails its crc32c"):
        RowReader(store, "pooled").take(rows)
    assert copy.read_bytes() == bytes(raw)


# ------------------------------------------------------------------------------ the commands
def test_embed_train_and_evaluate_with_a_cache_in_a_bucket(bucket, tmp_path, monkeypatch):
    """`pipe embed --cache s3://...` writes the stores a folder cache gets, object for object;
    a second run reuses them all; training and evaluation read them through the mirror."""
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    table = make_table(tmp_path / "data", 12)
    embed_json(table, tmp_path / "local")
    first = embed_json(table, f"s3://{bucket}/c")
    assert first["embedded"] == 24 and first["failed"] == 0
    cache = cache_in(bucket, tmp_path)
    got = comparable({k: v for k, v in bucket_objects(cache).items() if k.startswith("stores/")})
    want = comparable({k: v for k, v in local_objects(tmp_path / "local").items()
                       if k.startswith("stores/") and not k.endswith("/.inuse")})
    assert got == want and len(got) > 10
    assert [k for k in bucket_objects(cache) if k.startswith("datasets/")]  # the index went up too
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
    again = embed_json(table, f"s3://{bucket}/c")
    assert again["embedded"] == 0 and again["reused"] == 24
    runs = {}
    for name, where in (("local", str(tmp_path / "local")), ("bucket", f"s3://{bucket}/c")):
        r = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", where,
                 "--out", str(tmp_path / f"run-{name}"), "--json", "adaptor.d_model=32", "adaptor.n_heads=4",
                 "adaptor.ffn_dim=64", "batch_size=4", "epochs=1")
        runs[name] = json.loads(r.stdout.strip().splitlines()[-1])
    assert runs["bucket"]["epoch"] == 1 and runs["bucket"]["train_loss"] == runs["local"]["train_loss"]
    scores = {}
    for name, where in (("local", str(tmp_path / "local")), ("bucket", f"s3://{bucket}/c")):
        out = tmp_path / f"eval-{name}"
        pipe("evaluate", "--task", "retrieval", "-d", str(table), "-a", str(tmp_path / "run-bucket" / "last.safetensors"),
             "--cache", where, "--out", str(out))
        scores[name] = json.loads((out / "results.json").read_text())
    assert scores["bucket"]["methods"] == scores["local"]["methods"] and scores["bucket"]["data"]["splits"] == {"test": 3}
    spec = tmp_path / "sweep.yaml"
    spec.write_text(f"""
dataset: {table}
backbone: tiny-vit
text_encoder: tiny-bert
overrides: [adaptor.d_model=32, adaptor.n_heads=4, adaptor.ffn_dim=64, batch_size=4, epochs=1]
grid:
  optim.lr: [1.0e-3, 1.0e-4]
out: {tmp_path / "sweep"}
""")
    swept = pipe("sweep", str(spec), "--cache", f"s3://{bucket}/c")
    assert "backbone forwards: 0" in swept.output and len(pd.read_csv(tmp_path / "sweep" / "sweep.csv")) == 2


def test_verify_checks_every_object_of_a_bucket(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    url = f"s3://{bucket}/c"
    cache = cache_in(bucket, tmp_path, "writer")
    build(cache, failed_source="/data/x.png")
    ok = pipe("cache", "verify", "--cache", url, "--json")
    assert json.loads(ok.stdout.strip().splitlines()[-1])["ok"]
    key = f"{STORE}/embeddings.zarr/tokens/c/2/0/0"
    raw = bytearray(cache.read(key))
    raw[7] ^= 1
    cache.write(key, bytes(raw))  # one flipped byte in one object
    bad = pipe("cache", "verify", "--cache", url, expect=1)
    assert "array tokens, shard 2, chunk 0" in bad.output and "crc32c" in bad.output
    before = bucket_objects(cache)
    listed = pipe("cache", "gc", "--dry-run", "--cache", url)  # gc, rm and --repair on a bucket: tests/test_object_gc.py
    assert "would remove 1 item(s)" in listed.output, listed.output
    assert bucket_objects(cache) == before
    listed = json.loads(pipe("cache", "ls", "--cache", url, "--json").stdout.strip().splitlines()[-1])
    assert [r["items"] for r in listed] == [21]


def test_a_shard_is_fetched_in_range_requests_and_the_copies_stay_within_their_budget(bucket, tmp_path, monkeypatch):
    import cache.objects as objects

    cache = cache_in(bucket, tmp_path)
    build(cache, failed_source="/data/x.png")
    monkeypatch.setattr(objects, "RANGE_BYTES", 40)  # shards of a few hundred bytes: many ranges, in batches
    monkeypatch.setattr(objects, "MIRROR_BUDGET", objects.MirrorBudget())
    store = Store.open(ObjectStorage(cache.url + "/" + STORE, tmp_path / "reader"))
    size = len(store.storage.read("embeddings.zarr/tokens/c/0/0/0"))
    monkeypatch.setenv("PIPE_OBJECT_MIRROR_GB", str(2.5 * size / 2**30))  # room for two shard copies
    reader = RowReader(store, "tokens")
    for shard, (_, data) in enumerate(fixed_table()):
        rows = np.arange(shard * 8, shard * 8 + len(data.keys))
        np.testing.assert_array_equal(reader.take(rows), data.arrays["tokens"])
    copies = sorted(p.relative_to(tmp_path / "reader").as_posix()
                    for p in (tmp_path / "reader").rglob("*") if p.is_file() and not p.name.startswith("."))
    assert copies == ["embeddings.zarr/tokens/c/1/0/0", "embeddings.zarr/tokens/c/2/0/0"]  # the oldest went
    np.testing.assert_array_equal(RowReader(store, "tokens").take(np.arange(8)), fixed_table()[0][1].arrays["tokens"])


@pytest.mark.slow
def test_dask_workers_embed_into_a_bucket_as_one_process_does_into_a_folder(bucket, tmp_path, monkeypatch):
    """Workers write each shard's files, stage them as objects under their temporary names, and
    the client (which holds the claims) publishes them inside the bucket and commits."""
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    table = make_table(tmp_path / "data", 24)
    small = ("--shard-mb", "0.5", "--batch-size", "4")
    embed_json(table, tmp_path / "local", *small)
    dist = embed_json(table, f"s3://{bucket}/c", *small, "--workers", "2")
    assert dist["embedded"] == 48 and dist["failed"] == 0
    objects = bucket_objects(cache_in(bucket, tmp_path))
    assert not [k for k in objects if ".partial-" in k]  # every staged file was published, and its name dropped
    got = comparable({k: v for k, v in objects.items() if k.startswith("stores/")})
    want = comparable({k: v for k, v in local_objects(tmp_path / "local").items()
                       if k.startswith("stores/") and not k.endswith("/.inuse")})
    assert len([k for k in got if "/manifest/" in k]) > 2  # several shards, so several tasks ran
    assert got == want


def test_a_stray_bucket_note_does_not_turn_a_folder_into_a_bucket(tmp_path, monkeypatch):
    from cache.objects import REMOTE, remote_root
    from cache.store import LocalStorage, storage_at

    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / REMOTE).write_text(json.dumps({"url": "s3://some-bucket/c"}))
    assert remote_root(tmp_path / "elsewhere" / "stores") is None
    assert isinstance(storage_at(tmp_path / "elsewhere" / "stores" / "image" / "x"), LocalStorage)
    mirror = tmp_path / "mirror" / "some-bucket" / "c"
    mirror.mkdir(parents=True)
    (mirror / REMOTE).write_text(json.dumps({"url": "s3://some-bucket/c"}))
    assert remote_root(mirror / "stores" / "image" / "x") == ("s3://some-bucket/c", mirror)


@pytest.mark.slow
def test_pipe_embed_killed_and_resumed_on_a_bucket_equals_an_uninterrupted_folder_cache(bucket, tmp_path, monkeypatch):
    """SIGKILL a `pipe embed --cache s3://...` once it has committed a shard; what it committed
    stays byte for byte, and the resumed cache's stores equal a folder cache's. Training then
    streams from the bucket (resident=none) as it does from the folder."""
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    table = make_table(tmp_path / "data", 40)
    small = ("--shard-mb", "0.3")
    url = f"s3://{bucket}/c"
    cache = cache_in(bucket, tmp_path, "inspect")
    log = open(tmp_path / "killed.log", "wb")
    proc = forked.popen(pipe_cmd(*embed_args(table, url, *small)), env={**ENV, **os.environ}, stdout=log,
                            stderr=log, cwd=ROOT)
    t0 = time.monotonic()
    while not [o for o in cache.keys("stores") if "/manifest/part-" in o["path"]]:
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() - t0 < 180, "no shard was committed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {k: v for k, v in bucket_objects(cache).items() if "/manifest/" in k or "/c/" in k}
    parts = [k for k in before if "/manifest/" in k]
    resumed = embed_json(table, url, "--batch-size", "4", *small)
    assert resumed["reused"] >= 1 and resumed["embedded"] >= 1 and resumed["failed"] == 0  # killed mid-run
    after = bucket_objects(cache)
    assert all(after[k] == before[k] for k in parts)  # nothing committed before the kill changed
    embed_json(table, tmp_path / "local", "--batch-size", "4", *small)
    got = comparable({k: v for k, v in after.items() if k.startswith("stores/")})
    want = comparable({k: v for k, v in local_objects(tmp_path / "local").items()
                       if k.startswith("stores/") and not k.endswith("/.inuse")})
    assert got == want
    losses = []
    for where in (url, str(tmp_path / "local")):
        r = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", where, "--out",
                 str(tmp_path / f"run{len(losses)}"), "--json", "adaptor.d_model=32", "adaptor.n_heads=4",
                 "adaptor.ffn_dim=64", "batch_size=8", "epochs=1", "resident=none")
        losses.append(json.loads(r.stdout.strip().splitlines()[-1])["train_loss"])
    assert losses[0] == losses[1]
