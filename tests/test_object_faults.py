"""Object storage that misbehaves as real services do, between the commands and the S3 server.

A fault-injecting proxy (tests/helpers/faultproxy.py) sits on the loopback between every request
and the moto server, with a seeded schedule of the faults S3 services show: throttling
(503 SlowDown), 500s, connections reset during uploads and range reads, stalls past the
client's timeout, short reads, and conditional puts (commits, claims, the guard) that land
while their answer is lost. Under each, the store protocol and the commands finish with
what a clean run gives, byte for byte, or stop with one message and resume to it; a lost
commit answer never makes a second commit nor a missing one. The retry policy is
cache/retries.py's; these tests shorten its waits and timeouts through its settings.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from cache.objects import ObjectStorage
from cache.reader import RowReader
from cache.store import Store
from tests.helpers import embed_json, make_table, pipe
from tests.helpers.faultproxy import KINDS, QUICK, STALL_S, FaultProxy, Rule, Schedule, compared, mixed, tally
from tests.helpers.stores import STORE, bucket_objects, build, comparable, fixed_table, local_objects, store_objects

SEED = 31
TRAIN = ["adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=4", "epochs=2"]
TRAIN_UNSTABLE = {"epoch_seconds", "data_wait_share", "samples_per_s", "cpu_peak_mb", "gpu_peak_mb"}
EVAL_UNSTABLE = {"created", "seconds", "cpu_peak_mb", "gpu_peak_mb", "config_hash", "provenance"}


@pytest.fixture(scope="module")
def proxy(s3_endpoint):
    p = FaultProxy(s3_endpoint, stall_s=STALL_S).start()
    yield p
    p.stop()


@pytest.fixture
def faulty(bucket, proxy, monkeypatch, tmp_path):
    """A fresh bucket reached through the proxy (no faults until a test sets a schedule), with
    short retry waits and a 2 s request timeout."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    for k, v in QUICK.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror"))
    proxy.use(None)
    yield bucket
    proxy.use(None)


def read_back(url: str, mirror: Path) -> None:
    """Every committed row of the fixed store, read through an empty local copy, equals what was written."""
    store = Store.open(ObjectStorage(url + "/" + STORE, mirror))
    index = store.row_index()
    for name in ("tokens", "pooled", "length"):
        reader = RowReader(store, name)
        for _, data in fixed_table():
            rows = np.array([index[(k, 0)] for k in data.keys])
            np.testing.assert_array_equal(reader.take(rows), data.arrays[name])


# ------------------------------------------------------------------------------ the policy
def test_the_retry_policy_reads_its_settings_and_names_every_bad_one():
    from cache.retries import RetryPolicy
    from core.errors import PipeError

    assert RetryPolicy.from_env({}) == RetryPolicy()
    set_ = RetryPolicy.from_env({"PIPE_S3_RETRIES": "3", "PIPE_S3_BACKOFF_S": "0.5", "PIPE_S3_TIMEOUT_S": "120"})
    assert (set_.retries, set_.backoff_s, set_.timeout_s, set_.backoff_max_s) == (3, 0.5, 120.0, 15.0)
    assert RetryPolicy.from_env({"AWS_MAX_ATTEMPTS": "1"}).retries == 0  # the AWS SDKs' count of tries
    assert RetryPolicy.from_env({"AWS_MAX_ATTEMPTS": "1", "PIPE_S3_RETRIES": "4"}).retries == 4
    with pytest.raises(PipeError) as bad:
        RetryPolicy.from_env({"PIPE_S3_RETRIES": "many", "PIPE_S3_TIMEOUT_S": "0", "PIPE_S3_BACKOFF_S": "-1"})
    assert all(v in str(bad.value) for v in ("$PIPE_S3_RETRIES='many'", "$PIPE_S3_TIMEOUT_S='0'",
                                             "$PIPE_S3_BACKOFF_S='-1'"))


