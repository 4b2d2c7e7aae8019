"""Stage two: train the Adaptor straight from the cache.

No encoder is built and no image is decoded: the loader reads cached arrays, and the
checkpoint records the fingerprints of the caches it was trained on.

Several GPUs (or CPU processes) train one Adaptor with DDP when launched by torchrun::

    torchrun --nproc-per-node 4 -m cli train-adaptor -d mimic-cxr:/data/mimic \
        -b dinov2-b -t bert --config configs/adaptor_paper.yaml batch_size=1024

- ``batch_size`` is the global batch: each of the N processes takes batch_size / N
  items of every step (it must divide evenly), cut from the same seeded epoch order, so
  a step sees the same items as a one-process run.
- The contrastive loss gathers every rank's image and text embeddings (with gradients),
  so each rank scores its rows against the whole global batch's negatives, as one
  process would (the authors' 2-GPU runs did not: docs/concepts/method.md, flaw 4). The loss and DDP's
  gradient averaging together give the gradient of the global-batch loss. Set
  ``gather_negatives=false`` to reproduce the authors' per-rank negatives, or, on one device,
  ``loss_groups=2``: the step's loss in two groups of their own pairs (the authors' 2 GPUs x
  1024, configs/paper/pretrain.yaml), which trains exactly as two ranks that do not gather.
- Rank 0 alone validates (on the whole split), writes metrics.csv, the curves, the
  config and the checkpoints; the others print nothing. Resume works as for one
  process: every rank loads the same checkpoint.
- Each process uses the GPU of its LOCAL_RANK (nccl), or the CPU (gloo) with
  ``--device cpu``. Multi-node: add ``--nnodes`` and ``--rdzv-endpoint`` as usual.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

import numpy as np
import torch
from rich.progress import Progress

from core.atomic import atomic_write_text
from core.locks import FolderBusyError, owned_folder
from cache.index import load_index
from cache.pairs import CacheMissError, PairData, embed_command, load_pairs
from cache.paths import cache_root
from pipeline.config import ConfigError, OneOf, Validated, config_hash, save_config, to_dict
from pipeline import threads
from core.console import err, escape, progress
from pipeline.datasets import open_dataset
from pipeline.devices import DEVICES, peak_memory_mb
from pipeline.encoders import canonical_name
from core.errors import InputError
from pipeline.models.adaptor import Adaptor, AdaptorConfig, trim_text_padding
from pipeline.models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from pipeline.models.loss import clip_loss, itm_loss, rerank_top_k, retrieval_recall_from_sim
from pipeline.models.ranking import batched_clip_loss, recall_both_ways, split_clip_loss
from pipeline.provenance import provenance
from stages.train import distributed
from stages.train.distributed import DistContext
from stages.train.loader import GpuBudget, PairLoader
from stages.train.metrics import MetricsLog
from stages.train.residency import RESIDENCIES
from stages.train.resume import resume_key
from stages.train.step import STEP_MODES, StepRunner, check_step_mode, optimizer_for, restore_step_settings

CHECKPOINT = "last.safetensors"
BEST = "best.safetensors"  # the epoch with the lowest validation loss (weights only)


@dataclass(frozen=True)
class OptimConfig(Validated):
    """AdamW and its schedule: linear warm-up, then linear decay to 0."""
    lr: float = 2e-5               # peak learning rate (the paper: 2e-5)
    weight_decay: float = 0.01     # AdamW's decoupled weight decay
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW's moment coefficients
    warmup_frac: float = 0.02      # linear warm-up over this share of all steps, then linear decay to 0
    # The authors counted the schedule in one GPU's 1024 while each step took 2 x 1024, so their
    # rate ends near half its peak, never at 0.
    schedule_batch: int = 0        # the schedule's length counted in steps of this many pairs (0: batch_size)
    epoch_end_step: bool = False   # one more schedule step at each epoch's end (Lightning's, on top of theirs)

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        return [(k, m) for k, ok, m in (
            ("lr", v["lr"] > 0, f"must be a positive learning rate, got {v['lr']}"),
            ("schedule_batch", v["schedule_batch"] >= 0, f"must be >= 0 (0: batch_size), got {v['schedule_batch']}"),
            ("weight_decay", v["weight_decay"] >= 0, f"must be >= 0, got {v['weight_decay']}"),
            ("betas", all(0 <= b < 1 for b in v["betas"]), f"must lie in [0, 1), got {list(v['betas'])}"),
            ("warmup_frac", 0 <= v["warmup_frac"] <= 1, f"must lie in [0, 1], got {v['warmup_frac']}"),
        ) if not ok]


@dataclass(frozen=True)
class TrainConfig(Validated):
    dataset: str = ""
    backbone: str = ""             # required (-b), here or in the preset
    text_encoder: str = ""         # required (-t), here or in the preset
    cache: str | None = None
    out: str | None = None
    adaptor: AdaptorConfig = AdaptorConfig()
    optim: OptimConfig = OptimConfig()
    batch_size: int = 1024         # the global batch: under torchrun each of N processes takes batch_size / N
    epochs: int = 50               # passes over the training split
    seed: int = 42                 # seeds the initialisation, the epoch order and dropout
    device: Annotated[str, OneOf(DEVICES)] = "auto"   # auto, cpu, cuda or cuda:N
    resident: Annotated[str, OneOf(RESIDENCIES)] = "auto"   # where the arrays are held (stages/train/residency.py)
    views: bool = True             # sample one cached view per image each epoch (when the cache has views)
    train_split: str = "train"     # the split trained on
    val_split: str = "valid"       # the split validated on (picks best.safetensors); absent: no validation
    val_batch_size: int = 1024     # items per validation forward
    checkpoint_every: int = 1      # epochs
    itm_weight: float = 1.0        # tokens mode: weight of the matching (ITM) loss beside the contrastive loss
    val_rerank_items: int = 256    # tokens mode: validation items whose top-k are re-ranked by the matching head
    rerank_k: int = 10             # tokens mode: candidates per query that the matching head re-ranks
    gather_negatives: bool = True  # DDP: score against every rank's embeddings (false: per-rank negatives, flaw 4)
    step: Annotated[str, OneOf(STEP_MODES)] = "eager"  # how a step runs (stages/train/step.py)
    # The authors' 2 GPUs x 1024 without gathering is batch_size=2048, loss_groups=2 (flaw 4, reproduced).
    loss_groups: int = 1           # the step's contrastive loss in this many groups, each scoring its own pairs
    monitor: Literal["val_loss", "val_loss_batch"] = "val_loss"  # what best.safetensors and patience watch
    patience: int = 0              # epochs without a better monitor (by min_delta) before stopping; 0: never
    min_delta: float = 0.0         # the monitor must improve by more than this to count as better

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        positive = ("batch_size", "epochs", "val_batch_size", "checkpoint_every", "val_rerank_items", "loss_groups")
        found = [(k, f"must be >= 1, got {v[k]}") for k in positive if v[k] < 1]
        if v["loss_groups"] >= 1 and v["batch_size"] % v["loss_groups"]:
            found.append(("loss_groups", f"must divide batch_size={v['batch_size']} evenly, got {v['loss_groups']}"))
        if v["patience"] < 0 or v["min_delta"] < 0:
            found.append(("patience", f"patience and min_delta must be >= 0, got {v['patience']}, {v['min_delta']}"))
        if v["itm_weight"] < 0:
            found.append(("itm_weight", f"must be >= 0, got {v['itm_weight']}"))
        if v["rerank_k"] < 0:
            found.append(("rerank_k", f"must be >= 0, got {v['rerank_k']}"))
        return found


@dataclass
class TrainResult:
    out: Path
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    resumed_from: int = 0
    backbone_forwards: int = 0     # always 0: stage two never runs an encoder
    rank: int = 0                  # under torchrun only rank 0 reports; history is empty elsewhere
    best: Path | None = None       # best.safetensors, chosen on validation loss (None without validation)
    stopped: int | None = None     # the epoch after which ``on_epoch`` stopped the run (None: it ran them all)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def default_out(cfg: TrainConfig, dataset_name: str) -> Path:
    return Path("runs") / f"adaptor-{dataset_name}-{cfg.backbone}-{cfg.text_encoder}-{cfg.adaptor.mode}"


def load_training_data(cfg: TrainConfig) -> PairData:
    """The cached pairs a config trains on (shared by every run of a sweep)."""

    _require(cfg)
    root = cache_root(cfg.cache)
    ds_name = open_dataset(cfg.dataset, root, materialise=False, skip_bad_rows=True).name
    data = load_pairs(root, ds_name, cfg.dataset, cfg.backbone, cfg.text_encoder, canonical=canonical_name)
    check_no_new_items(open_dataset(cfg.dataset, root, skip_bad_rows=True), data, cfg)
    return data


EpochHook = Callable[[dict], bool]
"""Shown each epoch's row (rank 0, after it is logged and checkpointed); True stops the run there."""


