"""Nothing left behind, in a folder and in a bucket (the moto S3 server), by the same code.

- ``gc`` removes a dead writer's temporary shard files: in a folder, a ``.partial-`` file
  whose process is gone and that is older than the grace period; in a bucket, a
  ``.partial-`` object a Dask worker staged and its committer never published, once older
  than the claim lease. A claimed shard's files, and fresh ones, stay.
- The guard (the ``.lock`` object) is renewed while its holder works, a long ``gc``
  deletion included, so nobody takes it over midway; a holder that dies releases it by
  lease expiry, within one lease (plus a poll) of its death; a holder whose guard was
  taken over knows it, and never deletes the new holder's.
- Adaptor outputs and aligned masks are committed to the bucket over the version read:
  a second host computes none of them again, and two writers adding rows keep both's.
- ``verify --repair --dry-run`` says what each repair kind would do and changes nothing.
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.gc import busy_with
from cache.marker import MARKER, marker_bytes
from cache.mirror import attach
from cache.objects import GUARD_POLL_MAX_S, ObjectStorage
from cache.outputs import OutputCache, ensure_outputs_meta, outputs_folder
from cache.storage import LOCK, TEMP_GRACE_S
from cache.store import GROUP_META, Store
from tests.helpers.stores import (KEPT_OUT, ORPHAN, STORE, build, digests, fixed_table, gc_cache, gc_json, other_host,
                                  run_writer, whole)

LEASE_S = 3.0  # the claim lease the bucket's leftovers are judged by, here
GUARD_S = 1.5  # the guard's lease, here
TOKEN = "0123456789abcdef"


def _dead_pid() -> int:
    import subprocess

    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def _folder_cache(tmp_path: Path) -> Path:
    """The fixed store in a marked cache folder, referenced by a dataset's index."""
    root = tmp_path / "folder"
    build(root)
    (root / MARKER).write_bytes(marker_bytes())
    (root / "datasets" / "ds").mkdir(parents=True)
    (root / "datasets" / "ds" / "stores.json").write_text(json.dumps({"image": {"fixed-encoder": {"store": STORE}}}))
    return root


# ------------------------------------------------------------------------------ temporary shard files

@pytest.fixture
def cache(bucket, tmp_path, monkeypatch):
    """A cache in the bucket with an orphaned store and outputs (tests.helpers.stores.gc_cache)."""
    return gc_cache(bucket, tmp_path, monkeypatch)


@pytest.mark.parametrize("where", ["folder", "bucket"])

def test_gc_removes_a_dead_writers_partial_files_and_keeps_claimed_and_fresh_ones(where, request, tmp_path, monkeypatch):
    """Shard 5: a dead writer's files, no claim (removed). Shard 3: claimed by a live writer
    on another host (kept). Shard 1: committed, with a dead writer's file beside it (removed).
    Shard 7: written just now (kept)."""
    pid = _dead_pid()
    old = {f"embeddings.zarr/tokens/c/5/0/.0.partial-{pid}-{TOKEN}", f"embeddings.zarr/length/c/.5.partial-{pid}-{TOKEN}",
           f"embeddings.zarr/pooled/c/1/.0.partial-{pid}-{TOKEN}"}
    claimed, fresh = f"embeddings.zarr/tokens/c/3/0/.0.partial-{pid}-{TOKEN}", f"embeddings.zarr/length/c/.7.partial-{pid}-{TOKEN}"
    if where == "bucket":
        monkeypatch.setenv("PIPE_CLAIM_LEASE_S", str(LEASE_S))
        c = request.getfixturevalue("cache")
        url, store = c.url, c.child(STORE)
    else:
        url = str(_folder_cache(tmp_path))
        store = Store.open(Path(url) / STORE).storage
    live = Store.open(store).claim("f" * 16, "theirs", lease_s=120, who=other_host())
    assert live.state.value == "taken" and live.shard == 3
    for key in sorted(old) + [claimed]:  # as staged by Dask workers (a bucket), or left by killed writers (a folder)
        store.mkdirs(key.rsplit("/", 1)[0])
        store.write(key, b"half a shard")
    if where == "bucket":
        time.sleep(LEASE_S + 0.5)  # S3 keeps the time of the upload: let them outlive the lease
    else:
        for key in sorted(old) + [claimed]:
            os.utime(store.local(key), (0, time.time() - TEMP_GRACE_S - 5))
    store.mkdirs(fresh.rsplit("/", 1)[0])
    store.write(fresh, b"a shard being written")
    listed = gc_json(url, "--dry-run")
    want = sorted(f"{store.where}/{k}" if where == "bucket" else str(store.local(k)) for k in old)
    assert sorted(r["path"] for r in listed["would_remove"] if ".partial-" in r["path"]) == want
    assert store.exists(sorted(old)[0])  # a dry run deletes nothing
    store.write(fresh, b"a shard being written, still")  # (S3 keeps whole seconds: fresh again for the real run)
    done = gc_json(url)
    gone = [r for r in done["removed"] if ".partial-" in r["path"]]
    assert sorted(r["path"] for r in gone) == want and {r["why"] for r in gone} == {"temporary file of a writer that is gone"}
    assert not any(store.exists(k) for k in old) and store.exists(claimed) and store.exists(fresh)
    assert [g for _, g, _ in Store.open(store).parts()] == [g for g, _ in fixed_table()]  # the commits untouched


