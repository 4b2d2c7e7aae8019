"""`pipe cache gc` and `pipe cache rm` on a cache in a bucket, against the moto S3 server.

Each test builds a cache under ``s3://<bucket>/c`` with two stores (one a dataset index
references, one orphaned), Adaptor outputs of each, a prefix under ``stores/`` that is not
a store, and objects next to the cache (``c-other/``, ``cx/``, the bucket's top) that
must survive every command, byte for byte.
"""
from __future__ import annotations

import json
import time

import pytest

from cache.marker import MARKER, marker_bytes
from cache.storage import LOCK
from cache.store import Store
from tests.helpers import pipe
from tests.helpers.stores import (KEPT_OUT, ORPHAN, ORPHAN_OUT, SIBLINGS, STORE, bucket_objects, build, comparable,
                                  digests, fixed_table, gc_cache, gc_json, other_host, whole)


@pytest.fixture
def cache(bucket, tmp_path, monkeypatch):
    """The cache described in the module's docstring; returns the writer's storage of it."""
    return gc_cache(bucket, tmp_path, monkeypatch)


def test_gc_lists_then_removes_only_the_orphaned_store_and_its_outputs(cache, bucket, tmp_path):
    top = whole(bucket, tmp_path)
    before = digests(top)
    listed = gc_json(cache.url, "--dry-run")
    want = sorted([f"{cache.url}/{ORPHAN}", f"{cache.url}/{ORPHAN_OUT}"])
    assert sorted(r["path"] for r in listed["would_remove"]) == want
    assert [r["path"] for r in listed["skipped"]] == [f"{cache.url}/stores/image/not-a-store"]
    assert listed["bytes"] > 0 and digests(top) == before  # a dry run deletes nothing
    mirror = tmp_path / "mirror" / bucket / "c"
    assert (mirror / ORPHAN / "embeddings.zarr" / "zarr.json").is_file()  # the command's mirror has the store
    done = gc_json(cache.url)
    assert sorted(r["path"] for r in done["removed"]) == want
    after = digests(top)
    gone = {k for k in before if k.startswith(f"c/{ORPHAN}/") or k.startswith(f"c/{ORPHAN_OUT}/")}
    assert any("/manifest/part-" in k for k in gone) and any("/c/0/" in k for k in gone)
    assert not [k for k in after if k.startswith(f"c/{ORPHAN}/")]
    assert after == {k: v for k, v in before.items() if k not in gone}  # everything else byte for byte
    assert all(k in after for k in SIBLINGS) and f"c/{STORE}/embeddings.zarr/zarr.json" in after
    assert not (mirror / ORPHAN).exists() and not (mirror / ORPHAN_OUT).exists()  # the mirror follows
    assert gc_json(cache.url)["removed"] == []  # nothing more to collect
    Store.open(cache.child(STORE)).row_index()  # the referenced store still reads


def test_rm_removes_one_store_and_refuses_one_in_use_unless_forced(cache, bucket, tmp_path):

    top = whole(bucket, tmp_path)
    before = digests(top)
    used = pipe("cache", "rm", "fixed-encoder-0123456789abcdef", "--cache", cache.url, expect=2)
    assert "ds" in used.output and "--force" in used.output
    for bad in ("stores/image/..", "stores/image/not-a-store", "stores", f"{cache.url}/../c-other"):
        r = pipe("cache", "rm", bad, "--cache", cache.url, expect=2)
        assert "Nothing was removed" in r.output, r.output
    assert digests(top) == before
    pipe("cache", "rm", "fedcba987654", "--cache", cache.url)  # by fingerprint prefix
    after = digests(top)
    assert not [k for k in after if k.startswith(f"c/{ORPHAN}/") or k.startswith(f"c/{ORPHAN_OUT}/")]
    assert all(after[k] == before[k] for k in after) and all(k in after for k in SIBLINGS)
    pipe("cache", "rm", STORE, "--cache", cache.url, "--force")  # by key, used by a dataset
    left = digests(top)
    assert not [k for k in left if k.startswith("c/stores/image/fixed-")]
    assert json.loads(cache.read("datasets/ds/stores.json")) == {"image": {}}  # its index forgot it, in the bucket
    assert all(k in left for k in SIBLINGS) and "c/stores/image/not-a-store/x" in left
    assert not (tmp_path / "mirror" / bucket / "c" / STORE).exists()


