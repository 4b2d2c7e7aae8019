"""The plumbing of `make gpu-check`, on any machine (no test here needs a GPU).

With CUDA hidden, the check says at once that nothing was measured; the parts that only
run on a GPU machine (timeouts, reading pytest's and the benchmarks' output, the targets)
are checked here on made-up results; and the GPU benchmarks' CPU modes still run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = _load_check()


def run_hidden(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A script run with every CUDA device hidden, as on a machine without one."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "PIPE_NO_PROGRESS": "1"}
    return subprocess.run([sys.executable, *cmd], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_without_cuda_the_check_says_nothing_was_measured_and_exits_0(tmp_path):
    out = tmp_path / "gpu-check.json"
    r = run_hidden("bench/gpu_check.py", "--out", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1  # one JSON object, nothing else on stdout
    result = json.loads(lines[0])
    assert result["measured"] is False and result["reason"].startswith("no CUDA device visible")
    assert result["torch"] and "cuda" in result and result["gpu"] is None and result["passed"] is None
    assert set(result["targets"]) == {t[0] for t in gpu_check.TARGETS}
    assert all(t["value"] is None and t["pass"] is None for t in result["targets"].values())
    assert json.loads(out.read_text()) == result
    assert "nothing was measured" in r.stderr
    assert not list(ROOT.glob(".gpu-check-*"))  # no work folder is made when nothing runs


def test_a_step_that_hangs_is_stopped_and_reported(tmp_path):
    t0 = time.monotonic()
    res = gpu_check.run_step([sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"],
                             timeout=2, log=tmp_path / "hang")
    assert time.monotonic() - t0 < 20
    assert res["ok"] is False and res["timed_out"] and res["error"] == "timed out after 2 s"
    assert "started" in res["stdout"]
    bad = gpu_check.run_step([sys.executable, "-c", "import sys; sys.exit('boom')"], timeout=30, log=tmp_path / "bad")
    assert bad["ok"] is False and bad["error"] == "exit code 1" and "boom" in bad["stderr_tail"]
    missing = gpu_check.run_step([str(tmp_path / "no-such-program")], timeout=5, log=tmp_path / "missing")
    assert missing["ok"] is False and "could not start" in missing["error"]


def test_test_results_are_read_from_junit_xml_or_the_summary_line(tmp_path):
    xml = tmp_path / "t.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.test_gpu" name="test_a" time="1.0"/>
<testcase classname="tests.test_gpu" name="test_b" time="1.0"><failure message="AssertionError: off by 2">trace</failure></testcase>
<testcase classname="tests.test_gpu" name="test_c" time="0.0"><skipped type="pytest.skip" message="no C compiler">x</skipped></testcase>
</testsuite></testsuites>""")
    parsed = gpu_check.parse_junit(xml)
    assert {k: parsed[k] for k in ("passed", "failed", "errors", "skipped", "total")} == \
        {"passed": 1, "failed": 1, "errors": 0, "skipped": 1, "total": 3}
    assert parsed["cases"] == {"test_a": "passed", "test_b": "failed: AssertionError: off by 2",
                               "test_c": "skipped: no C compiler"}
    summary = gpu_check.test_summary({"ok": False, "seconds": 3.0, "stdout": "", "error": "exit code 1"}, xml)
    assert summary["ok"] is False and summary["failed"] == 1
    assert gpu_check.parse_junit(tmp_path / "missing.xml") is None
    cut = gpu_check.test_summary({"ok": False, "seconds": 200.0, "error": "timed out after 200 s",
                                  "stdout": "..F.s\n1 failed, 3 passed, 1 skipped in 190.00s"}, tmp_path / "none.xml")
    assert (cut["passed"], cut["failed"], cut["skipped"], cut["ok"]) == (3, 1, 1, False)


