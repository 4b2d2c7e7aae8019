"""Who embeds the groups: this process, or the workers of a Dask cluster.

Both runners share one claim loop (:func:`claim_groups`): each group is claimed in the
store; a group another run committed is counted as reused; a group a live process is
writing now is come back to until it is committed (or its writer dies and we take it
over). Claims always stay with this process, so a crashed client's shards are redone by
the next run, like any other.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Iterable

from cache.index import Unit
from cache.store import Claim, ClaimState, ShardSink, Store
from pipeline import threads
from pipeline.console import err, progress
from pipeline.devices import resolve_device
from pipeline.errors import PipeError
from stages.embed.embedder import GroupEmbedder
from stages.embed.modality import MODALITIES, Modality
from stages.embed.overlap import WriteBehind
from stages.embed.plan import Plan, group_id


def claim_groups(store: Store, groups: Iterable[list[Unit]], run_id: str, *,
                 take: Callable[[Claim, list[Unit]], None], skip: Callable[[list[Unit], bool], None],
                 settle: Callable[[], None] = lambda: None, before: Callable[[], None] = lambda: None,
                 on_wait: Callable[[list[list[Unit]]], None] = lambda busy: None, poll: float = 0.2) -> None:
    """Claim every group once; ``take`` those we get, ``skip`` those committed elsewhere
    (with whether we waited for them), and poll the busy ones until none is left.

    ``settle`` runs after each pass (to finish the work taken in it); ``before`` before
    each claim of the first pass (progress bookkeeping); ``on_wait`` once, with the groups
    another live process is writing.
    """
    waiting, waited = groups, False
    while True:
        busy = []
        for units in waiting:
            if not waited:
                before()
            claim = store.claim(group_id(units), run_id)
            if claim.state is ClaimState.BUSY:
                busy.append(units)
            elif claim.state is ClaimState.DONE:
                skip(units, waited)
            else:
                take(claim, units)
        settle()
        if not busy:
            return
        if not waited:
            on_wait(busy)
        waiting, waited = busy, True
        time.sleep(poll)


class Runner:
    """Embeds the groups here, writing each batch to its shard behind the next forward."""

    def __init__(self, modality: Modality, enc_cfg, cfg, device, store: Store, dataset: str, res, run_id: str):
        self.modality, self.enc_cfg, self.cfg, self.device = modality, enc_cfg, cfg, device
        self.store, self.dataset, self.res, self.run_id = store, dataset, res, run_id
        self.failures: list[dict] = []
        self.label = f"embed {modality.name} · {enc_cfg.name}"

    def _count_skipped(self, units: list[Unit], waited: bool) -> None:
        self.res.reused += len(units)
        self.res.waited += len(units) if waited else 0

    def _count_failures(self, fails: list[dict]) -> None:
        self.res.failed += len(fails)
        self.failures.extend(fails)

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> list[dict]:
        embedder = GroupEmbedder(self.modality, self.enc_cfg.name, self.cfg, self.device)
        self._open: dict[int, tuple[Claim, ShardSink]] = {}  # shards claimed and not yet committed
        try:
            with progress() as bar, WriteBehind(depth=4) as writer:
                task = bar.add_task(self.label, total=plan.estimate())

                def take(claim: Claim, units: list[Unit]) -> None:
                    sink = self.store.shard_sink(claim.shard, self.cfg.fsync)
                    self._open[claim.shard] = (claim, sink)
                    kept, fails = embedder.embed(units, self.dataset, sink, writer.submit,
                                                 lambda n: bar.advance(task, n))
                    self.res.embedded += len(kept)
                    self._count_failures(fails)
                    writer.submit(self._publish, claim, sink, kept)

                def skip(units: list[Unit], waited: bool) -> None:
                    self._count_skipped(units, waited)
                    bar.advance(task, len(units))

                claim_groups(self.store, groups, self.run_id, take=take, skip=skip, settle=writer.drain,
                             before=lambda: bar.update(task, total=plan.estimate()), on_wait=_say_waiting)
        finally:
            embedder.close()
            for claim, sink in self._open.values():  # interrupted (the writer has stopped): drop them
                sink.abort()
                self.store.release(claim)
        return self.failures

    def _publish(self, claim: Claim, sink: ShardSink, kept: list[Unit]) -> None:
        """Runs on the writer thread, after the shard's last rows: publish it, or give it up."""
        if kept:
            sink.close()
            self.store.commit(claim, [u.key for u in kept], [u.view for u in kept], [u.source for u in kept],
                              self.dataset)
        else:  # every item failed
            sink.abort()
            self.store.release(claim)
        del self._open[claim.shard]


