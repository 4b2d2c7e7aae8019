"""`pipe sweep`: many Adaptor trainings from one cache, searched, run in parallel, ranked.

    spec = load_sweep("sweep_demo", ["epochs=5"], cache="cache")
    result = run(spec, workers=2)

1. Before any trial: the sweep file is checked whole (:mod:`stages.sweep.spec`), every
   encoder pair must be in the cache (the exact `pipe embed` commands are printed, or
   ``embed=True`` runs them), and a classification metric must be one of the dataset's.
2. The search: trials are claimed from the Optuna study (:mod:`stages.sweep.study`) and run
   on the pool (:mod:`stages.sweep.pool`: this process, or Dask workers), at most one per
   worker at a time; each trial's objective comes from the validation split
   (:mod:`stages.sweep.trial`). ``trials.csv`` is rewritten and one progress line printed
   after each trial.
3. The best ``top`` trials are evaluated on the test split, with the usual intervals, into
   ``OUT/top/``: reported apart from the search, which never read the test split.

Running it again resumes (finished trials are kept, interrupted ones re-run); two processes
on one study share its trials.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from cache.pairs import CacheMissError, embed_command
from cache.paths import cache_root
from core.atomic import atomic_write_text
from core.console import err, escape
from core.errors import PipeError
from stages.embed import EmbedConfig
from stages.embed import run as embed_run
from pipeline.records import load_results
from stages.sweep import board
from stages.sweep.objective import parse_objective, read_figure
from stages.sweep.pool import LOST, SchedulerError, make_pool
from stages.sweep.space import PAIR, pair_name
from stages.sweep.spec import SweepSpec, eval_config, train_config
from stages.sweep.study import Claimed, Study, redacted, storage_url
from stages.sweep.trial import EvalTask, TrialTask, release, run_evaluation, run_trial
from stages.train.trainer import load_training_data

POLL_S = 2.0     # how often a process with nothing left to start looks at the others' trials


@dataclass
class WorkerStats:
    """What one worker did: trials, and the rows it read from the cache (per store array) at its
    first trial and after it."""

    trials: int = 0
    first_reads: dict[str, int] = field(default_factory=dict)
    later_reads: int = 0
    read_seconds: list[float] = field(default_factory=list)
    peak_rss_mb: float = 0.0
    held_mb: float = 0.0

    def add(self, outcome: dict) -> None:
        reads = outcome.get("reads", {})
        self.trials += 1
        if outcome.get("first"):
            for k, n in reads.items():
                self.first_reads[k] = self.first_reads.get(k, 0) + n
        else:
            self.later_reads += sum(reads.values())
        self.read_seconds.append(outcome.get("read_seconds", 0.0))
        w = outcome.get("worker", {})
        self.peak_rss_mb = max(self.peak_rss_mb, w.get("peak_rss_mb", 0.0))
        self.held_mb = max(self.held_mb, w.get("held_mb", 0.0))


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    csv: Path | None = None
    pool: str = ""
    ran: int = 0                       # trials this process ran
    workers: dict[str, WorkerStats] = field(default_factory=dict)
    top: list[dict] = field(default_factory=list)
    interrupted: bool = False

    @property
    def rows_read(self) -> int:
        """Rows every worker read from the cache, all arrays together."""
        return sum(sum(w.first_reads.values()) + w.later_reads for w in self.workers.values())

    def summary(self) -> dict:
        return {"ran": self.ran, "interrupted": self.interrupted, "csv": str(self.csv), "pool": self.pool,
                "rows_read": self.rows_read, "backbone_forwards": 0, "top": self.top,
                "workers": {k: vars(w) for k, w in self.workers.items()}}


# ------------------------------------------------------------------ before any trial
def check_caches(spec: SweepSpec, embed: bool = False) -> None:
    """Every encoder pair must be in the cache: refused with the `pipe embed` commands, or embedded now."""
    missing = [p for p in spec.pairs if _missing(spec, p)]
    if missing and embed:
        for image, text in missing:
            err.print(f"embedding {escape(spec.dataset)} with {escape(image)} + {escape(text)} first (--embed)")
            embed_run(EmbedConfig(dataset=spec.dataset, backbone=image, text_encoder=text, cache=spec.cache))
        missing = [p for p in spec.pairs if _missing(spec, p)]
    if missing:
        root = cache_root(spec.cache)
        commands = "\n".join(f"  {embed_command(spec.dataset, a, b, root)}" for a, b in missing)
        raise CacheMissError(f"{len(missing)} of the sweep's {len(spec.pairs)} encoder pair(s) are not in the cache "
                             f"for {spec.dataset!r}; no trial has started. Embed them first:\n{commands}\n"
                             "(or run the sweep with --embed to embed them before the first trial)")


def _missing(spec: SweepSpec, pair: tuple[str, str]) -> bool:
    params = {PAIR: pair_name(*pair)} if len(spec.pairs) > 1 else {}
    try:
        load_training_data(train_config(spec, params, "probe"))
    except CacheMissError:
        return True
    return False


# ------------------------------------------------------------------ the sweep
def run(spec: SweepSpec, workers: int | None = None, scheduler: str | None = None, embed: bool = False,
        lease_s: float | None = None) -> SweepResult:
    """Run the sweep's missing trials, then evaluate its best on the test split."""
    check_caches(spec, embed)
    Path(spec.out).mkdir(parents=True, exist_ok=True)
    study = Study(spec, lease_s=lease_s)
    _write_manifest(spec, [])
    result = SweepResult()
    generation = f"{study.me['writer']}:{time.time()}"
    try:
        with make_pool(workers, scheduler) as pool:
            pool.generation = generation
            result.pool = pool.describe()
            err.print(f"sweep {escape(spec.source)}: {spec.trials} trials ({spec.search} search over "
                      f"{escape(', '.join(spec.axes) or 'nothing')}), objective {escape(spec.objective.label)} on the "
                      f"validation split · study {escape(spec.study)} in {escape(redacted(study.url))} · "
                      f"{escape(result.pool)} · backbone forwards: 0 (every trial reads the cache)")
            result.interrupted = search(spec, study, pool, result)
            if not result.interrupted:
                result.top = evaluate_top(spec, study, pool)
    except SchedulerError:
        _write_results(spec, study, result)  # its running trials put back: trials.csv says so
        raise
    finally:
        study.close()
        release()  # what trials run in this process kept
    _write_results(spec, study, result)
    return result


