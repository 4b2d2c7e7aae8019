"""Stage three: downstream evaluation, trained and scored from the cache.

    pipe evaluate --task classification --dataset demo --adaptor runs/adaptor-demo/last.safetensors

Nothing here runs a backbone or decodes an image, except the few test images a run shows
(the segmentation overlays, the retrieval examples' thumbnails: :mod:`stages.evaluate.pictures`)
and the text encoder, once, for zero-shot prompts not yet in the cache. The checkpoint's
metadata names its encoders and the fingerprints of the caches it was trained on; those
must match the caches evaluated here.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from core.atomic import atomic_write_text
from core.jsondata import plain
from core.locks import owned_folder, release_empty_folder
from cache.pairs import CacheMissError, PairData, embed_command, load_pairs
from cache.paths import cache_root
from pipeline.config import ConfigError, OneOf, Validated, config_hash, save_config, to_dict
from pipeline import threads
from core.console import err, escape
from pipeline.datasets import open_dataset
from pipeline.devices import DEVICES, peak_memory_mb, resolve_device
from pipeline.encoders import canonical_name, resolve_encoder_name
from pipeline.models.checkpoint import CheckpointMismatchError, check_fingerprints
from pipeline.models.heads import HEAD_KINDS, SEG_DECODERS
from pipeline.models.label_types import LABEL_TYPE_CHOICES
from pipeline.provenance import provenance
from pipeline.records import CheckpointInfo, DataCard, EvalRecord, Provenance
from pipeline.tables import Table
from stages.evaluate.card import data_card
from stages.evaluate.context import SCORE_SPLITS, EvalContext, TaskResult
from stages.evaluate.features import FrozenAdaptor
from stages.evaluate.head_bank import HEAD_SCHEDULES
from stages.evaluate.metrics import SEGMENTATION_METRICS
from stages.evaluate.native import NATIVE
from stages.evaluate.native import check_pair as check_native_pair
from stages.evaluate.tables import to_markdown
from stages.evaluate.tasks import TASKS, get_task


@dataclass(frozen=True)
class HeadsConfig(Validated):
    """The heads trained on frozen features (classification; segmentation reads the shared settings)."""
    kinds: list[str] = field(default_factory=lambda: ["mlp"])   # mlp (the paper's), linear, probe (L-BFGS)
    lrs: list[float] = field(default_factory=lambda: [5e-4])    # several: one pass trains them all
    probe_l2s: list[float] = field(default_factory=lambda: [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])  # the probe's L2 grid
    weight_decay: float = 1e-4     # the paper: 1e-4 (RSNA), 0.05 (COVIDx)
    hidden: int = 512              # the MLP head's hidden width (the paper: 512)
    dropout: float = 0.1           # the MLP head's dropout (the paper: 0.1)
    batch_size: int = 128          # items per optimiser step (the paper: 128)
    epochs: int = 50               # validations; more epochs when min_steps needs them
    min_steps: int = 500           # optimiser steps at least, however few labels a fraction keeps
    max_steps: int = 3000          # optimiser steps at most (0: no cap): a large split's validations come sooner
    patience: int = 10             # validations without a better score before a head stops
    min_delta: float = 0.0         # a validation must beat the best by more than this to reset patience
    val_every: int = 0             # validate every k epochs of `epochs` (0: `epochs` validations, spread)
    schedule: Annotated[str, OneOf(HEAD_SCHEDULES)] = "restarts"  # the learning rate's schedule (HEAD_SCHEDULES)
    restart_epochs: int = 10       # period of the warm restarts: validations (restarts), epochs (epoch-restarts)
    restart_frac: float = 0.0      # epoch-restarts: the period as this share of the run's steps (the authors' 0.4)
    replicas: int = 1              # the authors' GPUs per step: their period counts one GPU's steps

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        positive = ("hidden", "batch_size", "epochs", "min_steps", "patience", "restart_epochs", "replicas")
        cap = [] if v["max_steps"] >= 0 else [("max_steps", f"must be >= 0 (0: no cap), got {v['max_steps']}")]
        cap += [(k, f"must be >= 0, got {v[k]}") for k in ("min_delta", "val_every", "restart_frac") if v[k] < 0]
        return [(k, m) for k, ok, m in (
            ("kinds", bool(v["kinds"]) and all(k in HEAD_KINDS for k in v["kinds"]),
             f"must be a non-empty list of {'/'.join(HEAD_KINDS)}, got {v['kinds']}"),
            ("lrs", bool(v["lrs"]) and min(v["lrs"]) > 0, f"must be positive learning rates, got {v['lrs']}"),
            ("probe_l2s", bool(v["probe_l2s"]) and min(v["probe_l2s"]) >= 0,
             f"must be a non-empty list of L2 strengths >= 0, got {v['probe_l2s']}"),
            ("weight_decay", v["weight_decay"] >= 0, f"must be >= 0, got {v['weight_decay']}"),
            ("dropout", 0 <= v["dropout"] < 1, f"must lie in [0, 1), got {v['dropout']}"),
        ) if not ok] + [(k, f"must be >= 1, got {v[k]}") for k in positive if v[k] < 1] + cap


@dataclass(frozen=True)
class SegConfig(Validated):
    """Segmentation: a convolutional decoder on the patch tokens, alpha * focal + dice."""
    target: str = ""               # which mask; "" = the dataset's first mask column
    decoder: Annotated[str, OneOf(SEG_DECODERS)] = "upsample"   # pipeline/models/heads.py:SEG_DECODERS
    channels: list[int] = field(default_factory=lambda: [256, 128, 64, 32])   # decoder width per stage
    alpha: float = 10.0            # loss = alpha * focal + dice (MGCA, the paper)
    gamma: float = 2.0             # focal loss exponent
    threshold: float = 0.5         # on the sigmoid, for the reported masks
    batch_size: int = 16           # images per optimiser step (the paper: 4)
    epochs: int = 30               # validations; more epochs when min_steps needs them
    min_steps: int = 500           # optimiser steps at least, however few masks a fraction keeps
    max_steps: int = 3000          # optimiser steps at most (0: no cap)
    val_every: int = 0             # validate every k epochs of `epochs` (0: `epochs` validations, spread)
    # pixels pooled over the split (ours), or the authors' per-image mean with empty-on-empty = 1
    select: Annotated[str, OneOf(SEGMENTATION_METRICS)] = "dice_global"  # the validation Dice that picks the epoch
    balance_negatives: bool = False  # train on as many empty-mask images as non-empty ones (MGCA's SIIM)
    # The cached views of an image encoder's -ssr variant (`pipe embed --views K`), tokens and mask moved
    # alike: each time a batch takes a training image, one of its views with probability augment_p.
    augment: bool = False          # train decoders on the cached views too (the authors' ShiftScaleRotate)
    augment_p: float = 0.5         # how often a training image is one of its views (the authors': 0.5)
    overlays: int = 6              # test images drawn in overlays.png: the best and the worst by Dice

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        found = [(k, f"must be >= 1, got {v[k]}") for k in ("batch_size", "epochs", "min_steps") if v[k] < 1]
        if v["val_every"] < 0:
            found.append(("val_every", f"must be >= 0, got {v['val_every']}"))
        if v["max_steps"] < 0:
            found.append(("max_steps", f"must be >= 0 (0: no cap), got {v['max_steps']}"))
        if not v["channels"] or min(v["channels"]) < 1:
            found.append(("channels", f"must be a non-empty list of positive widths, got {v['channels']}"))
        if not 0 < v["threshold"] < 1:
            found.append(("threshold", f"must lie in (0, 1), got {v['threshold']}"))
        if not 0 <= v["augment_p"] <= 1:
            found.append(("augment_p", f"must lie in [0, 1], got {v['augment_p']}"))
        return found


@dataclass(frozen=True)
class ClassificationConfig(Validated):
    """Which labels are classified, and as what."""
    labels: list[str] = field(default_factory=list)   # the labels to classify; [] = every 0/1 label
    label_type: Annotated[str, OneOf(LABEL_TYPE_CHOICES)] = "auto"   # pipeline/models/label_types.py


@dataclass(frozen=True)
class RetrievalConfig(Validated):
    """Image-text retrieval on the test split."""
    rerank_k: int = 10             # tokens mode: candidates per query re-ranked by the matching head

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        return [("rerank_k", f"must be >= 0, got {v['rerank_k']}")] if v["rerank_k"] < 0 else []


@dataclass(frozen=True)
class ZeroShotConfig(Validated):
    """Zero-shot classification from prompt pairs."""
    prompts: str = "chest_xray"    # a name in configs/prompts/ or a YAML path


@dataclass(frozen=True)
class EvalConfig(Validated):
    task: Annotated[str, OneOf(TASKS)] = "classification"  # what to evaluate (stages/evaluate/tasks.py)
    dataset: str = ""
    adaptor: str = ""              # a checkpoint (or its run directory), "none", or "native" (the pair's joint space)
    backbone: str = ""             # with a checkpoint: taken from it
    text_encoder: str = ""
    cache: str | None = None
    out: str | None = None
    fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])  # shares of the training labels, nested (1% within 10% within 100%)
    seeds: int = 3                 # runs per fraction, each with its own subset and head initialisation
    seed: int = 0                  # seeds are seed, seed+1, ...; each draws its own nested subsets
    baseline: bool = False         # also evaluate the raw backbone features in this run
    # Each task's own settings (the Task entry names its section); heads serve classification and segmentation.
    classification: ClassificationConfig = ClassificationConfig()
    seg: SegConfig = SegConfig()
    retrieval: RetrievalConfig = RetrievalConfig()
    zero_shot: ZeroShotConfig = ZeroShotConfig()
    heads: HeadsConfig = HeadsConfig()
    bootstrap: int = 1000          # test-set resamples for the CIs
    ci: float = 0.95               # the bootstrap interval's coverage
    device: Annotated[str, OneOf(DEVICES)] = "auto"   # auto, cpu, cuda or cuda:N
    train_split: str = "train"     # the split the heads train on
    val_split: str = "valid"       # the split that stops and picks heads
    test_split: str = "test"       # the split every figure is measured on
    score_split: Annotated[str, OneOf(SCORE_SPLITS)] = "test"   # the split the figures are scored on (valid: a sweep's selection)

    # Settings that were top-level keys before each task had its section; the old keys still work.
    MOVED = {"labels": "classification.labels", "label_type": "classification.label_type",
             "rerank_k": "retrieval.rerank_k", "prompts": "zero_shot.prompts"}
    # Settings added since runs were recorded: at these defaults they stay out of the config hash.
    ADDED = {"seg.augment": False, "seg.augment_p": 0.5}

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        return [(k, m) for k, ok, m in (
            ("task", v["task"] in TASKS, f"must be one of {', '.join(TASKS)}, got {v['task']!r}"),
            ("fractions", bool(v["fractions"]) and all(0.0 < f <= 1.0 for f in v["fractions"]),
             f"must lie in (0, 1], got {v['fractions']}"),
            ("seeds", v["seeds"] >= 1, f"must be >= 1, got {v['seeds']}"),
            ("ci", 0.0 < v["ci"] < 1.0, f"must lie in (0, 1), got {v['ci']}"),
            ("bootstrap", v["bootstrap"] >= 0, f"must be >= 0, got {v['bootstrap']}"),
        ) if not ok]


@dataclass
class EvalResult:
    out: Path
    record: EvalRecord             # what results.json holds (pipeline.records)
    tables: list[Table]

    @property
    def results(self) -> dict:
        """results.json's data."""
        return self.record.to_dict()


