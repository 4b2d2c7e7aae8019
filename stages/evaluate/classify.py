"""Classification: heads on frozen image features, over label fractions and seeds.

Features are the frozen Adaptor's per-sample ``encode_image`` outputs (cached) or the
backbone's cached pooled outputs (``--adaptor none``). For every seed, nested stratified
subsets of the training split are drawn (fractions.py); for every fraction all heads
(kinds x learning rates) train in one pass, the validation split picks each kind's best
learning rate and epoch, and the test split is scored once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd
import torch

from cache.index import LABEL_PREFIX
from core.console import err, progress, escape
from core.errors import InputError
from pipeline.methods import Method
from pipeline.models.heads import HEADS, make_head, save_head
from pipeline.models.label_types import LABEL_TYPE_CHOICES, LABEL_TYPES, LabelType
from pipeline.records import MethodResult, prediction_key
from stages.evaluate import metrics as M
from stages.evaluate.context import FEATURE_SOURCES, EvalContext, TaskResult
from stages.evaluate.head_task import draw_subsets, fit_grid, summarise
from stages.evaluate.head_bank import FitSettings, Head, HeadBank, fit_probes, predict
from stages.evaluate.plots import roc_grid
from stages.evaluate.tables import (Table, add_row, fraction_columns, fraction_label, interval_note, make_table,
                                    summary_cell)

METRIC_TITLE = {"auroc": "AUROC", "macro_auroc": "macro AUROC", "accuracy": "accuracy", "macro_f1": "macro-F1",
                "ece": "expected calibration error, 15 bins, lower is better"}


class NoLabelsError(InputError):
    """A dataset without the labels a task needs."""


@dataclass
class Labels:
    kind: LabelType           # LABEL_TYPES: binary | multilabel | multiclass
    names: list[str]          # labels, or classes ("<label>=<value>") for multiclass
    y: np.ndarray             # [N, L]: 0/1 with NaN unknown; one-hot rows for multiclass
    keep: np.ndarray          # [N] bool: items with a usable label

    @property
    def type(self) -> str:
        return self.kind.name

    @property
    def primary(self) -> str:
        return self.kind.primary

    @property
    def need_negatives(self) -> bool:
        return self.kind.need_negatives


# ----------------------------------------------------------------------------- labels
def resolve_labels(items: pd.DataFrame, requested: list[str], label_type: str, dataset: str) -> Labels:
    have = [c[len(LABEL_PREFIX):] for c in items.columns if c.startswith(LABEL_PREFIX)]
    if not have:
        raise NoLabelsError(
            f"dataset {dataset!r} has no labels, so there is nothing to classify. Add numeric label columns to the "
            "pairs table (e.g. `effusion` with 0/1, empty where unknown; or one column of class indices 0..K-1) "
            "and re-run `pipe embed` on it to re-index (its embeddings are reused).")
    unknown = [n for n in requested if n not in have]
    if unknown:
        raise NoLabelsError(f"labels {unknown} are not in dataset {dataset!r}; it has: {', '.join(have)}. "
                            "Fix labels=[...].")
    names = list(requested) or _default_labels(items, have)
    values = items[[LABEL_PREFIX + n for n in names]].to_numpy(np.float64)
    kind = _label_type(values, names, label_type)
    if kind.exclusive:
        return _multiclass(values[:, 0], names[0], kind)
    return Labels(kind, names, values, ~np.isnan(values).all(1))  # an item with any known label


def _default_labels(items: pd.DataFrame, have: list[str]) -> list[str]:
    """Every 0/1 label (a multi-label task); else a lone multi-class label."""
    binary = [n for n in have if np.isin(items[LABEL_PREFIX + n].dropna().to_numpy(), (0.0, 1.0)).all()]
    if binary or len(have) > 1:
        return binary or have
    return have


def _label_type(values: np.ndarray, names: list[str], asked: str) -> LabelType:
    """The asked label type (LABEL_TYPE_CHOICES), checked against the values; auto picks by them."""
    known = values[~np.isnan(values)]
    binary = bool(np.isin(known, (0.0, 1.0)).all())
    wanted = LABEL_TYPE_CHOICES[asked]
    if (wanted.exclusive if wanted is not None else not binary):
        integer = bool(np.all(known == np.round(known)) and (known >= 0).all())
        if len(names) != 1 or not integer:
            raise NoLabelsError(
                f"labels {names} are not all 0/1. A multi-class label is ONE column of class indices 0..K-1 "
                "(choose it alone with labels=[NAME]); binary and multi-label tasks need 0/1 values.")
        return wanted or LABEL_TYPES["multiclass"]
    if not binary:
        raise NoLabelsError(f"label_type={asked} needs 0/1 labels, but {names} hold other values")
    return LABEL_TYPES["binary"] if len(names) == 1 else LABEL_TYPES["multilabel"]


def _multiclass(col: np.ndarray, name: str, kind: LabelType) -> Labels:
    keep = ~np.isnan(col)
    classes = np.unique(col[keep])
    y = np.zeros((len(col), len(classes)), np.float64)
    y[np.flatnonzero(keep), np.searchsorted(classes, col[keep])] = 1.0
    return Labels(kind, [f"{name}={c:g}" for c in classes], y, keep)


def check_train_split(labels: Labels, y_train: np.ndarray) -> None:
    for j, name in enumerate(labels.names):
        col = y_train[:, j][~np.isnan(y_train[:, j])]
        for value, what in ((1, "positive"), (0, "negative"))[: 2 if labels.need_negatives else 1]:
            if not np.any((col > 0.5) == bool(value)):
                raise NoLabelsError(f"label {name!r} has no {what} example in the training split, so no head can "
                                    "learn it. Leave it out with labels=[...] or fix the split column.")


# ---------------------------------------------------------------------------- metrics
def scores_from_logits(logits: np.ndarray, kind: LabelType) -> np.ndarray:
    return kind.scores(torch.from_numpy(logits)).numpy()


def _binary_metrics(names: list[str], y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> dict:
    return {"auroc": M.auroc(y[:, 0], p[:, 0], w), "ece": M.binary_ece(y, p, w)}


def _multilabel_metrics(names: list[str], y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> dict:
    macro, per = M.macro_auroc(y, p, w)
    return {"macro_auroc": macro, "ece": M.binary_ece(y, p, w),
            **{f"auroc/{n}": v if w is not None else float(v) for n, v in zip(names, per)}}


def _multiclass_metrics(names: list[str], y: np.ndarray, p: np.ndarray, w: np.ndarray | None) -> dict:
    true, pred = y.argmax(1), p.argmax(1)
    return {"accuracy": M.accuracy(true, pred, w), "macro_f1": M.macro_f1(true, pred, w),
            "ece": M.top_class_ece(y, p, w)}


# The metrics of each label type (pipeline.models.label_types.LABEL_TYPES), by its name.
METRICS: dict[str, Callable] = {"binary": _binary_metrics, "multilabel": _multilabel_metrics,
                                "multiclass": _multiclass_metrics}


def classification_metrics(labels: Labels, y: np.ndarray, p: np.ndarray, w: np.ndarray | None = None) -> dict:
    """The task's metrics: floats, or ``[B]`` arrays over bootstrap multiplicities ``w``."""
    return METRICS[labels.kind.name](labels.names, y, p, w)


