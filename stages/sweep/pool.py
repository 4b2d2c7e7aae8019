"""Where trials run: this process, one after another (``--workers 0``), or the workers of a
Dask cluster, many at once.

Without ``--scheduler`` (or ``$PIPE_DASK_SCHEDULER``) a local cluster is started, sized from
what this process may use: one worker per GPU, else one per CPU (at most
:data:`MAX_LOCAL_WORKERS`), the CPUs split among them as embed's workers split them
(``$PIPE_THREADS`` per worker, :mod:`pipeline.threads`). Each worker runs one trial at a
time and keeps its loaded data between trials (:mod:`stages.sweep.trial`).
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

from core.console import err
from core.errors import PipeError
from pipeline import threads
from pipeline.cluster import LocalWorkers

SCHEDULER_ENV = "PIPE_DASK_SCHEDULER"
MAX_LOCAL_WORKERS = 8
CONNECT_TIMEOUT_S = 10.0   # to reach the scheduler, and to reach it again once its connection dropped
LOST = "lost"              # a trial's outcome when its future was lost: put back, to run again


class SchedulerError(PipeError):
    """A Dask scheduler that cannot be reached; the message names it."""


@dataclass
class Job:
    """A submitted trial (or evaluation) and what it is about."""

    handle: Any
    about: Any


class SerialPool:
    """Trials in this process, one at a time: a submitted one runs when its result is awaited."""

    capacity = 1
    local_cluster = False
    gpu_per_worker = False
    generation = ""

    def __enter__(self) -> "SerialPool":
        _warm_up()   # as each Dask worker does: the first trial's time is its own
        return self

    def __exit__(self, *exc) -> None:
        return None

    def describe(self) -> str:
        return "in this process, one trial at a time"

    def submit(self, fn: Callable, task: Any, about: Any) -> Job:
        return Job((fn, task), about)

    def wait(self, jobs: list[Job], timeout: float) -> list[tuple[Job, dict]]:
        job = jobs[0]
        fn, task = job.handle
        return [(job, fn(task))]

    def cancel(self, jobs: list[Job]) -> None:
        return None


# The local cluster's workers, set for trials: a trial is one long task that runs Python between
# small torch operations, so whatever else a worker's process does takes the GIL from it. Measured
# on the synthetic 10k sweep (bench/sweep.py): a trial ran 1.25x as long on a worker as alone.
LOCAL_WORKER_CONFIG = {
    # Dask's default MALLOC_TRIM_THRESHOLD_=65536 hands freed memory back to the system at once, so
    # every batch's tensors are mapped and faulted in anew (4x the system time); glibc's own
    # threshold (it adapts) is what a process that runs trials itself has.
    "distributed.nanny.pre-spawn-environ": {"OMP_NUM_THREADS": 1, "MKL_NUM_THREADS": 1, "OPENBLAS_NUM_THREADS": 1},
    "distributed.worker.profile.enabled": False,   # the statistical profiler samples the task's stack every 10 ms
    "distributed.admin.tick.interval": "1s",       # the event loop's blocked-loop check, 50 times a second by default
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.worker.memory.monitor-interval": "1s",
}


class DaskPool:
    """Trials on a Dask cluster: a local one started here, or one already up (``scheduler``)."""

    def __init__(self, workers: int | None, scheduler: str | None):
        self.workers, self.scheduler = workers, scheduler
        self.client = self.cluster = None
        self.local_cluster = scheduler is None
        self.gpu_per_worker = False
        self.generation = ""

    def __enter__(self) -> "DaskPool":
        from distributed import Client  # lazy: dask's distributed takes a second to import

        if self.scheduler:
            try:
                self.client = Client(self.scheduler, timeout=f"{CONNECT_TIMEOUT_S:.0f}s")
            except (OSError, TimeoutError) as e:
                raise SchedulerError(f"cannot reach the Dask scheduler at {self.scheduler} ({e}). Start one with "
                                     "`dask scheduler` and workers with `dask worker <address>`, or leave "
                                     f"--scheduler and ${SCHEDULER_ENV} out to start a local cluster.") from None
            self._preload()
            return self
        n, gpus = local_workers(self.workers)
        per = threads.plan(processes=n)
        self.gpu_per_worker = gpus > 0
        workers = LocalWorkers(n, env={threads.ENV: str(per.threads)}, config=LOCAL_WORKER_CONFIG,
                               preload=("optuna", "matplotlib"))  # what each trial's study and curves load
        cluster = workers.__enter__()
        try:
            self.client = Client(cluster)
        except BaseException:
            workers.__exit__(None, None, None)
            raise
        self.cluster = workers
        self._preload()
        return self

    def _preload(self) -> None:
        """Every worker imports the trials' code (torch, the stages) and warms up now, all at once, before
        any trial is claimed: a trial's lease and time start when it can run."""
        self.client.run(_warm_up)

    def __exit__(self, *exc) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.__exit__(None, None, None)

    @property
    def capacity(self) -> int:
        for _ in range(3):  # a connection that just dropped: the client notices, reconnects or gives up
            self._connected()
            try:
                return max(1, sum(self.client.nthreads().values()))
            except OSError as e:
                why = f"{type(e).__name__}: {e}"
                time.sleep(1.0)
        raise self._lost(why)

    def _connected(self) -> None:
        """Return once the client is connected; a :class:`SchedulerError` once it gave its scheduler up (the
        client tries to reconnect for :data:`CONNECT_TIMEOUT_S` after the connection drops)."""
        t0 = time.monotonic()
        while self.client.status in ("connecting", "newly-created") and time.monotonic() - t0 < 2 * CONNECT_TIMEOUT_S:
            time.sleep(0.1)
        if self.client.status != "running":
            raise self._lost(f"no answer for {CONNECT_TIMEOUT_S:.0f} s")

    def _lost(self, why: str) -> SchedulerError:
        where = f"at {self.scheduler}" if self.scheduler else "of the local cluster"
        return SchedulerError(f"lost the Dask scheduler {where} ({why}). Start it again (or leave --scheduler "
                              "out for a local cluster) and run the same command: it resumes the trials that were "
                              "running, and keeps the finished ones.")

    def describe(self) -> str:
        n = len(self.client.nthreads())
        if self.local_cluster:
            per = threads.plan(processes=n)
            gpu = ", one GPU each" if self.gpu_per_worker else ""
            return f"a local Dask cluster of {n} workers ({per.line()}{gpu}), one trial per worker at a time"
        return f"the Dask cluster at {self.scheduler} ({n} workers, {self.capacity} trials at a time)"

    def submit(self, fn: Callable, task: Any, about: Any) -> Job:
        from distributed.client import ClosedClientError  # lazy: dask's distributed takes a second to import

        self._connected()
        try:
            return Job(self.client.submit(fn, task, pure=False), about)
        except ClosedClientError as e:
            raise self._lost(str(e)) from None

    def wait(self, jobs: list[Job], timeout: float) -> list[tuple[Job, dict]]:
        from distributed import wait  # lazy: dask's distributed takes a second to import
        from distributed.client import FuturesCancelledError  # lazy: as above

        try:
            done, _ = wait([j.handle for j in jobs], timeout=timeout, return_when="FIRST_COMPLETED")
        except TimeoutError:
            return []
        except FuturesCancelledError:  # the scheduler lost them (the connection dropped): each is told apart below
            done = {j.handle for j in jobs if j.handle.cancelled()}
        return [(job, _result(job.handle)) for job in jobs if job.handle in done]

    def cancel(self, jobs: list[Job]) -> None:
        if jobs and self.client.status == "running":
            self.client.cancel([j.handle for j in jobs], force=True)