def test_figures_and_targets_come_from_the_benchmarks_json(tmp_path):
    partial = tmp_path / "grid.json"  # a run cut short leaves its figures in --out
    partial.write_text(json.dumps({"bench": "cached_vs_e2e", "speedup_tokens_pooled_grid": 4.2,
                                   "residency_tokens_pooled_grid": "gpu"}))
    benches = {
        "embed_gpu": gpu_check.bench_result({"ok": True, "seconds": 40.0, "stdout": "log\n" + json.dumps(
            {"bench": "embed_gpu", "ratio_dinov2_s": 0.95, "ratio_dinov2_b": 0.85, "peak_gflops": 700000.0,
             "bare_gflops_dinov2_b": 280000.0, "bare_peak_share_dinov2_b": 0.4, "embed_peak_share_dinov2_b": 0.34})},
            None),
        "cached_vs_e2e_pooled_b32": gpu_check.bench_result({"ok": True, "seconds": 50.0, "stdout": json.dumps(
            {"speedup_pooled": 61.0, "cached_samples_s_pooled": 90000.0, "residency_pooled": "gpu",
             "cached_samples_s_pooled_cuda-graph": 90000.0, "peak_share_cached_pooled": 0.01,
             "gflops_e2e_pooled": 300000.0, "flop_ratio_pooled": 150.0})}, None),
        "cached_vs_e2e_pooled_b1024": gpu_check.bench_result({"ok": True, "seconds": 50.0, "stdout": json.dumps(
            {"speedup_pooled": 80.0, "cached_samples_s_pooled": 650000.0, "residency_pooled": "gpu"})}, None),
        "cached_vs_e2e_tokens_pooled_grid": gpu_check.bench_result(
            {"ok": False, "seconds": 75.0, "stdout": "", "error": "timed out after 75 s"}, partial),
    }
    assert benches["cached_vs_e2e_tokens_pooled_grid"]["result"]["speedup_tokens_pooled_grid"] == 4.2
    fig = gpu_check.figures(benches)
    assert fig["embed_ratio_dinov2_s"] == 0.95 and fig["speedup_pooled_b32"] == 61.0
    assert fig["cached_samples_s_pooled_b1024"] == 650000.0 and fig["cached_samples_s_pooled_cuda-graph_b32"] == 90000.0
    # the roofline figures of each row come along: GFLOP/s and share of the peak measured in the same run
    assert fig["embed_bare_peak_share_dinov2_b"] == 0.4 and fig["embed_peak_gflops"] == 700000.0
    assert fig["peak_share_cached_pooled_b32"] == 0.01 and fig["gflops_e2e_pooled_b32"] == 300000.0
    assert fig["flop_ratio_pooled_b32"] == 150.0 and "peak_share_cached_pooled_b1024" not in fig
    got = {name: t["pass"] for name, t in gpu_check.targets(fig).items()}
    assert got == {"embed_dinov2_s": True, "embed_dinov2_b": False, "pooled_speedup": True,
                   "pooled_gpu_resident_samples_s": True, "tokens_8x8_speedup": False,
                   "embed_bare_peak_share_dinov2_b": True}
    assert gpu_check.targets({**fig, "embed_bare_peak_share_dinov2_b": 0.12})["embed_bare_peak_share_dinov2_b"][
        "pass"] is False
    fig["residency_pooled_b1024"] = "ram"  # fast, but not from a GPU-resident cache: not the target
    assert gpu_check.targets(fig)["pooled_gpu_resident_samples_s"]["pass"] is False
    assert gpu_check.targets({})["embed_dinov2_s"]["pass"] is None
    assert gpu_check.last_json("x\n{\"a\": 1}\nnot json {\n") == {"a": 1} and gpu_check.last_json("") is None


def test_every_step_of_the_check_has_its_own_limit_within_the_budget(tmp_path):
    steps = gpu_check.steps(sys.executable, tmp_path)
    assert [s.name for s in steps][:2] == ["tests", "embed_gpu"]
    assert all(0 < s.cap_s <= gpu_check.BUDGET_S for s in steps)
    # the caps add up to less than the budget: no step is cut short by the ones before it
    assert sum(s.cap_s for s in steps) + 15 <= gpu_check.BUDGET_S
    assert gpu_check.BUDGET_S + 20 < 8 * 60  # the whole check: under 8 minutes
    tests = steps[0].cmd
    assert tests[tests.index("-m", 2) + 1] == "gpu and not slow" and "tests/test_gpu.py" in tests
    assert "--timeout" in tests and "-v" in tests
    for s in steps[1:]:
        assert (ROOT / s.cmd[1]).exists() and "--out" in s.cmd and s.out_file is not None