def test_what_is_retried_how_often_and_how_far_apart(monkeypatch):
    import cache.retries as retries
    from obstore.exceptions import GenericError

    from types import SimpleNamespace

    slept, clock = [], [0.0]

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(retries, "time", SimpleNamespace(sleep=sleep, monotonic=lambda: clock[0]))
    policy = retries.RetryPolicy(retries=4, backoff_s=0.1, backoff_max_s=0.3, give_up_s=100)
    calls = []

    def failing(error):
        def call():
            calls.append(error)
            raise error
        return call

    with pytest.raises(retries.BucketUnavailable, match=r"reading k: the bucket failed 5 tries .*last: 503 SlowDown"):
        policy.run(failing(GenericError("Generic S3 error: Error performing GET - Server returned non-2xx status "
                                        "code: 503 Service Unavailable: <Error><Code>SlowDown</Code></Error>")),
                   "reading k")
    assert len(calls) == 5 and len(slept) == 4
    assert all(lo <= s <= hi for s, (lo, hi) in zip(slept, [(0.05, 0.1), (0.1, 0.2), (0.15, 0.3), (0.15, 0.3)]))
    for answer in ("404 Not Found", "403 Forbidden", "400 Bad Request"):  # answers, not failures: never retried
        calls.clear()
        with pytest.raises(GenericError):
            policy.run(failing(GenericError(f"Server returned non-2xx status code: {answer}")), "x")
        assert len(calls) == 1
    for passing in ("429 Too Many Requests", "500 Internal Server Error"):
        assert retries.transient(GenericError(f"Server returned non-2xx status code: {passing}"))
    assert retries.transient(GenericError("Error performing PUT http://h/b/k - HTTP error: error sending request"))
    assert retries.transient(retries.ShortRead("k: 3 of 8 bytes")) and not retries.transient(FileNotFoundError("k"))
    calls.clear()
    clock[0] = 0.0
    with pytest.raises(retries.BucketUnavailable):  # no retry starts past give_up_s
        retries.RetryPolicy(retries=50, backoff_s=1, backoff_max_s=1, give_up_s=2.5).run(
            failing(retries.ShortRead("k")), "x")
    assert 3 <= len(calls) <= 6 and clock[0] <= 2.5


def test_pipe_doctor_states_the_policy_in_force(monkeypatch):
    monkeypatch.setenv("PIPE_S3_RETRIES", "3")
    report = json.loads(pipe("doctor", "--json").stdout)["object_store_retries"]
    assert report["retries"] == 3 and report["set_by"] == {"PIPE_S3_RETRIES": "3"}
    assert "3 retries of 5xx/408/429" in report["policy"] and "read back" in report["policy"]
    monkeypatch.setenv("PIPE_S3_RETRIES", "-2")
    assert "$PIPE_S3_RETRIES='-2'" in json.loads(pipe("doctor", "--json").stdout)["object_store_retries"]["error"]


def test_a_stalled_request_is_abandoned_at_the_timeout_and_tried_again(faulty, proxy, tmp_path, monkeypatch):
    import time

    monkeypatch.setenv("PIPE_S3_TIMEOUT_S", "1")
    s = ObjectStorage(f"s3://{faulty}/c", tmp_path / "m")
    s.write("k", b"value")
    monkeypatch.setattr(proxy, "stall_s", 30.0)  # it would hang for 30 s: the client gives up after 1
    proxy.use(Schedule(SEED, [Rule("stall", limit=1, within=1)]))
    t0 = time.monotonic()
    assert s.read("k") == b"value"
    assert proxy.injected["stall"] == 1 and 1.0 <= time.monotonic() - t0 < 10
    faults_in(proxy, {"stall"})