def _warm_up() -> None:
    """On a worker: import the trials' code and what their first steps import (:func:`stages.sweep.trial.warm_up`)."""
    importlib.import_module("stages.sweep.trial").warm_up()


def _result(future) -> dict:
    """A trial's outcome. A worker that died under it was replaced by another (Dask runs it again); one
    whose workers kept dying is failed, saying so; one whose future was lost is :data:`LOST` (put back)."""
    from distributed.client import FutureCancelledError  # lazy: dask's distributed takes a second to import
    from distributed.scheduler import KilledWorker  # lazy: as above

    try:
        return future.result()
    except KilledWorker as e:
        return {"state": "failed", "reason": killed(e.allowed_failures)}
    except FutureCancelledError as e:
        return {"state": LOST, "reason": f"its Dask task was lost ({e.reason})"}
    except Exception as e:  # noqa: BLE001 - anything else Dask says about it is the trial's failure, with the reason
        return {"state": "failed", "reason": f"its Dask worker failed: {type(e).__name__}: {e}"}


def killed(allowed_failures: int) -> str:
    """Why a trial whose Dask workers kept dying under it is failed."""
    return (f"each of the {allowed_failures + 1} Dask workers that ran it died (out of memory, preempted or killed), "
            "so Dask gave it up (distributed.scheduler.allowed-failures); their logs say why. If it was the "
            "out-of-memory killer, give the workers more memory or the trial less (a smaller batch_size)")


def local_workers(requested: int | None) -> tuple[int, int]:
    """(workers, GPUs): one per GPU, else one per CPU this process may use (at most MAX_LOCAL_WORKERS)."""
    gpus = _gpus()
    if requested:
        return requested, min(gpus, requested)
    if gpus:
        return gpus, gpus
    cpus, _ = threads.available_cpus()
    return max(1, min(cpus, MAX_LOCAL_WORKERS)), 0


def _gpus() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return 0
    import torch  # lazy: only to count GPUs

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def make_pool(workers: int | None, scheduler: str | None):
    """``workers=0``: this process; else a Dask cluster (``scheduler``, ``$PIPE_DASK_SCHEDULER``, or local)."""
    scheduler = scheduler or os.environ.get(SCHEDULER_ENV, "").strip() or None
    if workers == 0 and not scheduler:
        return SerialPool()
    if workers and scheduler:
        err.print(f"[yellow]note:[/] --workers {workers} is ignored: the cluster at {scheduler} has its own workers")
    return DaskPool(workers, scheduler)
