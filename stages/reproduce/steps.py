"""The steps that reproduce a table, in order, each with its command, state and cost.

embed (one per dataset and encoder) -> pretrain (one Adaptor per row) -> evaluate (one per
cell). A step knows whether it is done from what is on disk, so a re-run skips finished
steps: an embedding the dataset's index records, a checkpoint at its last epoch (a
checkpoint before it resumes there), a cell whose results.json has this cell's config and
checkpoint. An evaluation cut short is run again from the start; its Adaptor outputs are
cached, so only its heads train again.
"""
from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cache.index import index_folder, read_stores, resolve_store
from cache.store import Store
from pipeline.config import config_hash, load_config, to_dict
from pipeline.datasets import READERS, open_dataset
from pipeline.datasets.shared_splits import SOURCES
from pipeline.datasets.spec import parse_dataset_spec, with_option
from pipeline.encoders import resolve_encoder_name
from pipeline.encoders.stored import STORED_DTYPES
from pipeline.encoders.remote import FLAG, runs_remote_code
from core.errors import InputError
from pipeline.models.checkpoint import checkpoint_hash, read_meta
from pipeline.records import load_results
from stages import embed, evaluate
from stages import train as train_adaptor
from stages.evaluate.features import resolve_checkpoint
from stages.train.resume import differences
from stages.reproduce.spec import DATASETS, Cell, Row, Substitutions, TableSpec

# Throughput measured here (README, "Benchmarks"; 2-core x86_64 CPU), the basis of --plan's times:
EMBED_DINOV2S_PER_S = 13.2     # bench/embed_overhead.py: `pipe embed`, DINOv2-S-sized ViT, 13.0-13.4 img/s
EMBED_TINY_PER_S = 365.0       # same run, tiny-vit on 1,000 PNGs: 361-372 img/s
TRAIN_POOLED_PER_S = 360.0     # bench/cached_vs_e2e.py: cached pooled step, DINOv2-S + BERT sized, 325-399 samples/s
# Other encoders are scaled from the DINOv2-S rate by their forward cost per item, which each encoder's
# config carries (``card.gflops``; an assumption about speed, not a measurement of it).
RATE_BASIS = "dinov2-s"


def embed_rate(encoder: str, modality: str | None = None) -> float | None:
    """Items per second `pipe embed` of ``encoder`` manages on the 2-core CPU the basis was measured on:
    scaled by cost from DINOv2-S's, and never above tiny-vit's, where decoding and overhead bound the rate."""
    enc, basis = resolve_encoder_name(encoder, modality), resolve_encoder_name(RATE_BASIS)
    if not enc.card.gflops:
        return None
    return min(EMBED_TINY_PER_S, EMBED_DINOV2S_PER_S * basis.card.gflops / enc.card.gflops)
CHECKPOINT_BYTES = 16 * 12_207_617   # weights, best weights and AdamW's two moments, float32


@dataclass
class Step:
    id: str
    kind: str                       # embed | pretrain | evaluate
    command: str                    # the `pipe` command that does the same
    status: str                     # done, to run, resume after epoch k, run again (why), needs ...
    done: bool
    run: Callable[[], Any] | None   # None when it cannot run here (its data is not given)
    out: Path | None = None
    seconds: float | None = None    # estimate, from the throughput above
    disk: int = 0                   # bytes it adds
    stores: list[str] = field(default_factory=list)
    cell: Cell | None = None
    row: Row | None = None          # the row a pretraining step trains

    def summary(self) -> dict:
        return {"id": self.id, "kind": self.kind, "command": self.command, "status": self.status, "done": self.done,
                "out": str(self.out) if self.out else None, "seconds": self.seconds, "disk_bytes": self.disk,
                "stores": self.stores}


@dataclass
class Context:
    """A table spec with everything the user gave: where each dataset is, the split sources, overrides."""

    spec: TableSpec
    root: Path                      # the cache
    out: Path
    data: dict[str, str]            # dataset key -> reader spec, split source applied
    device: str = "auto"
    cache_arg: str | None = None
    substitute: Substitutions = field(default_factory=Substitutions)
    pretrain_overrides: list[str] = field(default_factory=list)
    eval_overrides: list[str] = field(default_factory=list)
    only: list[str] = field(default_factory=list)

    def selected(self, step_id: str) -> bool:
        """``--only`` names steps by id or id prefix ending at a ``/`` or ``+``: a cell, a row's cells
        (``dinov2-b+bert``), an image encoder's rows (``dinov2-b``), a pretraining, an embedding."""
        return not self.only or any(step_id == o or step_id.startswith((o.rstrip("/+") + "/", o.rstrip("/+") + "+"))
                                    for o in self.only)

    def image(self, encoder: str) -> str:
        """The image encoder that runs for the paper's ``encoder`` (substituted, in the table's variant)."""
        return self.substitute.image(encoder, self.spec.variant)

    def common(self) -> list[str]:
        return [f"device={json.dumps(self.device)}"] + ([f"cache={json.dumps(self.cache_arg)}"] if self.cache_arg
                                                       else [])