def run(cfg: TrainConfig, data: PairData | None = None, on_epoch: EpochHook | None = None) -> TrainResult:
    """Train one Adaptor; under torchrun, this process's share of a DDP run.

    ``data``: the cached pairs, already loaded (a sweep loads them once for all its runs).
    ``on_epoch(row)``: called after every epoch with its metrics row; returning True stops
    the run after that epoch (its checkpoint is written; ``TrainResult.stopped`` says so)."""
    with distributed.session(cfg.device) as ctx:
        plan = threads.apply(processes=ctx.local_world_size)
        if ctx.is_main:
            err.print(plan.line())
        with distributed.main_first(ctx):  # reading a dataset may write to the cache: one rank at a time
            data = data or load_training_data(cfg)
            ds_name = None if cfg.out else open_dataset(cfg.dataset, cache_root(cfg.cache), materialise=False,
                                                        skip_bad_rows=True).name
        cfg = _with_dims(cfg, data)
        train_pos, val_pos = _split_positions(cfg, data, ctx.is_main)
        out = Path(cfg.out) if cfg.out else default_out(cfg, ds_name)
        out.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as owner:
            refused = None
            if ctx.is_main:  # rank 0 owns the run folder for the whole run; a second run is refused
                try:
                    owner.enter_context(owned_folder(out, "train-adaptor"))
                except FolderBusyError as e:
                    refused = e
            if distributed.any_rank(refused is not None, ctx):
                raise refused or FolderBusyError(f"{out} is in use by another run (rank 0 was refused)")
            return Trainer(cfg, data, ctx, out, train_pos, val_pos, on_epoch).fit()