def test_the_embed_benchmark_without_cuda_says_so_in_its_json(tmp_path):
    r = run_hidden("bench/embed_gpu.py", "--out", str(tmp_path / "e.json"))
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["bench"] == "embed_gpu" and last["gpu"] is None and "no CUDA" in last["skipped"]
    assert json.loads((tmp_path / "e.json").read_text()) == last


@pytest.mark.slow
def test_the_cached_vs_e2e_benchmark_runs_on_cpu(tmp_path):
    out = tmp_path / "c.json"
    r = run_hidden("bench/cached_vs_e2e.py", "--items", "8", "--batch", "4", "--epochs", "1", "--e2e-steps", "1",
                   "--modes", "pooled", "--workdir", str(tmp_path / "work"), "--out", str(out), timeout=500)
    assert r.returncode == 0, r.stderr[-3000:]
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["bench"] == "cached_vs_e2e" and last["device"] == "cpu" and last["steps"] == ["eager"]
    assert last["speedup_pooled"] > 0 and last["residency_pooled"] == "ram" and "speedup_tokens" not in last
    assert json.loads(out.read_text()) == last
    # the roofline: FLOPs counted from the shapes (the encoders' forward dwarfs the Adaptor's step), and
    # both sides' GFLOP/s as shares of a float32 peak measured in the same run
    assert last["flop_ratio_pooled"] > 20 and last["peak_dtype"] == "float32" and last["peak_gflops"] > 0
    assert 0 < last["peak_share_cached_pooled"] < 2 and 0 < last["peak_share_e2e_pooled"] < 2
    assert last["peak_share_cached_pooled"] == round(last["gflops_cached_pooled"] / last["peak_gflops"], 4)


def test_the_embed_benchmarks_steady_state_rate_runs_on_the_cpu(tmp_path):
    """bench/embed_gpu.py's measurement itself (three fresh caches, the difference of a whole table's
    run and its first half's) runs, with tiny-vit on the CPU standing in for the GPU."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import embed_gpu
    finally:
        sys.path.remove(str(ROOT / "bench"))
    table = embed_gpu.make_images(tmp_path / "imgs", 16)
    rate = embed_gpu.embed_rate(table, table.with_name("half.csv"), "tiny-vit", 4, tmp_path / "work", device="cpu")
    assert rate > 0
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["all", "half", "warm"]


def test_cached_vs_e2e_writes_its_headline_after_each_step_mode_and_compiles_last(tmp_path, monkeypatch):
    """A cold torch.compile that overruns its cap (the check then kills the process) must not cost the
    figures already measured: the headline figures (speedup, fastest step mode) are on disk after each
    step mode, and eager and cuda-graph run before compile."""
    import types

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cached_vs_e2e as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    assert bench.STEPS.index("compile") == len(bench.STEPS) - 1
    rates = {"eager": 1000.0, "cuda-graph": 4000.0}

    def cached_rate(data, mode, gp, bs, device, amp, epochs, max_steps=0, step="eager"):
        if step == "compile":
            raise SystemExit("killed while compiling")
        return {"samples_s": rates[step], "wait": 0.01, "residency": "gpu", "flops_per_sample": 1e8,
                "params": 12_000_000}

    monkeypatch.setattr(bench, "e2e_rate", lambda *a: (10.0, 1.5e10))
    monkeypatch.setattr(bench, "cached_rate", cached_rate)
    out_file = tmp_path / "c.json"
    args = types.SimpleNamespace(batch=32, e2e_steps=1, tokens_steps=0, epochs=1, out=str(out_file))
    out = {"bench": "cached_vs_e2e", "tokens_batch": 8, "batch": 32, "peak_gflops": 1000.0, "bandwidth_gbs": 100.0}
    with pytest.raises(SystemExit):
        bench.measure_mode("pooled", (None, None, None, None, None), args, __import__("torch").device("cpu"),
                           None, bench.STEPS, out)
    saved = json.loads(out_file.read_text())
    assert saved["speedup_pooled"] == 400.0 and saved["step_pooled"] == "cuda-graph"
    assert saved["cached_samples_s_pooled_eager"] == 1000.0 and saved["data_wait_share"] == 0.01
    # the roofline of the best step mode so far: 4000 samples/s x 0.1 GFLOP = 400 GFLOP/s of a 1000 peak
    assert saved["gflops_cached_pooled"] == 400.0 and saved["peak_share_cached_pooled"] == 0.4
    assert saved["peak_share_e2e_pooled"] == 0.15 and saved["flop_ratio_pooled"] == 150.0
    # fused AdamW moves 28 bytes per parameter: 336 MB at 100 GB/s is 3.36 ms of the 8 ms step
    assert saved["optimizer_floor_ms"] == 3.36 and saved["step_ms_pooled"] == 8.0


def test_the_checks_test_selection_leaves_out_the_slow_gpu_tests():
    """`-m gpu` also selected the slow GPU tests (a kill and resume, a compile, torchrun), which alone
    take the check's budget; the check selects the others."""
    expr = gpu_check.steps(sys.executable, ROOT)[0].cmd
    expr = expr[expr.index("-m", 2) + 1]

    def selected(marker: str) -> set[str]:
        r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", marker, "tests/test_gpu.py",
                            "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        return {line.split("::")[1] for line in r.stdout.splitlines() if "::" in line}

    every, chosen = selected("gpu"), selected(expr)
    assert chosen and chosen < every
    assert all("compiled" not in n and "killed" not in n and "torchrun" not in n for n in chosen), chosen


