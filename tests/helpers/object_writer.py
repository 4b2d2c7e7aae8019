"""A writer of the fixed table into a store in a bucket, in its own process (object-store tests).

    python -m tests.helpers.object_writer URL MIRROR all [reverse]   claim and write every group
    python -m tests.helpers.object_writer URL MIRROR hang            commit group 0, then upload group 1's
                                                                     shard objects and wait before its part
                                                                     (to be killed)
    python -m tests.helpers.object_writer URL MIRROR guard           take the guard of the storage at URL and
                                                                     hold it, renewing its lease, until killed

(from the repository's root)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from cache.claims import live_run
from cache.objects import ObjectStorage
from cache.store import ClaimState, Store
from tests.helpers.stores import create_store, fixed_table


def write_all(store: Store, reverse: bool) -> None:
    todo = fixed_table()[::-1] if reverse else fixed_table()
    while todo:
        busy = []
        for group, data in todo:
            claim = store.claim(group, "run-w")
            if claim.state is ClaimState.TAKEN:
                store.write_shard(claim, data, "fixed-dataset", fsync=False)
                print("wrote", group, claim.shard, flush=True)
            elif claim.state is ClaimState.BUSY:
                busy.append((group, data))
        todo = busy
        time.sleep(0.05 if busy else 0)


def hang(store: Store) -> None:
    (g0, d0), (g1, d1) = fixed_table()[:2]
    store.write_shard(store.claim(g0, "run-w"), d0, "fixed-dataset", fsync=False)
    claim = store.claim(g1, "run-w")
    sink = store.shard_sink(claim.shard, fsync=False)
    sink.append(d1.arrays)
    for tmp, final in sink.finish():  # its shard objects uploaded, as a commit does first: then killed
        store.storage.publish(tmp, final.relative_to(store.path).as_posix())
    print("claimed", claim.shard, flush=True)
    time.sleep(600)


def hold_guard(storage: ObjectStorage) -> None:
    with storage.guard():
        print("held", flush=True)
        time.sleep(600)


if __name__ == "__main__":
    url, mirror, mode = sys.argv[1:4]
    if mode == "guard":
        hold_guard(ObjectStorage(url, Path(mirror)))
    with live_run("run-w"):
        store = create_store(ObjectStorage(url, Path(mirror)))
        write_all(store, "reverse" in sys.argv[4:]) if mode == "all" else hang(store)
