"""Who embeds the groups: this process, or the workers of a Dask cluster.

Both runners share one claim loop (:func:`claim_groups`): each group is claimed in the
store; a group another run committed is counted as reused; a group a live writer is
writing now is come back to until it is committed (or its writer dies, or its lease
lapses, and we take it over). Claims always stay with this process, which renews their
leases from a background thread (:class:`cache.claims.LeaseKeeper`) for the whole time
it holds them, also while a Dask worker embeds the group; so a crashed client's shards
are redone by the next run, like any other, within one lease. A claim that another
writer took over after our lease lapsed is never committed: its group is waited for
like any other busy one.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable

from cache.claims import LeaseKeeper, lease_seconds
from cache.index import Unit
from cache.store import Claim, ClaimLost, ClaimState, ShardSink, Store
from pipeline import threads
from pipeline.cluster import LocalWorkers
from core.console import err, progress
from pipeline.devices import resolve_device
from core.errors import PipeError
from stages.embed.embedder import GroupEmbedder
from stages.embed.modality import MODALITIES, Modality
from stages.embed.overlap import WriteBehind
from stages.embed.plan import Plan, group_id


def claim_groups(store: Store, groups: Iterable[list[Unit]], run_id: str, *,
                 take: Callable[[Claim, list[Unit]], None], skip: Callable[[list[Unit], bool], None],
                 settle: Callable[[], list[list[Unit]]] = lambda: [], before: Callable[[], None] = lambda: None,
                 on_wait: Callable[[list[list[Unit]]], None] = lambda busy: None, poll: float = 0.2,
                 lease_s: float | None = None) -> None:
    """Claim every group once; ``take`` those we get, ``skip`` those committed elsewhere
    (with whether we waited for them), and poll the busy ones until none is left.

    ``settle`` runs after each pass (to finish the work taken in it) and returns the
    groups whose claims were lost to another writer, which are waited for like busy
    ones; ``before`` runs before each claim of the first pass (progress bookkeeping);
    ``on_wait`` once, with the groups another live writer is writing.
    """
    waiting, waited = groups, False
    while True:
        busy = []
        for units in waiting:
            if not waited:
                before()
            claim = store.claim(group_id(units), run_id, lease_s)
            if claim.state is ClaimState.BUSY:
                busy.append(units)
            elif claim.state is ClaimState.DONE:
                skip(units, waited)
            else:
                take(claim, units)
        busy += settle()
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
        self.lease_s = lease_seconds(cfg.lease_s)
        self.failures: list[dict] = []
        self.label = f"embed {modality.name} · {enc_cfg.name}"

    def _count_skipped(self, units: list[Unit], waited: bool) -> None:
        self.res.reused += len(units)
        self.res.waited += len(units) if waited else 0

    def _count_failures(self, fails: list[dict]) -> None:
        self.res.failed += len(fails)
        self.failures.extend(fails)

    def _count(self, outcomes: list[tuple[Claim, list[Unit], int, list[dict], bool]]) -> list[list[Unit]]:
        """Count the groups published since the last call; return those whose claim was lost."""
        lost = []
        while outcomes:
            claim, units, embedded, fails, committed = outcomes.pop(0)
            if committed:
                self.res.embedded += embedded
                self._count_failures(fails)
            else:
                _say_lost(claim)
                lost.append(units)
        return lost

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> list[dict]:
        embedder = GroupEmbedder(self.modality, self.enc_cfg.name, self.cfg, self.device)
        self._open: dict[Claim, ShardSink] = {}  # shards claimed and not yet committed
        outcomes: list = []  # appended by the writer thread, counted here after each pass
        try:
            with progress() as bar, LeaseKeeper(self.lease_s) as keeper, WriteBehind(depth=4) as writer:
                task = bar.add_task(self.label, total=plan.estimate())

                def take(claim: Claim, units: list[Unit]) -> None:
                    keeper.hold(self.store, claim)
                    sink = self.store.shard_sink(claim.shard, self.cfg.fsync)
                    self._open[claim] = sink
                    kept, fails = embedder.embed(units, self.dataset, sink, writer.submit,
                                                 lambda n: bar.advance(task, n))
                    writer.submit(self._publish, claim, sink, units, kept, fails, keeper, outcomes)

                def skip(units: list[Unit], waited: bool) -> None:
                    self._count_skipped(units, waited)
                    bar.advance(task, len(units))

                def settle() -> list[list[Unit]]:
                    writer.drain()
                    return self._count(outcomes)

                claim_groups(self.store, groups, self.run_id, take=take, skip=skip, settle=settle,
                             before=lambda: bar.update(task, total=plan.estimate()), on_wait=_say_waiting,
                             lease_s=self.lease_s)
        finally:
            embedder.close()
            for sink in self._open.values():  # interrupted: the keeper released their claims, drop their files
                sink.abort()
        return self.failures

    def _publish(self, claim: Claim, sink: ShardSink, units: list[Unit], kept: list[Unit], fails: list[dict],
                 keeper: LeaseKeeper, outcomes: list) -> None:
        """Runs on the writer thread, after the shard's last rows: publish it, or give it up.

        A claim another writer took over (our lease lapsed) is not committed: the shard's
        temporary files are dropped and the group is waited for like a busy one.
        """
        committed = True
        try:
            if kept:
                files = sink.finish()
                self.store.commit(claim, [u.key for u in kept], [u.view for u in kept], [u.source for u in kept],
                                  self.dataset, files, self.cfg.fsync)
            else:  # every item failed
                sink.abort()
                self.store.release(claim)
        except ClaimLost:
            sink.abort()
            committed = False
        keeper.drop(claim)
        del self._open[claim]
        outcomes.append((claim, units, len(kept), fails, committed))


def _say_waiting(busy: list[list[Unit]]) -> None:
    err.print(f"[yellow]{sum(map(len, busy))} items are being embedded by another process; "
              "waiting for its commits.")


def _say_lost(claim: Claim) -> None:
    err.print(f"[yellow]shard {claim.shard}: another writer took this claim over after its lease lapsed (was this "
              "process paused for longer than the lease?); its work is dropped and the shard is waited for.")


class DaskRunner(Runner):
    """Each group is a Dask task: a worker embeds it and writes the whole shard's arrays
    under temporary names, and returns them with the manifest rows; this process, which
    holds the claim and renews its lease meanwhile, commits them."""

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> list[dict]:
        from distributed import as_completed  # lazy: dask's distributed takes a second to import

        with _dask_client(self.cfg) as client, progress() as bar, LeaseKeeper(self.lease_s) as keeper:
            task = bar.add_task(f"{self.label} · dask", total=plan.estimate())
            futures: dict = {}

            def take(claim: Claim, units: list[Unit]) -> None:
                keeper.hold(self.store, claim)
                fut = client.submit(_remote_embed, self.store.storage.where, self.modality.name, self.enc_cfg.name,
                                    self.cfg, claim.shard, units, self.dataset, pure=False)
                futures[fut] = (claim, units)

            def skip(units: list[Unit], waited: bool) -> None:
                self._count_skipped(units, waited)
                bar.advance(task, len(units))

            def settle() -> list[list[Unit]]:
                lost = []
                for fut in as_completed(list(futures)):
                    claim, units = futures.pop(fut)
                    if not self._finish(claim, _result(fut, claim)):
                        _say_lost(claim)
                        lost.append(units)
                    keeper.drop(claim)
                    bar.advance(task, len(units))
                return lost

            claim_groups(self.store, groups, self.run_id, take=take, skip=skip, settle=settle,
                         before=lambda: bar.update(task, total=plan.estimate()), lease_s=self.lease_s)
        return self.failures

    def _finish(self, claim: Claim, out: dict) -> bool:
        """Commit a worker's shard; False if the claim was lost to another writer meanwhile."""
        files = [(self.store.path / tmp, self.store.path / final) for tmp, final in out["files"]]  # keys
        try:
            if out["keys"]:
                self.store.commit(claim, out["keys"], out["views"], out["sources"], self.dataset, files,
                                  self.cfg.fsync)
            else:
                self.store.release(claim)
        except ClaimLost:
            for tmp, _ in files:
                self.store.storage.delete(self.store.storage.key_of(tmp))
            return False
        self._count_failures(out["failures"])
        self.res.embedded += len(out["keys"])
        return True


