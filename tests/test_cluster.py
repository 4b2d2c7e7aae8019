"""Local Dask clusters: workers forked from a server that has loaded the heavy libraries, and the
cluster's settings held for a worker started in place of one that died."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import sys
import time

import pytest

from core.errors import PipeError
from pipeline import cluster
from tests.helpers import ROOT, forked, make_table, pipe

HAS_FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()


def test_the_server_loads_libraries_only_never_the_projects_code():
    project = {"core", "cache", "pipeline", "stages", "cli", "bench", "configs", "tests"}
    assert not {name.partition(".")[0] for name in cluster.PRELOAD} & project
    assert {"torch", "distributed", "transformers"} <= set(cluster.PRELOAD)


def test_the_start_method_is_forkserver_where_the_platform_has_it_unless_asked(monkeypatch):
    monkeypatch.delenv(cluster.START_ENV, raising=False)
    monkeypatch.setattr(cluster, "_forkserver_pid", lambda: None)  # no server running yet
    assert cluster.start_method() == ("forkserver" if HAS_FORKSERVER else "spawn")
    monkeypatch.setenv(cluster.START_ENV, "Spawn")
    assert cluster.start_method() == "spawn"


def test_a_server_is_used_only_as_this_module_started_it_in_this_environment(monkeypatch):
    """A server holds the environment it started with: workers forked from it would not see a
    variable set since. Idle, it is started again in the present environment; while a cluster
    uses it, or beside a server other code started, a cluster spawns."""
    if not HAS_FORKSERVER:
        pytest.skip("this platform has no forkserver start method")
    monkeypatch.delenv(cluster.START_ENV, raising=False)
    monkeypatch.setattr(cluster, "_forkserver_pid", lambda: 4242)
    monkeypatch.setattr(cluster, "_started", (4242, dict(os.environ)))
    monkeypatch.setattr(cluster, "_open", 1)
    assert cluster.start_method() == "forkserver"
    monkeypatch.setenv("PIPE_SOME_SETTING", "changed")
    assert cluster.start_method() == "spawn"  # a cluster still forks from the server of the old environment
    monkeypatch.setattr(cluster, "_open", 0)
    assert cluster.start_method() == "forkserver"  # idle: started again, in this environment
    monkeypatch.setattr(cluster, "_started", (4241, dict(os.environ)))  # a server this module did not start
    assert cluster.start_method() == "spawn"


def test_an_unknown_start_method_is_one_message_naming_the_choices(monkeypatch, tmp_path):
    monkeypatch.setenv(cluster.START_ENV, "threads")
    with pytest.raises(PipeError, match=r"\$PIPE_WORKER_START='threads' is not a worker start method: use one of "
                                        r"forkserver, spawn, or unset it"):
        cluster.start_method()
    table = make_table(tmp_path / "data", 4)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--workers", "2",
             "--cache", str(tmp_path / "cache"), expect=2)
    assert "$PIPE_WORKER_START='threads' is not a worker start method" in r.output.replace("\n", " ")


def _worker_facts() -> dict:
    import multiprocessing as mp
    import os as _os
    import sys as _sys

    return {"dynamo_loaded": "torch._dynamo" in _sys.modules, "daemon": mp.current_process().daemon,
            "pid": _os.getpid(), "parent": _os.getppid(), "threads": _os.environ.get("PIPE_THREADS"),
            "setting": _os.environ.get("PIPE_PROBE_SETTING"), "hashseed": _os.environ.get("PYTHONHASHSEED")}


NANNY_SET = ("PYTHONHASHSEED", "MALLOC_TRIM_THRESHOLD_")  # what Dask's nannies set for their workers


def _probe() -> dict:
    """A one-worker cluster started here; its worker killed; the facts of both workers."""
    from distributed import Client

    workers = cluster.LocalWorkers(1, env={"PIPE_THREADS": "1"}, config={"distributed.worker.daemon": False})
    with workers as local, Client(local) as client:
        [first] = client.run(_worker_facts).values()
        during = {k: os.environ.get(k) for k in NANNY_SET}  # once the workers have started
        os.kill(first["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            try:
                facts = list(client.run(_worker_facts).values())
            except Exception:  # noqa: BLE001  (the worker is gone and its replacement not yet up)
                facts = []
            if facts and facts[0]["pid"] != first["pid"]:
                break
            if time.monotonic() - t0 > 60:
                raise SystemExit("the killed worker was not started again")
            time.sleep(0.2)
    after = {k: os.environ.get(k) for k in NANNY_SET}
    os.environ["PIPE_PROBE_SETTING"] = "set since"  # the server, idle, holds the environment before this
    again = cluster.LocalWorkers(1)
    with again as local, Client(local) as client:
        [third] = client.run(_worker_facts).values()
    return {"method": workers.method, "me": os.getpid(), "first": first, "second": facts[0],
            "again": again.method, "third": third, "during": during, "after": after}


@pytest.mark.slow
def test_workers_fork_from_a_server_with_torch_loaded_and_a_restarted_worker_keeps_the_settings():
    """In a process of its own (no server started before): the worker comes with torch's compiler
    modules loaded though nothing it ran imports them, its parent is the server, not the process
    that owns the cluster; the worker started in place of a killed one too, and it is no daemon.
    A setting changed after the cluster closed reaches the next cluster's worker, from a new server."""
    if not HAS_FORKSERVER:
        pytest.skip("this platform has no forkserver start method")
    env = {k: v for k, v in os.environ.items() if k != cluster.START_ENV and k not in NANNY_SET}
    done = forked.run([sys.executable, "-m", "tests.test_cluster"], env=env, cwd=ROOT, capture_output=True,
                      text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    first, second = facts["first"], facts["second"]
    assert facts["method"] == "forkserver" and first["dynamo_loaded"], facts
    assert first["parent"] != facts["me"] and first["daemon"] is False and first["threads"] == "1", facts
    assert second["parent"] == first["parent"] and second["daemon"] is False and second["threads"] == "1", facts
    # the environment changed with no cluster open: a new server, in it, and the worker forked from it
    third = facts["third"]
    assert facts["again"] == "forkserver" and third["setting"] == "set since" and third["dynamo_loaded"], facts
    assert third["parent"] not in (first["parent"], facts["me"]), facts
    # the nannies' start-up settings reach the workers, and leave the process that owns the cluster as it was
    assert first["hashseed"] == second["hashseed"] == "6640", facts
    assert facts["during"] == facts["after"] == {k: None for k in NANNY_SET}, facts


if __name__ == "__main__":
    print(json.dumps(_probe()))