# ------------------------------------------------------------------------------ the guard's lease
def test_the_guard_is_renewed_while_its_holder_works_and_nobody_takes_it_meanwhile(bucket, tmp_path):
    url = f"s3://{bucket}/s"
    ours, theirs = ObjectStorage(url, tmp_path / "a", lease_s=GUARD_S), ObjectStorage(url, tmp_path / "b", lease_s=GUARD_S)
    got: list[float] = []

    def take() -> None:
        with theirs.guard():
            got.append(time.monotonic())

    with ours.guard() as hold:
        waiter = threading.Thread(target=take)
        waiter.start()
        time.sleep(2 * GUARD_S + 0.5)  # two leases: without renewals the waiter would have it by now
        assert not got and not hold.lost and hold.renewals >= 3, hold.renewals
        assert json.loads(ours.read(LOCK))["expires"] > time.time()
        released = time.monotonic()
    waiter.join(15)
    assert got and got[0] >= released and not ours.exists(LOCK)  # taken once released, and released by its holder


@pytest.mark.slow
def test_a_holder_that_dies_releases_the_guard_by_lease_expiry_within_one_lease(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("PIPE_GUARD_LEASE_S", str(GUARD_S))
    url = f"s3://{bucket}/s"
    ours = ObjectStorage(url, tmp_path / "ours")
    holder = run_writer(ObjectStorage(url, tmp_path / "dead"), "guard")
    assert holder.stdout.readline().strip() == "held"
    first = json.loads(ours.read(LOCK))
    time.sleep(GUARD_S)
    renewed = json.loads(ours.read(LOCK))
    assert renewed["token"] == first["token"] and renewed["expires"] > first["expires"]  # its holder renews it
    holder.kill()
    holder.wait()
    died, expires = time.time(), json.loads(ours.read(LOCK))["expires"]
    with ours.guard():
        taken = time.time()
    assert taken >= expires - 0.05  # never before its lease ran out ...
    assert taken - died <= GUARD_S + GUARD_POLL_MAX_S + 1.0  # ... and within one lease of the death (and a poll)


def test_a_guard_taken_over_is_lost_to_its_old_holder_which_leaves_the_new_one_alone(bucket, tmp_path):
    ours = ObjectStorage(f"s3://{bucket}/s", tmp_path / "a", lease_s=0.8)
    with ours.guard() as hold:
        new = {"writer": "w2", "host": "node-b", "token": "2" * 16, "time": time.time(), "expires": time.time() + 60}
        ours.write(LOCK, json.dumps(new).encode())  # what a takeover does while this holder is paused past its lease
        time.sleep(0.8)  # a renewal runs, and finds the guard is not its own
        assert hold.lost
    assert json.loads(ours.read(LOCK))["token"] == "2" * 16  # the new holder's guard is not deleted
    assert busy_with(ours) == "being committed to by w2 on node-b"


def test_a_long_gc_deletion_keeps_the_guard_until_the_store_is_gone(cache, bucket, tmp_path, monkeypatch):
    """With a 1 s lease and a deletion slowed to several seconds, a writer that wants the
    store's guard gets it only once the store is gone: the lease was renewed throughout."""
    import cache.gc as gc_module

    monkeypatch.setenv("PIPE_GUARD_LEASE_S", "1")
    monkeypatch.setattr(gc_module, "DELETE_BATCH", 1)
    slow = ObjectStorage.delete_many

    def slowly(self, keys):
        time.sleep(0.4)
        slow(self, keys)

    monkeypatch.setattr(ObjectStorage, "delete_many", slowly)
    orphan = cache.child(ORPHAN)
    n_objects = len(orphan.keys())
    seen: dict[str, object] = {}

    def writer() -> None:
        deadline = time.monotonic() + 60
        while not orphan.exists(LOCK) and time.monotonic() < deadline:
            time.sleep(0.02)
        seen["gc held it"] = orphan.exists(GROUP_META)  # gc's guard is there, and the store still whole
        with ObjectStorage(orphan.url, tmp_path / "writer", lease_s=1.0).guard():
            seen["metadata"] = orphan.exists(GROUP_META)

    t = threading.Thread(target=writer)
    t.start()
    t0 = time.monotonic()
    done = gc_json(cache.url)
    took = time.monotonic() - t0
    t.join(30)
    assert f"{cache.url}/{ORPHAN}" in [r["path"] for r in done["removed"]]
    assert n_objects >= 6 and took > 2.0  # the deletion outlasted the lease twice over
    assert seen == {"gc held it": True, "metadata": False}  # the writer waited until the store was gone
    assert not orphan.keys()


def test_a_store_a_running_embed_holds_between_its_claims_is_never_collected(cache, bucket, tmp_path):
    """A bucket has no flock: `pipe embed` marks each store it writes with an in-use object
    (a lease, renewed), which gc honours as a folder's ``.inuse`` lock; a dead writer's mark
    does not count, and a store removed meanwhile is said, never written into."""
    from cache.storage import StoreError

    top = whole(bucket, tmp_path)
    before = digests(top)
    orphan = Store.open(cache.child(ORPHAN))
    with orphan.in_use():  # no claim and no guard: only the mark says a writer is there
        marks = [k for k in digests(top) if "/.inuse/" in k]
        skipped = {r["path"]: r["why"] for r in gc_json(cache.url)["skipped"]}
        assert len(marks) == 1 and skipped[f"{cache.url}/{ORPHAN}"].startswith("not referenced by any dataset, "
                                                                                "but held by a running `pipe embed`")
        assert {k: v for k, v in digests(top).items() if k not in marks} == before
    assert not [k for k in digests(top) if "/.inuse/" in k]  # the mark goes with its writer
    gone = {**other_host().record(), "run": "x", "time": time.time() - 300, "lease_s": 120, "expires": time.time() - 180}
    orphan.storage.write(".inuse/dead-writer.json", json.dumps(gone).encode())  # a dead writer's mark
    assert f"{cache.url}/{ORPHAN}" in [r["path"] for r in gc_json(cache.url)["removed"]]
    with pytest.raises(StoreError, match="was removed while it was being opened"):
        with orphan.in_use():
            pass


# ------------------------------------------------------------------------------ derived files
def _hosts(bucket: str, tmp_path: Path, monkeypatch):
    """The cache's folder as each of two hosts sees it (each its own local mirror of the bucket)."""
    url = f"s3://{bucket}/c"
    ObjectStorage(url, tmp_path / "writer").write(MARKER, marker_bytes())

    def host(name: str) -> Path:
        monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / name))
        return attach(url)
    return host