# ------------------------------------------------------------------------------ the store protocol
@pytest.mark.parametrize("kind", KINDS)
def test_the_store_protocol_rides_out_each_fault(kind, faulty, proxy, tmp_path, monkeypatch):
    """Claims, the guard, shard uploads, commits and range reads under one kind of fault: the
    store equals a folder store object for object, and reads back through an empty copy."""
    import cache.objects as objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 40)  # shards of a few hundred bytes: read in many ranges
    local = tmp_path / "local"
    build(local)
    url = f"s3://{faulty}/c"
    proxy.use(Schedule(SEED, [Rule(kind, limit=3, within=10)]))
    cache = ObjectStorage(url, tmp_path / "writer")
    build(cache, failed_source=str(cache.path / "data" / "x.png"))
    read_back(url, tmp_path / "reader")
    assert proxy.injected[kind] >= 1, proxy.requests
    faults_in(proxy, {kind})
    proxy.use(None)
    got = comparable(bucket_objects(cache))
    assert got == comparable(local_objects(local))
    compared(len(got))


# ------------------------------------------------------------------------------ the ambiguous answer
def test_a_conditional_put_whose_answer_was_lost_is_read_back_never_sent_twice(faulty, proxy, tmp_path, monkeypatch):
    """Every conditional put lands on the server and its answer is lost: a create or a swap
    that landed is ours (read back), one whose condition failed is not, and none is sent twice."""
    s = ObjectStorage(f"s3://{faulty}/c", tmp_path / "m")
    proxy.use(Schedule(SEED, [Rule("lost_commit", rate=1.0, limit=100)]))
    assert s.create("manifest/part-000000-g.parquet", b"ours")  # landed; answer lost; read back: ours
    assert not s.create("manifest/part-000000-g.parquet", b"a second commit")  # 412 lost; read back: not ours
    etag = s.stat("manifest/part-000000-g.parquet").version
    assert s.swap("manifest/part-000000-g.parquet", b"replaced", etag)
    assert not s.swap("manifest/part-000000-g.parquet", b"stale", etag)
    assert proxy.injected["lost_commit"] == 4 and proxy.requests["PUT"] == 4  # each put sent once
    faults_in(proxy, {"lost_commit"})
    proxy.use(None)
    assert s.read("manifest/part-000000-g.parquet") == b"replaced"
    # Without the read-back, a retried create is answered 412 by its own landed write: the
    # commit would be reported as refused ("exists already") though it is there: a missing one.
    monkeypatch.setattr(ObjectStorage, "_settled", lambda self, key, data, etag: (False, None))
    proxy.use(Schedule(SEED, [Rule("lost_commit", rate=1.0, limit=1)]))
    assert not s.create("manifest/part-000001-g.parquet", b"ours")
    assert s.read("manifest/part-000001-g.parquet") == b"ours"


# ------------------------------------------------------------------------------ the commands


def trained(out: Path) -> dict:
    """What a training run leaves that two equal runs share: its metrics less times, its weights and optimizer state."""
    rows = pd.read_csv(out / "metrics.csv")
    weights = {name: load_file(str(out / name)) for name in ("last.safetensors", "last.optim.safetensors")}
    return {"metrics": rows[[c for c in rows.columns if c not in TRAIN_UNSTABLE]].to_dict("list"),
            **{f"{n}:{k}": t for n, w in weights.items() for k, t in w.items()}}


