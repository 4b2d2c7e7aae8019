"""Stage one: run each frozen encoder once per distinct content and cache its outputs.

The work list is every distinct (content key, view) of a modality, in order of first
appearance, cut into shard-sized groups. A group is the unit of work: it is claimed,
embedded, written as one whole shard and committed. Re-runs, resumed runs and concurrent
runs all compute the same groups, so each skips what another has committed, and a
resumed group is embedded with exactly the batches of an uninterrupted run.
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import queue
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

import numpy as np
import torch
import xxhash

from cache.keys import fingerprint
from cache.store import Claim, ShardSink, Store, StoreError, live_run
from pipeline.allocator import keep_freed_memory
from pipeline.console import err, peak_memory_mb, progress, resolve_device
from pipeline.datasets import Dataset, open_dataset
from cache.index import DatasetIndex, IndexBuilder
from cache.paths import cache_root


@dataclass(frozen=True)
class EmbedConfig:
    dataset: str
    backbone: str | None = "tiny-vit"
    text_encoder: str | None = "tiny-bert"
    cache: str | None = None
    batch_size: int = 32
    device: Literal["auto", "cpu", "cuda"] = "auto"
    allow_failures: bool = False
    views: int = 0                 # extra seeded augmented views per image, besides the plain one
    shard_mb: float = 64.0         # target shard size; a shard is the unit of work and of commit
    chunk_rows: int = 16           # rows per inner chunk (the unit of checksums and of reads)
    decode_threads: int = 2        # decode + preprocess threads (PIL and torch release the GIL)
    decode_processes: int = -1     # spawn processes for decoding instead; -1 = auto (on CUDA: up to 8)
    fsync: bool = True
    hash_ahead: int = 2048         # image files keyed ahead of the planner (in the background)
    workers: int = 0               # >0: start a Dask LocalCluster with this many worker processes
    scheduler: str | None = None   # tcp://host:port of an existing Dask cluster (shared file system)


@dataclass
class ModalityResult:
    modality: str
    encoder: str
    store: str
    embedded: int = 0
    reused: int = 0
    failed: int = 0
    waited: int = 0  # units another process was writing; we waited for its commit


@dataclass
class EmbedResult:
    dataset: str
    results: list[ModalityResult] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    memory: dict = field(default_factory=dict)

    @property
    def embedded(self) -> int:
        return sum(r.embedded for r in self.results)

    @property
    def reused(self) -> int:
        return sum(r.reused for r in self.results)

    @property
    def failed(self) -> int:
        return len(self.failures)

    def summary(self) -> dict:
        return {"embedded": self.embedded, "reused": self.reused, "failed": self.failed,
                "stores": [r.store for r in self.results], "dataset": self.dataset,
                "seconds": round(self.seconds, 3), **{k: round(v, 1) for k, v in self.memory.items()},
                "per_modality": [r.__dict__ for r in self.results]}


@dataclass(frozen=True)
class Unit:
    """One thing to embed: a content key, its view, and where to read it."""

    key: str
    view: int
    source: str          # image path, or "item <id>" for reports
    payload: str | None = None  # the normalised report text


def run(cfg: EmbedConfig, dataset: Dataset | None = None) -> EmbedResult:
    keep_freed_memory()  # batch after batch reuses the same heap (see pipeline/allocator.py)
    root = cache_root(cfg.cache)
    try:
        return _run(cfg, root, dataset)
    except StoreError:
        raise
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.EROFS: "the cache is on a read-only file system"}.get(e.errno, "the cache is not writable")
        raise StoreError(f"cannot write to the cache at {root}: {why} ({e.filename or e}). Committed shards "
                         "are intact and the cache stays valid; free space or choose a writable cache "
                         "(--cache DIR or $PIPE_CACHE), then re-run `pipe embed` to resume.") from e


def _run(cfg: EmbedConfig, root: Path, dataset: Dataset | None) -> EmbedResult:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ds = dataset or open_dataset(cfg.dataset, root)
    active = tuple(m for m, name in (("image", cfg.backbone), ("text", cfg.text_encoder))
                   if name and name.lower() != "none")
    index = IndexBuilder(ds, root, active, ahead=cfg.hash_ahead)  # image keys stream in, just ahead of need
    result = EmbedResult(dataset=ds.name)
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with live_run(run_id):
            for modality in active:
                name = cfg.backbone if modality == "image" else cfg.text_encoder
                res, fails = embed_modality(modality, name, index, ds.name, cfg, root, device, run_id)
                result.results.append(res)
                result.failures.extend(fails)
                index.record_store(modality, name, res.store)
        index.finish()
    finally:
        index.close()
    result.seconds = time.perf_counter() - t0
    result.memory = peak_memory_mb(device)
    return result


def embed_modality(modality: str, name: str, index: IndexBuilder | DatasetIndex, dataset: str, cfg: EmbedConfig,
                   root: Path, device: torch.device, run_id: str) -> tuple[ModalityResult, list[dict]]:
    from pipeline.encoders import resolve_encoder_name

    enc_cfg = resolve_encoder_name(name)
    if enc_cfg.modality != modality:
        flag = "--backbone" if modality == "image" else "--text-encoder"
        raise ValueError(f"{flag} {name!r} is a {enc_cfg.modality} encoder; `pipe encoders` lists the {modality} ones.")
    spec = encoder_spec(enc_cfg, cfg)
    fp = fingerprint(spec)
    row_bytes = _row_bytes(enc_cfg)
    shard_rows = max(cfg.chunk_rows, int(cfg.shard_mb * 2**20 / row_bytes) // cfg.chunk_rows * cfg.chunk_rows)
    store = Store.create(root, modality, enc_cfg.name, fp, spec, shard_rows, cfg.chunk_rows)
    if modality == "image":
        units, expected = index.image_units(cfg.views), len(index) * (cfg.views + 1)
    else:
        units = index.text_units()
        expected = len(units)
    res = ModalityResult(modality, enc_cfg.name, str(store.path))
    # the store's own shard size: the store may predate this --shard-mb
    plan = Plan(units, store.committed_units(), store.shard_rows, expected)
    groups = iter(plan)
    first = next(groups, None)  # plans up to the first pending shard (keying only its files)
    failures: list[dict] = []
    if first is not None:
        distributed = cfg.workers > 0 or cfg.scheduler
        runner = (_DaskRunner if distributed else _Runner)(modality, enc_cfg, cfg, device, store, dataset,
                                                          failures, res, run_id)
        runner.run(itertools.chain([first], groups), plan)
    res.reused += plan.reused
    # items that could not be keyed (missing file, empty report) go to the failure table too
    failures = index.failures_of(modality) + failures
    store.record_failures(failures, run_id)
    return res, failures


def encoder_spec(enc_cfg, cfg: EmbedConfig) -> dict:
    """Everything that changes what a store holds: the input of its fingerprint."""
    from pipeline.encoders import weights_identity

    spec = {"encoder": enc_cfg.to_dict(), "weights": weights_identity(enc_cfg),
            "dtype": {"tokens": "float16", "pooled": "float32"}, "tokens": "prefix+patches"}
    if enc_cfg.modality == "image":
        spec["preprocess"] = _preprocess(enc_cfg).to_dict()
    else:
        spec["text"] = {"normalisation": "nfc-collapse-whitespace", "max_tokens": enc_cfg.max_tokens,
                        "tokens": "all, padded to max_tokens"}
    return spec


class Plan:
    """The full work list cut into shard-sized groups, minus what is committed, as units stream in.

    Groups are cut from the *full* list, so every run, resumed or concurrent, sees the
    same groups in the same order. Iterating yields each group as soon as its units are
    known; ``reused`` counts committed units passed over so far.
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
    h = xxhash.xxh3_64()
    for u in units:
        h.update(f"{u.key}:{u.view},".encode())
    return h.hexdigest()


