"""`pipe sweep` through the real command line, on a small table embedded once with the tiny encoders.

The table's effusion label alternates in blocks of four, so the validation and test splits
(every fourth item each) both hold positives and negatives: a downstream objective is
defined on the validation split.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import forked
from tests.helpers import embed_json, make_table, pipe

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=8"]
CHEAP_HEADS = ["seeds=1", "heads.min_steps=40", "heads.epochs=4", "bootstrap=50"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PIPE_NO_PROGRESS": "1"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """40 pairs with an `effusion` label, embedded with the tiny encoders: (table, cache)."""
    root = tmp_path_factory.mktemp("sweep")
    table = make_table(root / "data", 40)
    df = pd.read_csv(table)
    df["effusion"] = [(i // 4) % 2 for i in range(len(df))]
    df.to_csv(table, index=False)
    embed_json(table, root / "cache")
    return table, root / "cache"


def sweep_file(path: Path, table: Path, out: Path, body: str, overrides=("epochs=1",)) -> Path:
    path.write_text(f"""dataset: {table}
backbone: tiny-vit
text_encoder: tiny-bert
overrides: [{", ".join([*SMALL, *overrides])}]
out: {out}
{body}""")
    return path


def sweep_json(*args: str, expect: int = 0) -> dict:
    r = pipe("sweep", *args, "--json", expect=expect)
    return json.loads(r.stdout.strip().splitlines()[-1])


def split_ids(table: Path, split: str) -> set[str]:
    df = pd.read_csv(table, dtype={"id": str})
    return set(df.id[df.split == split])


# ------------------------------------------------------------------ bad input, before any trial
def test_every_problem_of_a_sweep_file_is_listed_in_one_message(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text("""dataset: x.csv
backbone: tiny-vit
text_encoder: tiny-bert
search: optuna
colour: blue
space:
  optim.lr: {log: [0, 1.0e-2]}
  adaptor.dropout: {float: [0.5, 0.1]}
  optim.lrr: [1, 2]
  batch_size: []
  epochs: {uniform: [1, 3]}
objective: classification@0.01/roc
prune: sometimes
""")
    r = pipe("sweep", str(spec), "--cache", str(tmp_path / "cache"), expect=2)
    for needle in ("colour: unknown sweep key", "space.optim.lr: a log range needs lo > 0",
                   "space.adaptor.dropout: lo > hi", "space.batch_size: expected a non-empty list",
                   "space.epochs: expected a list or one of", "unknown classification metric 'roc'",
                   "prune: must be one of none, median, halving", "optim.lrr: unknown key; did you mean 'optim.lr'"):
        assert needle in r.output, needle
    assert "8 problems" in r.output and "Traceback" not in r.output


def test_an_empty_space_and_a_bad_objective_are_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("dataset: x.csv\nbackbone: tiny-vit\ntext_encoder: tiny-bert\nspace: {}\nobjective: retrieval/r@3\n"
                    "direction: upwards\n")
    r = pipe("sweep", str(spec), expect=2)
    assert "space: empty" in r.output and "unknown retrieval metric 'r@3'" in r.output
    assert "direction: must be one of maximize, minimize" in r.output


def test_a_metric_the_dataset_does_not_have_is_refused(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out",
                      "space:\n  optim.lr: [1.0e-3]\nobjective: classification@0.5/macro_auroc\n")
    r = pipe("sweep", str(spec), "--cache", str(cache), expect=2)
    assert "'macro_auroc' is not a figure of" in r.output and "classification@0.5/auroc" in r.output
    assert not (tmp_path / "out").exists()


def test_a_missing_encoder_pair_is_refused_with_the_embed_command(labelled, tmp_path):
    table, cache = labelled
    spec = tmp_path / "s.yaml"
    spec.write_text(f"dataset: {table}\npairs: [[tiny-vit, tiny-bert], [random-dinov2-s, tiny-bert]]\n"
                    f"space:\n  optim.lr: [1.0e-3]\nout: {tmp_path / 'out'}\n")
    r = pipe("sweep", str(spec), "--cache", str(cache), expect=2)
    assert (f"pipe embed --dataset {table} --backbone random-dinov2-s --text-encoder tiny-bert --cache {cache}"
            in r.output), r.output
    assert "1 of the sweep's 2 encoder pair(s) are not in the cache" in r.output and "--embed" in r.output
    assert not (tmp_path / "out").exists()


def test_an_unreachable_scheduler_or_storage_fails_within_seconds_naming_it(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", "space:\n  optim.lr: [1.0e-3]\n")
    t0 = time.monotonic()
    r = pipe("sweep", str(spec), "--cache", str(cache), "--scheduler", "tcp://127.0.0.1:9", expect=2)
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in r.output
    bad = sweep_file(tmp_path / "b.yaml", table, tmp_path / "out2",
                     f"space:\n  optim.lr: [1.0e-3]\nstorage: journal:{tmp_path / 'no' / 'such' / 'j.log'}\n")
    r = pipe("sweep", str(bad), "--cache", str(cache), "--workers", "0", expect=2)
    assert f"cannot open the study storage journal:{tmp_path / 'no' / 'such' / 'j.log'}" in r.output
    assert time.monotonic() - t0 < 60 and "Traceback" not in r.output


# ------------------------------------------------------------------ runs
@pytest.mark.slow
def test_trials_run_in_parallel_on_a_local_cluster_of_two_workers(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", """search: grid
space:
  optim.lr: [1.0e-3, 1.0e-4]
  adaptor.mode: [pooled, tokens]
