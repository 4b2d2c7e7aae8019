"""Training beside another job: torch's default threads against the ones `pipe` chooses.

Builds a synthetic cache of N items (``bench/scale.py``'s table, tiny encoders), starts a
second job that keeps every core busy the way another training job would (a torch loop
with torch's defaults), and runs one epoch of `pipe train-adaptor` (pooled, demo config)
beside it under three settings, in alternating order:

    torch default  all cores, OpenMP threads spin while they wait (OMP_WAIT_POLICY=ACTIVE)
    pipe (auto)    threads from the CPUs the process may use, idle threads sleep (PASSIVE)
    one thread     --threads 1

The figure is each setting's epoch time (from metrics.csv) over the auto setting's, the
median over ``--reps`` rounds; a ratio, so a noisy machine affects all three alike.

    python bench/threads.py [--n 4000] [--reps 3] [--no-second-job]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale import ROOT, run_step, write_table  # noqa: E402

SECOND_JOB = """
import torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
opt = torch.optim.SGD(m.parameters(), 1e-3)
x = torch.randn(512, 256)
while True:
    loss = m(x).pow(2).mean(); opt.zero_grad(); loss.backward(); opt.step()
"""
SETTINGS = {
    "torch default": {"OMP_WAIT_POLICY": "ACTIVE", "PIPE_THREADS": str(os.cpu_count() or 1)},
    "pipe (auto)": {},
    "one thread": {"PIPE_THREADS": "1"},
}


def epoch_seconds(run: Path) -> float:
    with open(run / "metrics.csv") as f:
        return float(list(csv.DictReader(f))[-1]["epoch_seconds"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-second-job", action="store_true", help="measure on a quiet machine instead")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pipe-threads-"))
    table, cache, log = write_table(work / "data", a.n), work / "cache", work / "log.txt"
    enc = ["-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache)]
    run_step(["embed", *enc], log, None)
    job = None if a.no_second_job else subprocess.Popen([sys.executable, "-c", SECOND_JOB],
                                                        env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"})
    times: dict[str, list[float]] = {k: [] for k in SETTINGS}
    try:
        for rep in range(a.reps):
            order = list(SETTINGS) if rep % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                run = work / f"run-{rep}-{name.replace(' ', '-')}"
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "PIPE_THREADS")}
                run_step(["train-adaptor", *enc, "--config", str(ROOT / "configs/demo.yaml"), "--out", str(run),
                          "epochs=1"], log, None, {**env, **SETTINGS[name]})
                times[name].append(epoch_seconds(run))
                print(f"round {rep + 1} · {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    finally:
        if job is not None:
            job.kill()
            job.wait()
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["pipe (auto)"])
    summary = {"bench": "threads", "n": a.n, "second_job": not a.no_second_job, "cpus": os.cpu_count(),
               "epoch_seconds": {k: [round(t, 3) for t in v] for k, v in times.items()},
               "ratio_vs_auto": {k: round(statistics.median(v) / base, 2) for k, v in times.items()}}
    for k, v in summary["ratio_vs_auto"].items():
        print(f"{k:>14}: {statistics.median(times[k]):7.2f} s per epoch · {v:.2f}x the auto setting's time")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