_ENCODERS: dict[tuple[str, str], object] = {}


def get_encoder(name: str, device: torch.device):
    """Build an encoder once per process (a later run in the same process reuses it)."""
    from pipeline.encoders import create_encoder

    key = (name, str(device))
    if key not in _ENCODERS:
        _ENCODERS.clear()  # hold one model at a time: they can be large
        _ENCODERS[key] = create_encoder(name, device=str(device))
    return _ENCODERS[key]


def _row_bytes(enc_cfg) -> int:
    d = enc_cfg.embed_dim
    if enc_cfg.modality == "text":
        return (enc_cfg.max_tokens or 128) * d * 2 + d * 4
    if enc_cfg.patch_size:
        n = (enc_cfg.input_size // enc_cfg.patch_size) ** 2 + enc_cfg.num_prefix_tokens
    else:
        n = 64
    return n * d * 2 + d * 4


def _preprocess(enc_cfg):
    from pipeline.imaging import Preprocess

    return Preprocess(resize_size=enc_cfg.resize_size or enc_cfg.input_size, input_size=enc_cfg.input_size,
                      mean=tuple(enc_cfg.mean), std=tuple(enc_cfg.std))


def _call(fn: Callable, *args) -> None:
    fn(*args)


class GroupEmbedder:
    """Turns a group of units into one shard's arrays. Used in-process and on Dask workers."""

    def __init__(self, modality: str, encoder_name: str, cfg: EmbedConfig, device: torch.device):
        from pipeline.encoders import resolve_encoder_name

        self.modality, self.cfg, self.device = modality, cfg, device
        self.enc_cfg = resolve_encoder_name(encoder_name)
        self.preprocess = _preprocess(self.enc_cfg) if modality == "image" else None
        self.pool = _decode_pool(cfg, device) if modality == "image" else None
        self._encoder = None
        self._copy_stream = None
        self._held = None

    def close(self) -> None:
        """Stop the decode workers (idle threads that ran torch ops keep OpenMP teams alive)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = get_encoder(self.enc_cfg.name, self.device)
        return self._encoder

    def embed(self, units: list[Unit], dataset: str, sink: ShardSink, write: Callable = _call,
              advance: Callable[[int], None] = lambda n: None) -> tuple[list[Unit], list[dict]]:
        """Embed units in fixed batches into ``sink``; items that fail are left out and reported.

        Each batch's host outputs go to ``write(fn, *args)``: a write-behind queue streams
        them into the shard while the next batch runs (the default writes inline).
        Returns the units written, in row order, and the failures.
        """
        bs = self.cfg.batch_size
        batches = [units[i:i + bs] for i in range(0, len(units), bs)]
        load = self._load_images if self.modality == "image" else self._load_texts
        kept, failures = [], []
        for batch, loaded in _prefetch(batches, load):
            ok = [(u, x) for u, x in zip(batch, loaded) if not isinstance(x, Exception)]
            failures += [{"item": "", "source": u.source, "key": u.key, "dataset": dataset, "reason": str(x),
                          "modality": self.modality} for u, x in zip(batch, loaded) if isinstance(x, Exception)]
            if ok:
                kept += [u for u, _ in ok]
                out = self._forward([x for _, x in ok])
                write(_append, sink, out)
                # Held until the next forward has run: freeing a batch's outputs first lets
                # glibc trim the heap top, and the next forward then page-faults its
                # activations back in (tiny-vit on CPU ran ~35% slower that way).
                self._held = out
            advance(len(batch))
        self._held = None
        return kept, failures

    def _load_images(self, batch: list[Unit]) -> list:
        return list(self.pool.map(_load_image, batch, [self.preprocess] * len(batch)))

    def _load_texts(self, batch: list[Unit]) -> list:
        return [u.payload for u in batch]

    @torch.inference_mode()
    def _forward(self, loaded: list) -> "HostBatch":
        """Launch one batch; results come back as host tensors, on GPU copied behind compute."""
        dev = self.device
        amp = torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else _null()
        with amp:
            if self.modality == "image":
                pixels = torch.stack(loaded)
                if dev.type == "cuda":
                    pixels = pixels.pin_memory()
                out = self.encoder(pixels.to(dev, non_blocking=True))
                host = {"tokens": self._to_host(out.tokens, torch.float16),
                        "pooled": self._to_host(out.pooled, torch.float32)}
            else:
                batch = {k: v.to(dev) for k, v in self.encoder.tokenize(loaded).items()}
                out = self.encoder(**batch)
                host = {"tokens": self._to_host(out.tokens, torch.float16),
                        "pooled": self._to_host(out.pooled, torch.float32),
                        "length": self._to_host(out.length, torch.int32)}
        done = None
        if self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return HostBatch(host, done, self.enc_cfg.max_tokens if self.modality == "text" else None)

    def _to_host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Device-to-host on a side stream into pinned memory, so the next forward starts at once."""
        t = t.detach().to(dtype)
        if t.device.type != "cuda":
            return t
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._copy_stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._copy_stream)
        return host


