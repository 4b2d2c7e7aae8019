"""Dask workers that die mid-task: SIGKILL, no nanny to restart them.

A scheduler and two workers run as their own processes (``dask worker --no-nanny``), and
`pipe embed --scheduler` (the client) runs in the test's process. At a seeded point, while a worker writes a
shard's files (its temporary ``.partial-<pid>-...`` files appear), that worker is killed
with SIGKILL. The scheduler re-runs its task on the other worker; the claims are the
client's, renewed under a short lease while the task runs again; the cache equals a
one-process run's; what the dead worker left (its temporary files, staged objects) never
reads as committed, verify passes, and `pipe cache gc` removes it once it is a dead
writer's (its pid gone on this host; in a bucket, older than the claim lease).

Into a bucket, the run goes through the fault-injecting proxy as well (tests/helpers/faultproxy.py):
every kind of fault, and a worker killed.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cache.objects import ObjectStorage
from cache.shards import partial_of
from cache.storage import TEMP_GRACE_S
from tests.helpers import embed_json, forked, make_table, pipe
from tests.helpers.faultproxy import KINDS, QUICK, STALL_S, FaultProxy, compared, mixed, tally
from tests.helpers.kills import ENV, ROOT, cache_files, embed_args
from tests.helpers.stores import store_objects

pytestmark = pytest.mark.slow  # clusters of processes, and kills

SEED = 2031
ITEMS = 16
SMALL = ("--shard-mb", "0.1", "--batch-size", "2", "--lease-s", "2")  # several shards of several batches each
LEASE_ENV = {"PIPE_CLAIM_LEASE_S": "2"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The table, and the cache a one-process `pipe embed` makes of it."""
    root = tmp_path_factory.mktemp("one-process")
    table = make_table(root / "data", ITEMS)
    embed_json(table, root / "cache", *SMALL)
    return {"table": table, "cache": root / "cache", "files": cache_files(root / "cache"),
            "stores": store_objects(root / "cache")}


class Cluster:
    """A Dask scheduler and ``n`` workers, each a process of its own, without nannies."""

    def __init__(self, folder: Path, env: dict, n: int = 2):
        self.folder, self.env = folder, env
        info = folder / "scheduler.json"
        self.scheduler = self._start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                                   "--no-dashboard", "--scheduler-file", str(info)])
        self.workers = [self._start(f"worker{i}", ["worker", "--scheduler-file", str(info), "--no-nanny",
                                                   "--nthreads", "1", "--no-dashboard", "--name", f"w{i}"])
                        for i in range(n)]
        self.address = self._wait_for(info, n)

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")
        return forked.popen([sys.executable, "-m", "dask", *args], env=self.env, stdout=log, stderr=log, cwd=ROOT)

    def _wait_for(self, info: Path, n: int) -> str:
        from distributed import Client  # lazy: dask's distributed takes a second to import

        t0 = time.monotonic()
        while not info.is_file() or not info.read_text().strip():
            assert time.monotonic() - t0 < 60 and self.scheduler.poll() is None, self.log("scheduler")
            time.sleep(0.1)
        address = json.loads(info.read_text())["address"]
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(n, timeout=90)
        return address

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text()[-3000:]

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def partials(folder: Path, pids: set[int]) -> list[tuple[str, int]]:
    """The shard files being written below ``folder`` by the processes ``pids``: (name, pid)."""
    out = []
    for p in folder.glob("**/.*.partial-*"):
        found = partial_of(p.name)
        if found and found[1] in pids and "/embeddings.zarr/" in p.as_posix():
            out.append((p.as_posix(), found[1]))
    return out


def kill_mid_task(cluster: Cluster, watch: Path, embed: threading.Thread, rng) -> int:
    """SIGKILL the worker that writes the ``nth`` shard file seen below ``watch`` (seeded),
    a seeded few milliseconds after it appeared; returns its pid."""
    pids = {w.pid for w in cluster.workers}
    nth, delay = int(rng.integers(1, 4)), float(rng.uniform(0, 0.03))
    seen: dict[str, int] = {}
    t0 = time.monotonic()
    while len(seen) < nth:
        assert embed.is_alive(), "the run ended before the kill point"
        assert time.monotonic() - t0 < 180, "no worker wrote a shard"
        seen.update(dict(partials(watch, pids)))
        time.sleep(0.002)
    victim = list(seen.values())[nth - 1]
    time.sleep(delay)
    os.kill(victim, signal.SIGKILL)
    return victim