# --------------------------------------------------------------------------- training
def train_heads(ctx: EvalContext, labels: Labels, x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray,
                y_va: np.ndarray, seed: int) -> tuple[dict[str, Head], dict]:
    """All heads (kinds x lrs, and probes x L2 strengths) on one training subset: the best per kind, and the sweep."""
    h, dev = ctx.cfg.heads, ctx.device
    torch.manual_seed(seed)
    stochastic = [kind for kind in h.kinds if not HEADS[kind].by_lbfgs]
    heads = [Head(kind, lr, make_head(kind, x_tr.shape[1], y_tr.shape[1], h.hidden, h.dropout).to(dev))
             for kind in stochastic for lr in h.lrs]
    xv, yv = torch.from_numpy(x_va).to(dev), torch.from_numpy(y_va).to(dev)
    loss = labels.kind.loss

    def score(module) -> tuple[float, float]:
        logits = predict(module, xv)
        val_loss = float(loss(torch.from_numpy(logits).to(dev), yv))
        return classification_metrics(labels, y_va, scores_from_logits(logits, labels.kind))[labels.primary], val_loss

    x, y, has_val = torch.from_numpy(x_tr).to(dev), torch.from_numpy(y_tr).to(dev), len(x_va) > 0
    best, sweep = {}, {}
    if heads:
        settings = FitSettings.of(h, h.epochs, h.batch_size, seed, h.min_steps, h.max_steps, h.val_every)
        bank = HeadBank(heads, loss, score, settings)
        best, sweep = bank.fit(x, y, has_val=has_val), bank.sweep()
    for kind in (k for k in h.kinds if HEADS[k].by_lbfgs):
        make = lambda: make_head(kind, x_tr.shape[1], y_tr.shape[1], h.hidden, h.dropout).to(dev)  # noqa: E731
        best[kind], probes = fit_probes(make, h.probe_l2s, x, y, loss, score, has_val)
        sweep.update(probes)
    return best, sweep