def _result(fut, claim: Claim) -> dict:
    """A task's result; a task whose workers kept dying is one message (the run resumes), not a traceback."""
    from distributed.scheduler import KilledWorker  # lazy: dask's distributed takes a second to import

    try:
        return fut.result()
    except KilledWorker as e:
        tries = getattr(e, "allowed_failures", None)
        raise PipeError(f"shard {claim.shard}: {'each of ' + str(tries + 1) + ' ' if tries is not None else 'the '}Dask "
                        "workers that ran it died (out of memory, preempted or killed), so Dask gave it up. Committed "
                        "shards are kept: give the workers more memory (or smaller shards, --shard-mb) and run "
                        "`pipe embed` again; it resumes where this run stopped.") from None


def _dask_client(cfg):
    from distributed import Client  # lazy: only a run with --workers or --scheduler uses Dask

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise PipeError(f"cannot reach the Dask scheduler at {cfg.scheduler} ({e}). Start one with "
                            "`dask scheduler` and workers with `dask worker <address>`.") from e
    per = threads.plan(processes=cfg.workers)  # the cores split among the workers, not all of them each
    # Workers that are not daemons may start decode processes (a GPU embed spawns them); a worker
    # started in place of one that died is not a daemon either.
    workers = LocalWorkers(cfg.workers, env={threads.ENV: str(per.threads)},
                           config={"distributed.worker.daemon": False})
    err.print(f"Dask: {cfg.workers} local workers ({workers.method}), {per.line()}")
    cluster = workers.__enter__()
    try:
        return _ClusterClient(Client(cluster), workers)
    except BaseException:
        workers.__exit__(None, None, None)
        raise


