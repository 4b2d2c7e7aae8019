"""Threads follow the CPUs a process may use: affinity, the cgroup quota, --threads."""
from __future__ import annotations

import os

import pytest
import torch

from pipeline import threads
from tests.helpers import make_table, pipe


def _cgroup(root, v2: str | None = None, v1: tuple[int, int] | None = None):
    root.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (root / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{v1[0]}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{v1[1]}\n")
    return root


def test_the_cgroup_quota_is_read_in_both_versions(tmp_path):
    assert threads.cgroup_quota(_cgroup(tmp_path / "a", v2="150000 100000")) == 1.5
    assert threads.cgroup_quota(_cgroup(tmp_path / "b", v2="max 100000")) is None
    assert threads.cgroup_quota(_cgroup(tmp_path / "c", v1=(300000, 100000))) == 3.0
    assert threads.cgroup_quota(_cgroup(tmp_path / "d", v1=(-1, 100000))) is None
    assert threads.cgroup_quota(tmp_path / "nothing-here") is None


def test_a_quota_below_the_affinity_wins_and_the_cores_are_shared(tmp_path, monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_affinity", lambda: 16)
    root = _cgroup(tmp_path, v2="250000 100000")  # docker --cpus 2.5
    assert threads.available_cpus(root)[0] == 3
    p = threads.plan(processes=1, root=root)
    assert p.threads == 3 and "quota 2.5" in p.why
    assert threads.plan(processes=4, root=root).threads == 1          # never below one
    assert threads.plan(processes=2, root=tmp_path / "none").threads == 8  # no quota: 16 CPUs over 2 processes
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.plan(processes=1, root=root).threads == 1          # the user's OpenMP setting is kept
    monkeypatch.setenv(threads.ENV, "5")
    assert threads.plan(processes=4, root=root).threads == 5          # --threads / $PIPE_THREADS wins


def test_the_affinity_mask_is_followed(monkeypatch):
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    monkeypatch.delenv(threads.ENV, raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert threads.available_cpus()[0] == 1
        assert threads.apply().threads == 1 and torch.get_num_threads() == 1
    finally:
        os.sched_setaffinity(0, before)


def test_threads_option_reaches_the_commands_and_the_log(tmp_path, monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    table = make_table(tmp_path / "data", 8)
    n = torch.get_num_threads()
    try:
        r = pipe("--threads", "1", "embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert",
                 "--cache", str(tmp_path / "cache"))
        assert "threads: 1 per process (set by --threads" in r.output
        assert torch.get_num_threads() == 1
    finally:
        os.environ.pop(threads.ENV, None)
        torch.set_num_threads(n)


def test_progress_off_a_terminal_is_log_lines_with_a_heartbeat(monkeypatch, capsys):
    """A batch job's log shows each long step alive: a line every few seconds and one at the end."""
    import time

    from core import console

    monkeypatch.delenv("PIPE_NO_PROGRESS", raising=False)
    monkeypatch.setenv("PIPE_PROGRESS_SECONDS", "0.2")
    bar = console.progress()
    assert isinstance(bar, console.LogProgress)  # stderr is not a terminal under pytest
    with bar:
        task = bar.add_task("train decoders", total=4)
        bar.advance(task)
        time.sleep(0.7)  # one slow unit: the heartbeat still reports
        for _ in range(3):
            bar.advance(task)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("train decoders:")]
    assert len(lines) >= 3, lines
    assert "1/4 (25%)" in lines[0] and "eta" in lines[0]
    assert lines[-1].startswith("train decoders: 4/4 (100%)") and "eta" not in lines[-1]


def test_the_command_line_sets_the_wait_policy_before_torch_loads():
    """`pipe` imports torch through stages that may load it before `pipeline`: the CLI sets it first."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys, os; import cli; seen = os.environ.get('OMP_WAIT_POLICY'); loaded = 'torch' in sys.modules; "
            "import stages.train.trainer; print(seen, loaded, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["PASSIVE", "False", "True"]   # set by `import cli`, before any torch