# ------------------------------------------------------------------------------ setup
def _require(cfg: EvalConfig) -> None:
    problems = [f"{k}: a value is required (--{k.replace('_', '-')})" for k in ("dataset", "adaptor")
                if not getattr(cfg, k)]
    if cfg.adaptor.lower() in ("none", NATIVE):
        flag = f"--adaptor {cfg.adaptor.lower()}"
        if not cfg.backbone:
            problems.append(f"backbone: {flag} evaluates a backbone's own features; name it with --backbone")
        if get_task(cfg.task).needs_text and not cfg.text_encoder:
            problems.append(f"text_encoder: {flag} with --task {cfg.task} needs --text-encoder")
    if problems:
        raise ConfigError(problems, "evaluate")


def _same_encoder(flag: str, given: str, trained: str | None) -> str:
    """A flag may restate the checkpoint's encoder (by any alias), not change it."""

    if not given:
        return trained or ""
    if trained and resolve_encoder_name(given).name != resolve_encoder_name(trained).name:
        raise CheckpointMismatchError(
            f"{flag} {given} differs from the checkpoint's encoder {trained}: an Adaptor only reads the "
            f"embeddings it was trained on. Drop {flag}, or pass --adaptor none to evaluate {given} alone.")
    return trained or given


def _encoders(cfg: EvalConfig, adaptor: FrozenAdaptor | None) -> tuple[str, str | None]:
    if adaptor is None:
        return cfg.backbone, cfg.text_encoder or None
    meta = adaptor.meta
    return (_same_encoder("--backbone", cfg.backbone, meta.get("backbone")),
            _same_encoder("--text-encoder", cfg.text_encoder, meta.get("text_encoder")))


