"""One trial, where it runs: in this process (``--workers 0``) or on a Dask worker.

A worker keeps what it loaded for every trial it runs: the dataset's cached pairs (per
encoder pair) and, through :func:`cache.reader.hold`, every cached array a trial reads,
held in memory by store (its location and fingerprint). The first trial on a worker reads
each array it needs from the cache once; later trials read nothing from it. The rows read
are counted per trial (:func:`cache.reader.rows_read`), and so is the time spent reading.

A trial trains its Adaptor (``repeats`` seeds), reports each epoch's validation figure to
the study so the pruner can stop it, and, for a downstream objective, evaluates the run
on the validation split (``score_split=valid``) with `pipe evaluate`'s own task. Whatever
goes wrong inside (a NaN loss, out of memory, a value the config refuses) ends the trial
as failed, with the reason; the sweep goes on.

An attempt of a trial may find its run folder owned by a live process: an earlier attempt of
the same trial, on a worker that the scheduler gave up for dead while it lived on (or that
lost the scheduler). It waits for that one to leave, then resumes from where it stopped
(:func:`when_free`): two attempts never write one folder at once, and only the `pipe sweep`
process that claimed the trial tells the study how it ended, once.
"""
from __future__ import annotations

import math
import os
import resource
import signal
import socket
import statistics
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cache.reader import RowReader, held_bytes, hold, read_seconds, release_held, rows_read
from cache.paths import cache_root
from core.console import err, escape, logs_to
from core.errors import PipeError
from core.locks import FolderBusyError
from core.processes import process_alive, this_process
from pipeline.models.adaptor import MODES
from stages.evaluate import stage as evaluation
from stages.sweep.objective import read_figure
from stages.sweep.space import PAIR, pair_name
from stages.sweep.spec import SweepSpec, eval_config, train_config
from stages.train import trainer
from stages.train.trainer import load_training_data


BUSY_POLL_S = 1.0        # how often an attempt looks whether its run folder is free again
BUSY_LIMIT_S = 3600.0    # and for how long


class TrialFailure(Exception):
    """A trial that cannot go on (a NaN loss): recorded as failed with this message."""


@dataclass(frozen=True)
class TrialTask:
    spec: SweepSpec
    number: int
    trial_id: int
    params: dict
    url: str                     # the study's storage (the pruner reads the other trials there)
    run: str                     # the trial's folder
    driver: dict                 # the `pipe sweep` process (this_process()); a local cluster's workers watch it
    generation: str = ""         # one `pipe sweep` run: what a worker kept for another run is dropped
    local_cluster: bool = False
    gpu_per_worker: bool = False


@dataclass(frozen=True)
class EvalTask:
    """One of the best trials, evaluated on the test split after the search."""

    spec: SweepSpec
    task: str
    checkpoint: str
    out: str
    pair: tuple[str, str]
    fractions: tuple[float, ...]
    driver: dict
    generation: str = ""
    local_cluster: bool = False


# ------------------------------------------------------------------ what a worker keeps
_PAIRS: dict[tuple, object] = {}       # (cache, dataset, image, text) -> PairData for training
_PREPARED: dict[tuple, object] = {}    # (cache, dataset, image, text, task) -> evaluation's Prepared
_DONE = {"trials": 0, "generation": ""}


def warm_up() -> None:
    """Import now what a trial's first steps would (each Dask worker runs this before any trial is
    claimed, so that a trial's time is its own): torch's optimiser reaches into ``torch._dynamo``
    (and sympy) at its first step, each epoch's report to the study opens its storage (Optuna's,
    SQLAlchemy), a run draws its curves with matplotlib. On a worker these took 4-5 s of its first
    trial. A process that runs its trials itself (``--workers 0``) warms up the same way."""
    import matplotlib.pyplot  # noqa: F401  (lazy, as everywhere: the run's curves)
    import optuna  # lazy, as everywhere: the study's storage
    import torch  # lazy, as everywhere: only for the optimiser's first step

    optuna.storages.RDBStorage("sqlite:///:memory:")   # SQLAlchemy and Alembic, as a study's database needs
    weight = torch.nn.Parameter(torch.zeros(1))
    weight.grad = torch.zeros(1)
    torch.optim.AdamW([weight]).step()


