"""Who this process is, and whether another process is still running.
"""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass

# ---------------------------------------------------------------------- who we are, and liveness
# The one place that decides whether a process is running. A pid means something only in
# the pid namespace it was issued in, on the machine (and boot) it was issued on; anywhere
# else the process cannot be seen from here and its liveness is unknown. Claims add a
# lease on top (cache/claims.py), which settles the unknown case.
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def process_start(pid: int | str) -> str | None:
    """Start time of a process (clock ticks since boot), to tell a live one from a reused pid."""
    stat = _read(f"/proc/{pid}/stat")
    try:
        return stat.rsplit(")", 1)[1].split()[19] if stat else None
    except IndexError:
        return None


def _pid_namespace() -> str | None:
    """This process's pid namespace (``pid:[inode]``), if ``/proc`` shows our own namespace.

    A ``/proc`` mounted for another pid namespace (a container started without its own)
    would answer pid questions about other processes, so then we claim no namespace and
    never judge another process by its pid.
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


@dataclass(frozen=True)
class Identity:
    """Who a process is: host name, pid, start time, boot id, pid namespace and a random token.

    ``writer`` is unique to the process (the token is drawn per process, and again in a
    forked child); two processes are on the same machine *and* see each other's pids only
    when host, boot id and pid namespace all agree (:meth:`sees`).
    """

    host: str
    pid: int
    start: str | None
    boot: str | None
    pidns: str | None
    token: str

    @property
    def writer(self) -> str:
        return f"{self.boot or '-'}:{self.pidns or '-'}:{self.pid}:{self.token}"

    def record(self) -> dict:
        return {"host": self.host, "pid": self.pid, "start": self.start, "boot": self.boot, "pidns": self.pidns,
                "writer": self.writer}

    def sees(self, info: dict) -> bool:
        """Can this process check the pid of the process that wrote ``info``?

        Records from before boot ids and namespaces were kept (no ``boot``) count as seen
        when the host name matches: the old rule.
        """
        if info.get("host") != self.host:
            return False
        if "boot" not in info and "pidns" not in info:
            return True
        return bool(self.boot and self.pidns) and info.get("boot") == self.boot and info.get("pidns") == self.pidns


_ME: list[Identity] = []


def me() -> Identity:
    """This process's :class:`Identity` (computed once per process: a forked child gets its own token)."""
    if not _ME or _ME[0].pid != os.getpid():
        _ME[:] = [Identity(socket.gethostname(), os.getpid(), process_start("self"),
                           _read("/proc/sys/kernel/random/boot_id"), _pid_namespace(), secrets.token_hex(8))]
    return _ME[0]


def this_process() -> dict:
    """Who we are, as recorded in claims and lock files (see :class:`Identity`)."""
    return me().record()


def pid_running(pid: int) -> bool:
    """Does ``pid`` exist in this pid namespace (whoever it belongs to)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, ValueError):
        return False
    return True


def process_alive(info: dict, who: Identity | None = None) -> bool:
    """Is the process that wrote ``info`` (see :func:`this_process`) still running?

    A process this one cannot see (another host, boot or pid namespace: :meth:`Identity.sees`)
    counts as alive: its liveness is unknown here. One it can see must exist with the
    recorded start time, so a pid reused by another program does not keep a dead
    writer's record alive.
    """
    if not (who or me()).sees(info):
        return True
    try:
        pid = int(info.get("pid", -1))
    except (TypeError, ValueError):
        return False
    if pid <= 0:
        return False
    start = process_start(pid)
    return start is not None and start == info.get("start")