def check_labels_current(cfg: EvalConfig, root: Path, ds, items, backbone: str, text: str | None) -> None:
    """Labels, masks and items come from the index `pipe embed` wrote: refuse a stale one."""

    hint = embed_command(cfg.dataset, backbone, text or "none", root)
    indexed = {i: r for i, r in zip(items.id, items.to_dict("records"))}
    for it in ds.items:
        row = indexed.get(it.id)
        if row is None:
            continue  # new (or failed) items are simply not evaluated
        for k, v in it.labels.items():
            old = row.get(f"label.{k}")
            if old is None or not (old == v or (np.isnan(old) and np.isnan(v))):
                raise CacheMissError(f"labels of {cfg.dataset!r} changed since it was embedded (item {it.id!r}, "
                                     f"label {k!r}). Re-index it (embeddings are reused):\n  {hint}")


@dataclass(frozen=True)
class Prepared:
    """A dataset and its cached pairs, opened and checked once by a caller that evaluates many
    checkpoints on them (a sweep's worker): :func:`prepare` makes one, ``run(cfg, prepared)`` reads it."""

    dataset: Any           # the materialised pipeline.datasets.Dataset
    data: PairData         # load_pairs(..., need_text=the task's needs_text)


def prepare(cfg: EvalConfig, backbone: str, text: str | None) -> Prepared:
    """Open the dataset and line up its cached pairs for ``cfg.task``, checking the index is current."""
    root = cache_root(cfg.cache)
    ds = open_dataset(cfg.dataset, root, materialise=False, skip_bad_rows=True)
    data = load_pairs(root, ds.name, cfg.dataset, backbone, text or "none", need_text=get_task(cfg.task).needs_text,
                      canonical=canonical_name)
    ds = open_dataset(cfg.dataset, root, skip_bad_rows=True)
    check_labels_current(cfg, root, ds, data.items, backbone, text)
    return Prepared(ds, data)