def evaluate_features(ctx: EvalContext, method: Method, features: str, x: np.ndarray, labels: Labels, pos: dict,
                      plan: dict, tick, keep: Callable | None = None) -> MethodResult:
    """Every (seed, fraction) for one feature set: per-run figures and their summaries.
    ``keep(seed, fraction, head, run)`` is shown every chosen head (to save some of them)."""
    y = labels.y.astype(np.float32)
    x_tr, y_tr = x[pos["train"]], y[pos["train"]]
    x_va, y_va, x_te, y_te = x[pos["valid"]], y[pos["valid"]], x[pos["test"]], y[pos["test"]]

    def fit(seed: int, f: float, sub: np.ndarray) -> dict[str, dict]:
        best, sweep = train_heads(ctx, labels, x_tr[sub], y_tr[sub], x_va, y_va, seed)
        out = {}
        for kind, head in best.items():
            p = scores_from_logits(predict(head.module, torch.from_numpy(x_te).to(ctx.device)), labels.kind)
            out[kind] = {
                "seed": seed, "n_train": int(len(sub)), **head.record(),
                "val_" + labels.primary: head.best_metric, "test": classification_metrics(labels, y_te, p),
                "sweep": {k: v for k, v in sweep.items() if k.startswith(kind + "@")},
                "scores": p}
            if keep is not None:
                keep(seed, f, head, out[kind])
        return out

    runs = fit_grid(ctx, plan, ctx.cfg.heads.kinds, fit, tick)

    def metrics(run: dict, w: np.ndarray) -> dict:
        return classification_metrics(labels, y_te, run["scores"], w)

    heads = {kind: {fraction_label(f): summarise(ctx, f, rs, len(y_te), metrics, skip_nan=True)
                    for f, rs in by_f.items()} for kind, by_f in runs.items()}
    return MethodResult(method, features, heads, {"feature_dim": int(x.shape[1])})