def begin(generation: str) -> None:
    """A task of sweep run ``generation``: what this process kept for another run (a cache that may
    have changed since) is dropped first."""
    if _DONE["generation"] != generation:
        release()
        _DONE["generation"] = generation


def release() -> None:
    """Forget every dataset, pair and held array this process kept (their memory goes back)."""
    _PAIRS.clear()
    _PREPARED.clear()
    release_held()
    _DONE["trials"] = 0


def training_data(spec: SweepSpec, pair: tuple[str, str]):
    """The cached pairs of an encoder pair, loaded once per process: every array any trial of the
    sweep may read (:func:`arrays_needed`) is read now, whole, and held from now on."""
    key = (str(cache_root(spec.cache)), spec.dataset, *pair)
    if key not in _PAIRS:
        params = {PAIR: pair_name(*pair)} if len(spec.pairs) > 1 else {}
        data = load_training_data(train_config(spec, params, "probe"))
        image_rows = data.image_rows[data.image_rows >= 0]
        hold(data.image, image_rows)
        hold(data.text, data.text_rows)
        image, text = arrays_needed(spec)
        for store, names, rows in ((data.image, image, image_rows), (data.text, text, data.text_rows)):
            for name in sorted(names):
                RowReader(store, name).take(rows[:1])   # the first read of a held array reads it all
        _PAIRS[key] = data
    return _PAIRS[key]


def arrays_needed(spec: SweepSpec) -> tuple[set[str], set[str]]:
    """(image arrays, text arrays) that the sweep's trials and their evaluations may read: each
    Adaptor mode's own arrays, the pooled ones (the evaluations' baselines), and the image tokens
    for segmentation."""
    modes = {train_config(spec, {}, "probe").adaptor.mode}
    modes |= {v for p in spec.space if p.key == "adaptor.mode" for v in p.choices}
    image = {"pooled"} | {MODES[m].image_array for m in modes if m in MODES}
    text = {"pooled"} | {a for m in modes if m in MODES for a in MODES[m].text_arrays}
    if spec.objective.task == "segmentation":
        image.add("tokens")
    return image, text


def prepared(spec: SweepSpec, pair: tuple[str, str], task: str):
    """The evaluation's dataset and pairs for ``task``, opened once per process."""
    key = (str(cache_root(spec.cache)), spec.dataset, *pair, task)
    if key not in _PREPARED:
        cfg = eval_config(spec, task, adaptor="none", backbone=pair[0], text_encoder=pair[1])
        p = evaluation.prepare(cfg, pair[0], pair[1])
        hold(p.data.image, p.data.image_rows[p.data.image_rows >= 0])
        if p.data.text is not p.data.image:
            hold(p.data.text, p.data.text_rows)
        _PREPARED[key] = p
    return _PREPARED[key]


def worker_name() -> str:
    try:
        from distributed import get_worker  # lazy: only on a Dask worker

        return f"dask:{get_worker().name}"
    except (ImportError, ValueError):
        return "local"


