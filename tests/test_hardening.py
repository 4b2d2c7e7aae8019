"""Stage one under stress: repeated SIGKILLs, concurrent writers, a full disk, a read-only cache.

The file-system cases mount small tmpfs file systems, which needs root (CI and the
development machines run as root).
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import forked
from tests.helpers import ROOT, embed_json, make_table, pipe
from tests.helpers.kills import assert_nothing_lost, cache_files, claim_records, committed
from tests.helpers.stores import read_rows, stores_by_modality

pytestmark = pytest.mark.slow  # subprocesses, kills and process groups: minutes, not seconds

ENV = {**os.environ, "PIPE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def embed_cmd(table: Path, cache: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cli", "embed", "--dataset", str(table), "--backbone", "tiny-vit",
            "--text-encoder", "tiny-bert", "--cache", str(cache), "--batch-size", "4", "--shard-mb", "0.3",
            "--json", *extra]


def assert_same_cache(a: Path, b: Path) -> None:
    sa, sb = stores_by_modality(a), stores_by_modality(b)
    for modality in ("image", "text"):
        units = sb[modality].manifest()
        keys = list(zip(units.column("key").to_pylist(), units.column("view").to_pylist()))
        assert len(keys) == len(set(keys)), "a unit is stored twice"
        for name in ("tokens", "pooled"):
            ra, rb = read_rows(sa[modality], name), read_rows(sb[modality], name)
            assert ra.keys() == rb.keys()
            assert all(np.array_equal(ra[k], rb[k]) for k in ra), f"{modality}/{name} differ"


@pytest.fixture(scope="module")
def table_and_clean(embedded):
    """40 items embedded once as embed_cmd embeds them (the cache test_cache_integrity.py damages)."""
    made = embedded(40, "--shard-mb", "0.3", "--batch-size", "4")
    return made.table, made.cache


KILLED = ("--shard-mb", "0.1")  # 16-row shards: 96 items make 12 of them, room for ten kills' progress


def test_sigkill_at_ten_random_points_then_resume(tmp_path):
    table = make_table(tmp_path / "data", 96)
    embed_json(table, tmp_path / "clean", "--batch-size", "4", *KILLED)  # the reference, in this process
    cache = tmp_path / "cache"
    rng = random.Random(1234)
    kept: dict[str, bytes] = {}  # every file committed before some kill
    landed = 0
    parts = lambda: len(list(cache.glob("stores/*/*/manifest/part-*.parquet")))
    for i in range(10):
        proc = forked.popen(embed_cmd(table, cache, *KILLED), env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        # Alternate the trigger: once this run holds a claim (past start-up, inside its first
        # shard), or once it has committed a shard (inside the next one); then a random delay.
        start = parts()
        ready = ((lambda: any(c.get("pid") == proc.pid for c in claim_records(cache))) if i % 2 == 0
                 else (lambda: parts() > start))
        while proc.poll() is None and not ready():
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3) if i % 2 == 0 else rng.uniform(0, 0.05))
        landed += proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_nothing_lost(kept, cache)  # no kill, and no run after one, lost or changed a committed file
        kept.update(committed(cache))
    print(f"embed: {landed} of 10 kills landed; {len(kept)} committed files kept through them")
    assert landed >= 8 and kept, (landed, len(kept))
    out = embed_json(table, cache, "--batch-size", "4", *KILLED)  # the run after the kills, in this process
    assert out["embedded"] + out["reused"] == 192
    pipe("cache", "verify", "--cache", str(cache))
    assert_nothing_lost(kept, cache)
    assert cache_files(cache) == cache_files(tmp_path / "clean")  # byte for byte


def test_two_concurrent_writers_store_everything_once(table_and_clean, tmp_path):
    table, clean = table_and_clean
    cache = tmp_path / "cache"
    procs = [forked.popen(embed_cmd(table, cache), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    summaries = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert sum(s["embedded"] for s in summaries) == 80  # split between them, none twice
    pipe("cache", "verify", "--cache", str(cache))
    assert_same_cache(clean, cache)


@contextmanager
def tmpfs(path: Path, size: str, *options: str):
    """A small tmpfs at ``path``; the test is skipped (with the reason) where none can be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (it needs root): {done.stderr.strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_disk_full_gives_a_clear_error_and_a_valid_cache(table_and_clean, tmp_path):
    table, clean = table_and_clean
    with tmpfs(tmp_path / "small", "1500k") as cache:
        full = forked.run(embed_cmd(table, cache), env=ENV, capture_output=True, text=True)
        assert full.returncode == 2, full.stderr
        assert "disk is full" in full.stderr and "re-run `pipe embed`" in full.stderr
        assert "Traceback" not in full.stderr
        # the shard being written was dropped: no half-written file, no claim left behind
        assert list(cache.rglob(".*partial*")) == [] and list(cache.glob("stores/*/*/claims/*")) == []
        pipe("cache", "verify", "--cache", str(cache))  # what was committed reads back intact
        subprocess.run(["mount", "-o", "remount,size=64m", str(cache)], check=True)
        again = forked.run(embed_cmd(table, cache), env=ENV, capture_output=True, text=True)
        assert again.returncode == 0, again.stderr  # resumes once there is room
        out = json.loads(again.stdout.strip().splitlines()[-1])
        assert out["reused"] > 0 and out["embedded"] + out["reused"] == 80
        pipe("cache", "verify", "--cache", str(cache))
        assert_same_cache(clean, cache)


def test_read_only_cache(table_and_clean, tmp_path):
    table, _ = table_and_clean
    with tmpfs(tmp_path / "ro", "8m", "ro") as cache:
        r = pipe("embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
                 "--cache", str(cache), expect=2)
        assert "read-only" in r.output and "--cache" in r.output and "Traceback" not in r.output
    with tmpfs(tmp_path / "later-ro", "64m") as cache:
        embed_json(table, cache)
        subprocess.run(["mount", "-o", "remount,ro", str(cache)], check=True)
        pipe("cache", "verify", "--cache", str(cache))  # reading a read-only cache works
        out = tmp_path / "run"
        pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(out), "epochs=1", "batch_size=8", "adaptor.d_model=32", "adaptor.n_heads=4",
             "adaptor.ffn_dim=64")
        assert (out / "last.safetensors").exists()


def test_a_store_killed_while_it_was_being_created_is_created_again(tmp_path):
    """An older version wrote a store's group metadata first and its attributes after: a kill
    in between left a group without attributes, which every later run refused. The group is
    now written whole, and such a leftover (nothing committed in it) is created again."""
    import zarr

    table = make_table(tmp_path / "data", 4)
    embed_json(table, tmp_path / "clean")
    cache = tmp_path / "cache"
    for store in (tmp_path / "clean").glob("stores/*/*"):
        left = cache / store.relative_to(tmp_path / "clean")
        for sub in ("manifest", "claims", "failures"):
            (left / sub).mkdir(parents=True)
        zarr.open_group(str(left / "embeddings.zarr"), mode="w", zarr_format=3)  # and then the kill
    out = embed_json(table, cache)
    assert out["embedded"] == 8
    pipe("cache", "verify", "--cache", str(cache))
    assert cache_files(cache) == cache_files(tmp_path / "clean")
