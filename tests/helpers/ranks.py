"""The ranks of a process group, each a process forked from the test fork server.

``torch.multiprocessing.spawn`` starts every rank as a fresh interpreter that imports torch
again (3-4 CPU seconds a rank, the work of the test itself is a fraction of one). Here each
rank is ``python -m tests.helpers.ranks MODULE FUNCTION RANK ARGS``, which :mod:`tests.helpers.forked`
forks from its server, where torch is already loaded; the rank is still a process of its own,
with its own interpreter state, joined to the others through the process group as spawned
ranks are.

    spawn(function, nprocs, *args, timeout=60)   # function(rank, *args) in each rank

``function`` is a module-level function of an importable module (a test module), ``args`` are
JSON values (paths as strings). A rank that fails fails the call with its output; the others are
stopped.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time

from tests.helpers import ROOT, forked


def spawn(function, nprocs: int, *args, timeout: float = 60) -> None:
    """``torch.multiprocessing.spawn(function, args, nprocs)`` with forked ranks (see the module)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [forked.popen([sys.executable, "-m", "tests.helpers.ranks", function.__module__, function.__qualname__,
                           str(rank), json.dumps(args)], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) for rank in range(nprocs)]
    deadline = time.monotonic() + timeout
    try:
        for rank, proc in enumerate(procs):
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            if proc.returncode != 0:
                raise AssertionError(f"rank {rank} of {nprocs} ({function.__qualname__}) exited "
                                     f"{proc.returncode}:\n{out[-3000:]}")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def main(argv: list[str]) -> None:
    module, name, rank, args = argv
    function = getattr(importlib.import_module(module), name)
    function(int(rank), *json.loads(args))


if __name__ == "__main__":
    main(sys.argv[1:])