objective: val_loss
top: 0
""")
    out = sweep_json(str(spec), "--cache", str(cache), "--workers", "2")
    assert "a local Dask cluster of 2 workers" in out["pool"]
    assert len(out["rows"]) == 4 and {r["state"] for r in out["rows"]} == {"complete"}
    assert len(out["workers"]) == 2, out["workers"]  # both workers ran trials
    arrays = {"image/pooled", "image/tokens", "text/pooled", "text/tokens", "text/length"}  # both modes' arrays
    for w in out["workers"].values():  # each read the cache once, at its first trial; its later trials read nothing
        assert w["first_reads"] == {a: 40 for a in arrays} and w["later_reads"] == 0, w
    rows = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert list(rows.columns) == ["trial", "state", "objective", "seconds", "run", "optim.lr", "adaptor.mode", "reason"]
    assert sorted(rows.trial) == [0, 1, 2, 3] and set(rows["adaptor.mode"]) == {"pooled", "tokens"}
    assert list(rows.objective) == sorted(rows.objective)  # val_loss: lower is better, best first
    for run in rows.run:
        assert (Path(run) / "last.safetensors").is_file() and "backbone forwards: 0" in (Path(run) / "log.txt").read_text()


@pytest.fixture(scope="module")
def downstream(labelled, tmp_path_factory):
    """A finished sweep ranked by a downstream objective (in this process, one trial at a time)."""
    table, cache = labelled
    root = tmp_path_factory.mktemp("downstream")
    spec = sweep_file(root / "s.yaml", table, root / "out", f"""search: random
trials: 3
space:
  optim.lr: {{log: [1.0e-4, 3.0e-3]}}
  adaptor.n_layers: {{int: [1, 2]}}
