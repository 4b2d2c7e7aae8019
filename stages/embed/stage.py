"""Stage one: run each frozen encoder once per distinct content and cache its outputs.

The work list is every distinct (content key, view) of a modality, in order of first
appearance, cut into shard-sized groups (:mod:`stages.embed.plan`). A group is the unit
of work: it is claimed, embedded, written as one whole shard and committed
(:mod:`stages.embed.runners`). Re-runs, resumed runs and concurrent runs all compute the
same groups, so each skips what another has committed.
"""
from __future__ import annotations

import errno
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache.index import IndexBuilder
from cache.keys import fingerprint
from cache.mirror import push
from cache.paths import cache_root
from cache.claims import lease_seconds, live_run
from cache.store import Store, StoreError
from pipeline import threads
from pipeline.allocator import keep_freed_memory
from core.console import err
from pipeline.datasets import Dataset, open_dataset
from pipeline.devices import peak_memory_mb, resolve_device
from pipeline.encoders import resolve_encoder_name
from pipeline.encoders.remote import require_consent
from pipeline.encoders.stored import store_spec
from core.errors import InputError
from pipeline.imaging import DEFAULT_IMAGE_MEMORY_MB
from stages.embed.modality import MODALITIES, TEXT, Modality
from stages.embed.plan import Plan
from stages.embed.runners import DaskRunner, Runner


@dataclass(frozen=True)
class EmbedConfig:
    """Stage one: which table, which encoders, where the cache is, and how the work is cut."""
    dataset: str
    backbone: str | None = "tiny-vit"
    text_encoder: str | None = "tiny-bert"
    cache: str | None = None
    batch_size: int = 32           # images or reports per encoder forward
    device: str = "auto"           # auto, cpu, cuda or cuda:N
    allow_failures: bool = False
    views: int = 0                 # extra seeded augmented views per image, besides the plain one
    shard_mb: float = 64.0         # target shard size; a shard is the unit of work and of commit
    chunk_rows: int = 16           # rows per inner chunk (the unit of checksums and of reads)
    decode_threads: int = 2        # decode + preprocess threads (PIL and torch release the GIL)
    decode_processes: int = -1     # spawn processes for decoding instead; -1 = auto (on CUDA: up to 8)
    image_memory_mb: float = DEFAULT_IMAGE_MEMORY_MB  # one image's decode + resize budget; larger ones fail
    fsync: bool = True             # fsync shard files and manifest parts before they are committed
    hash_ahead: int = 2048         # image files keyed ahead of the planner (in the background)
    workers: int = 0               # >0: start a Dask LocalCluster with this many worker processes
    scheduler: str | None = None   # tcp://host:port of an existing Dask cluster (shared file system)
    lease_s: float | None = None   # a claim's lease; None: $PIPE_CLAIM_LEASE_S, else 120 s (cache/claims.py)

    @property
    def modalities(self) -> list[Modality]:
        """The modalities this run embeds (an encoder named `none` skips its modality)."""
        return [m for m in MODALITIES.values() if m.encoder_name(self)]


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


_WRITE_ERRORS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
                 errno.EROFS: "the cache is on a read-only file system"}


def run(cfg: EmbedConfig, dataset: Dataset | None = None) -> EmbedResult:
    keep_freed_memory()  # batch after batch reuses the same heap (see pipeline/allocator.py)
    err.print(threads.apply().line())
    root = cache_root(cfg.cache)
    try:
        return _run(cfg, root, dataset)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EDQUOT, errno.EPERM):
            raise
        why = _WRITE_ERRORS.get(e.errno, "the cache is not writable")
        raise StoreError(f"cannot write to the cache at {root}: {why} ({e.filename or e}). Committed shards "
                         "are intact and the cache stays valid; free space or choose a writable cache "
                         "(--cache DIR or $PIPE_CACHE), then re-run `pipe embed` to resume.") from e


