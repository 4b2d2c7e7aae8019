"""Evaluation metrics in numpy, written out so their conventions are explicit.

* AUROC is the Mann-Whitney statistic with tied scores counting one half (the same as
  the average-rank formula). It is NaN when the labels hold only one class.
* Dice and IoU start from per-image overlap counts (intersection, predicted and true
  pixels) collected over the whole test set; every summary is a mean of per-image
  scores, never a mean of per-batch means. The three Dice conventions of
  docs/concepts/method.md (flaw 3) are separate functions.
* Bootstrap. A resample of n test items is a row of multiplicities ``w`` (how often each
  item was drawn). Every metric here accepts ``w`` of shape ``[B, n]`` and then returns
  its ``B`` resampled values at once; without ``w`` it returns the plain estimate (all
  multiplicities 1). ``bootstrap_cis`` draws the rows from a seeded generator, so a CI
  is reproducible. Metrics whose resampled values are biased (``BIASED``: the ECE) get
  the percentile interval re-centred on their estimate; see :func:`bootstrap_cis`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

CHUNK = 100  # resamples drawn and scored together (bounds memory at CHUNK x n)
# Metrics whose value on a resample is biased against their value on the data, so that the plain
# percentile interval can miss its own estimate (see bootstrap_cis). ECE is biased upward: a
# resample repeats items, which adds noise to each bin's observed frequency, and noise only ever
# widens the absolute gap |confidence - frequency|.
BIASED = ("ece",)
LOWER_IS_BETTER = ("ece",)   # metrics where a smaller figure is better (the rest: larger)


def _weights(w: np.ndarray | None, n: int) -> tuple[np.ndarray, bool]:
    if w is None:
        return np.ones((1, n)), True
    return np.asarray(w, dtype=np.float64), False


def _out(values: np.ndarray, single: bool):
    return float(values[0]) if single else values


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.full(np.shape(num), np.nan), where=den > 0)


# ----------------------------------------------------------------------------- AUROC
def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x``; tied values share the mean of the ranks they span."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    sx = x[order]
    starts = np.flatnonzero(np.r_[True, sx[1:] != sx[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def auroc(y_true: np.ndarray, score: np.ndarray, w: np.ndarray | None = None):
    """Area under the ROC curve: P(score of a positive > score of a negative), ties 1/2.

    NaN labels are ignored; NaN where only one class remains.
    """
    y, s = np.asarray(y_true, dtype=np.float64), np.asarray(score, dtype=np.float64)
    w, single = _weights(w, len(y))
    known = ~np.isnan(y)
    y, s, w = y[known] > 0.5, s[known], w[:, known]
    order = np.argsort(s, kind="mergesort")
    y, s, w = y[order], s[order], w[:, order]
    if not len(s):
        return _out(np.full(len(w), np.nan), single)
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])  # tie blocks, ascending score
    pos = np.add.reduceat(w * y, starts, axis=1)           # [B, blocks] positive weight per block
    neg = np.add.reduceat(w * ~y, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg                    # negatives scoring strictly lower
    num = (pos * (below + 0.5 * neg)).sum(1)
    return _out(_ratio(num, pos.sum(1) * neg.sum(1)), single)


def macro_auroc(y_true: np.ndarray, scores: np.ndarray, w: np.ndarray | None = None):
    """(mean AUROC over the columns where it is defined, per-column AUROCs)."""
    per = np.array([np.atleast_1d(auroc(y_true[:, j], scores[:, j], w)) for j in range(y_true.shape[1])])
    defined = np.isfinite(per)
    mean = _ratio(np.where(defined, per, 0).sum(0), defined.sum(0).astype(float))
    return (_out(mean, w is None), per[:, 0] if w is None else per)


def calibration_error(correct: np.ndarray, confidence: np.ndarray, w: np.ndarray | None = None, bins: int = 15):
    """Expected calibration error: over equal-width confidence bins, the mass-weighted gap
    between mean confidence and observed frequency, ``sum_b |conf_b - freq_b| * n_b / n``.

    ``correct`` is 1 where the predicted event happened (a positive label for a binary
    probability; the true class for a top-class confidence). NaN entries are ignored.
    """
    y, c = np.asarray(correct, dtype=np.float64), np.asarray(confidence, dtype=np.float64)
    w, single = _weights(w, len(y))
    known = ~np.isnan(y)
    y, c, w = y[known], c[known], w[:, known]
    onehot = np.eye(bins)[np.clip((c * bins).astype(int), 0, bins - 1)]  # [n, bins]
    mass, conf, freq = w @ onehot, (w * c) @ onehot, (w * y) @ onehot     # [B, bins]
    return _out(_ratio(np.abs(conf - freq).sum(1), mass.sum(1)), single)


def binary_ece(y_true: np.ndarray, prob: np.ndarray, w: np.ndarray | None = None):
    """ECE of P(positive): the mean over the label columns (a multi-label task's average)."""
    y, p = np.atleast_2d(np.asarray(y_true, dtype=np.float64).T).T, np.atleast_2d(np.asarray(prob).T).T
    per = np.array([np.atleast_1d(calibration_error(y[:, j], p[:, j], w)) for j in range(y.shape[1])])
    return _out(np.nanmean(per, axis=0), w is None) if np.isfinite(per).any() else _out(per[0], w is None)


def top_class_ece(y_onehot: np.ndarray, prob: np.ndarray, w: np.ndarray | None = None):
    """ECE of the top class's probability (multi-class)."""
    return calibration_error((prob.argmax(1) == y_onehot.argmax(1)).astype(np.float64), prob.max(1), w)


def roc_curve(y_true: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    y, s = np.asarray(y_true, dtype=np.float64), np.asarray(score, dtype=np.float64)
    known = ~np.isnan(y)
    y, s = y[known] > 0.5, s[known]
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last = np.r_[np.flatnonzero(s[1:] != s[:-1]), len(s) - 1]  # end of each tie block
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(int((~y).sum()), 1)], np.r_[0.0, tp / max(int(y.sum()), 1)]


# --------------------------------------------------------------------- classification
def accuracy(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray | None = None):
    correct = (np.asarray(y_true) == np.asarray(y_pred)).astype(np.float64)
    w, single = _weights(w, len(correct))
    return _out(_ratio(w @ correct, w.sum(1)), single)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, w: np.ndarray | None = None):
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), over the classes present in
    the labels or the predictions (of the resample, when bootstrapping)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    w, single = _weights(w, len(y_true))
    f1s, seen = [], []
    for c in np.union1d(np.unique(y_true), np.unique(y_pred)):
        t, p = y_true == c, y_pred == c
        tp, fp, fn = w @ (t & p), w @ (~t & p), w @ (t & ~p)
        f1s.append(_ratio(2 * tp, 2 * tp + fp + fn))
        seen.append(2 * tp + fp + fn > 0)
    if not f1s:
        return _out(np.full(len(w), np.nan), single)
    f1s, seen = np.array(f1s), np.array(seen)
    return _out(_ratio(np.where(seen, f1s, 0).sum(0), seen.sum(0).astype(float)), single)