def _values(rows: np.ndarray) -> np.ndarray:
    return np.stack([rows, rows * 2], 1).astype(np.float32)


def _never(rows):
    raise AssertionError(f"rows {rows} were computed again")


def test_adaptor_outputs_computed_on_one_host_are_reused_on_another(bucket, tmp_path, monkeypatch):
    host = _hosts(bucket, tmp_path, monkeypatch)
    a = outputs_folder(host("host-a"), "a" * 32, "f" * 64)
    ensure_outputs_meta(a, {"checkpoint": "x"})
    _, computed = OutputCache(a, "image_pooled").get(np.arange(6), _values)
    assert computed == 6
    b = outputs_folder(host("host-b"), "a" * 32, "f" * 64)
    assert b != a and (b / "meta.json").is_file()
    got, computed = OutputCache(b, "image_pooled").get(np.array([5, 0, 3]), _never)
    assert computed == 0 and np.array_equal(got, _values(np.array([5, 0, 3])))


@pytest.mark.parametrize("where", ["folder", "bucket"])
def test_two_writers_adding_outputs_at_once_keep_each_others_rows(where, bucket, tmp_path, monkeypatch):
    """The second writer read the file before the first committed: its commit is refused,
    it merges the first's rows with its own, and commits again."""
    host = _hosts(bucket, tmp_path, monkeypatch) if where == "bucket" else lambda name: tmp_path / "folder"

    def on(name: str) -> OutputCache:  # the outputs file as host ``name`` sees it
        return OutputCache(outputs_folder(host(name), "a" * 32, "f" * 64), "text_pooled")

    on("host-a").get(np.arange(3), _values)
    second = on("host-b")

    def meanwhile(rows):
        on("host-a").get(np.array([8, 9]), _values)  # the first commits between the second's read and its write
        host("host-b")
        return _values(rows)

    got, computed = second.get(np.arange(6), meanwhile)
    assert computed == 3 and np.array_equal(got, _values(np.arange(6)))
    rows, values = on("host-a").load()
    assert rows.tolist() == [0, 1, 2, 3, 4, 5, 8, 9] and np.array_equal(values, _values(rows))


