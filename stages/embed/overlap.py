"""Overlapping the encoder with everything else: read ahead, write behind."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, Iterator


def prefetched(batches: list, load: Callable) -> Iterator:
    """Yield (batch, load(batch)) while the next batch already loads in the background."""
    if not batches:
        return
    loader = ThreadPoolExecutor(1, thread_name_prefix="prefetch")
    try:
        nxt: Future = loader.submit(load, batches[0])
        for i, b in enumerate(batches):
            cur = nxt.result()
            if i + 1 < len(batches):
                nxt = loader.submit(load, batches[i + 1])
            yield b, cur
    finally:
        loader.shutdown(wait=True, cancel_futures=True)


def call_now(fn: Callable, *args) -> None:
    """The inline stand-in for :meth:`WriteBehind.submit`."""
    fn(*args)


class WriteBehind:
    """A bounded queue of shard writes run by one thread, so forwards never wait on disk.

    A failed write is re-raised in the caller at the next submit or at drain: committed
    shards stay valid, the failed one is never committed.
    """

    def __init__(self, depth: int):
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="shard-writer", daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def _loop(self):
        while True:
            job = self.q.get()
            if job is None:
                return
            fn, args = job
            try:
                if self.error is None:
                    fn(*args)
            except BaseException as e:  # handed to the main thread
                self.error = e
            finally:
                self.q.task_done()

    def submit(self, fn, *args):
        self._raise()
        self.q.put((fn, args))

    def drain(self):
        self.q.join()
        self._raise()

    def _raise(self):
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def __exit__(self, *exc):
        self.q.put(None)
        self.thread.join()
        return False