def dataset_specs(spec: TableSpec, data: dict[str, str], splits: dict[str, str]) -> dict[str, str]:
    """Reader specs for the table's datasets: a folder becomes ``<reader>:<folder>``; a split source
    given for every dataset (key ``*``) applies where that source has files for the reader; a table
    may read another of the source's splits for a dataset (``split_sources``: RSNA segmentation
    reads MGCA's detection split where ``--splits mgca`` is given)."""
    out = {}
    for key in spec.datasets:
        if key not in data:
            continue
        reader = DATASETS[key].reader
        text = data[key] if parse_dataset_spec(data[key], READERS) is not None else f"{reader}:{data[key]}"
        source = splits.get(key) or splits.get("*")
        if source:
            name, colon, folder = source.partition(":")
            source = spec.split_sources.get(key, {}).get(name, name) + colon + folder
        if source and (key in splits or reader in SOURCES.get(source.partition(":")[0], {})):
            text = with_option(text, "splits", source, READERS)
        out[key] = text
    return out


def _cmd(*parts: str) -> str:
    return " ".join(shlex.quote(p) if not p.startswith("--") else p for p in parts)


# ------------------------------------------------------------------------------ embed
def embed_steps(ctx: Context) -> list[Step]:
    """One per dataset, modality and encoder: images of every dataset, reports of the pre-training data."""
    wanted: dict[tuple[str, str, str], None] = {}
    for key in ctx.spec.datasets:
        for modality in ("image", "text"):
            for row in ctx.spec.rows:
                name = row.image if modality == "image" else row.text
                if name and (modality == "image" or key == ctx.spec.pretrain_data):
                    wanted[(key, modality, ctx.image(name) if modality == "image" else ctx.substitute(name))] = None
    return [_embed_step(ctx, key, modality, encoder) for key, modality, encoder in wanted]


def _embed_step(ctx: Context, key: str, modality: str, encoder: str) -> Step:
    step_id = f"embed/{key}/{modality}/{encoder}"
    spec = ctx.data.get(key)
    b, t = (encoder, "none") if modality == "image" else ("none", encoder)
    views = ctx.spec.views if modality == "image" else 0
    enc = resolve_encoder_name(encoder, modality)
    cmd = _cmd("pipe", "embed", "--dataset", spec or f"<{key}>", "--backbone", b, "--text-encoder", t,
               "--allow-failures", *(["--views", str(views)] if views else []),
               *(["--cache", ctx.cache_arg] if ctx.cache_arg else []),
               *([FLAG] if runs_remote_code(enc) else []))
    folder = index_folder(ctx.root, open_dataset(spec, ctx.root, materialise=False).name) if spec else None
    store = _recorded_store(folder, modality, enc.name) if folder else None
    items = _items(folder, key) * (1 + views)
    rate = embed_rate(enc.name, modality)   # a -pad variant carries its base's cost card
    done = store is not None and (not views or Store.open(store).views() >= views)
    cfg = embed.EmbedConfig(dataset=spec or "", backbone=b, text_encoder=t, cache=ctx.cache_arg, device=ctx.device,
                            allow_failures=True, views=views)
    status = "done" if done else ("to run" if spec else f"needs --data {key}=FOLDER")
    return Step(step_id, "embed", cmd, status, done, (lambda: embed.run(cfg)) if spec else None,
                seconds=None if done or not rate else items / rate, disk=0 if done else items * row_bytes(enc),
                stores=[f"reuse {store}" if done else f"create stores/{modality}/{enc.name}-<fingerprint>"])


def _recorded_store(folder: Path, modality: str, encoder: str) -> Path | None:
    entry = read_stores(folder).get(modality, {}).get(encoder) if folder.is_dir() else None
    store = resolve_store(folder, entry["store"]) if entry else None
    return store if store is not None and store.is_dir() else None


