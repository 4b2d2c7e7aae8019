"""Claims on shards, with leases: who writes a shard, until when, and whether that writer still counts.

A claim is a small JSON file, ``claims/<shard>-<group>.json``, that records its writer
(host, pid, process start time, boot id, pid namespace and a writer id unique to the
process: :class:`core.processes.Identity`), a token of its own, and a **lease**: the time
until which it holds (``expires``). The writer renews the lease from a background thread
(:class:`LeaseKeeper`, every quarter of the lease) for as long as it holds the claim.

:func:`judge` decides whether a claim is live:

- our own claim (same writer id) is live while its run is running in this process;
- a writer this process can see (same host, boot id and pid namespace) whose process is
  gone (no such pid, or a pid reused by a process with another start time) is dead at once;
- otherwise the lease decides: live until it expires, dead after, whatever host wrote it.
  A live lease is never taken over, even where the pid looks dead from here.

Every change to a claim file (taking, renewing, committing, releasing: see
:class:`cache.store.Store`) is made under the store's lock after checking that the file
is still the writer's own, so a renewal never resurrects a claim that another writer
has taken over, and a writer whose claim was taken over cannot commit or release it.

Claims written before leases existed have no ``expires``. They keep their old meaning on
the host that wrote them (live while the process with that pid and start time runs);
from any other host, where they used to count as live for ever, they count as live for
:data:`LEGACY_LEASE_S` after they were written (the old writers never renewed a claim,
and no shard takes that long).

Leases compare wall-clock times written on one host with the clock of another: the
hosts' clocks must agree to well within a lease (NTP does).
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from core.processes import Identity, me, process_alive
from core.errors import InputError, PipeError

LEASE_ENV = "PIPE_CLAIM_LEASE_S"
DEFAULT_LEASE_S = 120.0     # a crashed writer's shard is taken over within two minutes
LEGACY_LEASE_S = 3600.0     # a claim without a lease (an older version's), judged from another host
RENEWALS_PER_LEASE = 4      # renewed every quarter lease: three renewals may fail before it lapses

log = logging.getLogger(__name__)


def lease_seconds(value: float | None = None) -> float:
    """The lease a writer takes: ``value``, else ``$PIPE_CLAIM_LEASE_S``, else 120 s."""
    where = "the claim lease"
    if value is None:
        raw = os.environ.get(LEASE_ENV, "").strip()
        if not raw:
            return DEFAULT_LEASE_S
        where = f"${LEASE_ENV}={raw!r}"
        try:
            value = float(raw)
        except ValueError:
            value = float("nan")
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise InputError(f"{where}: a lease is a positive number of seconds (the default is "
                         f"{DEFAULT_LEASE_S:.0f}); got {value!r}")
    return float(value)


# Runs of this process that are writing now. A claim this process made in an earlier,
# failed run (a library caller may retry in the same process) is dead, not live.
LIVE_RUNS: set[str] = set()


@contextlib.contextmanager
def live_run(run: str) -> Iterator[str]:
    LIVE_RUNS.add(run)
    try:
        yield run
    finally:
        LIVE_RUNS.discard(run)


def new_record(group: str, shard: int, run: str, token: str, lease_s: float, now: float | None = None,
               who: Identity | None = None) -> dict:
    """What a claim file holds when it is taken."""
    now = time.time() if now is None else now
    return {**(who or me()).record(), "claim": token, "group": group, "shard": shard, "run": run, "time": now,
            "lease_s": lease_s, "expires": now + lease_s, "renewed": now, "renewals": 0}


def renewed(info: dict, lease_s: float, now: float | None = None) -> dict:
    now = time.time() if now is None else now
    return {**info, "lease_s": lease_s, "expires": now + lease_s, "renewed": now,
            "renewals": int(info.get("renewals", 0)) + 1}


def owns(info: dict, writer: str, token: str) -> bool:
    """Is this claim record still the one ``writer`` took (``token``)?"""
    return bool(token) and info.get("writer") == writer and info.get("claim") == token


@dataclass(frozen=True)
class Verdict:
    live: bool
    why: str  # "its lease holds for 1 min 40 s more", "its process is gone", ...


def judge(info: dict, now: float | None = None, who: Identity | None = None) -> Verdict:
    """Is the writer of the claim ``info`` still to be waited for? (See the module's rules.)"""
    who = who or me()
    now = time.time() if now is None else now
    if info.get("writer") and info.get("writer") == who.writer:
        if info.get("run") in LIVE_RUNS:
            return Verdict(True, "this process is writing it")
        return Verdict(False, "an earlier run of this process left it")
    if who.sees(info) and not process_alive(info, who):
        return Verdict(False, "its process is gone")
    try:
        if "expires" in info:
            left = float(info["expires"]) - now
        elif who.sees(info):  # a claim of an older version, on its own host: its process runs
            return Verdict(True, "its process is running (a claim without a lease, by an older version)")
        else:
            left = float(info.get("time", 0)) + LEGACY_LEASE_S - now
    except (TypeError, ValueError):
        return Verdict(False, "its lease is unreadable")
    if not math.isfinite(left) or left <= 0:
        return Verdict(False, f"its lease expired {duration(-left)} ago" if math.isfinite(left) else
                       "its lease is unreadable")
    return Verdict(True, f"its lease holds for {duration(left)} more")


def claim_is_live(info: dict, now: float | None = None, who: Identity | None = None) -> bool:
    return judge(info, now, who).live


def describe(info: dict) -> str:
    """Who wrote a claim, for messages: ``pid 123 on node7``."""
    return f"pid {info.get('pid')} on {info.get('host')}"


def duration(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s"
    return f"{s // 60} min {s % 60} s" if s < 7200 else f"{s // 3600} h {s % 3600 // 60} min"


class Renews(Protocol):
    """What :class:`LeaseKeeper` renews through (a :class:`cache.store.Store`)."""

    def renew(self, claim, lease_s: float) -> bool: ...

    def release(self, claim) -> None: ...


class LeaseKeeper:
    """Keeps the leases of the claims this process holds, from a background thread.

    :meth:`hold` a claim when it is taken, :meth:`drop` it once committed or released.
    Every ``lease_s / 4`` each held claim is renewed; one that another writer has taken
    over meanwhile (this process was paused past its lease) is not renewed again and is
    reported by :meth:`lost`. Leaving the block stops the thread and releases what is
    still held (an interrupted run), so nobody waits for its lease to lapse.
    """

    def __init__(self, lease_s: float, every: float | None = None):
        self.lease_s = lease_s
        self.every = every if every is not None else lease_s / RENEWALS_PER_LEASE
        self._held: dict[object, Renews] = {}  # claim -> its store (claims are frozen: hashable)
        self._lost: set = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease-keeper", daemon=True)
        self.renewals = 0

    def __enter__(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> bool:
        self._stop.set()
        self._thread.join()
        with self._guard:
            held, self._held = list(self._held.items()), {}
        for claim, store in held:
            with contextlib.suppress(OSError, PipeError):  # best effort: the lease lapses by itself
                store.release(claim)
        return False

    def hold(self, store: Renews, claim) -> None:
        with self._guard:
            self._held[claim] = store

    def drop(self, claim) -> None:
        with self._guard:
            self._held.pop(claim, None)

    def lost(self, claim) -> bool:
        with self._guard:
            return claim in self._lost

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.renew_all()

    def renew_all(self) -> None:
        with self._guard:
            held = list(self._held.items())
        for claim, store in held:
            try:
                kept = store.renew(claim, self.lease_s)
            except (OSError, PipeError) as e:  # a slow or flaky file system, a bucket that failed every retry: next time
                log.warning("could not renew the claim on shard %s (%s); retrying", getattr(claim, "shard", "?"), e)
                continue
            with self._guard:
                if kept:
                    self.renewals += 1
                elif claim in self._held:
                    self._held.pop(claim)
                    self._lost.add(claim)
                    log.warning("shard %s was taken over by another writer after this process's lease lapsed; "
                                "its work is left to that writer", getattr(claim, "shard", "?"))