def _run(cfg: EmbedConfig, root: Path, dataset: Dataset | None) -> EmbedResult:
    t0 = time.perf_counter()
    lease_seconds(cfg.lease_s)  # a bad lease setting stops here, before any work
    device = resolve_device(cfg.device)
    active = cfg.modalities
    if not active:
        raise InputError("nothing to do: --backbone and --text-encoder are both `none`. Name an image encoder, "
                         "a text encoder or both (`pipe encoders` lists them).")
    ds = dataset or open_dataset(cfg.dataset, root, skip_bad_rows=True)
    _check_reports(ds, active)
    bad_rows = [{"item": s.get("id") or "(no id)", "source": s.get("source") or "", "key": None, "dataset": ds.name,
                 "reason": f"bad row: {s.get('reason')}", "modality": "row"}
                for s in ds.skipped if s.get("kind") == "bad-row"]
    index = IndexBuilder(ds, root, tuple(m.name for m in active), ahead=cfg.hash_ahead)  # keys stream in
    result = EmbedResult(dataset=ds.name, failures=list(bad_rows))
    run_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        with live_run(run_id):
            for modality in active:
                name = modality.encoder_name(cfg)
                res, fails = embed_modality(modality, name, index, ds.name, cfg, root, device, run_id,
                                            also_record=bad_rows)
                result.results.append(res)
                result.failures.extend(fails)
        index.finish()
        push(root)  # a cache in a bucket: the dataset's index goes up with the stores its commits wrote
    finally:
        index.close()
    result.seconds = time.perf_counter() - t0
    result.memory = peak_memory_mb(device)
    return result


def embed_modality(modality: Modality | str, name: str, index, dataset: str, cfg: EmbedConfig, root: Path,
                   device: torch.device, run_id: str, also_record: list[dict] = ()) -> tuple[ModalityResult, list[dict]]:
    """Embed one modality of an index (an :class:`IndexBuilder` or a built ``DatasetIndex``).

    Returns the result and this modality's failures; ``also_record`` (the dataset's bad
    rows) goes into the store's failure table too, but is not returned again.
    """
    modality = MODALITIES[modality] if isinstance(modality, str) else modality
    enc_cfg = resolve_encoder_name(name, modality.name)
    if enc_cfg.modality != modality.name:
        other = next(m.flag for m in MODALITIES.values() if m.name == enc_cfg.modality)
        raise InputError(f"{modality.flag} {name!r} is a {enc_cfg.modality} encoder, and it has no "
                         f"{modality.name} tower: pass it with {other}, and name a {modality.name} encoder with "
                         f"{modality.flag} (`pipe encoders` lists them, with their modality).")
    require_consent(enc_cfg)  # before any work: an encoder that runs repository code needs the opt-in
    spec = encoder_spec(enc_cfg, cfg, device)
    row_bytes = modality.row_bytes(enc_cfg)
    shard_rows = max(cfg.chunk_rows, int(cfg.shard_mb * 2**20 / row_bytes) // cfg.chunk_rows * cfg.chunk_rows)
    store = Store.create(root, modality.name, enc_cfg.name, fingerprint(spec), spec, shard_rows, cfg.chunk_rows)
    with store.in_use():  # `pipe cache gc` leaves the store alone until the index records it
        res, failures = _embed_into(store, modality, enc_cfg, index, dataset, cfg, device, run_id, also_record)
        index.record_store(modality.name, res.encoder, res.store)
    return res, failures


def _embed_into(store: Store, modality: Modality, enc_cfg, index, dataset: str, cfg: EmbedConfig,
                device: torch.device, run_id: str, also_record: list[dict]) -> tuple[ModalityResult, list[dict]]:
    units, expected = modality.units(index, cfg.views)
    res = ModalityResult(modality.name, enc_cfg.name, str(store.path))
    # the store's own shard size: the store may predate this --shard-mb
    plan = Plan(units, store.committed_units(), store.shard_rows, expected)
    groups = iter(plan)
    first = next(groups, None)  # plans up to the first pending shard (keying only its files)
    failures: list[dict] = []
    if first is not None:
        runner_cls = DaskRunner if cfg.workers > 0 or cfg.scheduler else Runner
        runner = runner_cls(modality, enc_cfg, cfg, device, store, dataset, res, run_id)
        failures = runner.run(itertools.chain([first], groups), plan)
    res.reused += plan.reused
    # items that could not be keyed (missing file, empty report) go to the failure table too
    failures = index.failures_of(modality.name) + failures
    res.failed = len(failures)
    store.record_failures([*also_record, *failures], run_id)
    return res, failures


def _check_reports(ds, active: list[Modality]) -> None:
    """Stop before any work when the text encoder has no report to read at all."""
    if TEXT in active and ds.items and not any(it.report for it in ds.items):
        raise InputError(f"dataset {ds.name!r} has no reports (no `report` column, or every report is empty), "
                         "so there is nothing for the text encoder. Add a `report` column, or pass "
                         "--text-encoder none to embed the images only.")


def encoder_spec(enc_cfg, cfg: EmbedConfig | None = None, device: torch.device | None = None) -> dict:
    """Everything that changes what a store holds: the input of its fingerprint
    (:func:`pipeline.encoders.stored.store_spec`, which the trained-Adaptor API shares)."""
    return store_spec(enc_cfg, device)