def _context(cfg: EvalConfig, prepared: Prepared | None = None) -> EvalContext:
    _require(cfg)
    root = cache_root(cfg.cache)
    device = resolve_device(cfg.device)
    is_native = cfg.adaptor.lower() == NATIVE
    adaptor = None if cfg.adaptor.lower() in ("none", NATIVE) else FrozenAdaptor.load(cfg.adaptor, device, root)
    backbone, text = _encoders(cfg, adaptor)
    need_text = get_task(cfg.task).needs_text
    if is_native:
        check_native_pair(backbone, text, need_text)
    prepared = prepared or prepare(cfg, backbone, text)
    ds, data, name = prepared.dataset, prepared.data, prepared.dataset.name
    if adaptor is not None:
        fps = data.fingerprints() if need_text else {"image": data.image.fingerprint}
        check_fingerprints(adaptor.meta, fps, f"checkpoint {adaptor.path}")
    out = Path(cfg.out) if cfg.out else default_out(cfg, name, adaptor, backbone)
    return EvalContext(cfg, root, device, data, name, adaptor, backbone, text, out, dataset_version=ds.version,
                       split_source=ds.split_source, published=ds.fractions, description=ds.description,
                       report_agreement=ds.report_agreement, native=is_native)


def default_out(cfg: EvalConfig, dataset: str, adaptor: FrozenAdaptor | None, backbone: str) -> Path:
    method = f"adaptor-{adaptor.hash[:8]}" if adaptor is not None else f"{cfg.adaptor.lower()}-{backbone}"
    return Path("results") / f"{cfg.task}-{dataset}-{method}-{time.strftime('%Y%m%d-%H%M%S')}"


# -------------------------------------------------------------------------------- run
def run(cfg: EvalConfig, prepared: Prepared | None = None) -> EvalResult:
    """Evaluate one checkpoint (or none); ``prepared``: the dataset and pairs, opened by :func:`prepare`
    once for many runs (a sweep's worker), else opened here."""
    t0 = time.perf_counter()
    err.print(threads.apply().line())
    ctx = _context(cfg, prepared)
    fresh = not ctx.out.exists()
    ctx.out.mkdir(parents=True, exist_ok=True)
    with owned_folder(ctx.out, "evaluate"):  # one evaluation writes a run folder at a time
        try:
            return _run_owned(cfg, ctx, t0)
        except BaseException:
            if fresh:
                release_empty_folder(ctx.out)  # a run refused for its input leaves no empty run directory behind
            raise


