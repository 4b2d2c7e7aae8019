"""Several heads trained in one pass over the data, as dinov2's linear evaluation does.

Every batch goes to every head (e.g. one per learning rate and head kind); each head has
its own AdamW and its own cosine schedule with warm restarts. Every head is scored on the
validation split ``epochs`` times; a head keeps the weights of its best validation and
stops after ``patience`` validations without improvement. Per head kind, the learning
rate whose best validation score is highest wins.

Small label fractions have few batches per epoch, so a run trains for at least
``min_steps`` optimiser steps (more epochs, validated every few epochs): a 1% head is then
limited by its labels, not by having taken 50 steps.

The ``probe`` head is fitted another way (:func:`fit_probes`): a linear probe on
standardised features, solved full-batch by L-BFGS for each L2 strength of a small grid,
the validation split choosing the strength, as CLIP's linear-probe evaluation does. Its
cost is a few hundred passes over the features whatever the split's size, where the
stochastic heads take up to ``max_steps`` minibatch steps.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn


@dataclass
class Head:
    kind: str
    lr: float
    module: nn.Module
    opt: torch.optim.Optimizer | None = None
    sched: object = None
    best_key: tuple = (-math.inf, -math.inf)
    best_state: dict | None = None
    best_epoch: int = 0
    best_metric: float = float("nan")
    stale: int = 0
    watch: float = -math.inf       # the best validation metric by the patience rule (min_delta)
    steps: int = 0
    best_steps: int = 0
    param: str = "lr"              # what ``lr`` holds: the learning rate, or a probe's L2 strength ("l2")

    @property
    def name(self) -> str:
        return f"{self.kind}@{self.param}={self.lr:g}"

    @property
    def active(self) -> bool:
        return self.opt is not None

    def record(self) -> dict:
        """What a results file keeps of the chosen head."""
        return {self.param: self.lr, "best_epoch": self.best_epoch, "steps": self.best_steps}


@dataclass(frozen=True)
class HeadSchedule:
    """How a head's learning rate moves: a cosine with warm restarts, stepped after every
    optimiser step or once per epoch, with its period counted one way or another."""

    name: str
    per_epoch: bool                # stepped once per epoch (else after every optimiser step)
    eta_min: float
    period: Callable[["FitSettings", int, int], int]   # (settings, n items, validate every k steps) -> T_0
    summary: str


def _restart_period(s: "FitSettings", n: int, every: int) -> int:
    return s.restart_epochs * every


def _authors_period(s: "FitSettings", n: int, every: int) -> int:
    """The authors' T_0, in epochs: ``restart_frac`` of the run's length counted in one GPU's steps
    (ceil(n / (batch / replicas)) x epochs), or ``restart_epochs`` epochs without a fraction."""
    if not s.restart_frac:
        return s.restart_epochs
    return int(s.restart_frac * math.ceil(n / max(1, s.batch_size // s.replicas)) * s.epochs)


HEAD_SCHEDULES = {k.name: k for k in (
    HeadSchedule("restarts", False, 0.0, _restart_period,
                 "cosine with warm restarts every restart_epochs validations, stepped per optimiser step"),
    HeadSchedule("epoch-restarts", True, 1e-8, _authors_period,
                 "the authors' (Lightning's default interval): CosineAnnealingWarmRestarts(eta_min 1e-8) stepped once "
                 "per epoch, T_0 = restart_frac x the run's steps (one GPU's), or restart_epochs epochs"),
)}


@dataclass(frozen=True)
class FitSettings:
    epochs: int
    batch_size: int
    weight_decay: float
    patience: int
    restart_epochs: int
    seed: int
    min_steps: int = 0
    max_steps: int = 0             # 0: no cap
    schedule_name: str = "restarts"  # a key of HEAD_SCHEDULES
    restart_frac: float = 0.0
    replicas: int = 1              # the authors' GPUs: their T_0 counts one GPU's steps
    min_delta: float = 0.0         # patience: a validation must beat the best by more than this
    val_every: int = 0             # validate every k epochs of ``epochs`` (0: ``epochs`` validations)

    @classmethod
    def of(cls, heads, epochs: int, batch_size: int, seed: int, min_steps: int, max_steps: int,
           val_every: int = 0) -> "FitSettings":
        """The settings from a HeadsConfig (``heads``) and the task's own length and batch."""
        return cls(epochs, batch_size, heads.weight_decay, heads.patience, heads.restart_epochs, seed, min_steps,
                   max_steps, heads.schedule, heads.restart_frac, heads.replicas, heads.min_delta, val_every)

    def schedule(self, n: int) -> tuple[int, int, int]:
        """(steps per epoch, epochs, validate every k epochs) for n training items."""
        steps = max(1, n // self.batch_size + (n % self.batch_size > 1))
        if self.val_every:
            return steps, self.epochs, self.val_every
        epochs = max(self.epochs, math.ceil(self.min_steps / steps))
        return steps, epochs, math.ceil(epochs / self.epochs)

    def plan(self, n: int) -> tuple[int, int, int]:
        """(optimiser steps, validate every k steps, steps per epoch) for n training items.

        Without a cap: ``epochs`` validations, each after whole epochs (at least
        ``min_steps`` steps in all). A large split would take ``epochs`` full passes (13k
        steps for 35k items at batch 128); ``max_steps`` caps the steps, and the
        ``epochs`` validations are then spread over them, each after ``max_steps /
        epochs`` steps of a stream of shuffled epochs.
        """
        steps, epochs, every = self.schedule(n)
        total = steps * epochs
        if self.max_steps and total > max(self.max_steps, self.min_steps):
            total = max(self.max_steps, self.min_steps)
            return total, max(1, total // self.epochs), steps
        return total, steps * every, steps


class Rows:
    """Some rows of a tensor, picked by an index, without copying them.

    A head trains on ``rows[batch]`` (a tensor: only the batch is gathered); slices, index
    lists and tensors all index the chosen rows, and :meth:`subset` narrows them further.
    Segmentation's token grids and masks are the largest arrays evaluation holds: with
    views, every split and label fraction reads the one copy instead of its own.
    """

    def __init__(self, base: Tensor, index=None):
        self.base = base
        n = len(base)
        self.index = torch.arange(n, device=base.device) if index is None else \
            torch.as_tensor(np.asarray(index), dtype=torch.long).to(base.device)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.base.shape[1:])

    def __getitem__(self, key) -> Tensor:
        if isinstance(key, Tensor):
            key = key.to(self.index.device)
        elif not isinstance(key, (slice, int)):
            key = torch.as_tensor(np.asarray(key), dtype=torch.long, device=self.index.device)
        return self.base[self.index[key]]

    def subset(self, positions) -> "Rows":
        return Rows(self.base, self.index[torch.as_tensor(np.asarray(positions), dtype=torch.long)
                                          .to(self.index.device)])


def iter_predict(module: nn.Module, x: Tensor, batch: int = 512) -> Iterator[tuple[slice, Tensor]]:
    """Eval-mode outputs batch by batch: (the rows, the output)."""
    module.eval()
    with torch.no_grad():
        for s in range(0, len(x), batch):
            yield slice(s, s + batch), module(x[s:s + batch].float())


def predict(module: nn.Module, x: Tensor, batch: int = 512) -> np.ndarray:
    return np.concatenate([o.float().cpu().numpy() for _, o in iter_predict(module, x, batch)])


class HeadBank:
    """Heads of several kinds and learning rates fed the same batches."""

    def __init__(self, heads: list[Head], loss: Callable[[Tensor, Tensor], Tensor],
                 score: Callable[[nn.Module], tuple[float, float]], settings: FitSettings):
        self.heads, self.loss, self.score, self.s = heads, loss, score, settings

    def fit(self, x: Tensor, y: Tensor, has_val: bool,
            draw: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None) -> dict[str, Head]:
        """Train every head on ``x``/``y`` and keep each one's best validation; ``draw(idx)``, where
        given, makes a batch of those rows instead (segmentation's augmented views)."""
        s = self.s
        total, every, per_epoch = s.plan(len(x))
        kind = HEAD_SCHEDULES[s.schedule_name]
        period = max(1, kind.period(s, len(x), every))
        for h in self.heads:
            h.opt = torch.optim.AdamW(h.module.parameters(), lr=h.lr, weight_decay=s.weight_decay)
            h.sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(h.opt, T_0=period, eta_min=kind.eta_min)
        gen = torch.Generator().manual_seed(s.seed)
        batches = self._stream(len(x), gen)
        for step in range(1, total + 1):
            idx = next(batches)
            xb, yb = (x[idx].float(), y[idx]) if draw is None else draw(idx)
            for h in self.heads:
                if h.active:
                    self._step(h, xb, yb, not kind.per_epoch or step % per_epoch == 0)
                    h.steps += 1
            if step % every == 0 or (step == total and not s.val_every):
                self._validate(math.ceil(step / per_epoch), has_val)
                if not any(h.active for h in self.heads):
                    break
        return self._select()

    def _stream(self, n: int, gen: torch.Generator) -> Iterator[Tensor]:
        """Batches of one shuffled epoch after another."""
        while True:
            yield from self._batches(n, gen)

    def _batches(self, n: int, gen: torch.Generator) -> list[Tensor]:
        order = torch.randperm(n, generator=gen)
        out = list(order.split(self.s.batch_size))
        if n > 1 and len(out[-1]) == 1:  # BatchNorm cannot train on a single sample
            out = out[:-1]
        return out

    def _step(self, h: Head, xb: Tensor, yb: Tensor, schedule: bool = True) -> None:
        h.module.train()
        loss = self.loss(h.module(xb), yb)
        h.opt.zero_grad(set_to_none=True)
        loss.backward()
        h.opt.step()
        if schedule:
            h.sched.step()

    def _validate(self, epoch: int, has_val: bool) -> None:
        for h in self.heads:
            if not h.active:
                continue
            metric, val_loss = self.score(h.module) if has_val else (float("nan"), float("nan"))
            key = (metric if np.isfinite(metric) else -math.inf, -val_loss if np.isfinite(val_loss) else -math.inf)
            # patience counts from the last validation that beat the best by more than min_delta (as
            # Lightning's EarlyStopping); the kept weights are the best validation's, however small its gain
            progress = key > h.best_key if not self.s.min_delta else key[0] > h.watch + self.s.min_delta
            if not has_val or key > h.best_key:
                h.best_key, h.best_epoch, h.best_metric, h.best_steps = key, epoch, metric, h.steps
                h.best_state = copy.deepcopy(h.module.state_dict())
            if not has_val or progress:
                h.watch, h.stale = max(h.watch, key[0]), 0
            else:
                h.stale += 1
                if h.stale >= self.s.patience:
                    h.opt = None  # stopped early: its best epoch is kept

    def sweep(self) -> dict[str, dict]:
        """Every head's best validation score and epoch: the record of the learning-rate sweep."""
        return {h.name: {"val": h.best_metric, "epoch": h.best_epoch} for h in self.heads}

    def _select(self) -> dict[str, Head]:
        best: dict[str, Head] = {}
        for h in self.heads:
            h.opt = h.sched = None
            if h.best_state is not None:
                h.module.load_state_dict(h.best_state)
            if h.kind not in best or h.best_key > best[h.kind].best_key:
                best[h.kind] = h
        for h in best.values():
            h.module.eval()
        return best


# --------------------------------------------------------------------------- the L-BFGS probe
PROBE_ITERATIONS = 300   # L-BFGS iterations at most per L2 strength (each a full pass or a few)


def _standardise(module: nn.Module, x: Tensor) -> Tensor:
    """Set the probe's BatchNorm (no affine) to the features' mean and variance; the standardised x."""
    bn = module[0]
    mean, var = x.mean(0), x.var(0, unbiased=False)
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    return (x - mean) / torch.sqrt(var + bn.eps)


def _lbfgs(linear: nn.Linear, z: Tensor, y: Tensor, loss: Callable, l2: float, iterations: int) -> int:
    """Minimise loss + l2·|W|² over the whole set; returns the function evaluations used."""
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iterations, history_size=20,
                            tolerance_grad=1e-6, tolerance_change=1e-9, line_search_fn="strong_wolfe")
    evaluations = 0

    def closure():
        nonlocal evaluations
        evaluations += 1
        opt.zero_grad(set_to_none=True)
        value = loss(linear(z), y) + l2 * linear.weight.pow(2).sum()
        value.backward()
        return value

    opt.step(closure)
    return evaluations


def fit_probes(make: Callable[[], nn.Module], l2s: list[float], x: Tensor, y: Tensor, loss: Callable,
               score: Callable[[nn.Module], tuple[float, float]], has_val: bool,
               iterations: int = PROBE_ITERATIONS) -> tuple[Head, dict[str, dict]]:
    """One probe per L2 strength, each solved by L-BFGS; the best on validation, and the sweep.

    Without a validation split the first strength of ``l2s`` is kept.
    """
    best: Head | None = None
    sweep = {}
    for l2 in l2s:
        module = make()
        with torch.no_grad():
            z = _standardise(module, x.float())
        module.train()
        used = _lbfgs(module[1], z, y, loss, l2, iterations)
        module.eval()
        metric, val_loss = score(module) if has_val else (float("nan"), float("nan"))
        key = (metric if np.isfinite(metric) else -math.inf, -val_loss if np.isfinite(val_loss) else -math.inf)
        head = Head("probe", l2, module, best_key=key, best_epoch=1, best_metric=metric, steps=used,
                    best_steps=used, param="l2")
        sweep[head.name] = {"val": metric, "epoch": 1}
        if best is None or (has_val and key > best.best_key):
            best = head
    return best, sweep