# ------------------------------------------------------------------------------- task
def run(ctx: EvalContext) -> TaskResult:
    labels = resolve_labels(ctx.data.items, ctx.cfg.classification.labels, ctx.cfg.classification.label_type, ctx.dataset_name)
    _label_note(ctx, labels)
    pos = ctx.positions(labels.keep)
    if not len(pos["train"]) or not len(pos["test"]):
        raise NoLabelsError(f"classification needs labelled items in the {ctx.cfg.train_split!r} and "
                            f"{ctx.cfg.test_split!r} splits; found {len(pos['train'])} and {len(pos['test'])}. "
                            "Check the split column (train/valid/test) or set train_split=/test_split=.")
    if not len(pos["valid"]):
        ctx.note(f"no labelled items in the {ctx.cfg.val_split!r} split: each head keeps its last epoch and the "
                 "first learning rate; nothing is selected on validation")
    y_train = labels.y[pos["train"]]
    check_train_split(labels, y_train)
    plan = draw_subsets(ctx, y_train, labels.names, pos["train"], labels.need_negatives)
    sets = ctx.feature_sets()
    methods, saved = [], []
    with progress() as bar:
        task = bar.add_task("train heads", total=len(sets) * len(ctx.seeds) * len(ctx.cfg.fractions))
        for method, kind in sets:
            x = ctx.pooled_features(kind, np.arange(len(ctx.data.items)))
            keep = _head_saver(ctx, labels, saved) if FEATURE_SOURCES[kind].from_adaptor else None
            methods.append(evaluate_features(ctx, method, kind, x, labels, pos, plan, lambda: bar.advance(task), keep))
    result = TaskResult(methods=methods, tables=_tables(ctx, labels, methods, len(pos["test"])))
    result.plots.append(str(_roc_plot(ctx, labels, methods, pos)))
    result.data = {**_data_summary(ctx, labels, pos, plan), "heads": saved}
    result.files["predictions"] = _save_predictions(ctx, labels, methods, pos)
    for m in methods:  # scores went to predictions.npz; results.json keeps the figures
        for by_f in m.heads.values():
            for cell in by_f.values():
                for r in cell.runs:
                    r.pop("scores")
    return result


def _head_saver(ctx: EvalContext, labels: Labels, saved: list[str]) -> Callable:
    """Keeps the heads that `pipe predict` and the trained-Adaptor API apply: per head kind, the
    first seed's head at the largest label fraction, on the Adaptor's features, in
    ``<run>/heads/adaptor-<kind>.safetensors`` (its metadata says what it reads and predicts)."""
    seed, fraction = ctx.seeds[0], max(ctx.cfg.fractions)
    h, a = ctx.cfg.heads, ctx.adaptor

    def keep(s: int, f: float, head, run: dict) -> None:
        if s != seed or f != fraction:
            return
        path = ctx.out / "heads" / f"adaptor-{head.kind}.safetensors"
        save_head(path, head.module, {
            "kind": head.kind, "in_dim": a.model.cfg.d_model, "n_out": len(labels.names), "hidden": h.hidden,
            "dropout": h.dropout, "labels": labels.names, "label_type": labels.type, "features": "adaptor",
            "adaptor_weights": a.weights_hash, "adaptor_checkpoint": str(a.path), "backbone": ctx.backbone,
            "image_fingerprint": ctx.data.image.fingerprint, "dataset": ctx.cfg.dataset, "fraction": f, "seed": s,
            "n_train": run["n_train"], head.param: head.lr, "test": run["test"]})
        saved.append(str(path.relative_to(ctx.out)))
        ctx.note(f"the {head.kind} head on the Adaptor's features ({fraction_label(f)} of the labels, seed {s}) "
                 f"is saved: `pipe predict --head {path}` applies it")
    return keep


def _label_note(ctx: EvalContext, labels: Labels) -> None:
    if ctx.cfg.classification.labels:
        return
    if labels.kind.exclusive:
        ctx.note(f"multi-class task on {labels.names[0].split('=')[0]!r} ({len(labels.names)} classes)")
        return
    msg = f"{labels.type} task over every 0/1 label: {', '.join(labels.names)} (choose with labels=[...])"
    others = [n for n in ctx.data.label_names if n not in labels.names]
    if others:
        msg += f"; left out as not 0/1: {', '.join(others)} (a multi-class label runs alone: labels=[NAME])"
    ctx.note(msg)