# ------------------------------------------------------------------ a trial
def run_trial(task: TrialTask) -> dict:
    """Train (and evaluate) one trial; never raises: a failure is the outcome ``failed``, with the reason."""
    begin(task.generation)
    if task.local_cluster:
        watch_driver(task.driver)
    t0, reads0, secs0, first = time.perf_counter(), rows_read(), read_seconds(), _DONE["trials"] == 0
    run = Path(task.run)
    run.mkdir(parents=True, exist_ok=True)
    with logs_to(run / "log.txt"):
        try:
            outcome = _train_and_score(task, run)
        except Exception as e:  # noqa: BLE001 - every failure of one trial is that trial's, with its reason
            with open(run / "log.txt", "a") as log:
                traceback.print_exc(file=log)
            outcome = {"state": "failed", "reason": _reason(e)}
    _DONE["trials"] += 1
    reads = {k: v - reads0.get(k, 0) for k, v in rows_read().items() if v - reads0.get(k, 0)}
    seconds = time.perf_counter() - t0
    outcome["attrs"] = {**outcome.get("attrs", {}), "seconds": round(seconds, 2), "run": str(run)}
    outcome.update(worker=_worker(), first=first, reads=reads, read_seconds=round(read_seconds() - secs0, 4),
                   seconds=seconds)
    return outcome


def _reason(e: BaseException) -> str:
    """Why a trial failed, in one message: the project's own errors as written, others by their type."""
    text = str(e).strip()
    first = text.splitlines()[0] if text else type(e).__name__
    if isinstance(e, MemoryError) or "out of memory" in first.lower():
        return f"out of memory: {first}"
    if isinstance(e, (PipeError, TrialFailure)):
        return text
    return f"{type(e).__name__}: {first}"


def _worker() -> dict:
    me = this_process()
    return {"name": worker_name(), "host": socket.gethostname(), "pid": os.getpid(), "start": me.get("start"),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "held_mb": round(held_bytes() / 2**20, 1)}


def _train_and_score(task: TrialTask, run: Path) -> dict:
    spec = task.spec
    pair = spec.pair_of(task.params)
    data = training_data(spec, pair)
    reporter = Reporter(task)
    values = []
    for r in range(spec.repeats):
        folder = run if spec.repeats == 1 else run / f"seed-{r}"
        cfg = train_config(spec, task.params, str(folder), seed_offset=r)
        if task.gpu_per_worker:
            cfg = _on_own_gpu(cfg)
        reporter.active = r == 0
        res = when_free(trainer.run, cfg, data=data, on_epoch=reporter)
        if res.stopped is not None:
            return {"state": "pruned", "reason": f"pruned after epoch {res.stopped} by the {spec.prune} pruner",
                    "attrs": {"epochs": res.stopped}}
        values.append(_score(task, folder, pair, res))
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"state": "complete", "value": mean, "attrs": {"values": values, "std": spread}}


def _on_own_gpu(cfg):
    import dataclasses  # lazy: only with one GPU per worker

    import torch  # lazy: only with one GPU per worker

    from distributed import get_worker  # lazy: only on a Dask worker

    return dataclasses.replace(cfg, device=f"cuda:{int(get_worker().name) % max(1, torch.cuda.device_count())}")


def _score(task: TrialTask, folder: Path, pair: tuple[str, str], res) -> float:
    """The objective of one trained run: its last epoch's figure, or its evaluation on the validation split."""
    o = task.spec.objective
    if not o.downstream:
        return read_figure(res.final, o)
    fields = {"adaptor": str(folder), "out": str(folder / f"valid-{o.task}"), "score_split": "valid",
              "bootstrap": 0}
    if o.fraction is not None:
        fields["fractions"] = [o.fraction]
    cfg = eval_config(task.spec, o.task, **fields)
    result = when_free(evaluation.run, cfg, prepared(task.spec, pair, o.task))
    return read_figure(result.record, o)


def when_free(step, *args, **kwargs):
    """``step(*args, **kwargs)`` (a training or an evaluation of this trial), run once no other live
    process owns the run folder it writes: an earlier attempt of this trial that still runs there
    is waited for, and this one resumes where it stops."""
    t0, said = time.monotonic(), False
    while True:
        try:
            return step(*args, **kwargs)
        except FolderBusyError as e:
            if time.monotonic() - t0 > BUSY_LIMIT_S:
                raise
            if not said:
                err.print(f"waiting: {escape(str(e).split('; ')[0])} (an earlier attempt of this trial, whose "
                          "worker was given up for dead?); this attempt resumes where it stops")
                said = True
            time.sleep(BUSY_POLL_S)


