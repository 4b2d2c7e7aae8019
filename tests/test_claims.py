"""Claims with leases, with the clock, the host and the process injected.

A claim is live while its lease holds, whatever host wrote it; dead once the lease has
expired, whatever host wrote it; and dead at once when its writer runs in this pid
namespace on this machine and is gone. A writer renews its lease while it works, a
renewal never resurrects a claim another writer took over, and a writer whose claim was
taken over cannot commit or release it. (The same with real processes in their own UTS
and pid namespaces: tests/test_hosts.py.)
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import threading
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cache import claims
from core.processes import Identity, me, process_start
from cache.claims import LEGACY_LEASE_S, LeaseKeeper, judge, lease_seconds, live_run, new_record
from cache.gc import in_use
from cache.store import Claim, ClaimLost, ClaimState, ShardData, Store
from cache.verify import verify_store
from tests.helpers import make_table, pipe

T0 = 1_000_000.0  # the injected clock starts here
LEASE = 120.0


def other_host(pid: int = 4242, host: str = "node-b") -> Identity:
    return Identity(host, pid, "777", "another-boot-id", "pid:[4026531111]", "b" * 16)


def same_host_other_namespace(pid: int = 1) -> Identity:
    """A container sharing our host name (host networking) and boot, in its own pid namespace."""
    return replace(me(), pid=pid, start="5", pidns="pid:[4026539999]", token="c" * 16)


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def neighbour(pid: int, start: str | None = None) -> Identity:
    """Another process on this machine, in our pid namespace."""
    return replace(me(), pid=pid, start=start if start is not None else process_start(pid), token="d" * 16)


def record(who: Identity, lease: float = LEASE, at: float = T0, run: str = "r") -> dict:
    return new_record("0" * 16, 0, run, "e" * 16, lease, at, who)


# ------------------------------------------------------------------------------ judging one claim
def test_a_claim_from_another_host_is_live_while_its_lease_holds_and_dead_after():
    info = record(other_host())
    assert judge(info, T0 + LEASE - 1).live
    late = judge(info, T0 + LEASE + 1)
    assert not late.live and late.why == "its lease expired 1 s ago"
    assert judge(info, T0 + 1).why == "its lease holds for 119 s more"
    assert judge(info, T0 - 200).why == "its lease holds for 5 min 20 s more"


def test_a_container_sharing_our_host_name_is_judged_by_its_lease_not_its_pid():
    """Its pid (1) means nothing in our namespace: neither 'running' nor 'gone' counts."""
    for pid in (1, _dead_pid()):
        info = record(same_host_other_namespace(pid))
        assert judge(info, T0 + 10).live, pid
        assert not judge(info, T0 + LEASE + 1).live


def test_a_writer_in_our_namespace_that_is_gone_is_dead_at_once():
    info = record(neighbour(_dead_pid(), start="1"))
    verdict = judge(info, T0 + 1)  # its lease still holds
    assert not verdict.live and verdict.why == "its process is gone"
    reused = record(neighbour(os.getppid(), start="1"))  # a live pid with another start time: reused
    assert not judge(reused, T0 + 1).live


def test_a_writer_in_our_namespace_that_runs_is_live_until_its_lease_expires():
    info = record(neighbour(os.getppid()))
    assert judge(info, T0 + 1).live
    assert not judge(info, T0 + LEASE + 1).live  # alive but stuck (or paused): the lease decides


def test_our_own_claims_are_live_while_their_run_runs():
    info = record(me(), run="run-1")
    assert not judge(info, T0).live  # an earlier run of this process left it
    with live_run("run-1"):
        assert judge(info, T0 + 10 * LEASE).live  # our own: the renewal thread keeps it, no clock needed


def test_claims_written_before_leases_keep_their_old_meaning_on_their_host():
    old = {"host": me().host, "pid": os.getppid(), "start": process_start(os.getppid()), "group": "0" * 16,
           "shard": 0, "run": "x", "time": T0}
    assert judge(old, T0 + 10 * LEGACY_LEASE_S).live  # its process runs
    assert not judge({**old, "pid": _dead_pid()}, T0).live
    elsewhere = {**old, "host": "node-b"}  # used to be live for ever; now for an hour after it was written
    assert judge(elsewhere, T0 + LEGACY_LEASE_S - 1).live
    assert not judge(elsewhere, T0 + LEGACY_LEASE_S + 1).live


def test_an_unreadable_lease_is_dead():
    assert not judge({**record(other_host()), "expires": "soon"}, T0).live
    assert not judge({**record(other_host()), "expires": float("nan")}, T0).live


def test_writer_ids_are_unique_per_process_even_across_fork():
    mine = me().writer
    assert me().writer == mine and me().boot and me().pidns and mine.endswith(me().token)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its writer id and leaves at once
        os.write(w, me().writer.encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 200).decode()
    assert child != mine and child.split(":")[:2] == mine.split(":")[:2]  # same machine and namespace


# ------------------------------------------------------------------------------ the setting
def test_the_lease_is_a_setting(monkeypatch):
    monkeypatch.delenv(claims.LEASE_ENV, raising=False)
    assert lease_seconds() == 120.0 and lease_seconds(7) == 7.0
    monkeypatch.setenv(claims.LEASE_ENV, "30")
    assert lease_seconds() == 30.0 and lease_seconds(5) == 5.0  # an explicit value wins
    monkeypatch.setenv(claims.LEASE_ENV, "soon")
    with pytest.raises(ValueError, match=r"\$PIPE_CLAIM_LEASE_S='soon'.*positive number of seconds"):
        lease_seconds()
    monkeypatch.setenv(claims.LEASE_ENV, "-1")
    r = pipe("embed", "-d", "x.csv", "-b", "tiny-vit", "-t", "none", expect=2)
    assert "PIPE_CLAIM_LEASE_S='-1'" in r.output and "Traceback" not in r.output
    monkeypatch.delenv(claims.LEASE_ENV)
    r = pipe("embed", "-d", "x.csv", "-b", "tiny-vit", "-t", "none", "--lease-s", "0.5", expect=2)
    assert "--lease-s" in r.output
    assert "--lease-s" in pipe("embed", "--help").output


# ------------------------------------------------------------------------------ a store's claims
def _store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "cache", "image", "unit", "1" * 32, {"unit": True}, 32, 16)


def _rows(seed: int) -> dict[str, np.ndarray]:
    return {"tokens": np.random.default_rng(seed).standard_normal((32, 3, 4)).astype(np.float16)}


def _write(store: Store, claim, seed: int, monkeypatch=None, who: Identity | None = None):
    """Stream a shard's rows under the temporary names of the writer ``who`` (default: us); returns the sink."""
    if who is not None:
        monkeypatch.setattr("cache.shards.me", lambda: who)
    sink = store.shard_sink(claim.shard, fsync=False)
    sink.append(_rows(seed))
    if who is not None:
        monkeypatch.undo()
    return sink


