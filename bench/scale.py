"""What each command costs per item, and its peak memory, as a table grows.

For each N it writes a synthetic table of N small images with distinct reports (20%
repeat an earlier one word for word), about two studies per patient, a patient-level
split, two binary findings that the images show (so heads have something to learn) and
a lesion mask per image, then runs every command a user runs, each in its own process,
one at a time:

    data info · embed · embed again (all reused) · train-adaptor pooled and tokens
    (1 epoch each) · evaluate classification, retrieval, zero-shot, segmentation ·
    cache verify · cache gc --dry-run

Segmentation trains a fixed 200 steps (``seg.max_steps=200``), so its figure is the cost of
reading the masks and tokens and scoring the test split, not of a longer training. With
``--smoke`` (what the tests run) it trains a narrow decoder for a few steps instead: such a run
checks that every command runs, and its figures are not the commands' costs.

and prints per step the seconds per 1k items, the CPU seconds per 1k items (user + system,
from ``wait4``) and the peak RSS of that process. On a machine shared with other work the
wall-clock figure moves with the load; the CPU figure much less, so the time target is
checked on both, and the README says which held. The tiny random-init encoders keep the forward passes small, so what is
measured is the pipeline's own cost: hashing, planning, shard writes, reading, heads.

Targets, checked between the smallest N ≥ 10k and the largest (``targets`` in the JSON):
every step's seconds per item (wall clock, and CPU) grows less than 1.3×, and every step's peak
anonymous memory (what the process holds, sampled from /proc; the peak RSS, also shown, adds the
cache files' mapped pages) stays under 2 GB plus the arrays it holds resident (the cache arrays that the step loads: pooled
vectors for the pooled Adaptor and the heads, token arrays for tokens mode and
segmentation).

    python bench/scale.py --n 10000 50000 [--workdir DIR] [--keep] [--threads T] [--out scale.json] [--smoke] [--fork]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from core import forking  # noqa: E402  (the project's root on the path first)
FINDINGS = {"effusion": ("Small left pleural effusion.", "No pleural effusion."),
            "cardiomegaly": ("The heart is enlarged.", "Heart size is normal.")}
EXTRA = ["Lungs are otherwise clear.", "No pneumothorax.", "Stable mediastinal contours.", "Degenerative spine.",
         "Low lung volumes.", "No focal consolidation.", "Sternotomy wires.", "Old rib fracture on the right."]
SIZE = 24  # pixels: decode cost is not what this benchmark measures
RSS_BUDGET_MB = 2048
SEG_STEPS = ["seg.min_steps=50", "seg.max_steps=200", "seg.epochs=2"]
SMOKE_SEG_STEPS = ["seg.channels=[8,8,8,8]", "seg.min_steps=4", "seg.max_steps=8", "seg.epochs=1"]


# ------------------------------------------------------------------------------- the table
def _report(i: int, rng: np.random.Generator, labels: dict[str, int]) -> str:
    words = [FINDINGS[k][0 if v else 1] for k, v in labels.items()]
    words += list(rng.choice(EXTRA, 2, replace=False))
    return " ".join(words) + f" Study {i}."  # distinct unless repeated on purpose


def write_table(folder: Path, n: int, seed: int = 0) -> Path:
    """N images, reports, patients, splits, two findings and a mask each; returns the CSV."""
    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    (folder / "mask").mkdir(exist_ok=True)
    rows, reports = [], []
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for i in range(n):
        labels = {"effusion": int(rng.random() < 0.3), "cardiomegaly": int(rng.random() < 0.2)}
        img = rng.normal(0.45, 0.08, (SIZE, SIZE))
        if labels["effusion"]:
            img[SIZE * 2 // 3:, : SIZE // 2] += 0.35      # a bright left base
        if labels["cardiomegaly"]:
            img[SIZE // 3: SIZE * 2 // 3, SIZE // 4: SIZE * 3 // 4] += 0.25
        name = f"img/{i:07d}.png"
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / name)
        cy, cx, r = rng.integers(4, SIZE - 4, 2).tolist() + [int(rng.integers(2, 5))]
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (rng.random() < 0.5)
        Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"mask/{i:07d}.png")
        report = reports[int(rng.integers(len(reports)))] if reports and rng.random() < 0.2 else _report(i, rng, labels)
        reports.append(report)
        rows.append({"id": f"s{i:07d}", "patient_id": f"p{i // 2:07d}", "image": name, "report": report,
                     "mask_lesion": f"mask/{i:07d}.png", **labels})
    df = pd.DataFrame(rows)
    patient = df["patient_id"].str[1:].astype(int).to_numpy()
    draw = np.random.default_rng(seed + 1).random(patient.max() + 1)[patient]
    df["split"] = np.where(draw < 0.7, "train", np.where(draw < 0.8, "valid", "test"))
    path = folder / "pairs.csv"
    df.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------------------- the steps
def steps(table: Path, cache: Path, runs: Path, smoke: bool = False) -> list[tuple[str, list[str], str]]:
    """(name, pipe arguments, which cache arrays it holds resident) in the order a user runs them."""
    d = ["-d", str(table)]
    enc = ["-b", "tiny-vit", "-t", "tiny-bert"]
    c = ["--cache", str(cache)]
    n = sum(1 for _ in open(table)) - 1
    # label fractions whose subsets keep 50+ training items (1% of a small table is a handful)
    fractions = [f"{f:g}" for f in (0.01, 0.1, 1.0) if f * 0.7 * n >= 50]
    ev = ["evaluate", *d, *c, "--seeds", "1", *[a for f in fractions for a in ("--fraction", f)]]
    return [
        ("data info", ["data", "info", *d, *c], ""),
        ("embed", ["embed", *d, *enc, *c], ""),
        ("embed again (all reused)", ["embed", *d, *enc, *c], ""),
        ("train-adaptor pooled (1 epoch)", ["train-adaptor", *d, *enc, *c, "--config", str(ROOT / "configs/demo.yaml"),
                                            "--out", str(runs / "pooled"), "epochs=1"], "pooled"),
        ("train-adaptor tokens (1 epoch)", ["train-adaptor", *d, *enc, *c, "--config",
                                            str(ROOT / "configs/demo_tokens.yaml"), "--out", str(runs / "tokens"),
                                            "epochs=1"], "tokens"),
        ("evaluate classification", [*ev, "--task", "classification", "--adaptor", str(runs / "pooled"),
                                     "--out", str(runs / "classification")], "pooled"),
        ("evaluate retrieval", [*ev, "--task", "retrieval", "--adaptor", str(runs / "pooled"),
                                "--out", str(runs / "retrieval")], "pooled"),
        ("evaluate zero-shot", [*ev, "--task", "zero-shot", "--adaptor", str(runs / "pooled"),
                                "--out", str(runs / "zero-shot")], "pooled"),
        ("evaluate segmentation", ["evaluate", *d, *c, "--seeds", "1", "--task", "segmentation", "--adaptor", "none",
                                   "-b", "tiny-vit", "--fraction", "1.0", *(SMOKE_SEG_STEPS if smoke else SEG_STEPS),
                                   "--out", str(runs / "segmentation")], "tokens+masks"),
        ("cache verify", ["cache", "verify", *c], ""),
        ("cache gc --dry-run", ["cache", "gc", "--dry-run", *c], ""),
    ]


def array_bytes(cache: Path, kind: str, n: int = 0) -> int:
    """Bytes of the arrays a step holds resident: the cache's arrays of one kind (``pooled`` or
    ``tokens``, with masks and lengths), and for ``tokens+masks`` also n masks on the encoder's
    input grid (one byte per pixel, as segmentation holds them)."""
    if not kind:
        return 0
    names = {"pooled": ("pooled",), "tokens": ("pooled", "tokens", "length"),
             "tokens+masks": ("pooled", "tokens", "length")}[kind]
    total = 0
    for store in (cache / "stores").glob("*/*/embeddings.zarr"):
        for name in names:
            total += sum(f.stat().st_size for f in (store / name).rglob("*") if f.is_file())
    if kind == "tokens+masks":
        for meta in (cache / "stores" / "image").glob("*/embeddings.zarr/zarr.json"):
            crop = json.loads(meta.read_text())["attributes"]["spec"]["preprocess"]["input_size"]
            total += n * int(crop) ** 2
            break
    return total


def _anon_kb(pid: int) -> int | None:
    """The process's anonymous resident memory (``RssAnon``, kB), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _fork_cli(args: list[str], log_fd: int, env: dict) -> int:
    """The pid of a child forked from this process that runs ``python -m cli ARGS`` with ``env``, its
    output into ``log_fd``. Of the project only ``core.forking`` is loaded here, so the child imports the
    rest afresh."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        forking.become_module("cli", args, env, (None, log_fd, log_fd), path=str(ROOT))
    return pid


def run_step(args: list[str], log: Path, threads: int | None, env: dict | None = None,
             cpu: list | None = None, anon: list | None = None, fork: bool = False) -> tuple[float, float, int]:
    """(seconds, peak RSS in MB, exit code) of one `pipe` process (``env`` replaces os.environ).

    ``cpu``, when given, gets the process's CPU seconds (user + system) appended; ``anon`` its
    peak anonymous memory in MB, sampled every 20 ms: what the process itself holds. Peak RSS
    also counts the pages of cache files the reader maps, which the kernel drops under
    pressure (a shard read through is file cache, not the step's memory). ``fork``: the process
    is forked from this one (see ``--fork``) instead of started as a fresh interpreter.
    """
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PIPE_NO_PROGRESS": "1"}
    if threads:
        env["PIPE_THREADS"] = str(threads)
    with open(log, "ab") as f:
        f.write(f"\n$ pipe {' '.join(args)}\n".encode())
        f.flush()
        t0 = time.perf_counter()
        if fork:
            pid = _fork_cli(args, f.fileno(), env)
        else:
            pid = subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=f, stderr=f, env=env).pid
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _anon_kb(pid) or 0)
                done.wait(0.02)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(pid, 0)
        done.set()
        sampler.join()
        seconds = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if cpu is not None:
        cpu.append(usage.ru_utime + usage.ru_stime)
    if anon is not None:
        anon.append(peak[0] / 1024)
    return seconds, usage.ru_maxrss / 1024, code


def measure(n: int, work: Path, threads: int | None, only: list[str] | None = None, smoke: bool = False,
            fork: bool = False) -> dict:
    t0 = time.perf_counter()
    table = write_table(work / "data", n)
    print(f"n={n:,}: table written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    cache, runs, log = work / "cache", work / "runs", work / "log.txt"
    rows = []
    for name, args, resident in steps(table, cache, runs, smoke):
        if only and name not in only and name != "embed":   # every step reads what embed writes
            continue
        cpu: list[float] = []
        anon: list[float] = []
        seconds, rss, code = run_step(args, log, threads, cpu=cpu, anon=anon, fork=fork)
        rows.append({"step": name, "seconds": round(seconds, 2), "s_per_1k": round(1000 * seconds / n, 3),
                     "cpu_s_per_1k": round(1000 * cpu[0] / n, 3), "peak_rss_mb": round(rss),
                     "peak_anon_mb": round(anon[0]), "resident_mb": round(array_bytes(cache, resident, n) / 2**20, 1),
                     "exit": code, "load": round(os.getloadavg()[0], 2)})
        print(f"n={n:,} · {name}: {seconds:.1f} s ({cpu[0]:.1f} s CPU) · {rss:,.0f} MB (anon {anon[0]:,.0f}) · "
              f"exit {code}", file=sys.stderr, flush=True)
        if code not in (0, 1):
            raise SystemExit(f"`pipe {' '.join(args)}` failed with exit code {code}; see {log}")
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    return {"n": n, "steps": rows, "cache_mb": round(size / 2**20, 1), "log": str(log)}


def _growth(lo: dict, hi: dict, key: str) -> dict:
    return {a["step"]: round(b[key] / a[key], 2) if a.get(key) else None for a, b in zip(lo["steps"], hi["steps"])}


def targets(results: list[dict]) -> dict:
    """Growth of (wall and CPU) seconds per item from the smallest N >= 10k to the largest, and the RSS bound."""
    big = [r for r in results if r["n"] >= 10_000] or results
    lo, hi = min(big, key=lambda r: r["n"]), max(big, key=lambda r: r["n"])
    growth, cpu_growth = _growth(lo, hi, "s_per_1k"), _growth(lo, hi, "cpu_s_per_1k")
    ok = lambda g: all(v is not None and v < 1.3 for v in g.values()) if lo is not hi and g else None  # noqa: E731
    # anonymous memory where it was sampled (mapped cache files are the kernel's page cache)
    rss = {s["step"]: s.get("peak_anon_mb", s["peak_rss_mb"]) <= RSS_BUDGET_MB + s["resident_mb"] for s in hi["steps"]}
    return {"from_n": lo["n"], "to_n": hi["n"], "time_per_item_growth": growth, "time_ok": ok(growth),
            "cpu_per_item_growth": cpu_growth, "cpu_ok": ok(cpu_growth) if all("cpu_s_per_1k" in s for s in
                                                                                lo["steps"] + hi["steps"]) else None,
            "rss_budget_mb": RSS_BUDGET_MB, "rss_ok": all(rss.values()), "rss_by_step": rss}


def _mb(v) -> str:
    return "–" if v is None else f"{v:,}"


def table(results: list[dict]) -> str:
    ns = [r["n"] for r in results]
    lines = ["| step | " + " | ".join(f"{n:,}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for i, s in enumerate(results[0]["steps"]):
        cells = [f"{r['steps'][i]['s_per_1k']:.2f} ({r['steps'][i].get('cpu_s_per_1k', float('nan')):.2f} CPU) · "
                 f"{r['steps'][i]['peak_rss_mb']:,} MB (anon {_mb(r['steps'][i].get('peak_anon_mb'))})"
                 for r in results]
        lines.append(f"| `{s['step']}` | " + " | ".join(cells) + " |")
    lines.append("| cache size | " + " | ".join(f"{r['cache_mb']:,.0f} MB" for r in results) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--workdir", type=Path, default=None, help="where tables and caches go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the tables and caches")
    ap.add_argument("--threads", type=int, default=None, help="PIPE_THREADS for every step (default: automatic)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument("--only", nargs="+", default=None, metavar="STEP",
                    help="measure only these steps (by name, e.g. 'evaluate segmentation'); embed always runs")
    ap.add_argument("--smoke", action="store_true",
                    help="check that every command runs, not what it costs: segmentation trains a narrow decoder "
                         "for a few steps (the tests run this)")
    ap.add_argument("--fork", action="store_true",
                    help="fork each command from this process, which imports the libraries first, instead of "
                         "starting a fresh interpreter: the figures leave out Python's start-up (the tests run this)")
    a = ap.parse_args()
    if a.fork:
        forking.preload()
    base = a.workdir or Path(tempfile.mkdtemp(prefix="pipe-scale-"))
    results = []
    try:
        for n in sorted(a.n):
            results.append(measure(n, base / f"n{n}", a.threads, a.only, a.smoke, a.fork))
            if not a.keep:
                shutil.rmtree(base / f"n{n}")
    finally:
        if not a.keep and a.workdir is None:
            shutil.rmtree(base, ignore_errors=True)
    summary = {"bench": "scale", "results": results, "targets": targets(results), "cpus": os.cpu_count(),
               "smoke": a.smoke, "fork": a.fork}
    print(table(results))
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