@dataclass
class HostBatch:
    """One batch of outputs in host memory, maybe still being copied from the GPU."""

    tensors: dict[str, torch.Tensor]
    done: object = None           # a CUDA event recorded after the copies
    max_tokens: int | None = None  # text: pad token states to this length

    def arrays(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        arrays = {k: t.numpy() for k, t in self.tensors.items()}
        if self.max_tokens is not None:  # pad to max_tokens: a row must not depend on its batch
            tok, T = arrays["tokens"], self.max_tokens
            padded = np.zeros((tok.shape[0], T, tok.shape[2]), np.float16)
            padded[:, : min(tok.shape[1], T)] = tok[:, :T]
            arrays["tokens"] = padded
        return arrays


def _append(sink: ShardSink, batch: HostBatch) -> None:
    sink.append(batch.arrays())


def _load_image(u: Unit, preprocess):
    """Read, check, decode and preprocess one image; an exception is returned, not raised."""
    from pipeline.imaging import read_and_decode

    try:
        data, img = read_and_decode(u.source)
    except Exception as e:  # recorded per item; the rest of the batch goes on
        return e
    if xxhash.xxh3_128_hexdigest(data) != u.key:
        return ValueError(f"{u.source} changed while embedding (its bytes no longer match the key); "
                          "re-run `pipe embed`")
    return preprocess(img, view=u.view, seed_key=u.key)


def _decode_pool(cfg: EmbedConfig, device: torch.device):
    """Threads on CPU (the forward needs the cores); spawned processes to feed a GPU.

    Processes return tensors through shared memory (torch's multiprocessing reductions).
    """
    n = cfg.decode_processes
    if n < 0:
        n = min(8, max(1, (os.cpu_count() or 2) - 1)) if device.type == "cuda" else 0
    if n == 0:
        return ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="decode")
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as tmp

    return ProcessPoolExecutor(n, mp_context=tmp.get_context("spawn"), initializer=_quiet_worker)