def test_a_killed_pytest_still_tells_each_finished_tests_outcome_and_all_skipped_is_no_pass():
    killed = ("tests/test_gpu.py::test_a PASSED [ 10%]\ntests/test_gpu.py::test_b[pooled] FAILED [ 20%]\n"
              "tests/test_gpu.py::test_c SKIPPED (needs a CUDA device) [ 30%]\n")  # no XML, no summary line
    parsed = gpu_check.parse_pytest_summary(killed)
    assert parsed["cases"] == {"test_a": "passed", "test_b[pooled]": "failed", "test_c": "skipped"}
    assert (parsed["passed"], parsed["failed"], parsed["skipped"]) == (1, 1, 1)
    res = {"ok": False, "seconds": 110.0, "stdout": killed, "error": "timed out after 110 s"}
    assert gpu_check.test_summary(res, Path("/nonexistent.xml"))["cases"]["test_b[pooled]"] == "failed"
    skipped = "tests/test_gpu.py::test_a SKIPPED (no) [ 50%]\ntests/test_gpu.py::test_b SKIPPED (no) [100%]\n"
    summary = gpu_check.test_summary({"ok": True, "seconds": 3.0, "stdout": skipped}, Path("/nonexistent.xml"))
    assert summary["ok"] is False and summary["error"] == "every test was skipped"


def test_the_check_writes_what_it_measured_after_every_step(tmp_path, monkeypatch):
    """A check killed midway (its own time limit) keeps the steps it finished in --out."""
    out = tmp_path / "gpu-check.json"
    seen = []

    def fake_steps(py, work):
        ok = [py, "-c", "import json; print(json.dumps({'bench': 'x', 'ratio_dinov2_s': 0.95}))"]
        peek = [py, "-c", f"import json; print(json.dumps(json.load(open({str(out)!r}))['benches']))"]
        return [gpu_check.Step("embed_gpu", ok, cap_s=30), gpu_check.Step("peek", peek, cap_s=30)]

    monkeypatch.setattr(gpu_check, "steps", fake_steps)
    real = gpu_check.run_step

    def run_step(cmd, timeout, log, env=None):
        res = real(cmd, timeout, log, env)
        seen.append(res["stdout"])
        return res

    monkeypatch.setattr(gpu_check, "run_step", run_step)
    result = gpu_check.run_check(200, tmp_path, {}, partial=str(out))
    assert "embed_gpu" in json.loads(seen[1])  # the second step read the first one's figures from --out
    assert result["figures"]["embed_ratio_dinov2_s"] == 0.95
    assert json.loads(out.read_text())["partial"] is True


