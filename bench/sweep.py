"""Sweep throughput: trials per hour in one process (serial) against a local Dask cluster
with the same total threads, on the demo with the real encoders and on a synthetic table.

For each dataset it embeds the table once (not timed), writes a sweep file (a random
search of ``--trials`` trials over the learning rate, depth and dropout, ``--epochs``
epochs each, objective ``val_loss``), and runs ``pipe sweep`` three times, each in its own
process and its own folder:

- serial: ``--workers 0`` with ``PIPE_THREADS=T`` (one process, T threads);
- cluster: ``--workers W`` with ``PIPE_THREADS=T/W`` per worker (W processes, T threads in all);
- narrow: ``--workers 0`` with ``PIPE_THREADS=T/W``: one process with a worker's threads.

The narrow run gives the ceiling of the speedup: W workers can at best run W trials in the time
one runs with T/W threads, so the cluster over serial is at most W x narrow / serial (the
trials' own thread scaling sets it: where T threads run a trial 1.6x as fast as T/W, two
workers can gain no more than 2 / 1.6 = 1.25x). ``cluster / ceiling`` is how much of it the
cluster reaches.

Per run it reports the wall clock of the whole command, the trials per hour over the
search itself (first trial started to last trial finished, from the study), per worker
its peak RSS and the memory its held arrays take, the rows it read from the cache at its
first trial and after it, and the seconds a trial spent reading the cache (its worker's
first trial, and the others). Targets: the cluster's trials per hour at least 1.5× the
serial run's, and no trial reading from the cache after its worker's first.

    python bench/sweep.py [--demo-n 2000] [--synthetic-n 10000] [--trials 8] [--epochs 3]
                          [--threads 2] [--workers 2] [--workdir DIR] [--out sweep.json]

On a machine shared with other work every figure moves with the load; the load average
before and after is part of the output. The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.scale import write_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPACE = """search: random
space:
  optim.lr: {log: [1.0e-4, 2.0e-3]}
  adaptor.n_layers: {int: [1, 2]}
  adaptor.dropout: {float: [0.0, 0.2]}