def plant(store: Store, group: str, shard: int, who: Identity, at: float, lease: float = LEASE) -> Path:
    """A claim file as ``who`` would have written it at ``at``."""
    path = store.path / "claims" / f"{shard:06d}-{group}.json"
    path.write_text(json.dumps(new_record(group, shard, "r", "f" * 16, lease, at, who)))
    return path


def _commit(store: Store, claim, sink, tag: str) -> None:
    keys = [f"{tag}{i}" for i in range(32)]
    store.commit(claim, keys, [0] * 32, [""] * 32, "unit", sink.finish(), fsync=False)


GROUP = "a" * 16


def test_an_expired_claim_is_taken_over_and_a_live_one_is_waited_on(tmp_path, monkeypatch):
    store, t0 = _store(tmp_path), time.time()
    b = store.claim(GROUP, "run-b", LEASE, now=t0, who=other_host())
    assert b.state is ClaimState.TAKEN and b.shard == 0
    sink = _write(store, b, 1, monkeypatch, other_host())  # node-b is writing, then goes quiet
    assert store.claim(GROUP, "run-a", LEASE, now=t0 + LEASE - 1).state is ClaimState.BUSY
    other = store.claim("c" * 16, "run-a", LEASE, now=t0 + 1)
    assert other.shard == 1  # a live claim's shard is never handed out
    assert in_use(store.path) == "being written by pid 4242 on node-b"  # nor does gc touch the store
    a = store.claim(GROUP, "run-a", LEASE, now=t0 + LEASE + 1)
    assert a.state is ClaimState.TAKEN and a.shard == 0  # redone in place
    assert not sink.writers["tokens"].tmp.exists()  # node-b's half-written file is gone
    info = json.loads(a.path.read_text())
    assert info["writer"] == me().writer and info["expires"] == t0 + LEASE + 1 + LEASE


