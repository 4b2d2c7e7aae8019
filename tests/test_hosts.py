"""Two hosts without two machines: `pipe embed` writers in their own UTS and pid namespaces.

A writer in its own UTS namespace has its own host name, and in its own pid namespace it
is pid 1 with its own /proc: from the cache's point of view it is another machine (or a
container) sharing the cache's file system. These tests need root for `unshare` (CI and
the development machines run as root); where the kernel refuses, they are skipped with
its answer.
"""
from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import forked
from tests.helpers import make_table, pipe
from tests.helpers.kills import (
    ENV,
    assert_nothing_lost,
    cache_files,
    claim_records,
    committed,
    embed_args,
    in_namespace,
    namespace_init,
    pipe_cmd,
    sigkill,
    skip_without_namespaces,
    start,
    wait_until,
)

pytestmark = pytest.mark.slow  # subprocesses in namespaces, kills: minutes, not seconds


def parts(cache: Path, modality: str) -> int:
    return len(list(cache.glob(f"stores/{modality}/*/manifest/part-*.parquet")))


def run_clean(table: Path, cache: Path, *extra: str) -> None:
    done = forked.run(pipe_cmd(*embed_args(table, cache, *extra)), env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def namespaces():
    skip_without_namespaces()


# ------------------------------------------------------------------------------ a host that crashes
CRASH = ("--shard-mb", "0.3")  # 16-row image shards: 48 items make 3 of them


def test_a_crashed_hosts_shard_is_taken_over_once_its_lease_lapses(namespaces, tmp_path):
    table = make_table(tmp_path / "data", 48)
    cache, log = tmp_path / "cache", tmp_path / "node-a.log"
    proc = start(in_namespace(pipe_cmd(*embed_args(table, cache, *CRASH)), hostname="node-a"), log,
                 env={"PIPE_CLAIM_LEASE_S": "6"})
    init = namespace_init(proc)
    wait_until(proc, lambda: parts(cache, "image") >= 1 and bool(claim_records(cache)), log)
    sigkill(init)  # pid 1 of the namespace: node-a is gone, mid-shard, with everything in it
    proc.wait(timeout=30)
    before = committed(cache)
    left = claim_records(cache)
    assert left and all(c["host"] == "node-a" and c["pid"] == 1 and c["lease_s"] == 6 for c in left), left

    # node-a's claim is another host's, with a valid lease: nobody may clear it, not even --repair
    out = pipe("cache", "verify", "--cache", str(cache), "--repair").output
    assert "claimed by pid 1 on node-a (in progress: its lease holds for" in out, out
    assert claim_records(cache) == left
    time.sleep(max(0.0, max(c["expires"] for c in left) - time.time()) + 0.5)
    out = pipe("cache", "verify", "--cache", str(cache)).output  # once it lapses, it is an interrupted run
    assert "claimed by pid 1 on node-a, left by an interrupted run (its lease expired" in out, out

    # a `pipe embed` here takes the shard over and finishes the cache
    done = forked.run(pipe_cmd(*embed_args(table, cache, *CRASH, "--lease-s", "6")), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["reused"] >= 16 and summary["embedded"] + summary["reused"] == 96, summary
    assert not claim_records(cache)
    pipe("cache", "verify", "--cache", str(cache))
    assert_nothing_lost(before, cache)
    run_clean(table, tmp_path / "clean", *CRASH)
    assert cache_files(cache) == cache_files(tmp_path / "clean")  # byte for byte


# ------------------------------------------------------------------------------ two live writers, one host name
TWO = ("--shard-mb", "2")  # ~48-row image shards: each takes longer than the 1 s lease below


class ClaimWatcher(threading.Thread):
    """Reads every claim file every 20 ms while the writers run: who held claims together,
    and how often their leases were renewed."""

    def __init__(self, cache: Path):
        super().__init__(daemon=True)
        self.cache, self.stop, self.together, self.renewals, self.writers = cache, threading.Event(), 0, 0, {}

    def run(self) -> None:
        while not self.stop.is_set():
            seen = claim_records(self.cache)
            for c in seen:
                self.writers[c["writer"]] = (c["host"], c["pid"], c["pidns"])
                self.renewals = max(self.renewals, c.get("renewals", 0))
            self.together += len({c["writer"] for c in seen}) > 1
            time.sleep(0.02)


def test_two_live_writers_in_namespaces_sharing_a_host_name_never_clear_each_others_shards(namespaces, tmp_path):
    table = make_table(tmp_path / "data", 160)
    cache = tmp_path / "cache"
    watcher = ClaimWatcher(cache)
    watcher.start()
    logs = [tmp_path / f"writer-{i}.log" for i in range(2)]
    procs = [start(in_namespace(pipe_cmd(*embed_args(table, cache, *TWO))), log, env={"PIPE_CLAIM_LEASE_S": "1"})
             for log in logs]
    codes = [p.wait(timeout=400) for p in procs]
    watcher.stop.set()
    watcher.join()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], [t[-3000:] for t in texts]
    # both were pid 1 on the same host name: only their pid namespaces and writer ids tell them apart
    assert len(watcher.writers) == 2 and {(h, pid) for h, pid, _ in watcher.writers.values()} == {(socket.gethostname(), 1)}
    assert len({ns for _, _, ns in watcher.writers.values()}) == 2
    assert watcher.together > 0, "the two writers never held claims at the same time"
    assert not any("took this claim over" in t for t in texts), "a live writer's shard was taken over"
    assert watcher.renewals >= 2  # shards outlasted the lease, and the lease was renewed
    summaries = [json.loads(t.strip().splitlines()[-1]) for t in texts if t.strip()]
    assert sum(s["embedded"] for s in summaries) == 320 and all(s["embedded"] > 0 for s in summaries), summaries
    pipe("cache", "verify", "--cache", str(cache))
    run_clean(table, tmp_path / "clean", *TWO)
    assert cache_files(cache) == cache_files(tmp_path / "clean")