def _make_dry_run(*args: str) -> str:
    r = subprocess.run(["make", "-n", "--no-print-directory", "gpu-check", *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_gpu_check_can_run_with_an_existing_interpreter_without_installing(tmp_path):
    """`make gpu-check` depends on `install`, so a stale or missing virtual environment would spend a lent
    GPU's minutes installing; GPU_PY names an interpreter that already has the packages, and nothing is
    installed (the preflight names what is missing). GPU_ARGS passes options such as --preflight."""
    plain = _make_dry_run(f"VENV={tmp_path / 'no-venv'}")
    assert "-m venv" in plain and "pip install" in plain  # the default still installs what is missing
    lines = _make_dry_run("GPU_PY=python3", "GPU_ARGS=--preflight", f"VENV={tmp_path / 'no-venv'}").strip().splitlines()
    assert lines == [f"PYTHONPATH={ROOT} python3 bench/gpu_check.py --out gpu-check.json --preflight"]


def test_the_batch_sweep_compares_with_end_to_end_before_and_after_and_names_the_peak(tmp_path, monkeypatch):
    """--sweep-batches times the cached pooled step at each batch (items repeated to fill it), then the
    end-to-end step again; each speedup is over the mean of both end-to-end rates."""
    import types

    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cached_vs_e2e as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    seen = []

    def cached_rate(data, mode, gp, bs, device, amp, epochs, max_steps=0, step="eager", fill=0):
        seen.append((bs, fill))
        return {"samples_s": {32: 300.0, 64: 500.0, 128: 450.0}[bs], "flops_per_sample": 1e8}

    monkeypatch.setattr(bench, "cached_rate", cached_rate)
    monkeypatch.setattr(bench, "e2e_rate", lambda *a: (6.0, 1.5e10))
    args = types.SimpleNamespace(sweep_batches=[64, 128], sweep_steps=4, e2e_steps=1, out=str(tmp_path / "s.json"))
    out = {"batch": 32, "e2e_samples_s_pooled": 4.0, "peak_gflops": 100.0}
    bench.sweep_batches(args, (None,) * 5, None, None, out)
    assert seen == [(32, 128), (64, 256), (128, 512)]
    assert out["sweep_e2e_samples_s_pooled"] == [4.0, 6.0] and out["peak_batch_pooled"] == 64
    assert out["sweep_pooled"]["64"] == {"cached_samples_s": 500.0, "speedup": 100.0, "gflops": 50.0,
                                         "peak_share": 0.5}
    assert json.loads((tmp_path / "s.json").read_text())["peak_batch_pooled"] == 64


def test_a_cached_run_stops_after_max_steps_across_epochs(tmp_path):
    """cached_rate's max_steps counts steps in all: a sweep over 1,000 one-step epochs times 3 steps, not 1,000."""
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import cached_vs_e2e as bench
    finally:
        sys.path.remove(str(ROOT / "bench"))
    import numpy as np
    import torch

    from cache.pairs import load_pairs
    from tests.helpers import embed_json, make_table

    table = make_table(tmp_path / "data", 8)
    embed_json(table, tmp_path / "cache")
    name = json.loads((next((tmp_path / "cache" / "datasets").iterdir()) / "dataset.json").read_text())["name"]
    data = load_pairs(tmp_path / "cache", name, str(table), "tiny-vit", "tiny-bert")
    steps = []
    original = bench.StepRunner.__call__
    bench.StepRunner.__call__ = lambda self, b: steps.append(len(b["index"])) or original(self, b)
    try:
        res = bench.cached_rate(data, "pooled", 0, 4, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False),
                                epochs=1000, max_steps=3, fill=8)
    finally:
        bench.StepRunner.__call__ = original
    assert steps == [4] * (2 + 3)  # two warm-up steps, then three timed
    assert res["samples_s"] > 0 and res["flops_per_sample"] > 0 and np.isfinite(res["flops_per_sample"])