def test_renewal_keeps_a_slow_writers_claim(tmp_path):
    """A writer slower than its lease keeps its claim: the keeper renews it in the background."""
    store, lease = _store(tmp_path), 0.6
    with live_run("slow"), LeaseKeeper(lease) as keeper:
        claim = store.claim(GROUP, "slow", lease)
        keeper.hold(store, claim)
        sink = _write(store, claim, 1)
        deadline = time.time() + 4 * lease
        while time.time() < deadline:  # another process on another host asks all along
            info = json.loads(claim.path.read_text())
            assert judge(info, who=other_host()).live, info
            assert store.claim(GROUP, "other", lease, who=other_host()).state is ClaimState.BUSY
            time.sleep(0.05)
        _commit(store, claim, sink, "k")
        keeper.renew_all()  # a renewal that comes between the commit and the drop is no loss
        keeper.drop(claim)
        assert keeper.renewals >= 4 and not keeper.lost(claim)
    assert not list((store.path / "claims").iterdir()) and len(store.parts()) == 1
    assert verify_store(store.path).ok


def test_a_renewal_never_resurrects_a_claim_taken_over(tmp_path):
    store = _store(tmp_path)
    a = store.claim(GROUP, "run-a", LEASE, now=T0)
    assert store.renew(a, LEASE, now=T0 + 30)  # still ours: renewed
    assert json.loads(a.path.read_text())["renewals"] == 1
    b = store.claim(GROUP, "run-b", LEASE, now=T0 + 30 + LEASE + 1, who=other_host())  # a was paused too long
    assert b.state is ClaimState.TAKEN and b.path == a.path
    taken = a.path.read_bytes()
    assert not store.renew(a, LEASE, now=T0 + 200)  # nothing written
    assert a.path.read_bytes() == taken
    with LeaseKeeper(LEASE, every=3600) as keeper:  # the keeper notices and stops renewing it
        keeper.hold(store, a)
        keeper.renew_all()
        assert keeper.lost(a)
        keeper.renew_all()
    assert a.path.read_bytes() == taken  # leaving the keeper did not release b's claim either


def test_a_writer_whose_claim_was_taken_over_cannot_commit_over_the_new_owner(tmp_path, monkeypatch):
    store = _store(tmp_path)
    a = store.claim(GROUP, "run-a", LEASE, now=T0)
    sink_a = _write(store, a, 1)  # a writes its rows, then is paused past its lease
    b = store.claim(GROUP, "run-b", LEASE, now=T0 + LEASE + 1, who=other_host())
    assert not sink_a.writers["tokens"].tmp.exists()  # b's takeover cleared the shard
    sink_b = _write(store, b, 2, monkeypatch, other_host())  # b redoes the shard, under its own names
    files_a = sink_a.finish()
    with pytest.raises(ClaimLost, match="shard 0 was taken over by another writer"):
        store.commit(a, [f"a{i}" for i in range(32)], [0] * 32, [""] * 32, "unit", files_a, fsync=False)
    assert not store.parts() and b.path.exists()  # nothing of a's was published; b's claim stands
    sink_a.abort()
    store.release(a)  # a's release leaves b's claim alone too
    assert b.path.exists() and sink_b.writers["tokens"].tmp.exists()
    _commit(store, b, sink_b, "b")  # b's commit is the one
    assert len(store.parts()) == 1 and store.committed_units() == {(f"b{i}", 0) for i in range(32)}
    rep = verify_store(store.path)
    assert rep.ok and not rep.warnings, rep.warnings
    expected = _rows(2)["tokens"]
    z = __import__("zarr").open_array(str(store.zpath / "tokens"), mode="r")
    np.testing.assert_array_equal(z[:32], expected)