def _write_results(spec: SweepSpec, study: Study, result: SweepResult) -> None:
    result.rows = board.trial_rows(spec, study.trials())
    result.csv = board.write_tables(spec, result.rows)
    board.write_legacy(spec, result.rows)
    _write_manifest(spec, result.top)


def search(spec: SweepSpec, study: Study, pool, result: SweepResult) -> bool:
    """Claim and run trials until none is left to start and none runs anywhere; True if interrupted."""
    jobs: list = []
    try:
        while True:
            while len(jobs) < pool.capacity and (claimed := study.start_next()) is not None:
                if claimed.resumed:
                    err.print(f"trial {claimed.number}: re-running it (interrupted before: {escape(claimed.resumed)})")
                jobs.append(_submit(spec, study, pool, claimed))
            if not jobs:
                if not study.pending():
                    return False
                time.sleep(POLL_S)  # another process's trials run: wait, to take over any it abandons
                continue
            for job, outcome in pool.wait(jobs, timeout=POLL_S):
                jobs.remove(job)
                _finished(spec, study, pool, job.about, outcome, result)
    except KeyboardInterrupt:
        pool.cancel(jobs)
        _put_back(study, jobs, "interrupted (Ctrl-C)")
        err.print(f"[yellow]interrupted:[/] {len(jobs)} running trial(s) put back; run the same command again to "
                  "resume them (finished trials are kept)")
        return True
    except SchedulerError:
        _put_back(study, jobs, "its Dask scheduler was lost", say=True)
        raise


def _put_back(study: Study, jobs: list, why: str, say: bool = False) -> None:
    for job in jobs:
        study.release(job.about, why)
        if say:
            err.print(f"[yellow]trial {job.about.number}: {escape(why)}; put back, to run again")


def _submit(spec: SweepSpec, study: Study, pool, claimed: Claimed):
    try:
        return pool.submit(run_trial, _task(spec, study, pool, claimed), claimed)
    except SchedulerError:
        study.release(claimed, "its Dask scheduler was lost")
        raise


def _task(spec: SweepSpec, study: Study, pool, claimed: Claimed) -> TrialTask:
    return TrialTask(spec, claimed.number, claimed.trial_id, claimed.params, study.url,
                     str(board.trial_folder(spec, claimed.number)), study.me, pool.generation, pool.local_cluster,
                     pool.gpu_per_worker)


def _finished(spec: SweepSpec, study: Study, pool, claimed: Claimed, outcome: dict, result: SweepResult) -> None:
    if outcome["state"] == LOST:  # not run to its end: put back, and claimed again at once
        study.release(claimed, outcome["reason"])
        err.print(f"[yellow]trial {claimed.number}: {escape(outcome['reason'])}; put back, to run again")
        return
    if not study.finish(claimed, outcome):
        err.print(f"[yellow]trial {claimed.number}: another process took it over (this one's lease lapsed); "
                  "its result here is dropped")
        return
    result.ran += 1
    w = outcome.get("worker", {})
    result.workers.setdefault(f"{w.get('name', '?')} pid {w.get('pid', '?')}", WorkerStats()).add(outcome)
    rows = board.trial_rows(spec, study.trials())
    result.csv = board.write_tables(spec, rows)
    line = board.progress_line(spec, claimed.number, claimed.params, outcome, rows, pool.capacity)
    err.print(line, markup=False)
    with open(Path(spec.out) / "progress.log", "a", encoding="utf-8") as log:
        log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")