def _run_owned(cfg: EvalConfig, ctx: EvalContext, t0: float) -> EvalResult:
    what = (f"Adaptor {ctx.adaptor.hash[:16]} ({ctx.adaptor.mode.name} mode)" if ctx.adaptor else
            "the encoders' own joint space" if ctx.native else "no Adaptor")
    err.print(f"evaluating {escape(str(cfg.task))} on {escape(str(ctx.dataset_name))} ({len(ctx.data.items):,} cached items) · {escape(str(what))} · "
              f"backbone forwards: 0 · out {escape(str(ctx.out))}")
    result = get_task(cfg.task).run(ctx)
    save_config(cfg, ctx.out / "config.yaml")
    forwards = ctx.adaptor.log_forwards() if ctx.adaptor else None
    record = _record(ctx, result, forwards, time.perf_counter() - t0)
    _write(ctx.out, record)
    return EvalResult(ctx.out, record, result.tables)


def _checkpoint(ctx: EvalContext, forwards: str | None) -> CheckpointInfo | None:
    a = ctx.adaptor
    if a is None:
        return None
    return CheckpointInfo(str(a.path), a.hash, a.mode.name, a.meta.get("epoch"), a.meta.get("dataset"),
                          a.meta.get("fingerprints"), str(a.folder(ctx.data.image)), dict(a.forwards), forwards)


def _record(ctx: EvalContext, result: TaskResult, forwards: str | None, seconds: float) -> EvalRecord:
    fps = {"image": ctx.data.image.fingerprint}
    if get_task(ctx.cfg.task).needs_text:
        fps["text"] = ctx.data.text.fingerprint
    return EvalRecord(
        task=ctx.cfg.task, dataset=ctx.cfg.dataset, dataset_name=ctx.dataset_name, methods=result.methods,
        tables=result.tables, config=to_dict(ctx.cfg), config_hash=config_hash(ctx.cfg),
        checkpoint=_checkpoint(ctx, forwards), backbone=ctx.backbone, text_encoder=ctx.text_encoder,
        fingerprints=fps, dataset_version=ctx.dataset_version,
        split_source=ctx.split_source or "the reader's own splits", created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        data=result.data, plots=[os.path.relpath(p, ctx.out) for p in result.plots], notes=ctx.notes,
        files={k: os.path.relpath(p, ctx.out) for k, p in result.files.items()},
        data_card=DataCard.from_dict(data_card(ctx, get_task(ctx.cfg.task).needs_text)),
        provenance=Provenance.from_dict(provenance()), seconds=round(seconds, 2),
        peak_memory={k: round(v, 1) for k, v in peak_memory_mb(ctx.device).items()})


def _write(out: Path, record: EvalRecord) -> None:
    atomic_write_text(out / "results.json", json.dumps(plain(record.to_dict()), indent=1, allow_nan=True))
    atomic_write_text(out / "results.md", results_markdown(record))


def results_markdown(r: EvalRecord) -> str:
    ck = r.checkpoint
    lines = [f"# {r.task} · {r.dataset_name}", "",
             f"- dataset: `{r.dataset}` · release: {r.dataset_version or 'not known'} · splits: {r.split_source}",
             f"- backbone: {r.backbone}" + (f" · text encoder: {r.text_encoder}" if r.text_encoder else ""),
             f"- checkpoint: `{ck.path}` (hash {ck.hash[:16]}, {ck.mode} mode)" if ck else
             "- checkpoint: none (frozen backbone features)",
             "- cache fingerprints: " + ", ".join(f"{k} {v[:16]}" for k, v in r.fingerprints.items()),
             f"- items: {json.dumps(r.data.get('splits', {}))}", ""]
    if r.data.get("fractions"):
        lines += ["- training items per fraction and seed: " + json.dumps(r.data["fractions"]), ""]
    for t in r.tables:
        lines += [to_markdown(t), ""]
    if r.notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in r.notes] + [""]
    lines += [f"Plots: {', '.join(r.plots)}", ""]
    return "\n".join(lines)