def _items(folder: Path | None, key: str) -> int:
    """Items of a dataset: its index's count once embedded, else its published size (approximate)."""
    meta = folder / "dataset.json" if folder is not None else None
    return int(json.loads(meta.read_text())["items"]) if meta and meta.is_file() else DATASETS[key].approx_items


def row_bytes(enc) -> int:
    """Bytes one item takes in a store: its tokens and pooled vector (and a report's length, and an
    encoder with a joint space its projected vector), in the dtypes stage one stores
    (pipeline/encoders/stored.py:STORED_DTYPES)."""
    size = {k: dtype.itemsize for k, dtype in STORED_DTYPES.items()}
    native = enc.native_dim * size["native"]
    if enc.modality == "text":
        return ((enc.max_tokens or 512) * enc.embed_dim * size["tokens"] + enc.embed_dim * size["pooled"]
                + size["length"] + native)
    side = (enc.input_size // enc.patch_size) if enc.patch_size else 3   # resnet-ae: a 3x3 bottleneck
    tokens = enc.num_prefix_tokens + side * side
    return tokens * enc.embed_dim * size["tokens"] + enc.embed_dim * size["pooled"] + native


# --------------------------------------------------------------------------- pretrain
def pretrain_config(ctx: Context, row: Row):
    return load_config(train_adaptor.TrainConfig, ctx.spec.pretrain_preset, [
        *ctx.pretrain_overrides, f"dataset={json.dumps(ctx.data.get(ctx.spec.pretrain_data, ''))}",
        f"backbone={json.dumps(ctx.image(row.image))}", f"text_encoder={json.dumps(ctx.substitute(row.text))}",
        f"out={json.dumps(str(pretrain_dir(ctx, row)))}", *ctx.common()])


def pretrain_dir(ctx: Context, row: Row) -> Path:
    return ctx.out / "pretrain" / row.id


def pretrain_step(ctx: Context, row: Row) -> Step:
    step_id = f"pretrain/{row.id}"
    key = ctx.spec.pretrain_data
    cfg = pretrain_config(ctx, row)
    out = pretrain_dir(ctx, row)
    cmd = _cmd("pipe", "train-adaptor", "--dataset", cfg.dataset or f"<{key}>", "--backbone", cfg.backbone,
               "--text-encoder", cfg.text_encoder, "--config", ctx.spec.pretrain_preset,
               "--out", str(out), *ctx.pretrain_overrides)
    items = _items(index_folder(ctx.root, open_dataset(cfg.dataset, ctx.root, materialise=False).name)
                   if key in ctx.data else None, key)
    seconds = cfg.epochs * items / TRAIN_POOLED_PER_S
    state, done = _checkpoint_state(out, cfg)
    runnable = key in ctx.data and not state.startswith("conflict")
    return Step(step_id, "pretrain", cmd, state if key in ctx.data else f"needs --data {key}=FOLDER", done,
                (lambda: train_adaptor.run(cfg)) if runnable else None, out=out, seconds=None if done else seconds,
                disk=0 if done else CHECKPOINT_BYTES, row=row)


def _checkpoint_state(out: Path, cfg) -> tuple[str, bool]:
    last = out / "last.safetensors"
    if not last.is_file():
        return "to run", False
    meta = read_meta(last)
    changed = differences(meta.get("config", {}), to_dict(cfg))   # the trainer's own rule (stages/train/resume.py)
    if changed:
        return (f"conflict: {out} holds an Adaptor trained with another config ({', '.join(changed)} differ); "
                "delete it, or pass another --out"), False
    epoch = int(meta.get("epoch", 0))
    if meta.get("stopped_early"):
        return f"done (stopped early after epoch {epoch})", True
    return ("done", True) if epoch >= cfg.epochs else (f"resume after epoch {epoch} of {cfg.epochs}", False)


# --------------------------------------------------------------------------- evaluate
def cell_dir(ctx: Context, cell: Cell) -> Path:
    return ctx.out / "cells" / cell.id.replace("%", "")


def eval_config(ctx: Context, cell: Cell, column_overrides: dict[str, list[str]]):
    """The cell's evaluation: its column's recipe, the user's overrides, then what makes it this cell."""
    adaptor = "none" if cell.baseline else str(pretrain_dir(ctx, cell.row))
    return load_config(evaluate.EvalConfig, cell.column.preset, [
        *ctx.eval_overrides, *column_overrides.get(cell.column.data, []),
        f"dataset={json.dumps(ctx.data.get(cell.column.data, ''))}", f"adaptor={json.dumps(adaptor)}",
        f"backbone={json.dumps(ctx.image(cell.row.image))}", f"fractions=[{cell.fraction}]",
        f"out={json.dumps(str(cell_dir(ctx, cell)))}", *ctx.common()])


def eval_step(ctx: Context, cell: Cell, column_overrides: dict[str, list[str]]) -> Step:
    cfg = eval_config(ctx, cell, column_overrides)
    out = cell_dir(ctx, cell)
    cmd = _cmd("pipe", "evaluate", "--task", cfg.task, "--dataset", cfg.dataset or f"<{cell.column.data}>",
               "--adaptor", cfg.adaptor, "--backbone", cfg.backbone, "--fraction", f"{cell.fraction:g}",
               "--config", cell.column.preset, "--out", str(out),
               *ctx.eval_overrides, *column_overrides.get(cell.column.data, []))
    if cell.column.data not in ctx.data:
        return Step(cell.id, "evaluate", cmd, f"needs --data {cell.column.data}=FOLDER", False, None, out, cell=cell)
    status, done = _cell_state(out, cfg)

    def run():
        if out.exists():  # a cell cut short, or one whose config or Adaptor changed: start it again
            shutil.rmtree(out)
        return evaluate.run(cfg)
    return Step(cell.id, "evaluate", cmd, status, done, run, out, cell=cell)


def _cell_state(out: Path, cfg) -> tuple[str, bool]:
    if not (out / "results.json").is_file():
        return ("run again (it was cut short)" if out.is_dir() and any(out.iterdir()) else "to run"), False
    try:
        r = load_results(out)
    except InputError:
        return "run again (its results.json is unreadable)", False
    if r.config_hash != config_hash(cfg):
        return "run again (its config changed)", False
    if r.checkpoint is not None:
        try:
            current = checkpoint_hash(resolve_checkpoint(cfg.adaptor))
        except InputError:
            current = None
        if current != r.checkpoint.hash:
            return "run again (its Adaptor was trained again)", False
    return "done", True


# ------------------------------------------------------------------------------- all
def column_overrides(ctx: Context) -> dict[str, list[str]]:
    """Per dataset, what its release asks of the recipe: COVIDx's label (3 classes in v5 and the
    "A" releases such as COVIDx9A, the authors'; COVID-19 or not in the binary releases), and a
    release that must be known."""
    out: dict[str, list[str]] = {}
    if "covidx" in ctx.data and any(c.data == "covidx" for c in ctx.spec.columns):
        ds = open_dataset(ctx.data["covidx"], ctx.root)
        if ds.version is None:
            theirs = ctx.spec.releases.get("covidx", "v9A")
            raise InputError(f"{ctx.data['covidx']}: the folder's files do not say which COVIDx release it holds "
                             f"(the authors' code read COVIDx{theirs}, BenchX's lists are CXR-4); state it: --data "
                             f"'covidx=FOLDER?version={theirs}'")
        binary = any(it.labels.get("label") != it.labels.get("label") for it in ds.items)  # NaN: a binary release
        if binary:
            out["covidx"] = ["classification.labels=[covid]"]
    return out


def build_steps(ctx: Context) -> list[Step]:
    """Every step of the table, in run order, limited to what ``ctx.only`` selects (with what it needs)."""
    overrides = column_overrides(ctx)
    steps = embed_steps(ctx)
    cells = ctx.spec.cells()
    for row in ctx.spec.rows if ctx.spec.adaptor else ():
        steps.append(pretrain_step(ctx, row))
        steps += [eval_step(ctx, c, overrides) for c in cells if c.row == row and not c.baseline]
    steps += [eval_step(ctx, c, overrides) for c in cells if c.baseline]
    if not ctx.only:
        return steps
    chosen = {s.id for s in steps if ctx.selected(s.id)}
    for s in steps:  # cells come after the pretraining they need: one pass collects every dependency
        if s.id in chosen and s.cell is not None and not s.cell.baseline:
            chosen.add(f"pretrain/{s.cell.row.id}")
    for s in steps:
        if s.id in chosen:
            chosen |= set(_needs(ctx, s))
    return [s for s in steps if s.id in chosen]


def _needs(ctx: Context, step: Step) -> list[str]:
    """The embeddings a cell or a pretraining reads."""
    if step.cell is not None:
        return [f"embed/{step.cell.column.data}/image/{ctx.image(step.cell.row.image)}"]
    if step.row is not None:
        key = ctx.spec.pretrain_data
        return [f"embed/{key}/image/{ctx.image(step.row.image)}", f"embed/{key}/text/{ctx.substitute(step.row.text)}"]
    return []