def run_and_kill(cluster: Cluster, table: Path, cache: str, watch: Path, seed: int) -> tuple[dict, int]:
    """`pipe embed --scheduler` (in this process, on a thread: the Dask client), with one worker killed."""
    ran = []
    embed = threading.Thread(target=lambda: ran.append(pipe(*embed_args(table, cache, *SMALL, "--scheduler",
                                                                         cluster.address), expect=None)))
    embed.start()
    victim = kill_mid_task(cluster, watch, embed, np.random.default_rng(seed))
    tally(**{"worker SIGKILLs": 1})
    embed.join(timeout=300)
    assert ran and ran[0].exit_code == 0, (ran and ran[0].output, ran and ran[0].exception)
    dead = next(w for w in cluster.workers if w.pid == victim)
    assert dead.wait(timeout=10) == -signal.SIGKILL
    assert sum(w.poll() is None for w in cluster.workers) == 1  # no nanny brought it back
    return json.loads(ran[0].stdout.strip().splitlines()[-1]), victim


def test_a_worker_killed_mid_task_into_a_folder_cache(reference, tmp_path):
    env = {**ENV, **LEASE_ENV}
    cluster = Cluster(tmp_path, env)
    cache = tmp_path / "cache"
    try:
        done, victim = run_and_kill(cluster, reference["table"], str(cache), cache, SEED)
    finally:
        cluster.close()
    assert done["embedded"] == 2 * ITEMS and done["failed"] == 0
    left = partials(cache, {victim})
    assert left  # the dead worker's shard files: never committed, its task ran again elsewhere
    assert cache_files(cache) == reference["files"]
    compared(len(reference["files"]))
    assert not list(cache.glob("stores/*/*/claims/*.json"))  # the client's claims: all committed or released
    assert json.loads(pipe("cache", "verify", "--cache", str(cache), "--json").stdout.strip().splitlines()[-1])["ok"]
    pipe("cache", "gc", "--cache", str(cache))
    assert partials(cache, {victim})  # young: it could be a live writer's on another host sharing the folder
    for path, _ in left:  # ... until older than the grace a folder gives them
        os.utime(path, (time.time() - TEMP_GRACE_S - 1,) * 2)
    pipe("cache", "gc", "--cache", str(cache))  # now a dead writer's, by its pid and its age
    assert not partials(cache, {victim}) and cache_files(cache) == reference["files"]


def test_a_worker_killed_mid_task_into_a_bucket_under_every_fault(reference, bucket, s3_endpoint, tmp_path,
                                                                   monkeypatch):
    proxy = FaultProxy(s3_endpoint, stall_s=STALL_S).start()
    mirror = tmp_path / "mirror"
    env = {**ENV, **os.environ, **QUICK, **LEASE_ENV, "AWS_ENDPOINT_URL": proxy.url, "PIPE_OBJECT_MIRROR": str(mirror)}
    url = f"s3://{bucket}/c"
    for k in (*QUICK, "AWS_ENDPOINT_URL", "PIPE_OBJECT_MIRROR"):  # the client, here, goes through the proxy too
        monkeypatch.setenv(k, env[k])
    cluster = Cluster(tmp_path, env)
    try:
        proxy.use(mixed(SEED, within=20))
        done, victim = run_and_kill(cluster, reference["table"], url, mirror, SEED + 1)
        injected = dict(proxy.injected)
    finally:
        cluster.close()
        proxy.stop()
        monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # the checks below: straight to the server
    assert set(injected) >= set(KINDS) - {"short_range"}, injected  # it writes: no shard is read
    tally(**{f"fault {k}": n for k, n in injected.items()})
    assert done["embedded"] == 2 * ITEMS and done["failed"] == 0
    storage = ObjectStorage(url, tmp_path / "inspect")
    staged = [k for k in (o["path"] for o in storage.keys()) if f".partial-{victim}-" in k]
    assert staged or partials(mirror, {victim})  # its shard: staged or half-written, never committed
    assert store_objects(storage) == reference["stores"]
    compared(len(reference["stores"]))
    assert not [o for o in storage.keys("stores") if "/claims/" in o["path"]]
    assert json.loads(pipe("cache", "verify", "--cache", url, "--json").stdout.strip().splitlines()[-1])["ok"]
    for k, v in LEASE_ENV.items():
        monkeypatch.setenv(k, v)
    time.sleep(2.1)  # a staged object is a dead writer's once older than the claim lease
    pipe("cache", "gc", "--cache", url)
    assert not [o for o in storage.keys() if ".partial-" in o["path"]]
    assert store_objects(storage) == reference["stores"]