objective: classification@0.5/auroc
repeats: 2
top: 1
evaluate: [{", ".join(CHEAP_HEADS)}]
""")
    return table, root / "out", sweep_json(str(spec), "--cache", str(cache), "--workers", "0")


@pytest.mark.slow
def test_a_downstream_objective_ranks_trials_on_the_validation_split_only(downstream):
    table, out, result = downstream
    valid, test = split_ids(table, "valid"), split_ids(table, "test")
    rows = [r for r in result["rows"] if r["state"] == "complete"]
    assert len(rows) == 3 and result["objective"] == "classification@0.5/auroc"
    for r in rows:
        values = []
        for seed in (0, 1):
            ev = Path(r["run"]) / f"seed-{seed}" / "valid-classification"
            results = json.loads((ev / "results.json").read_text())
            assert results["config"]["score_split"] == "valid"
            with np.load(ev / "predictions.npz") as z:
                scored = set(z["ids"].tolist())
            assert scored == valid and not scored & test  # the test split was not read to choose a trial
            values.append(results["methods"][0]["heads"]["mlp"]["50%"]["summary"]["auroc"]["mean"])
        assert r["objective"] == pytest.approx(np.mean(values)) and r["objective_std"] == pytest.approx(
            np.std(values, ddof=1))
    assert [r["objective"] for r in rows] == sorted((r["objective"] for r in rows), reverse=True)
    (best,) = result["top"]  # the best trial, then, on the test split: apart from the search
    assert best["trial"] == rows[0]["trial"] and Path(best["out"]).parent == out / "top"
    with np.load(Path(best["out"]) / "predictions.npz") as z:
        assert set(z["ids"].tolist()) == test
    final = json.loads((Path(best["out"]) / "results.json").read_text())
    assert final["config"]["score_split"] == "test" and final["config"]["bootstrap"] == 50
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["top_runs"][0]["test"] == final["methods"][0]["heads"]["mlp"]["50%"]["summary"]["auroc"]["mean"]


@pytest.mark.slow
def test_trials_csv_and_the_sweep_page(downstream, tmp_path):
    _, out, result = downstream
    rows = pd.read_csv(out / "trials.csv")
    assert list(rows.columns) == ["trial", "state", "objective", "objective_std", "objective_runs", "seconds", "run",
                                  "optim.lr", "adaptor.n_layers", "reason"]
    assert rows.state.tolist() == ["complete"] * 3 and rows["optim.lr"].between(1e-4, 3e-3).all()
    assert [r["trial"] for r in result["rows"]] == rows.trial.tolist()
    assert len((out / "progress.log").read_text().splitlines()) == 3
    page = tmp_path / "sweep.html"
    pipe("report", str(out), "--html", str(page))
    html = page.read_text()
    for section in ("Trials, ranked", "Each parameter&#x27;s effect", "The objective over the trials",
                    "The best trials on the test split", "fANOVA"):
        assert section in html, section
    assert html.count('src="data:image/png;base64,') >= 3 and "<script" not in html
    assert "<caption>AUROC (%)<span" in html  # the best trial's downstream table
    table = pipe("report", str(out))  # without --html: the best trials' tables
    assert "AUROC" in table.stdout


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_sweep_goes_on_and_poor_ones_are_pruned(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", """search: grid
space:
  optim.lr: [1.0e-3, 2.0e-3, 3.0e-3, 1.0e-12, 1.0e+30]
objective: val_loss
prune: median
top: 0
""", overrides=("epochs=3", "adaptor.dropout=0"))
    out = sweep_json(str(spec), "--cache", str(cache), "--workers", "0")
    by_trial = {r["trial"]: r for r in out["rows"]}
    assert [by_trial[i]["state"] for i in range(3)] == ["complete"] * 3
    assert by_trial[3]["state"] == "pruned" and "pruned after epoch 1 by the median pruner" in by_trial[3]["reason"]
    assert by_trial[4]["state"] == "failed" and "the training loss is nan" in by_trial[4]["reason"].lower()


# ------------------------------------------------------------------ resumed and shared
def _start(spec: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return forked.popen([sys.executable, "-m", "cli", "sweep", str(spec), "--cache", str(cache), "--json",
                             *extra], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trainings(run: Path) -> int:
    """How many times a trial's training started (each start prints its banner in the trial's log)."""
    return (run / "log.txt").read_text().count("training the Adaptor")


def _wait_for_epoch(proc: subprocess.Popen, metrics: Path) -> None:
    """Until a trial has logged its first epoch (it is then between epochs)."""
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)


@pytest.mark.slow
def test_a_stopped_or_killed_sweep_resumes_and_runs_no_finished_trial_again(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", """search: grid
space:
  optim.lr: [1.0e-3, 5.0e-4, 2.0e-4]
