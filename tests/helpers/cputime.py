"""``pytest --cpu-times[=FILE]``: what each test costs in CPU seconds, the processes it started included.

On 2 cores the suite is bound by CPU, and under ``-n 4`` a test's wall clock says more about its
neighbours than about itself; its CPU time does not. A test's CPU time here is the growth, over
its setup, call and teardown, of the CPU time (user + system) of the test's process and of every
process below it: those still running (a fork server, a Dask worker) and those that ended and
were waited for (a ``pipe`` command, a forked child reaped by its server). The ten most costly
tests and the total are printed at the end of the run; ``FILE`` also gets one JSON line per test
(``{"test", "cpu_s", "wall_s", "start_s", "worker"}``: when it started, in seconds from the
first test's start, and on which xdist worker), from which the run's timeline can be drawn. Linux only (it reads ``/proc``); elsewhere the option says so.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
KEY = "cpu_s"


def pytest_addoption(parser) -> None:
    parser.addoption("--cpu-times", metavar="FILE", nargs="?", const="", default=None,
                     help="report each test's CPU seconds (its processes included): the ten most costly at the "
                          "end, and one JSON line per test in FILE when given")


def tree_cpu_seconds(root: int | None = None) -> float:
    """CPU seconds of ``root`` (this process) and every process below it, ended children included."""
    root = os.getpid() if root is None else root
    children: dict[int, list[int]] = {}
    own: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        own[pid] = sum(int(x) for x in fields[11:15])  # utime, stime, and those of its waited-for children
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += own.get(pid, 0)
        todo.extend(children.get(pid, ()))
    return total / TICK


def pytest_configure(config) -> None:
    target = config.getoption("--cpu-times")
    if target is not None and not Path("/proc/self/stat").exists():
        raise pytest.UsageError("--cpu-times reads /proc: it works on Linux only")
    if target and (target.endswith(".py") or "::" in target or Path(target).is_dir()):
        # `--cpu-times tests/test_x.py` takes the path as its FILE: it would overwrite the test module
        raise pytest.UsageError(f"--cpu-times took {target!r} as the file to write: write --cpu-times=FILE "
                                "(or the option alone) before the tests to run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if item.config.getoption("--cpu-times") is None:
        yield
        return
    cpu, wall = tree_cpu_seconds(), time.time()
    item.user_properties.append((KEY, (cpu, wall)))  # replaced by the cost at teardown
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if call.when != "teardown" or item.config.getoption("--cpu-times") is None:
        return
    start = dict(item.user_properties).get(KEY)
    if start is not None:
        cost = (round(tree_cpu_seconds() - start[0], 2), round(time.time() - start[1], 2), start[1],
                os.environ.get("PYTEST_XDIST_WORKER", "main"))
        item.user_properties[:] = [(k, v) for k, v in item.user_properties if k != KEY] + [(KEY, cost)]
        outcome.get_result().user_properties = list(item.user_properties)


_times: list[tuple[str, float, float, float, str]] = []  # (test, CPU s, wall s, start, worker), where the reports arrive (xdist: the controller)


def pytest_runtest_logreport(report) -> None:
    if report.when == "teardown":
        cost = dict(report.user_properties).get(KEY)
        if cost is not None:
            _times.append((report.nodeid, *cost))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    target = config.getoption("--cpu-times")
    if target is None or not _times or hasattr(config, "workerinput"):
        return
    ranked = sorted(_times, key=lambda t: -t[1])
    total = sum(t[1] for t in _times)
    terminalreporter.write_sep("=", f"ten most costly tests in CPU seconds (all {len(_times)}: {total:,.0f} s)")
    for test, cpu, wall, _, _ in ranked[:10]:
        terminalreporter.write_line(f"{cpu:8.1f} s CPU {wall:8.1f} s wall  {test}")
    if target:
        first = min(t[3] for t in _times)
        with open(target, "w") as f:
            for test, cpu, wall, start, worker in ranked:
                f.write(json.dumps({"test": test, "cpu_s": cpu, "wall_s": wall, "start_s": round(start - first, 2),
                                    "worker": worker}) + "\n")
        terminalreporter.write_line(f"every test's CPU seconds: {target}")

