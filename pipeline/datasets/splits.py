"""Reproducible splits and label fractions, written as ID-only lists with checksums.

* ``hash_split`` puts a patient in a split by hashing the patient id with a seed: the
  same patient always lands in the same split, so no patient is in two splits, and the
  assignment never depends on which other patients are present.
* ``nested_fractions`` picks the 1% / 10% / 100% training subsets: within each label
  stratum the ids are ordered by a seeded hash and each fraction takes a prefix, so the
  subsets are nested (1% ⊂ 10% ⊂ 100%) and keep the label proportions.
* ``split_lists`` / ``write_lists`` / ``verify_lists`` turn a dataset into the files
  ``<cache>/splits/<dataset name>/{train,valid,test,train_1pct,train_10pct}.txt`` (sorted
  ids, one a line) plus ``manifest.json`` ``{file: {count, sha256}}``, and check a dataset
  against such files, ours or someone else's.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Hashable, Sequence

import xxhash

from core.atomic import atomic_write_bytes
from pipeline.datasets.base import Dataset, DatasetError

SPLITS = ("train", "valid", "test")
FRACTIONS = (0.01, 0.1)
MANIFEST = "manifest.json"


def _unit(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from a string and a seed."""
    return xxhash.xxh64_intdigest(f"{seed}:{key}".encode()) / 2.0**64


def hash_split(key: str, proportions: Sequence[tuple[str, float]], seed: int = 0) -> str:
    """The split a patient belongs to, e.g. ``hash_split("p1", [("train", .7), ("test", .3)])``."""
    u = _unit(str(key), seed)
    total = sum(p for _, p in proportions)
    edge = 0.0
    for name, p in proportions:
        edge += p / total
        if u < edge:
            return name
    return proportions[-1][0]


# How a split column may spell each split; anything else is an error that lists what was found.
SPLIT_SPELLINGS = {"train": "train", "training": "train", "valid": "valid", "val": "valid", "validation": "valid",
                   "validate": "valid", "dev": "valid", "test": "test", "testing": "test", "eval": "test"}
DEFAULT_PROPORTIONS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))


def canonical_splits(values: Sequence[str | None], where: str) -> list[str | None]:
    """Split names mapped to train/valid/test (``val``, ``validation``, ``dev`` -> valid, ...).

    An unknown name is an error naming every distinct value found, so a typo never
    silently drops items from training or validation.
    """
    unknown = sorted({str(v) for v in values if v is not None and str(v).strip().lower() not in SPLIT_SPELLINGS})
    if unknown:
        raise DatasetError(f"{where}: unknown split name(s) {', '.join(map(repr, unknown))}. Use train, valid "
                           f"(or val/validation/dev) and test; the split column holds: "
                           f"{', '.join(sorted({str(v) for v in values if v is not None}))}")
    return [None if v is None else SPLIT_SPELLINGS[str(v).strip().lower()] for v in values]


def assign_splits(keys: Sequence[str], seed: int = 0,
                  proportions: Sequence[tuple[str, float]] = DEFAULT_PROPORTIONS) -> list[str]:
    """A deterministic, seeded split per key (a patient id, else the item id): see :func:`hash_split`."""
    return [hash_split(k, proportions, seed) for k in keys]


def split_rule(by: str, seed: int = 0, proportions: Sequence[tuple[str, float]] = DEFAULT_PROPORTIONS) -> str:
    parts = " / ".join(f"{name} {100 * p:g}%" for name, p in proportions)
    return f"assigned: seeded hash of {by} (seed {seed}), {parts}"


def _stratum(label) -> Hashable:
    if label is None or (isinstance(label, float) and math.isnan(label)):
        return "nan"
    return label


def _quotas(sizes: dict, fraction: float) -> dict:
    """Per-stratum counts summing to round(fraction * total), at least 1 (largest remainder),
    with at least one per non-empty stratum when the total allows it."""
    total = sum(sizes.values())
    target = min(total, max(1, int(round(fraction * total))))  # a fraction is never empty
    exact = {k: fraction * n for k, n in sizes.items()}
    quota = {k: min(sizes[k], int(math.floor(v))) for k, v in exact.items()}
    by_remainder = sorted(sizes, key=lambda k: (-(exact[k] - quota[k]), str(k)))
    for k in by_remainder:
        if sum(quota.values()) >= target:
            break
        if quota[k] < sizes[k]:
            quota[k] += 1
    if target >= len(sizes):
        for k in sorted(sizes, key=str):
            if quota[k] == 0 and sizes[k] > 0:
                donor = max(quota, key=lambda d: (quota[d], str(d)))
                if quota[donor] > 1:
                    quota[donor] -= 1
                quota[k] = 1
    return quota


def nested_fractions(ids: Sequence[str], labels: Sequence | None = None,
                     fractions: Sequence[float] = (0.01, 0.1, 1.0), seed: int = 0) -> dict[float, list[str]]:
    """Nested, label-stratified, seeded subsets of ``ids``: ``{fraction: sorted ids}``.

    ``labels`` (one per id, any hashable; None or NaN is its own stratum) stratifies the
    draw; without it the ids are one stratum. Each stratum is ordered by a hash of the id
    and the seed, and every fraction takes a prefix of that order, with per-stratum counts
    that never shrink as the fraction grows: a smaller fraction is always a subset of a
    larger one. Counts follow the label proportions (largest remainder), and each label
    keeps at least one id when the fraction's size allows. The result does not depend on
    the order of ``ids``.
    """
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        raise ValueError("nested_fractions: ids must be unique")
    if labels is not None and len(labels) != len(ids):
        raise ValueError(f"nested_fractions: {len(ids)} ids but {len(labels)} labels")
    if any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"nested_fractions: fractions must be in (0, 1], got {list(fractions)}")
    strata: dict = defaultdict(list)
    for i, id_ in enumerate(ids):
        strata[_stratum(labels[i]) if labels is not None else 0].append(id_)
    for key in strata:
        strata[key].sort(key=lambda x: (_unit(x, seed), x))
    sizes = {k: len(v) for k, v in strata.items()}
    out: dict[float, list[str]] = {}
    previous = {k: 0 for k in strata}
    for f in sorted(fractions):
        quota = {k: max(q, previous[k]) for k, q in _quotas(sizes, f).items()}
        out[f] = sorted(x for k, members in strata.items() for x in members[: quota[k]])
        previous = quota
    return {f: out[f] for f in fractions}