def test_a_task_whose_workers_keep_dying_is_one_message_not_a_traceback():
    """Dask gives a task up once it killed ``allowed-failures`` + 1 workers: `pipe embed` says so, and how to go on."""
    from distributed.scheduler import KilledWorker

    from cache.store import Claim, ClaimState
    from core.errors import PipeError
    from stages.embed.runners import _result

    class Gone:
        def result(self):
            raise KilledWorker("embed-shard-7", None, 3)

    with pytest.raises(PipeError, match=r"shard 7: each of 4 Dask workers that ran it died .*run `pipe embed` again"):
        _result(Gone(), Claim(ClaimState.TAKEN, 7, "g"))



# ------------------------------------------------------------------ a sweep's trial
SWEEP_ITEMS, TRIALS = 12, 4
BANNER = "training the Adaptor"  # in a trial's log, each time its training starts
UNSTABLE = {"epoch_seconds", "data_wait_share", "samples_per_s", "cpu_peak_mb", "gpu_peak_mb"}  # timing, memory


@pytest.fixture(scope="module")
def sweep_cache(tmp_path_factory):
    """A dozen items, embedded once with the tiny encoders."""
    root = tmp_path_factory.mktemp("sweep")
    table = make_table(root / "data", SWEEP_ITEMS)
    embed_json(table, root / "cache")
    return table, root / "cache"


def sweep_spec(folder: Path, table: Path, out: Path) -> Path:
    """A grid of TRIALS trials, two epochs each."""
    spec = folder / f"{out.name}.yaml"
    spec.write_text(f"""dataset: {table}
backbone: tiny-vit
text_encoder: tiny-bert
overrides: [adaptor.d_model=32, adaptor.n_heads=4, adaptor.ffn_dim=64, batch_size=4, epochs=2]
search: grid
space:
  optim.lr: [1.0e-3, 5.0e-4, 2.0e-4, 1.0e-4]
objective: val_loss
top: 0
out: {out}
""")
    return spec


def sweep_on(cluster: Cluster, spec: Path, cache: Path, ran: list) -> threading.Thread:
    """`pipe sweep --scheduler` (in this process, on a thread: the Dask client), its lease short."""
    return threading.Thread(target=lambda: ran.append(pipe("sweep", str(spec), "--cache", str(cache), "--scheduler",
                                                           cluster.address, "--lease-s", "2", "--json", expect=None)))


def reached(run: Path, mark: int) -> bool:
    """A trial's training has started (mark 0: its log has the banner), or saved its first epoch (1)."""
    if mark:
        return (run / "last.safetensors").is_file()
    return (run / "log.txt").is_file() and BANNER in (run / "log.txt").read_text()


def kill_mid_trial(cluster: Cluster, trials: Path, sweep: threading.Thread, rng) -> tuple[int, int]:
    """SIGKILL the worker that trains a seeded one of the first two trials (the two workers take
    them at once), a seeded few milliseconds after a seeded mark (:func:`reached`); returns (trial, pid)."""
    number, mark, delay = int(rng.integers(0, 2)), int(rng.integers(0, 2)), float(rng.uniform(0, 0.01))
    run = trials / f"{number:04d}"
    t0 = time.monotonic()
    while not reached(run, mark):
        assert sweep.is_alive(), "the sweep ended before the kill point"
        assert time.monotonic() - t0 < 180, "no worker started the trial"
        time.sleep(0.002)
    pid = json.loads((run / ".owner.json").read_text())["pid"]  # the trial's trainer: a worker process
    assert pid in {w.pid for w in cluster.workers}
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    return number, pid


def study_states(out: Path) -> list[str]:
    """Each trial's state in the sweep's Optuna study, by number."""
    import optuna

    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    return [t.state.name for t in sorted(study.get_trials(), key=lambda t: t.number)]


def trained(run: Path) -> tuple[list[dict], dict]:
    """A trial's metrics (timing and memory left out) and its last weights."""
    from safetensors.numpy import load_file

    rows = pd.read_csv(run / "metrics.csv")
    rows = rows.drop(columns=[c for c in rows.columns if c in UNSTABLE])
    return rows.to_dict("records"), load_file(run / "last.safetensors")


