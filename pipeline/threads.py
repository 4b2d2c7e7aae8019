"""How many threads a command's math may use: the CPUs this process may really run on.

``os.cpu_count()`` is the machine's cores. A job under SLURM, in a container or beside
other jobs may use fewer: its CPU affinity mask (``taskset``, SLURM's ``--cpus-per-task``
binding) and its cgroup's CPU quota (``docker --cpus``, Kubernetes limits) say how many.
PyTorch's default ignores the quota and starts one thread per core, and threads beyond
the CPUs a process gets make every intra-op parallel region wait for a descheduled
thread: measured here, a 10k-item epoch on a 2-core machine shared with one other job
took 42.4 s with torch's default threads against 1.65 s with one thread.

Spinning makes it worse: OpenMP threads that finish a parallel region wait for the next
one by spinning on a core, so on a busy machine they steal the cores the others need.
``pipeline/__init__.py`` therefore sets ``OMP_WAIT_POLICY=PASSIVE`` (unless set already)
before torch starts its OpenMP runtime.

Order of precedence: ``--threads N`` (``pipe --threads N CMD``, exported to child
processes as ``PIPE_THREADS``), then ``$OMP_NUM_THREADS`` where the user set it, then the CPUs this process may use, shared evenly among
the processes of one job (Dask workers, torchrun ranks on one node).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

ENV = "PIPE_THREADS"
CGROUP = Path("/sys/fs/cgroup")


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cgroup_quota(root: Path = CGROUP) -> float | None:
    """CPUs allowed by the cgroup's quota (v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ThreadPlan:
    threads: int
    why: str

    def line(self) -> str:
        return f"threads: {self.threads} per process ({self.why})"


def available_cpus(root: Path = CGROUP) -> tuple[int, str]:
    """(CPUs this process may use, how that was found)."""
    affinity, quota = _affinity(), cgroup_quota(root)
    if quota is not None and math.ceil(quota) < affinity:
        return max(1, math.ceil(quota)), f"cgroup quota {quota:g} CPUs, affinity {affinity}"
    return affinity, f"affinity {affinity} of {os.cpu_count()} cores" + ("" if quota is None else f", quota {quota:g}")


def plan(processes: int = 1, requested: int | None = None, root: Path = CGROUP) -> ThreadPlan:
    """Threads per process for ``processes`` processes of one job on this node."""
    if requested is None and os.environ.get(ENV, "").strip():
        try:
            requested = int(os.environ[ENV])
        except ValueError:
            requested = None
    if requested is not None and requested > 0:
        return ThreadPlan(requested, "set by --threads / $PIPE_THREADS")
    omp = os.environ.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:  # the user's own choice, as torch itself honours it
        return ThreadPlan(int(omp), "set by $OMP_NUM_THREADS")
    cpus, how = available_cpus(root)
    per = max(1, cpus // max(1, processes))
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return ThreadPlan(per, f"{how}{shared}")


def apply(processes: int = 1, requested: int | None = None) -> ThreadPlan:
    """Set torch's intra-op thread count from :func:`plan` and return the plan (to log)."""
    import torch  # lazy: the command line imports this module without torch

    p = plan(processes, requested)
    if torch.get_num_threads() != p.threads:
        torch.set_num_threads(p.threads)
    return p