objective: val_loss
top: 0
""", overrides=("epochs=6",))
    trials = tmp_path / "out" / "trials"
    proc = _start(spec, cache, "--workers", "0")
    _wait_for_epoch(proc, trials / "0001" / "metrics.csv")
    proc.send_signal(signal.SIGINT)  # Ctrl-C: a clean stop, the running trial put back
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "1 running trial(s) put back" in stderr, stderr
    rows = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert rows.state.tolist() == ["complete", "interrupted"] and rows.reason[1] == "interrupted (Ctrl-C)"
    finished_before = (trials / "0000" / "last.safetensors").stat().st_mtime_ns
    proc = _start(spec, cache, "--workers", "0")
    _wait_for_epoch(proc, trials / "0002" / "metrics.csv")
    proc.send_signal(signal.SIGKILL)  # mid-trial: trials 0 and 1 done, trial 2 between its epochs
    proc.wait()
    again = _start(spec, cache, "--workers", "0")
    stdout, stderr = again.communicate(timeout=600)
    assert again.returncode == 0, stderr
    result = json.loads(stdout.strip().splitlines()[-1])
    assert [r["state"] for r in result["rows"]] == ["complete"] * 3 and result["ran"] == 1
    assert "trial 2: re-running it (interrupted before: its process" in stderr
    assert (trials / "0000" / "last.safetensors").stat().st_mtime_ns == finished_before  # not run again
    assert [_trainings(trials / n) for n in ("0000", "0001", "0002")] == [1, 2, 2]
    for n in ("0001", "0002"):  # re-run (from its last checkpoint, if it had one) to the end
        assert pd.read_csv(trials / n / "metrics.csv").epoch.tolist() == [1, 2, 3, 4, 5, 6]
    grown = _start(spec, cache, "--workers", "0", "--trials", "3")  # nothing left: no trial runs
    stdout, _ = grown.communicate(timeout=600)
    assert json.loads(stdout.strip().splitlines()[-1])["ran"] == 0


@pytest.mark.slow
def test_two_processes_share_one_study_and_never_run_a_trial_twice(labelled, tmp_path):
    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", """search: random
trials: 6
space:
  optim.lr: {log: [1.0e-4, 3.0e-3]}
objective: val_loss
top: 0
""", overrides=("epochs=2",))
    procs = [_start(spec, cache, "--workers", "0") for _ in range(2)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert sum(r["ran"] for r in results) == 6  # each trial ran in exactly one of them
    rows = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert sorted(rows.trial) == list(range(6)) and set(rows.state) == {"complete"}
    assert all(_trainings(Path(run)) == 1 for run in rows.run)
    assert rows["optim.lr"].nunique() == 6  # a trial's values are drawn from its own number, whoever draws them


def test_a_trial_whose_dask_workers_die_is_failed_and_one_whose_future_is_lost_is_put_back():
    """Dask runs a trial whose worker died again elsewhere (tests/test_object_worker_kills.py); one whose workers
    kept dying it gives up: failed, saying why; one whose future was lost (the scheduler's connection
    dropped) is put back, to run again."""
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    from stages.sweep.pool import LOST, _result

    class Gone:
        def __init__(self, error: Exception):
            self.error = error

        def result(self):
            raise self.error

    failed = _result(Gone(KilledWorker("run_trial-1", None, 3)))
    assert failed["state"] == "failed" and failed["reason"].startswith(
        "each of the 4 Dask workers that ran it died (out of memory, preempted or killed), so Dask gave it up")
    lost = _result(Gone(FutureCancelledError("run_trial-1", "scheduler-connection-lost")))
    assert lost == {"state": LOST, "reason": "its Dask task was lost (scheduler-connection-lost)"}


@pytest.mark.slow
def test_an_attempt_waits_for_an_earlier_one_that_still_owns_the_trial_folder(labelled, tmp_path):
    """A worker that the scheduler gave up for dead may live on, training its trial: the next attempt
    waits for the folder, then resumes; the trial is trained once and told once."""
    import threading

    from core.locks import owned_folder

    table, cache = labelled
    spec = sweep_file(tmp_path / "s.yaml", table, tmp_path / "out", """search: grid