objective: val_loss
top: 0
"""


def _env(threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return {**env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PIPE_NO_PROGRESS": "1",
            "PIPE_THREADS": str(threads)}


def _pipe(args: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    with open(log, "w") as err:
        r = subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                           stderr=err, text=True)
    if r.returncode != 0:
        raise SystemExit(f"pipe {' '.join(args)} failed ({r.returncode}); see {log}")
    return r


def embed(dataset: str, image: str, text: str, cache: Path, work: Path, threads: int) -> float:
    t0 = time.perf_counter()
    _pipe(["embed", "-d", dataset, "-b", image, "-t", text, "--cache", str(cache)], _env(threads),
          work / f"embed-{image}.log")
    return time.perf_counter() - t0


def sweep_file(path: Path, out: Path, dataset: str, image: str, text: str, preset: str, trials: int,
               epochs: int) -> Path:
    path.write_text(f"dataset: {dataset}\nbackbone: {image}\ntext_encoder: {text}\npreset: {preset}\n"
                    f"overrides: [epochs={epochs}]\ntrials: {trials}\nout: {out}\n{SPACE}")
    return path


def run_sweep(spec: Path, cache: Path, workers: int, threads: int, log: Path) -> dict:
    """One `pipe sweep` (its own folder): its wall clock, the search's trials per hour, per-worker figures."""
    env = _env(threads if workers == 0 else max(1, threads // workers))
    t0 = time.perf_counter()
    r = _pipe(["sweep", str(spec), "--cache", str(cache), "--workers", str(workers), "--json"], env, log)
    wall = time.perf_counter() - t0
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = [x for x in res["rows"] if x["state"] == "complete"]
    span = max(x["finished"] for x in rows) - min(x["started"] for x in rows)
    firsts = [s for w in res["workers"].values() for s in w["read_seconds"][:1]]
    later = [s for w in res["workers"].values() for s in w["read_seconds"][1:]]
    return {"workers": workers, "threads_total": threads, "pool": res["pool"], "trials": len(rows),
            "wall_s": round(wall, 1), "search_s": round(span, 1),
            "trials_per_hour": round(3600 * len(rows) / span, 1),
            "trials_per_hour_wall": round(3600 * len(rows) / wall, 1),
            "per_worker": {k: {"trials": w["trials"], "peak_rss_mb": w["peak_rss_mb"], "held_mb": w["held_mb"],
                               "rows_read_first_trial": w["first_reads"], "rows_read_after": w["later_reads"]}
                           for k, w in res["workers"].items()},
            "read_s_first_trial": round(max(firsts, default=0.0), 3),
            "read_s_other_trials": round(max(later, default=0.0), 4),
            "trials_reading_after_first": sum(1 for w in res["workers"].values() for _ in range(
                1 if w["later_reads"] else 0))}


def measure(name: str, dataset: str, image: str, text: str, preset: str, cache: Path, work: Path,
            a: argparse.Namespace) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    embed_s = embed(dataset, image, text, cache, work, a.threads)
    runs = {}
    narrow = max(1, a.threads // a.workers)
    for kind, workers, threads in (("serial", 0, a.threads), ("cluster", a.workers, a.threads), ("narrow", 0, narrow)):
        spec = sweep_file(work / f"{kind}.yaml", work / kind, dataset, image, text, preset, a.trials, a.epochs)
        runs[kind] = run_sweep(spec, cache, workers, threads, work / f"{kind}.log")
    serial, cluster = runs["serial"], runs["cluster"]
    ceiling = a.workers * runs["narrow"]["trials_per_hour"] / serial["trials_per_hour"]
    speedup = cluster["trials_per_hour"] / serial["trials_per_hour"]
    return {"dataset": name, "encoders": f"{image} + {text}", "embed_s": round(embed_s, 1), "serial": serial,
            "cluster": cluster, "narrow": runs["narrow"], "speedup": round(speedup, 2),
            "speedup_wall": round(cluster["trials_per_hour_wall"] / serial["trials_per_hour_wall"], 2),
            "thread_scaling": round(serial["trials_per_hour"] / runs["narrow"]["trials_per_hour"], 2),
            "ceiling": round(ceiling, 2), "of_ceiling": round(speedup / ceiling, 2)}


def table(results: list[dict]) -> str:
    lines = ["| dataset | run | trials/h (search) | trials/h (wall) | peak RSS per worker | held arrays | "
             "rows read: first trial / after | cache read s: first / others |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        for kind in ("serial", "cluster", "narrow"):
            x = r[kind]
            rss = ", ".join(f"{w['peak_rss_mb']:,.0f} MiB" for w in x["per_worker"].values())
            held = ", ".join(f"{w['held_mb']:,.1f} MiB" for w in x["per_worker"].values())
            first = ", ".join(str(sum(w["rows_read_first_trial"].values())) for w in x["per_worker"].values())
            after = ", ".join(str(w["rows_read_after"]) for w in x["per_worker"].values())
            pool = x["pool"] + (f" ({x['threads_total']} thread{'s' if x['threads_total'] > 1 else ''})"
                                if kind != "cluster" else "")
            lines.append(f"| {r['dataset']} ({r['encoders']}) | {kind}: {pool} | {x['trials_per_hour']:,.0f} | "
                         f"{x['trials_per_hour_wall']:,.0f} | {rss} | {held} | {first} / {after} | "
                         f"{x['read_s_first_trial']:.3f} / {x['read_s_other_trials']:.4f} |")
        lines.append(f"| {r['dataset']} | cluster ÷ serial | **{r['speedup']:.2f}×** | {r['speedup_wall']:.2f}× | | | | |")
        lines.append(f"| {r['dataset']} | ceiling: workers × narrow ÷ serial (serial's threads run a trial "
                     f"{r['thread_scaling']:.2f}× as fast) | {r['ceiling']:.2f}× | cluster reaches "
                     f"{100 * r['of_ceiling']:.0f}% of it | | | | |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-n", type=int, default=2000, help="pairs of the demo (0: skip it)")
    ap.add_argument("--synthetic-n", type=int, default=10000, help="rows of the synthetic table (0: skip it)")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="threads in all, for both runs")
    ap.add_argument("--workers", type=int, default=2, help="the local cluster's workers")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="pipe-sweep-bench-"))
    load_before, results = os.getloadavg(), []
    if a.demo_n:
        demo = "demo" if a.demo_n == 2000 else f"demo?n={a.demo_n}"
        results.append(measure(f"demo ({a.demo_n} pairs)", demo, "dinov2-s-derived", "minilm", "demo.yaml",
                               work / "demo-cache", work / "demo", a))
    if a.synthetic_n:
        table_path = write_table(work / "synthetic" / "data", a.synthetic_n)
        results.append(measure(f"synthetic ({a.synthetic_n:,} rows)", str(table_path), "tiny-vit", "tiny-bert",
                               "demo.yaml", work / "synthetic-cache", work / "synthetic", a))
    targets = {"cluster_at_least_1.5x_serial": all(r["speedup"] >= 1.5 for r in results),
               "no_read_after_a_workers_first_trial": all(r[k]["trials_reading_after_first"] == 0
                                                          for r in results for k in ("serial", "cluster")),
               "target_within_the_ceiling": all(r["ceiling"] >= 1.5 for r in results)}
    summary = {"bench": "sweep", "results": results, "targets": targets, "cpus": os.cpu_count(),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()], "trials": a.trials, "epochs": a.epochs}
    print(table(results))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
