"""RSNA Pneumonia Detection Challenge (Kaggle, 2018).

Layout::

    <root>/stage_2_train_labels.csv    patientId, x, y, width, height, Target
    <root>/stage_2_train_images/<patientId>.dcm

(the stage-1 names ``stage_1_train_labels.csv`` / ``stage_1_train_images`` are accepted
when the stage-2 ones are absent). A positive image has one row per box; a negative one
has a single row with empty box fields and Target 0. The test images have no labels and
are not listed.

Items: one per labelled image, id = patient = ``patientId`` (the challenge has one image
per patientId). Label ``pneumonia`` (Target). Mask ``pneumonia``: the union of the image's
boxes, rasterised at the DICOM's Rows x Columns (read from its header) and written once to
``<cache>/derived/<name>/masks/<patientId>-<hash of the boxes>.png`` (all zero for
negatives), so edited boxes never reuse a stale mask.

Splits: there are no official labelled validation/test sets; patients are split 60/20/20
(train/valid/test) by a seeded hash of the patientId (``seed=``). This split is ours, not
MGCA's: MGCA's classification split is 70/15/15 (sklearn's ``train_test_split``, 0.3 then
0.5, ``random_state=0``: 18,678 / 4,003 / 4,003) and its detection split, which its and the
Adaptor authors' segmentation reads, holds out 2 x 5,337 (16,010 / 5,337 / 5,337). Read
theirs with ``splits=mgca`` or ``splits=mgca-detection`` (``pipeline/datasets/shared_splits.py``).
"""
from __future__ import annotations

import math
from pathlib import Path

import xxhash

from cache.paths import plain_name
from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.masks import boxes_to_mask
from pipeline.datasets.readers._common import (SEED, Problems, csv_rows, derived_dir, find_file, finish, make_masks,
                                               parse_spec, require_root, unmaterialised)
from pipeline.datasets.splits import hash_split
from pipeline.datasets.table import DatasetError

READER = "rsna-pneumonia"
PROPORTIONS = (("train", 0.6), ("valid", 0.2), ("test", 0.2))
DESCRIPTION = "RSNA Pneumonia Detection: binary label and box masks"


@register_reader(READER, SEED, DESCRIPTION)
def open_rsna(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, SEED)
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "pneumonia")
    require_root(spec)
    problems = Problems(READER, spec["allow_failures"])
    labels_csv, images = _locate(spec.root)
    boxes = _read_boxes(labels_csv, problems)
    masks = derived_dir(cache_root, spec.name) / "masks"
    items, jobs = [], []
    for pid, (line, target, bxs) in boxes.items():
        if not plain_name(pid):  # the id becomes file names (its DICOM, its mask): never a path out of the folder
            problems.bad(f"{labels_csv}:{line}", f"patientId {pid!r} is not a file name (it holds '/', '\\', a "
                         "leading '.' or a control character); it would name files outside the dataset's folders",
                         pid)
            continue
        dicom = images / f"{pid}.dcm"
        if not dicom.is_file():
            problems.bad(f"{labels_csv}:{line}", f"image file {dicom} is missing", pid)
            continue
        mask = masks / f"{pid}-{_boxes_hash(bxs)}.png"
        jobs.append((mask, dicom, lambda rows, cols, b=bxs: boxes_to_mask(b, rows, cols)))
        items.append(Item(id=pid, image=dicom, patient_id=pid, split=hash_split(pid, PROPORTIONS, spec["seed"]),
                          labels={"pneumonia": float(target)}, masks={"pneumonia": mask}))
    make_masks(jobs, f"{READER}: masks")
    return finish(spec, cache_root, items, problems, DESCRIPTION, stratify_by="pneumonia",
                  version=f"RSNA Pneumonia {labels_csv.name.split('_train')[0].replace('_', ' ')} labels")


def _locate(root: Path) -> tuple[Path, Path]:
    for stage in ("stage_2", "stage_1"):
        labels = find_file(root, [f"{stage}_train_labels.csv"])
        if labels is not None:
            images = root / f"{stage}_train_images"
            if not images.is_dir():
                raise DatasetError(f"{READER}: {images} not found; unpack the training DICOMs there "
                                   f"({stage}_train_images/<patientId>.dcm)")
            return labels, images
    raise DatasetError(f"{READER}: {root / 'stage_2_train_labels.csv'} not found. Give the folder of the Kaggle "
                       "download that holds stage_2_train_labels.csv and stage_2_train_images/.")


def _read_boxes(path: Path, problems: Problems) -> dict[str, tuple[int, int, list[tuple[float, ...]]]]:
    """patientId -> (first line, Target, boxes), in file order."""
    out: dict[str, tuple[int, int, list]] = {}
    bad: set[str] = set()
    for line, row in csv_rows(path, ("patientId", "x", "y", "width", "height", "Target"), problems):
        pid = row["patientId"]
        where = f"{path}:{line}"
        if not pid or pid in bad:
            if not pid:
                problems.bad(where, "empty patientId")
            continue
        try:
            target, box = _parse(row)
        except ValueError as e:
            problems.bad(where, str(e), pid)
            bad.add(pid)
            out.pop(pid, None)
            continue
        first, previous, bxs = out.get(pid, (line, target, []))
        if previous != target:
            problems.bad(where, f"Target {target} contradicts Target {previous} on line {first} for {pid}", pid)
            bad.add(pid)
            out.pop(pid, None)
            continue
        out[pid] = (first, target, bxs + ([box] if box else []))
    return out


def _parse(row: dict) -> tuple[int, tuple[float, ...] | None]:
    if row["Target"] not in ("0", "1", "0.0", "1.0"):
        raise ValueError(f"Target {row['Target']!r} is out of range (expected 0 or 1)")
    target = int(float(row["Target"]))
    fields = [row[k] for k in ("x", "y", "width", "height")]
    if target == 0:
        if any(fields):
            raise ValueError("a box is given on a row with Target 0")
        return 0, None
    try:
        x, y, w, h = (float(v) for v in fields)
    except ValueError:
        raise ValueError(f"unparseable box {fields} on a row with Target 1") from None
    if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0 or x < 0 or y < 0:
        raise ValueError(f"box x={x}, y={y}, width={w}, height={h} is out of range")
    return 1, (x, y, w, h)


def _boxes_hash(boxes: list) -> str:
    text = ";".join(",".join(f"{v:g}" for v in b) for b in sorted(boxes))
    return xxhash.xxh64_hexdigest(f"v1|{text}".encode())[:8]
