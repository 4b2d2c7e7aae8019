"""Label fractions: nested, stratified, seeded subsets of a training split.

One seeded order of the training items is drawn per seed; the 1%, 10% and 100% subsets
are prefixes of it, so 1% is inside 10% is inside 100%, and two runs with the same seed
(another checkpoint, another head, no Adaptor) train on exactly the same items.

The order is stratified: every item gets the key ``(rank in its stratum + u) / stratum
size``, so each stratum (one combination of label values) spreads evenly over the order
and any prefix holds about its share. In front of that order go a few representatives
so that every label has a positive (and, for binary labels, a negative) in the smallest
prefix that can hold them.
"""
from __future__ import annotations

import math

import numpy as np

from core.errors import InputError


class FractionTooSmallError(InputError):
    """A label fraction whose training subset lacks a class; the message names the fix."""


def subset_size(fraction: float, n: int) -> int:
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"label fraction {fraction} is outside (0, 1]; use e.g. --fraction 0.01 0.1 1.0")
    return max(1, min(n, int(round(fraction * n))))


def stratified_order(y: np.ndarray, seed: int, need_negatives: bool = True) -> tuple[np.ndarray, int]:
    """A seeded order of the rows of ``y`` ``[N, L]`` (0/1, NaN unknown) and how many leading
    rows are representatives (the smallest prefix with a positive for every label that has one)."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    rng = np.random.default_rng(seed)
    codes = np.where(np.isnan(y), -1, y > 0.5).astype(np.int8)
    _, stratum = np.unique(codes, axis=0, return_inverse=True)
    key = np.empty(len(y))
    for s in range(stratum.max(initial=-1) + 1):
        idx = np.flatnonzero(stratum == s)
        key[idx[rng.permutation(len(idx))]] = (np.arange(len(idx)) + rng.random(len(idx))) / len(idx)
    order = np.argsort(key, kind="stable")
    front: list[int] = []
    for value in ((1, 0) if need_negatives else (1,)):
        for j in range(codes.shape[1]):
            if not any(codes[i, j] == value for i in front):
                hits = order[codes[order, j] == value]
                if len(hits):
                    front.append(int(hits[0]))
    rest = order[~np.isin(order, front)]
    return np.concatenate([np.array(front, dtype=np.int64), rest]), len(front)


def plan_subsets(y: np.ndarray, names: list[str], fractions: list[float], seeds: list[int],
                 need_negatives: bool = True, fixed: dict[float, np.ndarray] | None = None
                 ) -> dict[int, dict[float, np.ndarray]]:
    """``{seed: {fraction: row indices of y}}``, every subset checked before any training.

    A fraction in ``fixed`` (published split files) takes that subset for every seed; the
    others are prefixes of each seed's stratified order, so they nest."""
    fixed = fixed or {}
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    plan: dict[int, dict[float, np.ndarray]] = {}
    for seed in seeds:
        order, front = stratified_order(y, seed, need_negatives)
        plan[seed] = {}
        for f in fractions:
            sub = fixed[f] if f in fixed else np.sort(order[:subset_size(f, len(order))])
            check_subset(y[sub], names, f, len(order), front, need_negatives)
            plan[seed][f] = sub
    return plan


def check_subset(y: np.ndarray, names: list[str], fraction: float, n_split: int, order_front: int,
                 need_negatives: bool = True) -> None:
    """Refuse a training subset in which some label has no positive (or, binary, no negative)."""
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    for j, name in enumerate(names):
        col = y[:, j][~np.isnan(y[:, j])]
        for value, what in ((1, "positive"), (0, "negative"))[: 2 if need_negatives else 1]:
            if not np.any((col > 0.5) == bool(value)):
                smallest = order_front / max(n_split, 1)
                each = "a positive and a negative" if need_negatives else "a positive"
                raise FractionTooSmallError(
                    f"label fraction {fraction:g} keeps {len(y)} of {n_split} training items, and label "
                    f"{name!r} has no {what} among them. Use a larger fraction (at least {smallest:.3g} here "
                    f"keeps one {what} of every label), or leave the label out with labels=[...]. At "
                    f"{fraction:g}, {each} of every label ({order_front} item(s) here) need a training split of at "
                    f"least {smallest_split(order_front, fraction):,} items, with at least one positive of each "
                    "label in it.")


def smallest_split(front: int, fraction: float) -> int:
    """The fewest training items whose ``fraction`` subset holds ``front`` items (subset_size rounds)."""
    n = max(front, math.ceil((front - 0.5) / fraction))
    while subset_size(fraction, n) < front:
        n += 1
    return n