class Reporter:
    """The trainer's per-epoch hook: a NaN loss fails the trial; the validation figure goes to the
    study, whose pruner may stop the trial (first repeat only)."""

    def __init__(self, task: TrialTask):
        self.task, self.active, self._study = task, True, None
        o = task.spec.objective
        self.figure = o.metric if not o.downstream else ("val_i2t_r@10" if o.direction == "maximize" else "val_loss")

    def __call__(self, row: dict) -> bool:
        loss = row.get("train_loss")
        if loss is None or not math.isfinite(loss):
            raise TrialFailure(f"the training loss is {loss} at epoch {row.get('epoch')}")
        value = row.get(self.figure)
        if self.task.spec.prune == "none" or not self.active or value is None or not math.isfinite(value):
            return False
        study = self.study()
        study._storage.set_trial_intermediate_value(self.task.trial_id, int(row["epoch"]), float(value))
        return bool(study.pruner.prune(study, study._storage.get_trial(self.task.trial_id)))

    def study(self):
        if self._study is None:
            import optuna  # lazy: optuna takes a second to import

            from stages.sweep.study import make_pruner, open_storage  # lazy: the study's module imports optuna

            self._study = optuna.load_study(study_name=self.task.spec.study, storage=open_storage(self.task.url),
                                            pruner=make_pruner(self.task.spec))
        return self._study


# ------------------------------------------------------------------ the test split, after the search
def run_evaluation(task: EvalTask) -> dict:
    """One best trial on the test split, with the usual intervals; reuses a finished one."""
    begin(task.generation)
    if task.local_cluster:
        watch_driver(task.driver)
    out = Path(task.out)
    if (out / "results.json").is_file():
        return {"out": str(out), "reused": True}
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with logs_to(out.parent / f"{out.name}.log"):
        try:
            cfg = eval_config(task.spec, task.task, adaptor=task.checkpoint, out=str(out),
                              fractions=list(task.fractions), score_split="test")
            evaluation.run(cfg, prepared(task.spec, task.pair, task.task))
        except FolderBusyError:  # another `pipe sweep` on this study evaluates it now: wait for its results
            return _wait_for(out)
        except Exception as e:  # noqa: BLE001 - reported with the trial, the others go on
            return {"out": str(out), "error": _reason(e)}
    return {"out": str(out), "seconds": round(time.perf_counter() - t0, 1)}


def _wait_for(out: Path, limit_s: float = 3600.0) -> dict:
    """Another process's evaluation of the same trial: its results, once written."""
    t0 = time.monotonic()
    while not (out / "results.json").is_file():
        if time.monotonic() - t0 > limit_s:
            return {"out": str(out), "error": f"another process has been evaluating it for {limit_s:.0f} s"}
        time.sleep(2.0)
    return {"out": str(out), "reused": True}


# ------------------------------------------------------------------ a local cluster's workers
_WATCHING: list[str] = []


def watch_driver(driver: dict) -> None:
    """On a worker of a local cluster: end this worker (and its nanny) within a second of the
    `pipe sweep` process that started the cluster dying, even by SIGKILL, so that no orphaned
    worker keeps training a trial that the next run takes over."""
    if _WATCHING or driver.get("writer") == this_process().get("writer"):
        return
    _WATCHING.append(driver.get("writer", ""))

    def watch() -> None:
        while process_alive(driver):
            time.sleep(1.0)
        parent = os.getppid()
        if parent > 1 and parent != driver.get("pid"):
            try:
                os.kill(parent, signal.SIGKILL)  # the nanny, which would start another worker
            except OSError:
                pass
        os._exit(70)

    threading.Thread(target=watch, name="watch-sweep", daemon=True).start()
