"""`pipe evaluate` killed with SIGKILL at seeded random points, then run again on the same
--out, ends exactly where an uninterrupted run ends: the same figures, the same cache.

Zero-shot evaluation writes to the cache while it runs (the prompts go into the text
store under claims, the frozen Adaptor's outputs into the derived cache), and
classification trains heads for a while: a kill can land in any of these. Nothing the
cache had committed before a kill is lost or changed by it.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from cache.npz import load_checked
from tests.helpers import SMALL, SMALL_HEADS, embed_json, make_eval_table, pipe
from tests.helpers.kills import (
    assert_nothing_lost,
    cache_files,
    committed,
    pipe_cmd,
    sigkill,
    start,
    wait_until,
)

pytestmark = pytest.mark.slow  # subprocesses and kills: minutes, not seconds

KILLS = {"zero-shot": 3, "classification": 2}
EXTRA = {"zero-shot": ["bootstrap=200"],
         "classification": [*SMALL_HEADS, "bootstrap=200", "--fraction", "0.5", "1.0", "--seeds", "1"]}
# what differs between any two runs: when, how long, how much memory, the config's hash (it
# holds the paths), and whether the Adaptor's outputs were computed or found in the cache
# what differs between any two runs: times, memory, the config hash and the provenance (command line, time, host)
UNSTABLE = {"created", "seconds", "cpu_peak_mb", "gpu_peak_mb", "config_hash", "provenance"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalkill")
    table = make_eval_table(root / "data")
    embed_json(table, root / "cache", "--shard-mb", "0.3", "--batch-size", "4")
    pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(root / "cache"),
         "--out", str(root / "pooled"), *SMALL, "epochs=1", "--device", "cpu")
    return {"table": table, "cache": root / "cache", "checkpoint": root / "pooled" / "last.safetensors"}


def args(w, task: str, cache: Path, out: Path) -> list[str]:
    return ["evaluate", "--task", task, "-d", str(w["table"]), "--adaptor", str(w["checkpoint"]), "--cache",
            str(cache), "--out", str(out), "--device", "cpu", *EXTRA[task]]


def comparable(out: Path, cache: Path) -> dict:
    """results.json less what differs between any two runs, with the run's own paths named alike."""
    text = (out / "results.json").read_text().replace(str(cache), "<cache>").replace(str(out), "<out>")
    r = {k: v for k, v in json.loads(text).items() if k not in UNSTABLE}
    r["checkpoint"] = {k: v for k, v in r["checkpoint"].items() if not k.startswith("adaptor_forwards")}
    return r


def derived(cache: Path) -> dict[str, dict[str, np.ndarray]]:
    """The Adaptor-output cache, array by array (npz files carry their write time)."""
    return {p.relative_to(cache).as_posix(): load_checked(p, "") for p in sorted(cache.glob("adaptor-outputs/*/*.npz"))}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("task", sorted(KILLS))
def test_evaluate_killed_at_random_points_then_run_again_equals_a_clean_run(world, tmp_path, task):
    clean_cache, cache = tmp_path / "clean-cache", tmp_path / "cache"
    shutil.copytree(world["cache"], clean_cache)
    shutil.copytree(world["cache"], cache)
    # the uninterrupted run: how long its work takes, from the end of start-up to its exit
    clean_log = tmp_path / "clean.log"
    proc = start(pipe_cmd(*args(world, task, clean_cache, tmp_path / "clean")), clean_log)
    wait_until(proc, lambda: "evaluating" in clean_log.read_text(), clean_log)
    t0 = time.perf_counter()
    assert proc.wait(timeout=300) == 0, clean_log.read_text()[-3000:]
    seconds = time.perf_counter() - t0

    rng = np.random.default_rng(sum(map(ord, task)))
    out, log, kills = tmp_path / "killed", tmp_path / "killed.log", []
    claimed = lambda: bool(list(cache.glob("stores/text/*/claims/*.json")))  # the prompts being embedded
    reach = 1.0  # the share of a clean run's work a kill may wait for: halved after each run that ends first
    for attempt in range(4 * KILLS[task]):  # a run that ends before its kill is run again
        if len(kills) == KILLS[task]:
            break
        before, mark = committed(cache), log.stat().st_size if log.exists() else 0
        proc = start(pipe_cmd(*args(world, task, cache, out)), log)
        begun = lambda: b"evaluating" in log.read_bytes()[mark:]  # this run is past start-up: its work has begun
        # zero-shot's first kill lands while the prompts are written into the text store
        by_claim = task == "zero-shot" and attempt == 0
        wait_until(proc, claimed if by_claim else begun, log)
        delay = float(rng.uniform(0, 0.05) if by_claim else rng.uniform(0, seconds * reach))
        time.sleep(delay)
        if proc.poll() is None:
            sigkill(proc.pid)
            proc.wait(timeout=60)
            left = len(list(cache.glob("stores/*/*/claims/*.json"))) + len(list(cache.rglob(".*.partial-*")))
            kills.append((round(delay, 2), f"{left} claim and shard temp files left"))
        else:  # each run resumes what the killed ones left, so it has less to do: the next kill comes sooner
            reach /= 2
        proc.wait(timeout=60)
        assert_nothing_lost(before, cache)
    assert len(kills) == KILLS[task], kills
    pipe(*args(world, task, cache, out))  # the run after the kills, in this process

    print(f"{task}: killed at {kills}")
    assert comparable(out, cache) == comparable(tmp_path / "clean", clean_cache), kills
    # results.md names files of its own run folder (the saved heads): compare with the folders named alike
    assert ((out / "results.md").read_text().replace(str(out), "<out>")
            == (tmp_path / "clean" / "results.md").read_text().replace(str(tmp_path / "clean"), "<out>"))
    pipe("cache", "verify", "--cache", str(cache))
    assert cache_files(cache) == cache_files(clean_cache)  # the prompts' rows, byte for byte
    a, b = derived(cache), derived(clean_cache)
    assert a.keys() == b.keys() and all(np.array_equal(a[k][n], b[k][n]) for k in a for n in a[k])
