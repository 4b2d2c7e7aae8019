"""The skeleton that every head task (classification, segmentation) shares.

A head task trains small heads on frozen features over label fractions and seeds:

1. :func:`draw_subsets`: the nested, stratified training subsets of every seed and
   fraction (:mod:`stages.evaluate.fractions`), checked before anything trains, and saved.
2. :func:`fit_grid`: for every seed and fraction, the task's ``fit`` trains its heads on
   that subset and returns one run record per head kind.
3. :func:`summarise`: per head kind and fraction, the mean and std over seeds and a
   bootstrap CI of the seed-averaged metric on the test set (a :class:`~pipeline.records.HeadCell`).

A task supplies what differs: its targets, its heads, its metrics and its tables.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from pipeline.records import HeadCell
from pipeline.tables import Figure
from stages.evaluate import metrics as M
from stages.evaluate.context import EvalContext
from stages.evaluate.fractions import plan_subsets

Plan = dict[int, dict[float, np.ndarray]]   # {seed: {fraction: row indices into the training targets}}


def draw_subsets(ctx: EvalContext, y_train: np.ndarray, names: list[str], train_positions: np.ndarray,
                 need_negatives: bool = True, whole: bool = False) -> Plan:
    """Every seed's training subset of every fraction (published ones where the dataset has
    them), each checked to hold what its targets need; their item ids go to subsets.json (100%
    too with ``whole``: training items that were themselves chosen, e.g. balanced)."""
    plan = plan_subsets(y_train, names, ctx.cfg.fractions, ctx.seeds, need_negatives,
                        ctx.fixed_subsets(train_positions))
    ctx.save_subsets(plan, train_positions, whole)
    return plan


def fit_grid(ctx: EvalContext, plan: Plan, kinds: list[str],
             fit: Callable[[int, float, np.ndarray], dict[str, dict]], tick: Callable[[], None]
             ) -> dict[str, dict[float, list[dict]]]:
    """``{kind: {fraction: [run per seed]}}``: ``fit(seed, fraction, subset)`` returns one run
    record per head kind; ``tick`` is called after each (seed, fraction)."""
    runs: dict[str, dict[float, list[dict]]] = {k: {f: [] for f in ctx.cfg.fractions} for k in kinds}
    for seed in ctx.seeds:
        for f, sub in plan[seed].items():
            for kind, run in fit(seed, f, sub).items():
                runs[kind][f].append(run)
            tick()
    return runs


def summarise(ctx: EvalContext, fraction: float, rs: list[dict], n_test: int,
              metrics: Callable[[dict, np.ndarray], dict], skip_nan: bool) -> HeadCell:
    """Mean and std over the seeds' runs ``rs`` of every metric in their ``test`` records, and a
    bootstrap CI of the seed-averaged metric on the ``n_test`` test items, where
    ``metrics(run, w)`` gives a run's metrics as ``[B]`` arrays over bootstrap multiplicities ``w``.
    ``skip_nan``: a run whose metric is undefined (NaN) is left out of the mean and std."""
    keys = list(rs[0]["test"])
    seeds = tuple(int(r["seed"]) for r in rs)
    spread = {k: _spread(np.array([r["test"][k] for r in rs], dtype=np.float64), skip_nan) for k in keys}

    def seed_mean(w: np.ndarray) -> dict[str, np.ndarray]:
        per = [metrics(r, w) for r in rs]
        return {k: np.mean([m[k] for m in per], axis=0) for k in keys}

    cis = M.bootstrap_cis(seed_mean, n_test, ctx.cfg.bootstrap, ctx.cfg.seed, ctx.cfg.ci)
    summary = {k: Figure(mean, std, tuple(cis[k]) if k in cis else None, len(rs), seeds)
               for k, (mean, std) in spread.items()}
    return HeadCell(fraction, summary, rs)


def _spread(v: np.ndarray, skip_nan: bool) -> tuple[float, float]:
    if skip_nan:
        return (float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                float(np.nanstd(v, ddof=1)) if np.isfinite(v).sum() > 1 else 0.0)
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