# ----------------------------------------------------------------------- segmentation
def overlap_counts(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-image ``[intersection, predicted, true]`` pixel counts of boolean masks ``[N, H, W]``."""
    pred, true = np.asarray(pred, bool).reshape(len(pred), -1), np.asarray(true, bool).reshape(len(true), -1)
    return np.stack([(pred & true).sum(1), pred.sum(1), true.sum(1)], 1).astype(np.int64)


def image_dice(counts: np.ndarray) -> np.ndarray:
    """Per-image Dice; an empty prediction on an empty mask is 1."""
    denom = counts[:, 1] + counts[:, 2]
    return np.divide(2.0 * counts[:, 0], denom, out=np.ones(len(counts)), where=denom > 0)


def image_iou(counts: np.ndarray) -> np.ndarray:
    union = counts[:, 1] + counts[:, 2] - counts[:, 0]
    return np.divide(counts[:, 0], union, out=np.ones(len(counts)), where=union > 0)


def _mean_over(values: np.ndarray, include: np.ndarray, w: np.ndarray | None):
    w, single = _weights(w, len(values))
    inc = include.astype(np.float64)
    return _out(_ratio(w @ (values * inc), w @ inc), single)


def dice_positive(counts: np.ndarray, w: np.ndarray | None = None):
    """Convention 1: mean per-image Dice over the images whose true mask is non-empty."""
    return _mean_over(image_dice(counts), counts[:, 2] > 0, w)


def dice_empty_is_one(counts: np.ndarray, w: np.ndarray | None = None):
    """Convention 2 (the authors'): mean per-image Dice over all images; an empty prediction on
    an empty mask scores 1, any prediction on an empty mask scores 0."""
    return _mean_over(image_dice(counts), np.ones(len(counts), bool), w)


def dice_all_empty_baseline(counts: np.ndarray, w: np.ndarray | None = None):
    """What convention 2 gives a predictor that never predicts a pixel: the share of empty masks."""
    return _mean_over((counts[:, 2] == 0).astype(np.float64), np.ones(len(counts), bool), w)


def dice_global(counts: np.ndarray, w: np.ndarray | None = None):
    """Dice of all pixels pooled, 2 sum(I) / (sum(P) + sum(T)): not fooled by empty predictions."""
    w, single = _weights(w, len(counts))
    c = w @ counts.astype(np.float64)  # [B, 3]
    return _out(_ratio(2.0 * c[:, 0], c[:, 1] + c[:, 2]), single)


def iou_positive(counts: np.ndarray, w: np.ndarray | None = None):
    return _mean_over(image_iou(counts), counts[:, 2] > 0, w)


def iou_empty_is_one(counts: np.ndarray, w: np.ndarray | None = None):
    return _mean_over(image_iou(counts), np.ones(len(counts), bool), w)


SEGMENTATION_METRICS: dict[str, Callable] = {
    "dice_positive": dice_positive,
    "dice_empty_is_one": dice_empty_is_one,
    "dice_all_empty_baseline": dice_all_empty_baseline,
    "dice_global": dice_global,
    "iou_positive": iou_positive,
    "iou_empty_is_one": iou_empty_is_one,
}


# ------------------------------------------------------------------------ retrieval
def match_ranks(sim: np.ndarray) -> np.ndarray:
    """Query i matches candidate i: how many candidates score strictly higher than the match
    (ties count in the match's favour)."""
    sim = np.asarray(sim, dtype=np.float64)
    return (sim > np.diagonal(sim)[:, None]).sum(1)


def recall_at(ranks: np.ndarray, k: int, w: np.ndarray | None = None):
    hits = (np.asarray(ranks) < k).astype(np.float64)
    return _mean_over(hits, np.ones(len(hits), bool), w)


# ------------------------------------------------------------------------ bootstrap
def resample_weights(n: int, resamples: int, seed: int) -> list[np.ndarray]:
    """Multiplicity rows ``[b, n]`` of ``resamples`` draws of n items with replacement, in chunks."""
    rng = np.random.default_rng(seed)
    out = []
    for start in range(0, resamples, CHUNK):
        b = min(CHUNK, resamples - start)
        idx = rng.integers(0, n, (b, n)) + (np.arange(b) * n)[:, None]
        out.append(np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float64))
    return out


def bootstrap_cis(metrics: Callable[[np.ndarray], dict[str, np.ndarray]], n: int, resamples: int = 1000,
                  seed: int = 0, level: float = 0.95, centred: tuple[str, ...] = BIASED
                  ) -> dict[str, tuple[float, float]]:
    """Percentile CIs of several metrics on the same resamples.

    ``metrics(w)`` maps multiplicities ``[b, n]`` to ``{name: [b] values}``. Resamples where
    a metric is undefined (NaN, e.g. no positive drawn) are left out of its CI.

    A metric named in ``centred`` (by default the ECE) has resampled values that are biased
    against its estimate, so the plain percentile interval can lie wholly above the estimate
    (the demo once printed ``4.2 [4.7, 5.8]``). Its interval is the percentile interval moved
    by the resamples' median bias, ``estimate + (q_lo - median, q_hi - median)``, clipped at
    0: the same spread, centred on the estimate, which it contains by construction.
    """
    if n == 0 or resamples <= 0:
        return {}
    draws: dict[str, list[np.ndarray]] = {}
    for w in resample_weights(n, resamples, seed):
        for k, v in metrics(w).items():
            draws.setdefault(k, []).append(np.asarray(v, dtype=np.float64))
    tail = (1.0 - level) / 2.0 * 100.0
    estimates = metrics(np.ones((1, n))) if any(k in centred for k in draws) else {}
    out = {}
    for k, parts in draws.items():
        v = np.concatenate(parts)
        v = v[np.isfinite(v)]
        if not len(v):
            out[k] = (np.nan, np.nan)
            continue
        lo, hi = float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))
        if k in centred and np.isfinite(estimate := float(np.asarray(estimates[k]).reshape(-1)[0])):
            shift = estimate - float(np.median(v))
            lo, hi = max(0.0, lo + shift), hi + shift
        out[k] = (lo, hi)
    return out


def bootstrap_ci(metric: Callable[[np.ndarray], np.ndarray], n: int, resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """The CI of one metric: ``metric(w)`` maps multiplicities ``[b, n]`` to ``[b]`` values."""
    return bootstrap_cis(lambda w: {"m": metric(w)}, n, resamples, seed, level).get("m", (np.nan, np.nan))