def _split_positions(cfg: TrainConfig, data: PairData, say: bool) -> tuple[np.ndarray, np.ndarray]:
    """The training and validation items; a split name the dataset lacks is an error that lists its splits."""
    names = sorted({str(s) for s in data.items["split"].dropna()})
    if cfg.train_split not in names:
        raise InputError(f"train_split={cfg.train_split!r} is not a split of {cfg.dataset!r}; its cached items are "
                         f"in: {', '.join(names) or 'no split at all'}. Set train_split=... (and val_split=...).")
    train_pos, val_pos = data.split(cfg.train_split), data.split(cfg.val_split)
    if len(train_pos) < 2:
        raise InputError(f"split {cfg.train_split!r} has {len(train_pos)} cached pairs; contrastive training "
                         f"needs at least 2. Check the dataset's split column or set train_split=...")
    if len(val_pos) < 2 and say:
        err.print(f"[yellow]note:[/] no validation: split {escape(repr(cfg.val_split))} has {len(val_pos)} cached "
                  f"pair(s) (the dataset's splits: {escape(', '.join(names))}); set val_split=... to validate.")
    return train_pos, val_pos


def global_batch(requested: int, n_items: int, world: int) -> int:
    """The global batch: ``batch_size``, cut to the split's size, split evenly over the ranks."""
    if requested % world:
        nearest = max(world, requested - requested % world)
        raise InputError(f"batch_size={requested} is the global batch and must divide evenly over the {world} "
                         f"processes; use a multiple of {world}, e.g. batch_size={nearest}")
    bs = min(requested, n_items)
    bs -= bs % world
    if bs < world:
        raise InputError(f"the training split has {n_items} pairs, fewer than the {world} processes; "
                         "launch fewer processes")
    return bs


