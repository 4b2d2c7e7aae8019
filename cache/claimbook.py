"""A store's claims: which writer is writing which shard, taken, renewed and released under the guard.

``claims/<shard>-<group>.json`` is a shard being written: by which writer, and its lease
(the rules are in cache/claims.py). Every change to a claim runs under the storage's
guard (an ``flock``, or a lock object on an object store) after checking that the claim
is still the writer's own, so a renewal never resurrects a claim another writer has taken
over, and a writer whose claim was taken over cannot commit or release it.
"""
from __future__ import annotations

import contextlib
import enum
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cache.claims import judge, lease_seconds, new_record, owns, renewed
from cache.storage import Storage, StoreError
from core.processes import Identity, me

CLAIMS = "claims"
CLAIM_RE = re.compile(r"^(\d{6})-([0-9a-f]{16})\.json$")


class ClaimLost(StoreError):
    """A claim that another writer took over after its lease lapsed: this writer's work on it is void."""


class ClaimState(enum.Enum):
    """What :meth:`ClaimBook.claim` found for a group of work."""

    TAKEN = "taken"   # this process now owns the shard: write it, then commit or release
    DONE = "done"     # another run committed this group already
    BUSY = "busy"     # a live process is writing this group now


@dataclass(frozen=True)
class Claim:
    state: ClaimState
    shard: int = -1
    group: str = ""
    path: Path | None = None
    writer: str = ""   # who took it (Identity.writer) and the claim's own token: what ownership means
    token: str = ""


def claim_key(shard: int, group: str) -> str:
    return f"{CLAIMS}/{shard:06d}-{group}.json"


class ClaimBook:
    """The claims of one store. ``parts`` lists the committed (shard, group) pairs."""

    def __init__(self, storage: Storage, parts: Callable[[], list[tuple[int, str, object]]]):
        self.storage = storage
        self._parts = parts
        self._finished: set[Claim] = set()  # claims this book committed or released: nothing to renew

    def claims(self) -> list[tuple[int, str, dict]]:
        out = []
        for name in self.storage.names(CLAIMS):
            m = CLAIM_RE.match(name)
            if m:
                with contextlib.suppress(OSError, ValueError):
                    out.append((int(m[1]), m[2], json.loads(self.storage.read(f"{CLAIMS}/{name}"))))
        return sorted(out, key=lambda c: c[0])

    def claim(self, group: str, run: str = "", lease_s: float | None = None, now: float | None = None,
              who: Identity | None = None) -> tuple[Claim, int | None]:
        """Try to take the shard for ``group`` (see :meth:`cache.store.Store.claim`); also
        returns the shard whose leftovers the new owner must clear (None if not taken)."""
        lease_s, who = lease_seconds(lease_s), who or me()
        with self.storage.guard():
            parts = self._parts()
            if any(g == group for _, g, _ in parts):
                return Claim(ClaimState.DONE, group=group), None
            committed = {s for s, _, _ in parts}
            claims = []
            for s, g, info in self.claims():
                if s in committed:  # killed between commit and release: the claim is stale
                    self.storage.delete(claim_key(s, g))
                else:
                    claims.append((s, g, info, judge(info, now, who).live))
            shard = None
            for s, g, _, live in claims:
                if g == group:
                    if live:
                        return Claim(ClaimState.BUSY, group=group), None
                    shard = s  # an interrupted write of this very group: redo it in place
            if shard is None:
                taken = committed | {s for s, _, _, live in claims if live}
                shard = next(i for i in range(len(taken) + 1) if i not in taken)
            for s, g, _, _ in claims:
                if s == shard:
                    self.storage.delete(claim_key(s, g))
            key = claim_key(shard, group)
            self.storage.delete(key)  # an unreadable claim of this name (a torn copy): never a writer's
            token = secrets.token_hex(8)
            if not self.storage.create(key, json.dumps(new_record(group, shard, run, token, lease_s, now, who)).encode()):
                raise StoreError(f"store {self.storage.where}: the claim {key} appeared while the store was guarded; "
                                 "another writer does not respect the guard. Stop the other writers and run again.")
        return Claim(ClaimState.TAKEN, shard, group, self.storage.local(key), who.writer, token), shard

    def own(self, claim: Claim) -> dict | None:
        """The claim's record if it is still ``claim``'s own (call under the guard), else None."""
        try:
            info = json.loads(self.storage.read(claim_key(claim.shard, claim.group)))
        except FileNotFoundError:
            return None
        except ValueError:  # not ours: we only ever write whole records
            return None
        return info if owns(info, claim.writer, claim.token) else None

    def renew(self, claim: Claim, lease_s: float | None = None, now: float | None = None) -> bool:
        """Extend the claim's lease; False (and nothing written) if another writer has taken it
        over. (True, and nothing written, once this book committed or released it.)"""
        with self.storage.guard():
            if claim in self._finished:
                return True
            info = self.own(claim)
            if info is None:
                return False
            self.storage.write(claim_key(claim.shard, claim.group),
                               json.dumps(renewed(info, lease_seconds(lease_s), now)).encode())
            return True

    def release(self, claim: Claim) -> None:
        """Give a claim up (its shard was not written); a claim another writer took over is left to it."""
        with self.storage.guard():
            if self.own(claim) is not None:
                self.finish(claim)

    def finish(self, claim: Claim) -> None:
        """Drop a claim that is ours (call under the guard): committed or given up."""
        self.storage.delete(claim_key(claim.shard, claim.group))
        self._finished.add(claim)