def test_masks_aligned_on_one_host_are_read_from_the_bucket_on_another(bucket, tmp_path, monkeypatch):
    from tests.helpers import write_png

    from pipeline.datasets.mask_targets import load_masks

    host = _hosts(bucket, tmp_path, monkeypatch)
    data = tmp_path / "data"
    items = pd.DataFrame({"id": [f"s{i}" for i in range(4)],
                          "image": [str(write_png(data / f"img{i}.png", i, size=40)) for i in range(4)],
                          "mask.lesion": [str(write_png(data / f"mask{i}.png", 10 + i, size=40)) for i in range(4)]})
    spec = {"preprocess": {"resize_size": 32, "input_size": 28}}
    first, read = load_masks(items, "lesion", spec, host("host-a"), "ds")
    assert read == 4 and first.shape == (4, 28, 28) and first.any()
    again, read = load_masks(items, "lesion", spec, host("host-b"), "ds")
    assert read == 0 and np.array_equal(again, first)


@pytest.mark.slow
def test_an_evaluation_on_a_second_host_runs_the_adaptor_zero_times(bucket, tmp_path, monkeypatch):
    from tests.helpers import embed_json, make_table, pipe

    url = f"s3://{bucket}/c"
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "host-a"))
    table = make_table(tmp_path / "data", 12)
    embed_json(table, url)
    pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", url, "--out",
         str(tmp_path / "run"), "adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=4",
         "epochs=1")
    results = {}
    for host in ("host-a", "host-b"):
        monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / host))
        out = tmp_path / f"eval-{host}"
        r = pipe("evaluate", "--task", "retrieval", "-d", str(table), "-a", str(tmp_path / "run" / "last.safetensors"),
                 "--cache", url, "--out", str(out), "bootstrap=50")
        results[host] = (r.output, json.loads((out / "results.json").read_text()))
    assert sum(results["host-a"][1]["checkpoint"]["adaptor_forwards"].values()) > 0
    assert "adaptor forwards: 0 (cached)" in results["host-b"][0]
    assert results["host-b"][1]["methods"] == results["host-a"][1]["methods"]


# ------------------------------------------------------------------------------ verify's repair kinds
def test_verify_repair_dry_run_names_each_repair_and_changes_nothing(cache, bucket, tmp_path):
    from tests.helpers import pipe

    top = whole(bucket, tmp_path)
    store = cache.child(STORE)
    key = "embeddings.zarr/tokens/c/2/0/0"
    raw = bytearray(store.read(key))
    raw[7] ^= 1
    store.write(key, bytes(raw))
    before = digests(top)
    r = pipe("cache", "verify", "--repair", "--dry-run", "--cache", cache.url, "--json", expect=1)
    report = json.loads(r.stdout.strip().splitlines()[-1])
    planned = [line for s in report["stores"] for line in s.get("would_repair", [])]
    assert any(line.startswith("drop manifest part part-000002-") for line in planned), planned
    assert f"remove {KEPT_OUT}/00.npz (it is computed again when next needed)" in planned
    assert not report["repaired"] and report["dry_run"] and "nothing was changed" in r.output
    assert digests(top) == before
    pipe("cache", "verify", "--dry-run", "--cache", cache.url, expect=2)  # says to pass --repair too


def test_every_repair_kind_is_one_object_with_its_plan_and_its_apply():
    from cache.verify import REPAIR_KINDS, Repair, RepairKind

    assert list(REPAIR_KINDS) == ["attrs", "meta", "quarantine", "drop", "unclaim", "clear", "unlink", "discard"]
    for name, kind in REPAIR_KINDS.items():
        assert isinstance(kind, RepairKind) and kind.name == name
        assert type(kind).plan is not RepairKind.plan and type(kind).apply is not RepairKind.apply
    with pytest.raises(ValueError, match="no repair kind 'rename'"):
        Repair("rename", Path("x"))