def assert_same_training(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k


def evaluated(out: Path, *cache: str) -> dict:
    """results.json less what differs between any two runs, with the cache (its URL, its local copy) and the run's folder named alike."""
    text = (out / "results.json").read_text().replace(str(out), "<out>")
    for name in cache:
        text = text.replace(name, "<cache>")
    r = {k: v for k, v in json.loads(text).items() if k not in EVAL_UNSTABLE}
    r["checkpoint"] = {k: v for k, v in r["checkpoint"].items() if not k.startswith("adaptor_forwards")}
    return r


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A table of 12 items and what a clean run on a folder cache gives: its stores, a trained
    Adaptor (resident and streaming) and a retrieval evaluation."""
    root = tmp_path_factory.mktemp("clean")
    table = make_table(root / "data", 12)
    cache = root / "cache"
    embed_json(table, cache, "--shard-mb", "0.05")
    runs = {}
    for mode in ("ram", "none"):
        pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(root / f"train-{mode}"), *TRAIN, f"resident={mode}")
        runs[mode] = trained(root / f"train-{mode}")
    pipe("evaluate", "--task", "retrieval", "-d", str(table), "-a", str(root / "train-ram" / "last.safetensors"),
         "--cache", str(cache), "--out", str(root / "eval"))
    return {"table": table, "cache": cache, "stores": store_objects(cache), "train": runs,
            "eval": evaluated(root / "eval", str(cache)), "root": root}


def faults_in(proxy: FaultProxy, kinds: set[str], label: str = "fault") -> None:
    """The kinds the run's requests could meet were all injected; the tally counts them."""
    tally(**{f"{label} {k}": n for k, n in proxy.injected.items()})
    assert kinds <= set(proxy.injected), (dict(proxy.injected), dict(proxy.requests))


@pytest.mark.slow
def test_embed_into_a_bucket_under_every_fault_equals_a_clean_run(faulty, proxy, clean, tmp_path, monkeypatch):
    import cache.objects as objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 256)  # shards of a few KiB: fetched in range requests
    url = f"s3://{faulty}/c"
    proxy.use(mixed(SEED))
    done = embed_json(clean["table"], url, "--shard-mb", "0.05")
    faults_in(proxy, set(KINDS) - {"short_range"})  # it writes: no shard is read
    assert done["embedded"] == 24 and done["failed"] == 0
    proxy.use(mixed(SEED + 10))
    verified = pipe("cache", "verify", "--cache", url, "--json")  # every object fetched, in ranges
    faults_in(proxy, {"throttle", "error500", "stall", "reset_read", "short_read", "short_range"})
    proxy.use(None)
    assert json.loads(verified.stdout.strip().splitlines()[-1])["ok"]
    assert store_objects(ObjectStorage(url, tmp_path / "inspect")) == clean["stores"]
    compared(len(clean["stores"]))


@pytest.mark.slow
def test_training_and_evaluation_from_a_bucket_under_every_fault_equal_a_clean_run(faulty, proxy, clean, tmp_path,
                                                                                   monkeypatch):
    """Each reads the cache through an empty local copy, so every shard crosses the proxy."""
    import cache.objects as objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 256)
    url, table = f"s3://{faulty}/c", str(clean["table"])
    embed_json(clean["table"], url, "--shard-mb", "0.05")
    for i, mode in enumerate(("ram", "none")):
        monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / f"mirror-{mode}"))
        proxy.use(mixed(SEED + 1 + i))
        pipe("train-adaptor", "-d", table, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", url,
             "--out", str(tmp_path / f"train-{mode}"), *TRAIN, f"resident={mode}")
        faults_in(proxy, {"throttle", "error500", "reset_read", "short_read", "short_range"})
        assert_same_training(trained(tmp_path / f"train-{mode}"), clean["train"][mode])
        compared(3)  # metrics.csv, the weights, the optimizer state
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror-eval"))
    proxy.use(mixed(SEED + 3))
    pipe("evaluate", "--task", "retrieval", "-d", table, "-a", str(clean["root"] / "train-ram" / "last.safetensors"),
         "--cache", url, "--out", str(tmp_path / "eval"))  # the clean run's Adaptor (equal to ours): the same paths
    faults_in(proxy, {"throttle", "error500", "reset_read"})
    proxy.use(None)
    assert evaluated(tmp_path / "eval", url.replace("s3://", "s3:/"), str(tmp_path / "mirror-eval" / faulty / "c")) == \
        clean["eval"]
    compared(1)  # results.json


