"""bench/scale.py runs every user-facing command at a small N and reports its figures."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _scale():
    spec = importlib.util.spec_from_file_location("scale", ROOT / "bench" / "scale.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_synthetic_table_has_what_the_commands_need(tmp_path):
    df = pd.read_csv(_scale().write_table(tmp_path, 200), dtype=str)
    assert len(df) == 200 and df["id"].is_unique
    assert 0.1 < 1 - df["report"].nunique() / len(df) < 0.3          # about 20% repeated reports
    assert df.groupby("patient_id")["split"].nunique().max() == 1     # no patient in two splits
    assert set(df["split"]) == {"train", "valid", "test"}
    assert {"effusion", "cardiomegaly", "mask_lesion"} <= set(df.columns)
    assert all((tmp_path / p).is_file() for p in df["image"].head(5)) and (tmp_path / df["mask_lesion"][0]).is_file()


def test_targets_compare_the_smallest_big_table_with_the_largest():
    def steps(s_per_1k, rss, res, cpu):
        return [{"step": "embed", "s_per_1k": s_per_1k, "cpu_s_per_1k": cpu, "peak_rss_mb": rss, "resident_mb": res}]
    results = [{"n": 2000, "steps": steps(9.0, 900, 0, 9.0)}, {"n": 10_000, "steps": steps(7.0, 1000, 0, 5.0)},
               {"n": 50_000, "steps": steps(8.4, 2100, 100, 7.0)}]
    t = _scale().targets(results)
    assert (t["from_n"], t["to_n"]) == (10_000, 50_000)
    assert t["time_per_item_growth"] == {"embed": 1.2} and t["time_ok"] is True
    assert t["cpu_per_item_growth"] == {"embed": 1.4} and t["cpu_ok"] is False     # CPU time is checked on its own
    assert t["rss_ok"] is True                                         # 2,100 MB <= 2,048 + 100 resident
    results[2]["steps"] = steps(9.5, 2200, 100, 6.0)
    t = _scale().targets(results)
    assert t["time_ok"] is False and t["rss_ok"] is False and t["cpu_ok"] is True


@pytest.mark.slow
def test_the_benchmark_runs_every_command_at_a_small_n(tmp_path):
    """Every step, each forked from the benchmark's process (``--fork``: the libraries are imported
    once); 80 items is the fewest whose label fractions keep 50 training items."""
    out = tmp_path / "scale.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--n", "80", "--out", str(out),
                        "--workdir", str(tmp_path / "w"), "--smoke", "--fork"], capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary == json.loads(out.read_text()) and summary["smoke"] is True and summary["fork"] is True
    steps = summary["results"][0]["steps"]
    assert [s["step"] for s in steps][:3] == ["data info", "embed", "embed again (all reused)"]
    assert len(steps) == 11 and all(s["exit"] == 0 for s in steps), steps
    assert all(s["seconds"] > 0 and s["peak_rss_mb"] > 50 for s in steps)
    assert "| `evaluate retrieval` |" in r.stdout


@pytest.mark.parametrize("fork", [False, True])
def test_a_step_is_measured_in_a_fresh_interpreter_or_forked(tmp_path, fork):
    """run_step's two ways to start a command: its CPU time, peak memory and exit code come from
    wait4 either way, and its output goes to the log."""
    log = tmp_path / "log.txt"
    cpu: list[float] = []
    seconds, rss, code = _scale().run_step(["--version"], log, None, cpu=cpu, fork=fork)
    assert code == 0 and seconds > 0 and rss > 10 and cpu[0] > 0
    assert "$ pipe --version" in log.read_text() and log.read_text().strip().endswith(
        importlib.metadata.version("freeze-pipe"))
    seconds, rss, code = _scale().run_step(["no-such-command"], log, None, fork=fork)
    assert code == 2 and "No such command" in log.read_text()


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_capacity_plan_adds_up():
    """DINOv2-S at 224 px: 1 + 16 x 16 tokens x 384 x float16, plus a float32 pooled vector, per image."""
    cap = _bench("capacity")
    row = cap.plan("x", 1000, 500, "dinov2-s", ram_gib=24, decode_s=0.05, host_cores=10)
    image_bytes = 257 * 384 * 2 + 384 * 4
    text = cap.resolve_encoder_name("bert")
    text_bytes = text.max_tokens * 768 * 2 + 768 * 4
    assert row["disk_gib"] == round((1000 * image_bytes + 500 * text_bytes) / 2**30, 1)
    assert row["decode_bound_hours"] == round(1000 * 0.05 / 10 / 3600, 2)
    switch = cap.switch_points(24)["dinov2-s"]
    big = cap.plan("y", switch["tokens_stream_above"] + 1000, int(0.604 * (switch["tokens_stream_above"] + 1000)),
                   "dinov2-s", 24, 0.05, 10)
    assert big["tokens_loader"] == "streaming" and big["pooled_loader"] == "resident"


def test_the_heads_benchmark_compares_like_with_like():
    heads = _bench("heads")
    rows = [{"method": m, "test_auroc": a, "seconds": s} for m, a, s in (
        ("mlp uncapped", 0.80, 10.0), ("mlp capped", 0.79, 5.0), ("linear uncapped", 0.70, 4.0),
        ("linear capped", 0.70, 2.0), ("probe (L-BFGS)", 0.72, 1.0))]
    c = heads.compare(rows)
    assert c["mlp capped vs mlp uncapped"] == {"auroc_difference": -0.01, "time_ratio": 0.5}
    assert c["probe (L-BFGS) vs linear uncapped"] == {"auroc_difference": 0.02, "time_ratio": 0.25}