def test_write_shard_commits_only_while_the_claim_is_ours(tmp_path):
    store = _store(tmp_path)
    a = store.claim(GROUP, "run-a", LEASE, now=T0)
    store.claim(GROUP, "run-b", LEASE, now=T0 + LEASE + 1, who=other_host())
    data = ShardData([f"a{i}" for i in range(32)], [0] * 32, [""] * 32, _rows(1))
    with pytest.raises(ClaimLost):
        store.write_shard(a, data, "unit", fsync=False)
    assert not store.parts() and not [f for f in store.shard_files(0) if ".partial-" in f.name]


def test_verify_repair_clears_expired_claims_of_any_host_and_never_live_ones(tmp_path, monkeypatch):
    store = _store(tmp_path)
    now = time.time()
    live = [plant(store, "1" * 16, 0, other_host(), now),
            plant(store, "2" * 16, 1, same_host_other_namespace(pid=_dead_pid()), now)]
    dead = [plant(store, "3" * 16, 2, other_host(host="node-c"), now - LEASE - 5),
            plant(store, "4" * 16, 3, same_host_other_namespace(), now - LEASE - 5),
            plant(store, "5" * 16, 4, neighbour(_dead_pid(), start="1"), now)]
    for shard in range(5):  # each writer left a finished temporary file
        _write(store, SimpleNamespace(shard=shard), shard, monkeypatch, other_host()).finish()
    rep = verify_store(store.path)
    assert rep.ok  # an interrupted run is not damage
    text = "\n".join(rep.warnings)
    assert text.count("(in progress: its lease holds for") == 2
    assert len(re.findall(r"left by an interrupted run \(its lease expired \d+ s ago\)", text)) == 2
    assert "left by an interrupted run (its process is gone)" in text
    repaired = verify_store(store.path, repair=True)
    assert len([r for r in repaired.repairs if r.startswith("removed the dead claim")]) == 3
    assert all(p.exists() for p in live) and not any(p.exists() for p in dead)
    assert [bool(store.shard_files(s)) for s in range(5)] == [True, True, False, False, False]


# ------------------------------------------------------------------------------ the runner
def test_a_run_whose_claim_is_taken_over_waits_for_the_new_owner_and_ends_complete(tmp_path, monkeypatch):
    """In-process: while this run embeds its first shard, a writer on another host takes the
    claim over (as if this run had been paused past its lease) and then dies. This run does
    not commit over it, waits for it, takes the shard back once that writer's lease lapses,
    and the cache equals a clean one."""
    from stages import embed
    from stages.embed.embedder import GroupEmbedder
    from tests.helpers.kills import cache_files

    table = make_table(tmp_path / "data", 8)
    cfg = dict(dataset=str(table), backbone="tiny-vit", text_encoder="none", batch_size=4, shard_mb=0.01,
               chunk_rows=16, device="cpu", lease_s=30)
    embed.run(embed.EmbedConfig(cache=str(tmp_path / "clean"), **cfg))

    real, thief = GroupEmbedder.embed, []

    def embed_then_lose_the_claim(self, units, dataset, sink, *args, **kwargs):
        out = real(self, units, dataset, sink, *args, **kwargs)
        if not thief:  # once: node-b takes the claim over with a 1 s lease, never renews it, and dies
            ((shard, group, _),) = sink.store.claims()
            thief.append(plant(sink.store, group, shard, other_host(), time.time(), lease=1.0))
        return out

    monkeypatch.setattr(GroupEmbedder, "embed", embed_then_lose_the_claim)
    res = embed.run(embed.EmbedConfig(cache=str(tmp_path / "lost"), **cfg))
    assert thief and not thief[0].exists()
    assert res.embedded == 8 and res.failed == 0
    assert cache_files(tmp_path / "lost") == cache_files(tmp_path / "clean")