def outage(proxy: FaultProxy, rng, lo: int, hi: int) -> None:
    """From a seeded request on (between ``lo`` and ``hi``), every request is answered 500."""
    proxy.use(Schedule(SEED, [Rule("error500", rate=1.0, limit=10**9, after=int(rng.integers(lo, hi)))]))


def stopped_once(proxy: FaultProxy, result) -> None:
    """The command stopped with exit 2 and one message that says to run it again; no traceback."""
    faults_in(proxy, {"error500"}, label="outage")
    proxy.use(None)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "the bucket failed 2 tries" in errors[0] and "run the same command again" in errors[0]
    assert "Traceback" not in result.output
    tally(**{"runs stopped with one message": 1})


@pytest.mark.slow
def test_a_bucket_that_stops_answering_stops_each_command_with_one_message_and_it_resumes(faulty, proxy, clean,
                                                                                          tmp_path, monkeypatch):
    """An outage mid-run (every request answered 500 from a seeded point on) outlasts the
    retries: `pipe embed`, `pipe train-adaptor` (streaming) and `pipe evaluate` each stop with
    one message; what they left verifies, and the same command run again ends where a clean
    run ends, keeping every object committed before the outage."""
    import cache.objects as objects

    monkeypatch.setattr(objects, "RANGE_BYTES", 256)
    url, table, rng = f"s3://{faulty}/c", str(clean["table"]), np.random.default_rng(SEED)
    monkeypatch.setenv("PIPE_S3_RETRIES", "1")
    embed = ("embed", "-d", table, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", url, "--shard-mb", "0.05")
    outage(proxy, rng, 50, 90)  # after the first commit, before the last
    stopped_once(proxy, pipe(*embed, expect=None))
    cache = ObjectStorage(url, tmp_path / "inspect")
    before = {k: v for k, v in bucket_objects(cache).items() if "/manifest/" in k}
    assert before  # it had committed before the outage
    assert json.loads(pipe("cache", "verify", "--cache", url, "--json").stdout.strip().splitlines()[-1])["ok"]
    resumed = embed_json(clean["table"], url, "--shard-mb", "0.05")
    assert resumed["reused"] >= 1 and resumed["embedded"] >= 1 and resumed["failed"] == 0
    after = bucket_objects(cache)
    assert all(after[k] == v for k, v in before.items())  # nothing committed changed
    assert store_objects(cache) == clean["stores"]
    compared(len(clean["stores"]))

    train = ("train-adaptor", "-d", table, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", url, "--out",
             str(tmp_path / "train"), *TRAIN, "resident=none")
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror-train"))  # every shard read through the bucket
    outage(proxy, rng, 20, 55)
    stopped_once(proxy, pipe(*train, expect=None))
    pipe(*train)
    assert_same_training(trained(tmp_path / "train"), clean["train"]["none"])
    compared(3)

    evaluate = ("evaluate", "--task", "retrieval", "-d", table, "-a",
                str(clean["root"] / "train-ram" / "last.safetensors"), "--cache", url, "--out", str(tmp_path / "eval"))
    monkeypatch.setenv("PIPE_OBJECT_MIRROR", str(tmp_path / "mirror-eval"))
    outage(proxy, rng, 30, 65)
    stopped_once(proxy, pipe(*evaluate, expect=None))
    pipe(*evaluate)
    assert evaluated(tmp_path / "eval", url.replace("s3://", "s3:/"), str(tmp_path / "mirror-eval" / faulty / "c")) == \
        clean["eval"]
    compared(1)  # results.json


def test_a_store_whose_first_shard_was_never_written_verifies(tmp_path):
    """A run that stops (an outage, a kill) between creating a store and writing its first shard
    leaves a store with no arrays and no commits: nothing is damaged, and verify says so."""
    from tests.helpers.stores import create_store

    create_store(tmp_path / "cache")
    done = pipe("cache", "verify", "--cache", str(tmp_path / "cache"), "--json")
    assert json.loads(done.stdout.strip().splitlines()[-1])["ok"], done.output