def test_a_worker_killed_mid_trial_of_a_sweep_runs_the_trial_again_once(sweep_cache, tmp_path):
    table, cache = sweep_cache
    out, clean = tmp_path / "out", tmp_path / "clean"
    cluster = Cluster(tmp_path, ENV)
    try:
        ran = []
        sweep = sweep_on(cluster, sweep_spec(tmp_path, table, out), cache, ran)
        sweep.start()
        number, victim = kill_mid_trial(cluster, out / "trials", sweep, np.random.default_rng(SEED + 6))
        tally(**{"worker SIGKILLs": 1})
        sweep.join(timeout=300)
        assert ran and ran[0].exit_code == 0, (ran and ran[0].output, ran and ran[0].exception)
        dead = next(w for w in cluster.workers if w.pid == victim)
        assert dead.wait(timeout=10) == -signal.SIGKILL
        (survivor,) = [w for w in cluster.workers if w.poll() is None]  # no nanny brought the dead one back
        again = []  # the same sweep, clean, on the surviving worker: what the killed one must equal
        sweep = sweep_on(cluster, sweep_spec(tmp_path, table, clean), cache, again)
        sweep.start()
        sweep.join(timeout=300)
        assert again and again[0].exit_code == 0, (again and again[0].output, again and again[0].exception)
    finally:
        cluster.close()
    result = json.loads(ran[0].stdout.strip().splitlines()[-1])
    rows = pd.read_csv(out / "trials.csv")
    assert sorted(rows.trial) == list(range(TRIALS)) and set(rows.state) == {"complete"}  # each once, finished
    assert study_states(out) == ["COMPLETE"] * TRIALS  # none left running, none added
    assert result["ran"] == TRIALS and len((out / "progress.log").read_text().splitlines()) == TRIALS  # told once each
    (worker, stats), = result["workers"].items()  # the dead worker told nothing; the survivor ran every trial
    assert worker.endswith(f" pid {survivor.pid}") and stats["trials"] == TRIALS
    runs = [out / "trials" / f"{n:04d}" for n in range(TRIALS)]
    assert [_trainings(r) for r in runs] == [2 if n == number else 1 for n in range(TRIALS)]
    objectives = [{r["trial"]: r["objective"] for r in json.loads(r.stdout.strip().splitlines()[-1])["rows"]}
                  for r in (ran[0], again[0])]
    assert objectives[0] == objectives[1]  # to the last bit, as the clean sweep's
    for n, run in enumerate(runs):
        (metrics, weights), (metrics0, weights0) = trained(run), trained(clean / "trials" / f"{n:04d}")
        assert metrics == metrics0 and weights.keys() == weights0.keys()
        assert all(np.array_equal(weights[k], weights0[k]) for k in weights)
    compared(2 * TRIALS)


def _trainings(run: Path) -> int:
    """How many times a trial's training started (each start logs its banner in the trial's log)."""
    return (run / "log.txt").read_text().count(BANNER)


def test_a_sweep_whose_scheduler_dies_stops_with_one_message_and_resumes(sweep_cache, tmp_path):
    """The scheduler SIGKILLed mid-trial: the client's futures are lost; `pipe sweep` puts the trial back and,
    the scheduler gone for good, stops with one message; the same command (here in one process) resumes."""
    table, cache = sweep_cache
    out = tmp_path / "out"
    spec = sweep_spec(tmp_path, table, out)
    cluster = Cluster(tmp_path, ENV, n=1)
    try:
        ran = []
        sweep = sweep_on(cluster, spec, cache, ran)
        sweep.start()
        mark = int(np.random.default_rng(SEED + 3).integers(0, 2))
        t0 = time.monotonic()
        while not reached(out / "trials" / "0000", mark):
            assert sweep.is_alive() and time.monotonic() - t0 < 180
            time.sleep(0.002)
        os.kill(cluster.scheduler.pid, signal.SIGKILL)
        tally(**{"scheduler SIGKILLs": 1})
        sweep.join(timeout=120)
    finally:
        cluster.close()
    (stopped,) = ran
    assert stopped.exit_code == 2 and f"lost the Dask scheduler at {cluster.address}" in stopped.output
    # which the client notices first, the lost future or the lost connection, is a race: either puts the trial back
    lost = ("its Dask task was lost (scheduler-connection-lost)", "its Dask scheduler was lost")
    assert any(f"trial 0: {why}; put back" in stopped.output for why in lost), stopped.output
    assert "Traceback" not in stopped.output
    rows = pd.read_csv(out / "trials.csv")
    assert rows.trial.tolist() == [0] and rows.state.tolist() == ["interrupted"]  # the one worker's one trial
    assert rows.reason[0] in lost
    assert study_states(out) == ["WAITING"]  # none left running
    result = json.loads(pipe("sweep", str(spec), "--cache", str(cache), "--workers", "0", "--json").stdout
                        .strip().splitlines()[-1])
    assert [r["state"] for r in result["rows"]] == ["complete"] * TRIALS and result["ran"] == TRIALS
    assert study_states(out) == ["COMPLETE"] * TRIALS
    assert len((out / "progress.log").read_text().splitlines()) == TRIALS  # each told once
    assert [_trainings(out / "trials" / f"{n:04d}") for n in range(TRIALS)] == [2, 1, 1, 1]