def check_no_new_items(ds, data: PairData, cfg: TrainConfig) -> None:
    """Refuse to train on a cache that predates rows added to the dataset since."""

    known = set(load_index(cache_root(cfg.cache), ds.name).table.id)
    new = [it.id for it in ds.items if it.id not in known]
    if new:
        hint = embed_command(cfg.dataset, cfg.backbone, cfg.text_encoder, cache_root(cfg.cache))
        raise CacheMissError(f"{len(new)} item(s) of {cfg.dataset!r} are not in the cache (e.g. item {new[0]!r}): "
                             f"the dataset grew since it was embedded. Run:\n  {hint}")


def _require(cfg: TrainConfig) -> None:
    missing = [k for k in ("dataset", "backbone", "text_encoder") if not getattr(cfg, k)]
    if missing:
        raise ConfigError([f"{k}: a value is required (--{k.replace('_', '-')})" for k in missing], "train-adaptor")


def _with_dims(cfg: TrainConfig, data: PairData) -> TrainConfig:
    """The Adaptor's input widths are the cached encoders' widths."""
    di = data.image.layout("pooled").row_shape[0]
    dt = data.text.layout("pooled").row_shape[0]
    return dataclasses.replace(cfg, adaptor=dataclasses.replace(cfg.adaptor, image_dim=di, text_dim=dt))


def schedule_steps(cfg: TrainConfig, n_train: int, steps_per_epoch: int) -> tuple[int, int]:
    """(the schedule's length, its steps per epoch): one per optimiser step (and one more at each
    epoch's end with ``optim.epoch_end_step``), the length counted in ``optim.schedule_batch`` pairs."""
    per_epoch = steps_per_epoch + int(cfg.optim.epoch_end_step)
    if not cfg.optim.schedule_batch:
        return per_epoch * cfg.epochs, per_epoch
    return math.ceil(n_train / cfg.optim.schedule_batch) * cfg.epochs, per_epoch


def lr_lambda(total_steps: int, warmup_frac: float):
    warm = max(1, round(total_steps * warmup_frac))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total_steps - step) / max(1, total_steps - warm))
    return f