def _say_waiting(busy: list[list[Unit]]) -> None:
    err.print(f"[yellow]{sum(map(len, busy))} items are being embedded by another process; "
              "waiting for its commits.")


class DaskRunner(Runner):
    """Each group is a Dask task: a worker embeds it and writes the whole shard's arrays,
    and returns its manifest rows, which this process commits."""

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> list[dict]:
        from distributed import as_completed  # lazy: dask's distributed takes a second to import

        with _dask_client(self.cfg) as client, progress() as bar:
            task = bar.add_task(f"{self.label} · dask", total=plan.estimate())
            futures: dict = {}

            def take(claim: Claim, units: list[Unit]) -> None:
                fut = client.submit(_remote_embed, str(self.store.path), self.modality.name, self.enc_cfg.name,
                                    self.cfg, claim.shard, units, self.dataset, pure=False)
                futures[fut] = (claim, units)

            def skip(units: list[Unit], waited: bool) -> None:
                self._count_skipped(units, waited)
                bar.advance(task, len(units))

            def settle() -> None:
                for fut in as_completed(list(futures)):
                    claim, units = futures.pop(fut)
                    self._finish(claim, fut.result())
                    bar.advance(task, len(units))

            claim_groups(self.store, groups, self.run_id, take=take, skip=skip, settle=settle,
                         before=lambda: bar.update(task, total=plan.estimate()))
        return self.failures

    def _finish(self, claim: Claim, out: dict) -> None:
        self._count_failures(out["failures"])
        if out["keys"]:
            self.store.commit(claim, out["keys"], out["views"], out["sources"], self.dataset)
            self.res.embedded += len(out["keys"])
        else:
            self.store.release(claim)


def _dask_client(cfg):
    from distributed import Client, LocalCluster  # lazy: dask's distributed takes a second to import

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise PipeError(f"cannot reach the Dask scheduler at {cfg.scheduler} ({e}). Start one with "
                            "`dask scheduler` and workers with `dask worker <address>`.") from e
    per = threads.plan(processes=cfg.workers)  # the cores split among the workers, not all of them each
    err.print(f"Dask: {cfg.workers} local workers, {per.line()}")
    cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=logging.ERROR, env={threads.ENV: str(per.threads)})
    return _ClusterClient(Client(cluster), cluster)


class _ClusterClient:
    """A client that also closes the LocalCluster it started."""

    def __init__(self, client, cluster):
        self.client, self.cluster = client, cluster

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        self.client.close()
        self.cluster.close()
        return False


_WORKER_EMBEDDERS: dict[tuple, GroupEmbedder] = {}


def _remote_embed(store_path: str, modality: str, encoder: str, cfg, shard: int, units: list[Unit],
                  dataset: str) -> dict:
    """Runs on a Dask worker: the encoder is built once per worker and reused by every task."""
    key = (modality, encoder, cfg.device, cfg.batch_size)
    if key not in _WORKER_EMBEDDERS:
        threads.apply()  # $PIPE_THREADS from the cluster that started this worker, else this node's CPUs
        _WORKER_EMBEDDERS.clear()
        _WORKER_EMBEDDERS[key] = GroupEmbedder(MODALITIES[modality], encoder, cfg, resolve_device(cfg.device))
    sink = Store.open(store_path).shard_sink(shard, cfg.fsync)
    try:
        kept, failures = _WORKER_EMBEDDERS[key].embed(units, dataset, sink)
        sink.close() if kept else sink.abort()
    except BaseException:
        sink.abort()
        raise
    return {"keys": [u.key for u in kept], "views": [u.view for u in kept], "sources": [u.source for u in kept],
            "failures": failures}
