"""Local Dask clusters (``pipe embed --workers N``, ``pipe sweep --workers N``) whose worker processes
start in a fraction of a second.

Dask starts each worker as a fresh interpreter (``spawn``), which then imports torch, transformers
and the rest before its first task: 5-8 CPU seconds per worker, paid again by every worker that
is started in place of one that died. Here, where the platform has it (Linux, macOS), the workers
are forked from one server process (multiprocessing's ``forkserver``) that imports those libraries
once, before any worker starts; the workers share its pages until they write to them. Nothing of
the project's own code is imported there, so a worker imports it as a fresh process would, and no
CUDA context exists before a fork (importing torch does not create one).

The Dask settings a cluster is started with hold for as long as it runs, so a worker started in
place of one that died gets them too (the start method, non-daemonic workers, the worker
environment). Dask's nannies set their workers' start-up variables (``OMP_NUM_THREADS=1``,
``PYTHONHASHSEED``, ``MALLOC_TRIM_THRESHOLD_``...) in the environment of the process that owns
the cluster, before starting each worker; they are given back their earlier values (or removed)
once the workers have started and when the cluster closes, so that the caller's own environment,
and its later subprocesses, are as they were.

``PIPE_WORKER_START=spawn`` starts each worker as a fresh interpreter instead (Dask's default).
A server holds the environment of the moment it started, so a cluster forks from it only where
this module started it, in an environment equal to the present one. Where the environment has
changed since and no cluster of this module is open, the server is stopped and started again
with the present environment (one preload, where spawning would pay one per worker); where a
cluster still uses it, or other code of the process started it, the workers are spawned.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading

from core.errors import InputError

START_ENV = "PIPE_WORKER_START"
METHODS = ("forkserver", "spawn")
# What a worker's first task would import: the arrays, the cache's formats, torch (with the part the
# optimiser and transformers' model modules load on first use) and the encoders' libraries.
PRELOAD = ("numpy", "pandas", "pyarrow.parquet", "zarr", "numcodecs", "xxhash", "PIL.Image", "torch",
           "torch.nn.functional", "torch._dynamo", "torch.optim", "transformers", "distributed")

_started: tuple[int, dict] | None = None  # (pid, environment) of the forkserver this module started
_open = 0  # clusters of this module open on that server
_lock = threading.Lock()


class WorkerStartError(InputError):
    """$PIPE_WORKER_START names no start method this platform has."""


def start_method() -> str:
    """How this process starts Dask workers: ``$PIPE_WORKER_START``, else forkserver where available."""
    asked = os.environ.get(START_ENV, "").strip().lower()
    if asked and asked not in METHODS:
        raise WorkerStartError(f"${START_ENV}={asked!r} is not a worker start method: use one of "
                               f"{', '.join(METHODS)}, or unset it.")
    available = multiprocessing.get_all_start_methods()
    if asked:
        if asked not in available:
            raise WorkerStartError(f"${START_ENV}={asked}: this platform starts processes only with "
                                   f"{', '.join(available)}; unset it.")
        return asked
    if "forkserver" not in available:
        return "spawn"
    running = _forkserver_pid()
    if running is None:
        return "forkserver"  # started, with this environment, by the next cluster
    if _started is not None and _started[0] == running and (_started[1] == dict(os.environ) or not _open):
        return "forkserver"  # ours, in this environment or idle (then started again in it)
    return "spawn"  # a server of ours that open clusters use in another environment, or one other code started


def _forkserver_pid() -> int | None:
    """The pid of this process's forkserver while it runs, else None."""
    from multiprocessing import forkserver  # lazy: a submodule multiprocessing loads only where used

    pid = getattr(forkserver._forkserver, "_forkserver_pid", None)  # noqa: SLF001  (no public accessor)
    if pid is None:
        return None
    try:
        os.kill(pid, 0)  # not waitpid: multiprocessing reaps its own server
    except OSError:
        return None
    return pid


class LocalWorkers:
    """``with LocalWorkers(n, env=..., config=...) as cluster``: a Dask LocalCluster of ``n`` single-threaded
    worker processes, its Dask ``config`` held until it closes. ``preload`` adds modules the workers'
    tasks import to :data:`PRELOAD` (the first cluster of a process sets what its server loads)."""

    def __init__(self, n: int, *, env: dict | None = None, config: dict | None = None, preload: tuple = ()):
        self.n, self.env, self.config, self.preload = n, dict(env or {}), dict(config or {}), tuple(preload)
        self.method = start_method()
        self.cluster = None
        self._settings = None
        self._before: dict | None = None  # the caller's environment before the nannies set theirs

    def __enter__(self):
        global _started
        import dask  # lazy: only a run with --workers uses Dask
        from distributed import LocalCluster  # lazy: dask's distributed takes a second to import

        with _lock:  # the method again: a cluster may have opened since this one was made
            self.method = start_method()
            self._settings = dask.config.set({**self.config, "distributed.worker.multiprocessing-method": self.method})
            try:
                if self.method == "forkserver":
                    self._server_in_this_environment()
            except BaseException:
                self._settings.__exit__(None, None, None)
                raise
        self._before = dict(os.environ)
        try:
            self.cluster = LocalCluster(n_workers=self.n, threads_per_worker=1, processes=True,
                                        dashboard_address=None, silence_logs=logging.ERROR, env=self.env)
            server = _forkserver_pid() if self.method == "forkserver" else None
            if server is not None and (_started is None or _started[0] != server):
                _started = (server, self._before)  # the caller's environment, as it is given back
            self._give_back_environment()
        except BaseException:
            self._close()
            raise
        return self.cluster

    def _server_in_this_environment(self) -> None:
        """Counts this cluster on the server, which is stopped first where it holds another environment
        (idle: :func:`start_method` said so), and given the preload where it is not running."""
        global _open
        from multiprocessing import forkserver  # lazy: a submodule multiprocessing loads only where used

        from distributed.utils import get_mp_context  # lazy: with distributed

        running = _forkserver_pid()
        if running is not None and _started is not None and _started[1] != dict(os.environ):
            forkserver._forkserver._stop()  # noqa: SLF001  (idle, ours: the next worker starts it again)
            running = None
        context = get_mp_context()  # Dask's own preload first (it sets it once), then ours
        if running is None:
            context.set_forkserver_preload([*PRELOAD, *self.preload])
        _open += 1

    def _give_back_environment(self) -> None:
        """The variables the nannies set before starting a worker, back to what the caller had."""
        import dask  # lazy: with the cluster

        for key in {*dask.config.get("distributed.nanny.pre-spawn-environ", {}), "PYTHONHASHSEED"}:
            if key in self._before:
                os.environ[key] = self._before[key]
            else:
                os.environ.pop(key, None)

    def _close(self) -> None:
        global _open
        try:
            if self.cluster is not None:
                self.cluster.close()
        finally:
            if self._before is not None:
                self._give_back_environment()
            if self._settings is not None:
                self._settings.__exit__(None, None, None)
            if self.method == "forkserver":
                with _lock:
                    _open -= 1

    def __exit__(self, *exc) -> bool:
        self._close()
        return False