space:
  optim.lr: [1.0e-3, 5.0e-4]
objective: val_loss
top: 0
""")
    run = tmp_path / "out" / "trials" / "0000"
    ran = []
    with owned_folder(run, "train-adaptor"):  # the earlier attempt, still running
        sweep = threading.Thread(target=lambda: ran.append(sweep_json(str(spec), "--cache", str(cache),
                                                                      "--workers", "0")))
        sweep.start()
        deadline = time.monotonic() + 120
        while not ((run / "log.txt").is_file() and "waiting: " in (run / "log.txt").read_text()):
            assert sweep.is_alive() and time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)  # a few looks later: still waiting, nothing trained in the folder
        assert sweep.is_alive() and not (run / "metrics.csv").exists()
    sweep.join(timeout=300)
    (result,) = ran
    assert [r["state"] for r in result["rows"]] == ["complete"] * 2 and result["ran"] == 2
    log = (run / "log.txt").read_text()
    assert f"{run} is in use by `pipe train-adaptor` (pid {os.getpid()}" in log and _trainings(run) == 1


# ------------------------------------------------------------------ encoder pairs
def test_encoder_pairs_and_encoder_lists_are_one_axis(tmp_path):
    from stages.sweep import load_sweep

    spec = tmp_path / "s.yaml"
    spec.write_text("dataset: x.csv\nbackbone: [tiny-vit, random-dinov2-s]\ntext_encoder: tiny-bert\n"
                    "space:\n  optim.lr: [1.0e-3, 1.0e-4]\n")
    s = load_sweep(spec)
    assert s.pairs == (("tiny-vit", "tiny-bert"), ("random-dinov2-s", "tiny-bert")) and s.axes == ("backbone", "optim.lr")
    assert s.search == "optuna" and len(s.grid) == 4
    settings = s.settings({"pair": "random-dinov2-s + tiny-bert", "optim.lr": 1e-4})
    assert settings == {"backbone": "random-dinov2-s", "text_encoder": "tiny-bert", "optim.lr": 1e-4}
    spec.write_text("dataset: x.csv\npairs: [[tiny-vit, tiny-bert], [random-dinov2-s, minilm]]\nsearch: grid\n")
    s = load_sweep(spec)
    assert s.axes == ("backbone", "text_encoder") and [p["pair"] for p in s.grid] == [
        "tiny-vit + tiny-bert", "random-dinov2-s + minilm"] and s.trials == 2


@pytest.mark.slow
def test_a_sweep_over_encoder_pairs_embeds_a_missing_one_first(labelled, tmp_path):
    table, cache = labelled
    spec = tmp_path / "s.yaml"
    spec.write_text(f"""dataset: {table}
pairs: [[tiny-vit, tiny-bert], [random-dinov2-s, tiny-bert]]
overrides: [{", ".join(SMALL)}, epochs=1]
search: grid
objective: val_loss
top: 0
out: {tmp_path / "out"}
""")
    r = pipe("sweep", str(spec), "--cache", str(cache), "--workers", "0", "--embed")
    assert "embedding" in r.output and "random-dinov2-s + tiny-bert first (--embed)" in r.output
    rows = pd.read_csv(tmp_path / "out" / "trials.csv")
    assert list(rows.columns) == ["trial", "state", "objective", "seconds", "run", "backbone", "text_encoder", "reason"]
    assert dict(zip(rows.trial, rows.backbone)) == {0: "tiny-vit", 1: "random-dinov2-s"}
    assert set(rows.text_encoder) == {"tiny-bert"}
    assert set(rows.state) == {"complete"}
    import yaml

    trained = yaml.safe_load((tmp_path / "out" / "trials" / "0001" / "config.yaml").read_text())
    assert trained["backbone"] == "random-dinov2-s" and trained["adaptor"]["image_dim"] == 384