class _ClusterClient:
    """A client that also closes the local cluster it started."""

    def __init__(self, client, workers: LocalWorkers):
        self.client, self.workers = client, workers

    def __enter__(self):
        return self.client

    def __exit__(self, *exc):
        try:
            self.client.close()
        finally:
            self.workers.__exit__(None, None, None)
        return False


_WORKER_EMBEDDERS: dict[tuple, GroupEmbedder] = {}


def _remote_embed(store_path: str, modality: str, encoder: str, cfg, shard: int, units: list[Unit],
                  dataset: str) -> dict:
    """Runs on a Dask worker: the encoder is built once per worker and reused by every task.

    ``store_path`` is the store's folder (shared by every worker) or its ``s3://`` URL; the
    shard's files come back as keys inside the store, staged where the client can publish them.
    """
    key = (modality, encoder, cfg.device, cfg.batch_size)
    if key not in _WORKER_EMBEDDERS:
        threads.apply()  # $PIPE_THREADS from the cluster that started this worker, else this node's CPUs
        _WORKER_EMBEDDERS.clear()
        _WORKER_EMBEDDERS[key] = GroupEmbedder(MODALITIES[modality], encoder, cfg, resolve_device(cfg.device))
    store = Store.open(store_path)  # a folder every worker shares, or an s3:// URL
    sink = store.shard_sink(shard, cfg.fsync)
    files: list = []
    try:
        kept, failures = _WORKER_EMBEDDERS[key].embed(units, dataset, sink)
        if kept:
            for tmp, final in sink.finish():  # the client moves them into place
                store.storage.stage(tmp)
                files.append((store.storage.key_of(tmp), store.storage.key_of(final)))
        else:
            sink.abort()
    except BaseException:
        sink.abort()
        raise
    return {"keys": [u.key for u in kept], "views": [u.view for u in kept], "sources": [u.source for u in kept],
            "failures": failures, "files": files}