class Trainer:
    def __init__(self, cfg: TrainConfig, data: PairData, ctx: DistContext, out: Path,
                 train_pos: np.ndarray, val_pos: np.ndarray, on_epoch: EpochHook | None = None):
        self.cfg, self.data, self.ctx, self.device, self.out = cfg, data, ctx, ctx.device, out
        self.on_epoch, self.stopped = on_epoch, None
        torch.manual_seed(cfg.seed)
        self.net = Adaptor(cfg.adaptor).to(self.device)      # what checkpoints hold
        self.model = distributed.wrap_model(self.net, ctx)   # what trains (DDP under torchrun)
        self.grid, self.n_prefix = data.image_grid
        bs = global_batch(cfg.batch_size, len(train_pos), ctx.world_size)
        if cfg.loss_groups % ctx.world_size and cfg.loss_groups > 1:
            raise InputError(f"loss_groups={cfg.loss_groups} must be a multiple of the {ctx.world_size} processes "
                             "(each process scores whole groups of its own pairs)")
        budget = GpuBudget(self.device)  # one for both loaders: training keeps the rest of the card
        self.train = PairLoader(data, train_pos, self.net.mode, bs, self.device, cfg.resident, cfg.views,
                                seed=cfg.seed, drop_last=True, rank=ctx.rank, world=ctx.world_size,
                                ram_copies=ctx.local_world_size, gpu_budget=budget)
        self.val = (PairLoader(data, val_pos, self.net.mode, cfg.val_batch_size, self.device, cfg.resident,
                               views=False, gpu_budget=budget) if len(val_pos) > 1 and ctx.is_main else None)
        check_step_mode(cfg.step, self.device, ddp=ctx.enabled)
        if self.net.has_match_head and cfg.itm_weight <= 0:
            raise InputError(f"itm_weight={cfg.itm_weight} would leave the matching head untrained; to train "
                             "tokens mode on the contrastive loss alone, set adaptor.fusion_layers=0 as well")
        self.opt = optimizer_for(self.net.parameters(), cfg.step, self.device, lr=cfg.optim.lr,
                                 weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
        self.steps_per_epoch = len(self.train)
        total, self.sched_per_epoch = schedule_steps(cfg, len(train_pos), self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lr_lambda(total, cfg.optim.warmup_frac))
        self.sched.base_lrs = [float(lr) for lr in self.sched.base_lrs]  # rates filled in place: no device sync
        self.runner = StepRunner(self._loss, self.opt, cfg.step, self.device)
        self.log = None
        self.best_val = float("inf")
        self.stale = 0                 # epochs since the monitor last improved by min_delta (patience)
        self.watch = float("inf")      # the monitor's best value by that rule

    def say(self, message: str) -> None:
        if self.ctx.is_main:
            err.print(message)

    # -- bookkeeping ---------------------------------------------------------------------
    def meta(self, epoch: int) -> dict:
        return {"kind": "adaptor", "config": to_dict(self.cfg), "config_hash": config_hash(self._resume_key()),
                "fingerprints": self.data.fingerprints(), "epoch": epoch, "backbone": self.cfg.backbone,
                "text_encoder": self.cfg.text_encoder, "image_grid": self.grid, "n_prefix": self.n_prefix,
                "dataset": self.cfg.dataset, "world_size": self.ctx.world_size, "train_pairs": len(self.train.positions),
                "steps_per_epoch": self.steps_per_epoch, "stale": self.stale,
                "watch": self.watch, "stopped_early": bool(self.cfg.patience and self.stale >= self.cfg.patience),
                "cache_root": str(cache_root(self.cfg.cache))}  # where its dataset's reports are (report banks)

    def _resume_key(self) -> dict:
        """What must match for a run to continue another (stages/train/resume.py)."""
        return resume_key(to_dict(self.cfg))

    def _maybe_resume(self) -> int:
        ckpt = self.out / CHECKPOINT
        if not ckpt.exists():
            return 0
        meta = read_meta(ckpt)
        if meta.get("config_hash") != config_hash(self._resume_key()):
            raise InputError(f"{self.out} holds a run with a different config; pass another --out, or delete "
                             f"{ckpt} to start over")
        if meta.get("fingerprints") != self.data.fingerprints():
            raise InputError(f"{ckpt} was trained on other caches ({meta.get('fingerprints')}); "
                             "pass another --out to train on these")
        load_checkpoint(ckpt, self.net, self.opt)  # every rank loads the same state
        restore_step_settings(self.opt, self.cfg.step, self.device)
        epoch = int(meta["epoch"])
        self.sched.last_epoch = epoch * self.sched_per_epoch - 1
        with warnings.catch_warnings():  # stepping before any optimizer step is the point here
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.sched.step()
        if (self.out / BEST).exists():
            best = read_meta(self.out / BEST)
            self.best_val = float(best.get(self.cfg.monitor, best.get("val_loss", float("inf"))))
        self.stale, self.watch = int(meta.get("stale", 0)), float(meta.get("watch", float("inf")))
        self.say(f"resuming {self.out} after epoch {epoch}")
        return epoch

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        cfg, main = self.cfg, self.ctx.is_main
        start = self._maybe_resume()  # first: a refused run (another config, other caches) writes nothing
        if main:
            save_config(cfg, self.out / "config.yaml")
            atomic_write_text(self.out / "provenance.json", json.dumps(provenance(), indent=1))
        distributed.barrier(self.ctx)  # all ranks have read the checkpoint before rank 0 may replace it
        self.log = MetricsLog(self.out, resume=start > 0) if main else None
        if main:
            self.log.truncate(start)
        self.say(self._banner())
        with (progress() if main else Progress(disable=True)) as bar:
            task = bar.add_task("train-adaptor", total=cfg.epochs * self.steps_per_epoch,
                                completed=start * self.steps_per_epoch)
            for epoch in range(start + 1, cfg.epochs + 1):
                if self.patience_spent:  # a resumed run that had already stopped early
                    break
                row = self._epoch(epoch, lambda: bar.advance(task))
                if main:
                    self.log.log(row)
                    err.print(_epoch_line(row))
                    self._keep_if_best(row)
                self._count_patience(row)
                stop = distributed.any_rank(main and self._stop_after(row), self.ctx)
                if stop or self.patience_spent or epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
                    self._save(epoch)
                if stop:
                    self.stopped = epoch
                    self.say(f"stopped after epoch {epoch} (asked by the caller)")
                    break
            if self.patience_spent:
                self.say(f"stopped early: {cfg.monitor} did not improve by more than {cfg.min_delta:g} in "
                         f"{cfg.patience} epoch(s)")
        if not main:
            return TrainResult(self.out, self.out / CHECKPOINT, [], start, rank=self.ctx.rank, stopped=self.stopped)
        self.log.plot(self.out / "curves.png", f"Adaptor · {cfg.backbone} + {cfg.text_encoder} · {cfg.adaptor.mode}")
        best = self.out / BEST if (self.out / BEST).exists() else None
        return TrainResult(self.out, self.out / CHECKPOINT, self.log.rows, start, best=best, stopped=self.stopped)

    def _stop_after(self, row: dict) -> bool:
        return bool(self.on_epoch is not None and self.on_epoch(row))

    def _banner(self) -> str:
        n_params = sum(p.numel() for p in self.net.parameters() if p.requires_grad)
        world = self.ctx.world_size
        ranks = (f" = {self.train.local_batch} per rank × {world} ranks, negatives "
                 f"{'gathered across ranks' if self.cfg.gather_negatives else 'per rank only (flaw 4)'}"
                 if world > 1 else "")
        return (f"training the Adaptor ({self.cfg.adaptor.mode} mode, {n_params:,} trainable parameters) "
                f"on {len(self.train.positions):,} pairs · world size {world} · effective global batch "
                f"{self.train.batch_size}{ranks} ({self.steps_per_epoch} steps/epoch) · data {self.train.residency} "
                f"({self.train.nbytes() / 2**20:,.1f} MiB) · backbone forwards: 0")

    @property
    def patience_spent(self) -> bool:
        """Early stopping: ``patience`` epochs have passed without a better monitor."""
        return bool(self.cfg.patience) and self.stale >= self.cfg.patience

    def _count_patience(self, row: dict) -> None:
        """Early stopping as Lightning's: the monitor must beat its best by more than ``min_delta``.
        Rank 0 validates; every rank learns the verdict, so all stop at the same epoch."""
        if not self.cfg.patience:
            return
        val = row.get(self.cfg.monitor) if self.ctx.is_main else None
        better = val is not None and math.isfinite(val) and val < self.watch - self.cfg.min_delta
        if distributed.any_rank(better, self.ctx):
            self.watch, self.stale = (val if val is not None else self.watch), 0
        elif distributed.any_rank(val is not None, self.ctx):
            self.stale += 1

    def _keep_if_best(self, row: dict) -> None:
        """best.safetensors: the weights of the epoch with the lowest validation loss so far (the
        whole split's, or with ``monitor=val_loss_batch`` the mean of loss-group-sized blocks')."""
        val = row.get(self.cfg.monitor)
        if val is None or not math.isfinite(val) or val >= self.best_val:
            return
        self.best_val = val
        save_checkpoint(self.out / BEST, self.net, {**self.meta(row["epoch"]), "val_loss": row.get("val_loss"),
                                                     self.cfg.monitor: val, "chosen_on": self.cfg.monitor})

    def _save(self, epoch: int) -> None:
        """Rank 0 writes the unwrapped model; the others wait so that no rank runs ahead of it."""
        if self.ctx.is_main:
            save_checkpoint(self.out / CHECKPOINT, self.net, self.meta(epoch), self.opt)
        distributed.barrier(self.ctx)

    def _epoch(self, epoch: int, tick) -> dict:
        self.model.train()
        # dropout: a resumed epoch replays exactly; each rank draws its own masks
        torch.manual_seed(self.cfg.seed * 100003 + epoch + self.ctx.rank * 1_000_003)
        t0, steps, self.train.wait_seconds = time.perf_counter(), 0, 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # cuda:N: its own statistics, not device 0's
        for batch in self.train.batches(epoch):
            self.runner(batch)
            self.sched.step()
            steps += 1
            tick()
        if self.cfg.optim.epoch_end_step:
            self.sched.step()
        loss = self.runner.take_mean_loss()  # the one device sync of the epoch
        seconds = time.perf_counter() - t0
        train_loss = distributed.mean_over_ranks(loss, self.ctx)  # = the global-batch loss
        row = {"epoch": epoch, "train_loss": train_loss, "lr": float(self.sched.get_last_lr()[0]),
               "logit_scale": float(self.net.scale().detach()), "epoch_seconds": round(seconds, 3),
               "data_wait_share": round(self.train.wait_seconds / max(seconds, 1e-9), 4),
               "samples_per_s": round(steps * self.train.batch_size / seconds, 1),
               **{k: round(v, 1) for k, v in peak_memory_mb(self.device).items()}}
        row.update(self.validate())
        return row

    @property
    def matching(self) -> bool:
        """Tokens mode with a matching head: the ITM loss trains it beside the contrastive loss."""
        return self.net.has_match_head

    def _loss(self, batch: dict) -> torch.Tensor:
        """The training loss of one batch (the step runner adds backward and the update).

        Both modes: CLIP InfoNCE on the embeddings ``forward`` returns; in tokens mode these
        are the unimodal embeddings (neither has seen the other modality), so in-batch
        negatives are honest and are gathered across ranks. Tokens mode adds the matching
        loss on each pair and two hard negatives drawn from this rank's similarities."""
        fwd = dict(image_grid=self.grid, n_prefix=self.n_prefix)
        if self.matching:
            img, txt, match = self.model(batch, match=True, **fwd)
        else:
            img, txt = self.model(batch, **fwd)
        # Gathered, each rank's loss is scaled so that DDP's gradient averaging yields the
        # gradient of the global-batch loss (see clip_loss); on one process it is the plain loss.
        loss = self._contrastive(img, txt)
        if self.matching:
            loss = loss + self.cfg.itm_weight * itm_loss(match)
        return loss

    def _contrastive(self, img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
        """One loss over the batch (negatives gathered across ranks), or, with ``loss_groups`` > 1, the
        mean of each group's own loss: the authors' two GPUs, each scoring its 1024 pairs alone."""
        w = self.cfg.adaptor.text_to_image_weight
        groups = self.cfg.loss_groups // self.ctx.world_size
        if self.cfg.loss_groups == 1:
            return clip_loss(img, txt, self.net.scale(), w, gather=self.cfg.gather_negatives)
        parts = zip(img.tensor_split(groups), txt.tensor_split(groups))
        return torch.stack([clip_loss(i, t, self.net.scale(), w) for i, t in parts]).mean()

    @torch.no_grad()
    def validate(self) -> dict:
        """Whole-split metrics, on rank 0 alone (the unwrapped model: no collectives)."""
        if self.val is None:
            return {}
        self.net.eval()
        imgs, txts = [], []
        for batch in self.val.batches(None):
            i, t = self.net(_trimmed(batch), image_grid=self.grid, n_prefix=self.n_prefix)
            imgs.append(i)
            txts.append(t)
        img, txt = torch.cat(imgs).float(), torch.cat(txts).float()
        t2i = self.cfg.adaptor.text_to_image_weight
        weights, scale = (1.0 - t2i, t2i), self.net.scale()  # (image→text, text→image)
        # in blocks of rows: memory grows with the split, never with its square
        out = {"val_loss": split_clip_loss(img, txt, scale, weights),
               "val_loss_batch": batched_clip_loss(img, txt, scale, weights,
                                                   self.train.batch_size // self.cfg.loss_groups)}
        for k, v in recall_both_ways(img, txt).items():
            out["val_" + k.replace("R@", "r@")] = round(float(v), 4)
        if self.matching and self.cfg.val_rerank_items > 1:
            out.update(self._validate_rerank())
        return out

    def _validate_rerank(self) -> dict:
        """Tokens mode: recall after the matching head re-ranks each query's top ``rerank_k``
        candidates, on the first ``val_rerank_items`` validation items."""
        n_max, parts = self.cfg.val_rerank_items, []
        for batch in self.val.batches(None):
            parts.append(batch)
            if sum(len(p["index"]) for p in parts) >= n_max:
                break
        val = _trimmed({k: torch.cat([p[k] for p in parts])[:n_max] for k in ("image_tokens", "text_tokens", "text_mask")})
        img_tok = self.net.image_token_states(val["image_tokens"], self.grid, self.n_prefix)
        keep = val["text_mask"].to(torch.bool)
        txt_tok = self.net.text_token_states(val["text_tokens"], keep)
        sim = self.net.embedding(img_tok).float() @ self.net.embedding(txt_tok, keep).float().T

        def score(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.net.match_pairs(img_tok, txt_tok, keep, i, t, chunk=512)

        i2t, t2i = rerank_top_k(sim, score, self.cfg.rerank_k)
        out = {"val_rerank_items": int(sim.shape[0])}
        for k, v in retrieval_recall_from_sim(i2t, t2i=t2i).items():
            out["val_itm_" + k.replace("R@", "r@")] = round(float(v), 4)
        return out


def _trimmed(batch: dict) -> dict:
    """A validation batch with its report tokens cut to its longest report
    (:func:`~pipeline.models.adaptor.trim_text_padding`: in eval mode, the same outputs)."""
    if "text_mask" not in batch:
        return batch
    text, keep = trim_text_padding(batch["text_tokens"], batch["text_mask"].to(torch.bool))
    return {**batch, "text_tokens": text, "text_mask": keep}


def _epoch_line(r: dict) -> str:
    batch = f"{r['val_loss_batch']:.4f} in batches, " if "val_loss_batch" in r else ""
    val = (f" · val loss {batch}{r['val_loss']:.4f} whole split · i2t R@1/5/10 {r['val_i2t_r@1']:.3f}/{r['val_i2t_r@5']:.3f}/"
           f"{r['val_i2t_r@10']:.3f}" if "val_loss" in r else "")
    mem = f" · peak {r.get('gpu_peak_mb', r['cpu_peak_mb']):,.0f} MiB"
    return (f"epoch {r['epoch']:>3} · loss {r['train_loss']:.4f}{val} · {r['epoch_seconds']:.2f} s"
            f" · data wait {100 * r['data_wait_share']:.1f}%{mem}")