def test_a_store_being_written_is_never_collected(cache, bucket, tmp_path):
    top = whole(bucket, tmp_path)
    orphan = Store.open(cache.child(ORPHAN))
    group = fixed_table()[1][0]
    assert orphan.claim(group, "theirs", lease_s=120, who=other_host()).state.value == "taken"
    before = digests(top)
    rep = gc_json(cache.url)
    assert [r["path"] for r in rep["removed"]] == []  # the store, and so its outputs, stay
    skipped = {r["path"]: r["why"] for r in rep["skipped"]}
    assert "being written by pid 4242 on node-b" in skipped[f"{cache.url}/{ORPHAN}"]
    assert digests(top) == before
    cache.delete(f"{ORPHAN}/claims/{orphan.claims()[0][0]:06d}-{group}.json")
    guard = {"writer": "w", "host": "node-b", "token": "1" * 16, "time": time.time(), "expires": time.time() + 60}
    cache.write(f"{ORPHAN}/{LOCK}", json.dumps(guard).encode())  # a writer inside the guard
    rep = gc_json(cache.url)
    assert "being committed to" in {r["path"]: r["why"] for r in rep["skipped"]}[f"{cache.url}/{ORPHAN}"]
    assert f"c/{ORPHAN}/embeddings.zarr/zarr.json" in digests(top)


def test_no_marker_in_the_bucket_or_an_unreadable_index_deletes_nothing(cache, bucket, tmp_path):

    top = whole(bucket, tmp_path)
    gc_json(cache.url, "--dry-run")  # the mirror now holds a copy of the marker: it must not count
    cache.delete(MARKER)
    assert (tmp_path / "mirror" / bucket / "c" / MARKER).is_file()  # a stale copy, kept by the mirror
    before = digests(top)
    for args in (("gc",), ("rm", "fedcba987654")):
        r = pipe("cache", *args, "--cache", cache.url, expect=2)
        assert "no cache marker" in r.output and "Nothing was deleted" in r.output, r.output
    assert digests(top) == before
    cache.write(MARKER, marker_bytes())
    cache.write("datasets/ds/stores.json", b'{"image": {"fixed-encoder": ')  # truncated
    r = pipe("cache", "gc", "--cache", cache.url, expect=2)
    assert "stores.json cannot be read" in r.output and "nothing was removed" in r.output, r.output
    assert digests(top) == {**before, "c/datasets/ds/stores.json": digests(top)["c/datasets/ds/stores.json"],
                            f"c/{MARKER}": digests(top)[f"c/{MARKER}"]}


def test_verify_repair_drops_a_damaged_shard_in_the_bucket_and_embed_restores_it(cache, bucket, tmp_path):
    """A flipped byte in one shard object: --repair deletes that shard's commit and objects in the
    bucket (nothing else), the store verifies clean, and writing the group again gives the
    store an undamaged build has, object for object."""
    top = whole(bucket, tmp_path)
    store = cache.child(STORE)
    clean = comparable(bucket_objects(store))
    key = "embeddings.zarr/tokens/c/2/0/0"
    raw = bytearray(store.read(key))
    raw[7] ^= 1
    store.write(key, bytes(raw))
    before = digests(top)
    bad = pipe("cache", "verify", "--cache", cache.url, expect=1)
    assert "array tokens, shard 2, chunk 0" in bad.output
    fixed = pipe("cache", "verify", "--repair", "--cache", cache.url, "--json")
    assert json.loads(fixed.stdout.strip().splitlines()[-1])["ok"], fixed.output
    after = digests(top)
    gone = sorted(set(before) - set(after))
    npz = {f"c/{KEPT_OUT}/00.npz", f"c/{ORPHAN_OUT}/00.npz"}  # not real .npz files: damaged derived files go too
    assert npz <= set(gone) and not (tmp_path / "mirror" / bucket / "c" / KEPT_OUT / "00.npz").exists()
    gone_in_store = [k for k in gone if k not in npz]
    assert all(k.startswith(f"c/{STORE}/") and ("/c/2" in k or "/manifest/part-000002-" in k) for k in gone_in_store), gone
    assert any("/manifest/part-000002-" in k for k in gone) and f"c/{STORE}/{key}" in gone
    assert {k: v for k, v in after.items()} == {k: v for k, v in before.items() if k not in gone}  # nothing else changed
    assert all(k in after for k in SIBLINGS)
    copy = tmp_path / "mirror" / bucket / "c" / STORE / "embeddings.zarr" / "tokens" / "c" / "2"
    assert not [p for p in copy.rglob("*") if p.is_file()]  # the local copy follows
    pipe("cache", "verify", "--cache", cache.url)  # clean now
    build(cache, failed_source="/data/x.png")  # the dropped group is written again (as `pipe embed` would)
    assert comparable(bucket_objects(store)) == clean


def test_verify_repair_refuses_a_bucket_without_its_marker(cache, bucket, tmp_path):

    top = whole(bucket, tmp_path)
    key = f"{STORE}/embeddings.zarr/tokens/c/2/0/0"
    raw = bytearray(cache.read(key))
    raw[7] ^= 1
    cache.write(key, bytes(raw))
    cache.delete(MARKER)
    before = digests(top)
    r = pipe("cache", "verify", "--repair", "--cache", cache.url, expect=2)
    assert "no cache marker" in r.output and "Nothing was deleted" in r.output, r.output
    assert digests(top) == before