# ------------------------------------------------------------------ the test split
def test_task(spec: SweepSpec) -> str:
    """The task the best trials are evaluated with: the objective's (retrieval for a training figure)."""
    return spec.objective.task or "retrieval"


def test_objective(spec: SweepSpec):
    """The figure shown for the best trials on the test split: the objective's, or for a training
    figure the matching retrieval recall (val_i2t_r@10 -> retrieval/i2t_r@10)."""
    o = spec.objective
    if o.downstream:
        return o
    metric = o.metric[len("val_"):] if o.metric.startswith("val_i2t_r@") or o.metric.startswith("val_t2i_r@") \
        else "i2t_r@10"
    return parse_objective(f"retrieval/{metric}", None)[0]


def evaluate_top(spec: SweepSpec, study: Study, pool) -> list[dict]:
    """The best ``top`` complete trials, each evaluated on the test split into ``OUT/top/``."""
    best = [r for r in board.trial_rows(spec, study.trials()) if r["state"] == "complete"][:spec.top]
    if not best:
        return []
    task = test_task(spec)
    fractions = _fractions(spec, task)
    jobs = []
    for r in best:
        run = Path(r["run"]) if spec.repeats == 1 else Path(r["run"]) / "seed-0"
        out = Path(spec.out) / "top" / f"trial-{r['trial']:04d}-{task}"
        jobs.append(pool.submit(run_evaluation, EvalTask(spec, task, str(run), str(out), spec.pair_of(r["params"]),
                                                         fractions, study.me, pool.generation, pool.local_cluster),
                               r))
    err.print(f"evaluating the best {len(jobs)} trial(s) on the test split ({task}, with intervals) into "
              f"{escape(str(Path(spec.out) / 'top'))}")
    done = []
    while jobs:
        for job, outcome in pool.wait(jobs, timeout=POLL_S):
            jobs.remove(job)
            if "state" in outcome:  # its Dask workers died, or its future was lost: not evaluated
                outcome = {"error": outcome["reason"]}
            done.append({"trial": job.about["trial"], "task": task, "objective": job.about["objective"],
                         **outcome, **_test_figure(spec, outcome)})
    return sorted(done, key=lambda d: [r["trial"] for r in best].index(d["trial"]))


def _test_figure(spec: SweepSpec, outcome: dict) -> dict:
    """``{"test": figure}``: the objective's figure (or the matching recall) in a best trial's test results."""
    path = Path(outcome.get("out", "")) / "results.json"
    if outcome.get("error") or not path.is_file():
        return {}
    try:
        return {"test": read_figure(load_results(path), test_objective(spec))}
    except (LookupError, PipeError) as e:
        return {"test_error": str(e)}


def _fractions(spec: SweepSpec, task: str) -> tuple[float, ...]:
    """The label fractions of the test-split tables: the objective's, and those ``evaluate:`` lists."""
    listed = any(o.partition("=")[0].strip() == "fractions" for o in spec.evaluate)
    f = list(eval_config(spec, task, adaptor="none").fractions) if listed or spec.objective.fraction is None else []
    if spec.objective.fraction is not None and spec.objective.fraction not in f:
        f.append(spec.objective.fraction)
    return tuple(sorted(f))


def _write_manifest(spec: SweepSpec, top: list[dict]) -> None:
    """sweep.json: what the sweep searches and how, for `pipe report OUT --html` (and people)."""
    from optuna.distributions import distribution_to_json  # lazy: optuna takes a second to import

    manifest = {
        "kind": "sweep", "source": spec.source, "dataset": spec.dataset, "pairs": [list(p) for p in spec.pairs],
        "objective": spec.objective.text, "direction": spec.objective.direction, "search": spec.search,
        "trials": spec.trials, "prune": spec.prune, "repeats": spec.repeats, "top": spec.top, "study": spec.study,
        "storage": redacted(storage_url(spec)), "axes": list(spec.axes), "preset": spec.preset,
        "overrides": list(spec.overrides), "evaluate": list(spec.evaluate),
        "space": {p.key: {p.kind: p.value} for p in spec.space},
        "distributions": {p.key: json.loads(distribution_to_json(p.distribution)) for p in spec.space},
        "test_task": test_task(spec), "test_objective": test_objective(spec).text,
        "top_runs": [{k: v for k, v in t.items() if k in ("trial", "task", "out", "error", "objective", "test")}
                     for t in top]}
    atomic_write_text(Path(spec.out) / "sweep.json", json.dumps(manifest, indent=1, default=str))

