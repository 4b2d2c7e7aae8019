"""Local Dask clusters: workers forked from a server that has loaded the heavy libraries, and the
cluster's settings held for a worker started in place of one that died."""
from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest

from core.errors import PipeError
from pipeline import cluster
from tests.helpers import make_table, pipe


def test_the_start_method_is_forkserver_where_the_platform_has_it_unless_asked(monkeypatch):
    monkeypatch.delenv(cluster.START_ENV, raising=False)
    monkeypatch.setattr(cluster, "_server_env", None)
    assert cluster.start_method() == ("forkserver" if "forkserver" in multiprocessing.get_all_start_methods()
                                      else "spawn")
    monkeypatch.setenv(cluster.START_ENV, "Spawn")
    assert cluster.start_method() == "spawn"


def test_the_server_loads_libraries_only_never_the_projects_code():
    project = {"core", "cache", "pipeline", "stages", "cli", "bench", "configs", "tests"}
    assert not {name.partition(".")[0] for name in cluster.PRELOAD} & project
    assert {"torch", "distributed", "transformers"} <= set(cluster.PRELOAD)


def test_a_process_whose_environment_changed_since_its_server_started_spawns(monkeypatch):
    """The server holds the environment it started with: workers forked from it would not see a
    variable set since, so such a cluster starts fresh interpreters."""
    monkeypatch.delenv(cluster.START_ENV, raising=False)
    monkeypatch.setattr(cluster, "_server_env", dict(os.environ))
    assert cluster.start_method() == "forkserver"
    monkeypatch.setenv("PIPE_SOME_SETTING", "changed")
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

    return {"torch_loaded": "torch._dynamo" in _sys.modules,
            "daemon": mp.current_process().daemon, "pid": _os.getpid(), "parent": _os.getppid(),
            "threads": _os.environ.get("PIPE_THREADS")}


@pytest.mark.slow
def test_workers_fork_from_a_server_with_torch_loaded_and_a_restarted_worker_keeps_the_settings(monkeypatch):
    from distributed import Client

    monkeypatch.delenv(cluster.START_ENV, raising=False)
    monkeypatch.setattr(cluster, "_server_env", None)
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("this platform has no forkserver start method")
    workers = cluster.LocalWorkers(1, env={"PIPE_THREADS": "1"}, config={"distributed.worker.daemon": False})
    assert workers.method == "forkserver"
    with workers as local, Client(local) as client:
        [first] = client.run(_worker_facts).values()
        # torch came with the fork: nothing this worker ran imports torch._dynamo
        assert first["torch_loaded"], first
        assert first["parent"] != os.getpid() and first["daemon"] is False and first["threads"] == "1"
        os.kill(first["pid"], signal.SIGKILL)
        t0 = time.monotonic()
        while True:
            try:
                facts = list(client.run(_worker_facts).values())
            except Exception:  # noqa: BLE001  (the worker is gone and its replacement not yet up)
                facts = []
            if facts and facts[0]["pid"] != first["pid"]:
                break
            assert time.monotonic() - t0 < 60, "the killed worker was not started again"
            time.sleep(0.2)
        # the replacement: forked from the same server, with the cluster's settings (not a daemon)
        assert facts[0]["parent"] == first["parent"] and facts[0]["daemon"] is False, facts