def fraction_name(fraction: float, split: str = "train") -> str:
    pct = fraction * 100
    text = f"{pct:.0f}" if abs(pct - round(pct)) < 1e-9 else f"{pct:g}"
    return f"{split}_{text}pct"


def stratify_label(ds: Dataset) -> str | None:
    """The label fractions are stratified by: the dataset's choice, else its only label."""
    if ds.stratify_by:
        return ds.stratify_by
    names = ds.label_names
    return names[0] if len(names) == 1 else None


def split_lists(ds: Dataset, fractions: Sequence[float] = FRACTIONS, seed: int = 0) -> dict[str, list[str]]:
    """``{"train": ids, "valid": ids, "test": ids, "train_1pct": ids, ...}`` (present splits only)."""
    by_split: dict[str, list] = defaultdict(list)
    for it in ds.items:
        if it.split:
            by_split[it.split].append(it)
    lists = {s: sorted(it.id for it in items) for s, items in sorted(by_split.items(), key=lambda kv: _order(kv[0]))}
    train = by_split.get("train", [])
    if train and fractions:
        label = stratify_label(ds)
        labels = [it.labels.get(label) for it in train] if label else None
        subsets = nested_fractions([it.id for it in train], labels, tuple(fractions), seed)
        for f in fractions:  # a published source's fixed subset, where it has one
            lists[fraction_name(f)] = sorted(ds.fractions[f]) if f in ds.fractions else subsets[f]
    return lists


def _order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


def list_bytes(ids: Sequence[str]) -> bytes:
    return "".join(f"{i}\n" for i in sorted(ids)).encode()


def manifest_of(lists: dict[str, list[str]]) -> dict[str, dict]:
    return {f"{name}.txt": {"count": len(ids), "sha256": hashlib.sha256(list_bytes(ids)).hexdigest()}
            for name, ids in lists.items()}


def lists_folder(cache_root: Path, dataset_name: str) -> Path:
    return Path(cache_root) / "splits" / dataset_name


def write_lists(folder: Path, lists: dict[str, list[str]]) -> dict[str, dict]:
    """Write every list, then the manifest (so a manifest only ever describes whole files)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, ids in lists.items():
        atomic_write_bytes(folder / f"{name}.txt", list_bytes(ids))
    manifest = manifest_of(lists)
    atomic_write_bytes(folder / MANIFEST, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    return manifest


def read_list(path: Path) -> list[str]:
    return [line for line in Path(path).read_text().splitlines() if line]


def verify_lists(folder: Path, lists: dict[str, list[str]]) -> list[str]:
    """Problems found comparing ``lists`` (from the dataset now) with the files in ``folder``.

    Each list file must match its manifest entry (count and SHA-256: the file was not
    edited), and the dataset's list must match the file. An empty result means identical.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return [f"{path} does not exist: write the lists first with `pipe data splits DATASET --write`, "
                "or point --lists at a folder holding manifest.json"]
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        return [f"{path} is not valid JSON ({e}); rewrite it with `pipe data splits DATASET --write`"]
    problems = []
    current = manifest_of(lists)
    for file in sorted(set(manifest) | set(current), key=lambda f: _order(f.removesuffix(".txt"))):
        problems += _compare(folder, file, manifest.get(file), current.get(file), lists.get(file.removesuffix(".txt")))
    return problems


def _compare(folder: Path, file: str, recorded: dict | None, now: dict | None, ids: list[str] | None) -> list[str]:
    split = file.removesuffix(".txt")
    if recorded is None:
        return [f"{split}: the dataset has {now['count']} ids but the manifest has no {file}"]
    if now is None:
        return [f"{split}: the manifest lists {file} with {recorded['count']} ids but the dataset has no such split"]
    out = []
    path = folder / file
    if not path.exists():
        out.append(f"{split}: {path} is missing (manifest says {recorded['count']} ids)")
    else:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != recorded["sha256"]:
            out.append(f"{split}: {path} was changed after its manifest was written "
                       f"(file has {len(read_list(path))} ids, SHA-256 {digest[:12]}; "
                       f"manifest says {recorded['count']} ids, SHA-256 {recorded['sha256'][:12]})")
    if now["sha256"] != recorded["sha256"]:
        detail = ""
        if path.exists():
            listed, have = set(read_list(path)), set(ids or [])
            added, removed = sorted(have - listed), sorted(listed - have)
            detail = f" ({len(added)} not in the list, {len(removed)} missing from the dataset"
            detail += f"; e.g. {(added or removed)[0]!r})" if added or removed else ")"
        out.append(f"{split}: the dataset has {now['count']} ids, the list has {recorded['count']}{detail}")
    return out


def patients_in_several_splits(ds: Dataset) -> dict[str, set[str]]:
    """Patients whose items fall in more than one split (should be empty)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for it in ds.items:
        if it.patient_id is not None and it.split:
            seen[it.patient_id].add(it.split)
    return {p: s for p, s in seen.items() if len(s) > 1}
