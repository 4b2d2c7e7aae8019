"""The work list of a modality, cut into shard-sized groups: the units of work and of commit.

Groups are cut from the *full*, ordered list of distinct (content key, view) units, so
every run, resumed or concurrent, sees the same groups in the same order; each skips what
another has committed, and a resumed group is embedded with exactly the batches of an
uninterrupted run.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import xxhash

from cache.index import Unit


class Plan:
    """The full work list cut into groups, minus what is committed, as units stream in.

    Iterating yields each group as soon as its units are known; ``reused`` counts
    committed units passed over so far.
    """

    def __init__(self, units: Iterable[Unit], done: set, shard_rows: int, expected: int = 0):
        self.units, self.done, self.shard_rows, self.expected = units, done, shard_rows, expected
        self.seen = self.reused = self.pending = 0

    def __iter__(self) -> Iterator[list[Unit]]:
        window: list[Unit] = []
        for u in self.units:
            window.append(u)
            if len(window) == self.shard_rows:
                if group := self._cut(window):
                    yield group
                window = []
        if window and (group := self._cut(window)):
            yield group

    def _cut(self, window: list[Unit]) -> list[Unit]:
        pending = [u for u in window if (u.key, u.view) not in self.done]
        self.seen += len(window)
        self.reused += len(window) - len(pending)
        self.pending += len(pending)
        return pending

    def estimate(self) -> int:
        """Pending units: those planned so far plus the rest, before dedup and reuse are known."""
        return self.pending + max(0, self.expected - self.seen)


def group_id(units: list[Unit]) -> str:
    """Names a group by its content, so every run agrees on which claim is which."""
    h = xxhash.xxh3_64()
    for u in units:
        h.update(f"{u.key}:{u.view},".encode())
    return h.hexdigest()