def _quiet_worker() -> None:
    torch.set_num_threads(1)  # one core per decode process


class _Runner:
    """Claims groups one by one, embeds them here, and writes shards behind the forwards."""

    def __init__(self, modality, enc_cfg, cfg: EmbedConfig, device, store: Store, dataset, failures, res, run_id):
        self.store, self.dataset, self.failures, self.res, self.run_id = store, dataset, failures, res, run_id
        self.embedder = GroupEmbedder(modality, enc_cfg.name, cfg, device)
        self.fsync = cfg.fsync
        self.label = f"embed {modality} · {enc_cfg.name}"

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> None:
        self._open: dict[int, tuple[Claim, ShardSink]] = {}  # shards claimed and not yet committed
        try:
            self._run(groups, plan)
        finally:
            self.embedder.close()
            for claim, sink in self._open.values():  # interrupted (the writer has stopped): drop them
                sink.abort()
                self.store.release(claim)

    def _run(self, groups: Iterable[list[Unit]], plan: Plan) -> None:
        with progress() as bar, _WriteBehind(depth=4) as writer:
            task = bar.add_task(self.label, total=plan.estimate())
            waiting = self._pass(groups, bar, task, writer, plan=plan)
            writer.drain()
            if waiting:
                err.print(f"[yellow]{sum(map(len, waiting))} items are being embedded by another process; "
                          "waiting for its commits.")
            while waiting:  # another live process holds these: wait for its commit, or take over
                time.sleep(0.2)
                waiting = self._pass(waiting, bar, task, writer, waited=True)
                writer.drain()

    def _pass(self, groups, bar, task, writer, waited: bool = False, plan: Plan | None = None) -> list[list[Unit]]:
        busy = []
        for units in groups:
            if plan is not None:
                bar.update(task, total=plan.estimate())
            claim = self.store.claim(group_id(units), self.run_id)
            if claim == "busy":
                busy.append(units)
                continue
            if claim == "done":
                self.res.reused += len(units)
                self.res.waited += len(units) if waited else 0
                bar.advance(task, len(units))
                continue
            sink = self.store.shard_sink(claim.shard, self.fsync)
            self._open[claim.shard] = (claim, sink)
            kept, fails = self.embedder.embed(units, self.dataset, sink, writer.submit,
                                              lambda n: bar.advance(task, n))
            self.res.embedded += len(kept)
            self.res.failed += len(fails)
            self.failures.extend(fails)
            writer.submit(self._publish, claim, sink, kept)
        return busy

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


