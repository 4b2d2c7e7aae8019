"""`pytest --cpu-times`: each test's CPU seconds, the processes it started included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from tests.helpers import ROOT, forked
from tests.helpers.cputime import tree_cpu_seconds

BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < {s}: pass\n"


def test_a_process_tree_counts_the_children_that_ended():
    before = tree_cpu_seconds()
    subprocess.run([sys.executable, "-c", BURN.format(s=0.4)], check=True)
    assert tree_cpu_seconds() - before >= 0.35


def test_the_option_ranks_the_tests_by_cpu_under_xdist_too(tmp_path):
    (tmp_path / "test_costs.py").write_text(
        "import subprocess, sys, time\n"
        f"def test_burns_in_a_child():\n    subprocess.run([sys.executable, '-c', {BURN.format(s=0.6)!r}], check=True)\n"
        "def test_sleeps():\n    time.sleep(0.5)\n")
    out = tmp_path / "cpu.jsonl"
    t0 = time.monotonic()
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # pytest-xdist and this plugin, nothing else
    done = forked.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "xdist", "-p",
                       "tests.helpers.cputime", "-n", "2", "--rootdir", str(tmp_path), str(tmp_path / "test_costs.py"),
                       f"--cpu-times={out}"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ten most costly tests in CPU seconds (all 2:" in done.stdout
    rows = {r["test"].split("::")[1]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"test_burns_in_a_child", "test_sleeps"}
    assert rows["test_burns_in_a_child"]["cpu_s"] >= 0.5 and rows["test_sleeps"]["cpu_s"] < 0.3
    assert rows["test_sleeps"]["wall_s"] >= 0.5 and max(r["wall_s"] for r in rows.values()) < time.monotonic() - t0
    assert {r["worker"] for r in rows.values()} <= {"gw0", "gw1"} and min(r["start_s"] for r in rows.values()) == 0
    assert all(0 <= r["start_s"] < time.monotonic() - t0 for r in rows.values())


def test_a_test_path_taken_as_the_file_is_refused_and_left_as_it_was(tmp_path):
    module = tmp_path / "test_one.py"
    module.write_text("def test_one():\n    pass\n")
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    done = forked.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.helpers.cputime",
                       "--rootdir", str(tmp_path), "--cpu-times", str(module)], env=env, cwd=ROOT,
                      capture_output=True, text=True, timeout=60)
    assert done.returncode == 4 and "write --cpu-times=FILE" in done.stderr, done.stdout + done.stderr
    assert module.read_text() == "def test_one():\n    pass\n"