def test_a_removal_cut_short_is_finished_and_rm_dry_run_deletes_nothing(cache, bucket, tmp_path):

    top = whole(bucket, tmp_path)
    before = digests(top)
    r = pipe("cache", "rm", "fedcba987654", "--dry-run", "--cache", cache.url)
    assert f"would remove {cache.url}/{ORPHAN}" in r.output and digests(top) == before
    orphan = cache.child(ORPHAN)
    cut = [o["path"] for o in orphan.keys() if o["path"] != "embeddings.zarr/zarr.json"][:4]
    for key in cut + [o["path"] for o in orphan.keys("manifest")]:  # as a removal killed after its first deletions
        orphan.delete(key)
    done = gc_json(cache.url)
    assert f"{cache.url}/{ORPHAN}" in [r["path"] for r in done["removed"]]
    assert not orphan.keys() and f"c/{STORE}/embeddings.zarr/zarr.json" in digests(top)


def test_a_key_the_client_cannot_list_stops_gc_with_a_message(cache, bucket, s3_endpoint, tmp_path):
    import boto3  # moto's own dependency: obstore refuses to write such a key


    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def listing() -> dict[str, str]:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        return {o["Key"]: o["ETag"] for page in pages for o in page.get("Contents", [])}

    s3.put_object(Bucket=bucket, Key="c/stores/image/../x", Body=b"odd")
    before = listing()
    r = pipe("cache", "gc", "--cache", cache.url, expect=2)
    assert "cannot be listed" in r.output and "'..'" in r.output and "Nothing was changed" in r.output, r.output
    assert listing() == before
    s3.delete_object(Bucket=bucket, Key="c/stores/image/../x")
    deep = f"c/{ORPHAN}/claims/../x"  # inside a store: seen only by gc's own listing
    s3.put_object(Bucket=bucket, Key=deep, Body=b"odd")
    before = listing()
    r = pipe("cache", "gc", "--cache", cache.url, expect=2)
    assert "pipe cache gc on" in r.output and "stopped" in r.output and "'..'" in r.output, r.output
    assert listing() == before
    s3.delete_object(Bucket=bucket, Key=deep)
    assert f"{cache.url}/{ORPHAN}" in [r["path"] for r in gc_json(cache.url)["removed"]]


def test_a_store_a_dataset_records_while_gc_runs_is_kept_with_its_outputs(cache, bucket, tmp_path, monkeypatch):
    """The index is read again under the store's guard: a `pipe embed` that records the store
    after gc listed it (simulated between the listing and the deletions) keeps it."""
    import cache.gc as bucket_gc  # gc and rm are one module for folders and buckets

    listed = bucket_gc._orphan_outputs
    index = json.dumps({"image": {"other-encoder": {"store": ORPHAN, "updated": 2}}}).encode()

    def and_then_a_writer_records_it(*args, **kwargs):
        out = listed(*args, **kwargs)
        cache.write("datasets/late/stores.json", index)
        return out

    monkeypatch.setattr(bucket_gc, "_orphan_outputs", and_then_a_writer_records_it)
    top = whole(bucket, tmp_path)
    before = digests(top)
    rep = gc_json(cache.url)
    assert rep["removed"] == []
    assert "came into use" in {r["path"]: r["why"] for r in rep["skipped"]}[f"{cache.url}/{ORPHAN}"]
    assert {k: v for k, v in digests(top).items() if k != "c/datasets/late/stores.json"} == before


def test_verify_repair_moves_an_unreadable_part_to_quarantine_in_the_bucket(cache, bucket, tmp_path):

    store = cache.child(STORE)
    part = next(o["path"] for o in store.keys("manifest") if o["path"].startswith("manifest/part-000001-"))
    store.write(part, b"not parquet")
    pipe("cache", "verify", "--cache", cache.url, expect=1)
    fixed = pipe("cache", "verify", "--repair", "--cache", cache.url, "--json")
    assert json.loads(fixed.stdout.strip().splitlines()[-1])["ok"], fixed.output
    keys = [o["path"] for o in store.keys()]
    moved = [k for k in keys if k.startswith(f"quarantine/{part.split('/')[-1]}.")]
    assert len(moved) == 1 and store.read(moved[0]) == b"not parquet" and part not in keys
    assert not [k for k in keys if "/c/1/" in k or k.endswith("/c/1")]  # shard 1's objects went with its commit
    assert [k for k in keys if "/c/0/" in k or k.endswith("/c/0")]  # the others stayed