class _DaskRunner(_Runner):
    """Each group is a Dask task: a worker embeds it and writes the whole shard's arrays,
    and returns its manifest rows, which this process commits. Claims stay with this
    process, so a crashed client's shards are redone by the next run, like any other."""

    def __init__(self, modality, enc_cfg, cfg: EmbedConfig, device, store, dataset, failures, res, run_id):
        self.store, self.dataset, self.failures, self.res, self.run_id = store, dataset, failures, res, run_id
        self.modality, self.enc_name, self.cfg = modality, enc_cfg.name, cfg
        self.label = f"embed {modality} · {enc_cfg.name} · dask"

    def run(self, groups: Iterable[list[Unit]], plan: Plan) -> None:
        from distributed import as_completed

        with _dask_client(self.cfg) as client, progress() as bar:
            task = bar.add_task(self.label, total=plan.estimate())
            waiting = groups
            while waiting:
                futures, busy = {}, []
                for units in waiting:
                    bar.update(task, total=plan.estimate())
                    claim = self.store.claim(group_id(units), self.run_id)
                    if claim == "busy":
                        busy.append(units)
                    elif claim == "done":
                        self.res.reused += len(units)
                        bar.advance(task, len(units))
                    else:
                        fut = client.submit(_remote_embed, str(self.store.path), self.modality, self.enc_name,
                                            self.cfg, claim.shard, units, self.dataset, pure=False)
                        futures[fut] = (claim, units)
                for fut in as_completed(futures):
                    claim, units = futures[fut]
                    self._finish(claim, fut.result())
                    bar.advance(task, len(units))
                waiting = busy
                if waiting:
                    time.sleep(0.2)

    def _finish(self, claim, out: dict) -> None:
        self.res.failed += len(out["failures"])
        self.failures.extend(out["failures"])
        if out["keys"]:
            self.store.commit(claim, out["keys"], out["views"], out["sources"], self.dataset)
            self.res.embedded += len(out["keys"])
        else:
            self.store.release(claim)


def _dask_client(cfg: EmbedConfig):
    from distributed import Client, LocalCluster

    if cfg.scheduler:
        try:
            return Client(cfg.scheduler, timeout="10s")
        except (OSError, TimeoutError) as e:
            raise ValueError(f"cannot reach the Dask scheduler at {cfg.scheduler} ({e}). Start one with "
                             "`dask scheduler` and workers with `dask worker <address>`.") from e
    cluster = LocalCluster(n_workers=cfg.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=logging.ERROR)
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


def _remote_embed(store_path: str, modality: str, encoder: str, cfg: EmbedConfig, shard: int,
                  units: list[Unit], dataset: str) -> dict:
    """Runs on a Dask worker: the encoder is built once per worker and reused by every task."""
    key = (modality, encoder, cfg.device, cfg.batch_size)
    if key not in _WORKER_EMBEDDERS:
        _WORKER_EMBEDDERS.clear()
        _WORKER_EMBEDDERS[key] = GroupEmbedder(modality, encoder, cfg, resolve_device(cfg.device))
    sink = Store.open(store_path).shard_sink(shard, cfg.fsync)
    try:
        kept, failures = _WORKER_EMBEDDERS[key].embed(units, dataset, sink)
        sink.close() if kept else sink.abort()
    except BaseException:
        sink.abort()
        raise
    return {"keys": [u.key for u in kept], "views": [u.view for u in kept], "sources": [u.source for u in kept],
            "failures": failures}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _prefetch(batches: list, load: Callable) -> Iterator:
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


class _WriteBehind:
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