@pytest.mark.slow  # starts a Dask cluster
def test_a_dask_client_renews_its_claims_while_the_workers_embed(tmp_path, monkeypatch):
    """Under Dask the client holds the claims: their leases must hold while a worker embeds
    a group for longer than the lease, as another host sees them."""
    from distributed import Client, LocalCluster

    from stages import embed
    from stages.embed import runners
    from stages.embed.embedder import GroupEmbedder

    lease = 0.8
    table = make_table(tmp_path / "data", 32)
    cache = tmp_path / "cache"
    real = GroupEmbedder.embed

    def slow_embed(self, *args, **kwargs):
        time.sleep(3 * lease)  # a group that takes three leases
        return real(self, *args, **kwargs)

    def in_process_cluster(cfg):  # threads in this process, so the slow embed applies on the worker too
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None)
        return runners._ClusterClient(Client(cluster), cluster)

    monkeypatch.setattr(GroupEmbedder, "embed", slow_embed)
    monkeypatch.setattr(runners, "_dask_client", in_process_cluster)
    seen, stop = [], threading.Event()

    def watch():  # another host's view of every claim, all along
        while not stop.is_set():
            for p in cache.glob("stores/*/*/claims/*.json"):
                with contextlib.suppress(OSError, ValueError):
                    info = json.loads(p.read_text())
                    seen.append((judge(info, who=other_host()).live, info["renewals"]))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res = embed.run(embed.EmbedConfig(dataset=str(table), backbone="tiny-vit", text_encoder="none",
                                          cache=str(cache), batch_size=8, shard_mb=0.01, chunk_rows=16,
                                          device="cpu", workers=1, lease_s=lease))
    finally:
        stop.set()
        watcher.join()
    assert res.embedded == 32
    assert seen and all(live for live, _ in seen), "a claim the client held looked dead to another host"
    assert max(n for _, n in seen) >= 4  # renewed every quarter lease while the workers ran
    assert verify_store(Path(res.results[0].store)).ok


# ------------------------------------------------------------------------------ where flock is not honoured
def test_two_parts_committing_one_shard_are_both_dropped(tmp_path):
    """Where flock does not reach across hosts, two hosts claiming in the same instant could
    both take one free shard for two groups and both commit. Whose rows the shard's files
    then hold is unknown: verify names it and --repair drops every part of that shard."""
    store = _store(tmp_path)
    a = store.claim("1" * 16, "run-a", LEASE)
    store.write_shard(a, ShardData([f"a{i}" for i in range(32)], [0] * 32, [""] * 32, _rows(1)), "unit", fsync=False)
    path = plant(store, "2" * 16, 0, other_host(), time.time())  # b took shard 0 too, unseen
    b = Claim(ClaimState.TAKEN, 0, "2" * 16, path, other_host().writer, "f" * 16)
    store.write_shard(b, ShardData([f"b{i}" for i in range(32)], [0] * 32, [""] * 32, _rows(2)), "unit", fsync=False)
    assert len(store.parts()) == 2
    rep = verify_store(store.path)
    assert not rep.ok and "which another part commits too" in rep.problems[0]
    repaired = verify_store(store.path, repair=True)
    assert repaired.ok and repaired.dropped == 64 and not store.parts() and not store.shard_files(0)


def test_a_file_system_without_flock_is_one_clear_message(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    table = make_table(tmp_path / "data", 2)
    monkeypatch.setattr(fcntl, "flock", no_flock)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "none", "--cache", str(tmp_path / "c"), expect=2)
    assert "does not support flock" in r.output and "Lustre: `-o flock`" in r.output and "Traceback" not in r.output