def _tables(ctx: EvalContext, labels: Labels, methods: list[MethodResult], n_test: int) -> list[Table]:
    keys, shared = labels.kind.table_keys(labels.names), len(labels.kind.table_keys([]))
    titles = [METRIC_TITLE[k] for k in keys[:shared]] + [f"AUROC · {n}" for n in labels.names][:len(keys) - shared]
    cols = fraction_columns(ctx.cfg.fractions)
    tables = []
    for key, title in zip(keys, titles):  # the label type's tables, then one per label (LabelType.table_keys)
        note = interval_note(ctx.cfg.ci, n_test, ctx.cfg.bootstrap, len(ctx.seeds), ctx.subsets_note,
                             centred=key in M.BIASED)
        t = make_table("classification", title, key, cols, note)
        for m in methods:
            for kind, by_f in m.heads.items():
                add_row(t, m.method.with_head(kind), {c.name: summary_cell(by_f[c.name].summary[key]) for c in cols})
        tables.append(t)
    return tables


def _roc_plot(ctx: EvalContext, labels: Labels, methods: list[MethodResult], pos: dict):
    """ROC curves on the test split, one panel per label: colour = fraction, line style = method
    (seed 0, the first head kind)."""
    y_te = labels.y[pos["test"]]
    kind = ctx.cfg.heads.kinds[0]
    curves: dict[str, list] = {}
    for j, name in enumerate(labels.names):
        for mi, m in enumerate(methods):
            for fi, (fl, cell) in enumerate(m.heads[kind].items()):
                p = cell.runs[0]["scores"][:, j]
                fpr, tpr = M.roc_curve(y_te[:, j], p)
                style = {"color": f"C{fi}", "linestyle": ("-", "--", ":")[mi % 3]}
                legend = f"{m.method.name} · {fl} ({M.auroc(y_te[:, j], p):.3f})"
                curves.setdefault(name, []).append((legend, fpr, tpr, style))
    title = f"ROC on {ctx.scored} · {ctx.dataset_name} · {kind} head, seed {ctx.seeds[0]} · legend: AUROC"
    return roc_grid(curves, ctx.out / "roc.png", title)


def _data_summary(ctx: EvalContext, labels: Labels, pos: dict, plan: dict) -> dict:
    prevalence = {s: {n: float(np.nanmean(labels.y[p, j])) if len(p) else None for j, n in enumerate(labels.names)}
                  for s, p in pos.items()}
    return {"label_type": labels.type, "labels": labels.names, "splits": {s: int(len(p)) for s, p in pos.items()},
            "prevalence": prevalence,
            "fractions": {fraction_label(f): {str(s): int(len(plan[s][f])) for s in plan} for f in ctx.cfg.fractions}}


def _save_predictions(ctx: EvalContext, labels: Labels, methods: list[MethodResult], pos: dict):
    """Test-set scores of every run, for analyses beyond the tables (and the report's ROC and
    reliability diagrams): :func:`pipeline.records.prediction_key` names method ``i``'s ``[n, L]`` scores
    of each head kind, fraction and seed."""
    arrays = {"ids": ctx.data.items.id.to_numpy()[pos["test"]].astype(str), "y": labels.y[pos["test"]],
              "label_names": np.array(labels.names)}
    for mi, m in enumerate(methods):
        for kind, by_f in m.heads.items():
            for cell in by_f.values():
                for r in cell.runs:
                    arrays[prediction_key(mi, kind, cell.fraction, r["seed"])] = r["scores"]
    path = ctx.out / "predictions.npz"
    np.savez_compressed(path, **{k: _small(v) for k, v in arrays.items()})
    err.print(f"test-set scores: {escape(str(path))}")
    return path


def _small(a: np.ndarray) -> np.ndarray:
    """Scores as float32: half the file, and far more precision than any figure shows."""
    return a.astype(np.float32) if a.dtype == np.float64 and a.ndim == 2 else a
