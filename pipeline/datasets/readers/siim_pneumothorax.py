"""SIIM-ACR Pneumothorax Segmentation (Kaggle, 2019), stage-1 training set.

Layout::

    <root>/train-rle.csv       ImageId, EncodedPixels   (the header really is "ImageId, EncodedPixels")
    <root>/dicom-images-train/<StudyInstanceUID>/<SeriesInstanceUID>/<ImageId>.dcm

``EncodedPixels`` is the challenge's relative run-length code (pairs of offset and length,
pixels numbered column by column, each offset counted from the end of the previous run)
or ``-1`` for an empty mask. An image with several pneumothoraces has one row per region.
(The stage-2 re-release ``stage_2_train.csv`` switched to a different, absolute encoding
and is not read here.)

Items: one per image listed in the CSV, id = patient = ``ImageId`` (the release gives no
other patient grouping). Label ``pneumothorax`` = 1 when any row of the image has a
region. Mask ``pneumothorax``: the union of the regions at the DICOM's Rows x Columns
(1024 x 1024 in this release), written once to
``<cache>/derived/<name>/masks/<ImageId>-<hash of the codes>.png``; all zero for negatives.

Splits: no official labelled test set; images are split 70/15/15 (train/valid/test, as
MGCA does) by a seeded hash of the ImageId (``seed=``).

**The PNG release** that BenchX used (Kaggle ``vbookshelf/pneumothorax-chest-xray-images-and-masks``)
is read when the folder (or its ``siim-acr-pneumothorax/``) holds it::

    <root>/png_images/<n>_<train|test>_<0|1>_.png   <root>/png_masks/<same name>   (0/255 masks)
    <root>/stage_1_train_images.csv   <root>/stage_1_test_images.csv   new_filename, has_pneumo[, ImageId]

It holds the stage-1 training images and the stage-1 test images with their masks. Items:
id = the file stem (``1898_train_0_``, the name BenchX's split lists use), patient = the
``ImageId`` where the CSV has one. Splits: the stage-1 test images are the test split; the
training images are split 85/15 (train/valid) by a seeded hash of the stem.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import xxhash

from cache.paths import plain_name
from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.masks import decode_relative_rle, parse_relative_rle
from pipeline.datasets.readers._common import (SEED, Problems, csv_rows, derived_dir, find_file, finish, make_masks,
                                               parse_spec, require_root, unmaterialised)
from pipeline.datasets.splits import hash_split
from pipeline.datasets.table import DatasetError

READER = "siim-pneumothorax"
PROPORTIONS = (("train", 0.7), ("valid", 0.15), ("test", 0.15))
IMAGES = "dicom-images-train"
RELEASE_SIZE = 1024  # every image of the release is 1024 x 1024
DESCRIPTION = "SIIM-ACR pneumothorax: binary label and segmentation masks"


PNG_FOLDER = "siim-acr-pneumothorax"
PNG_SPLITS = (("stage_1_train_images.csv", "train"), ("stage_1_test_images.csv", "test"))
PNG_VALID = 0.15


@register_reader(READER, SEED, DESCRIPTION)
def open_siim(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, SEED)
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "pneumothorax")
    require_root(spec)
    problems = Problems(READER, spec["allow_failures"])
    png = _png_root(spec.root)
    if png is not None:
        return _open_png(spec, cache_root, png, problems)
    rle_csv = find_file(spec.root, ["train-rle.csv"])
    if rle_csv is None:
        raise DatasetError(f"{READER}: {spec.root / 'train-rle.csv'} not found. Give the folder that holds "
                           f"train-rle.csv and {IMAGES}/.")
    codes = _read_codes(rle_csv, problems)
    files = _dicom_files(spec.root / IMAGES)
    masks = derived_dir(cache_root, spec.name) / "masks"
    items, jobs = [], []
    for image_id, (line, rles) in codes.items():
        if not plain_name(image_id):  # the id becomes the mask's file name: never a path out of the folder
            problems.bad(f"{rle_csv}:{line}", f"ImageId {image_id!r} is not a file name (it holds '/', '\\', a "
                         "leading '.' or a control character)", image_id)
            continue
        dicom = files.get(f"{image_id}.dcm")
        if dicom is None:
            problems.bad(f"{rle_csv}:{line}", f"image file {image_id}.dcm is missing under {spec.root / IMAGES}",
                         image_id)
            continue
        mask = masks / f"{image_id}-{_codes_hash(rles)}.png"
        jobs.append((mask, dicom, lambda rows, cols, r=rles, i=image_id: _union(r, rows, cols, i)))
        items.append(Item(id=image_id, image=dicom, patient_id=image_id,
                          split=hash_split(image_id, PROPORTIONS, spec["seed"]),
                          labels={"pneumothorax": float(bool(rles))}, masks={"pneumothorax": mask}))
    make_masks(jobs, f"{READER}: masks")
    return finish(spec, cache_root, items, problems, DESCRIPTION, stratify_by="pneumothorax",
                  version="SIIM-ACR stage 1, DICOM release (train-rle.csv)")


def _png_root(root: Path) -> Path | None:
    for candidate in (root, root / PNG_FOLDER):
        if (candidate / "png_images").is_dir() and (candidate / "png_masks").is_dir():
            return candidate
    return None


def _open_png(spec, cache_root: Path, root: Path, problems: Problems) -> Dataset:
    """The PNG release: images and masks as files, labels and names in the two stage-1 CSVs."""
    items = []
    for name, split in PNG_SPLITS:
        path = find_file(root, [name])
        if path is None:
            raise DatasetError(f"{READER}: {root / name} not found; the PNG release has stage_1_train_images.csv "
                               "and stage_1_test_images.csv beside png_images/ and png_masks/")
        for line, row in csv_rows(path, ("new_filename", "has_pneumo"), problems):
            item = _png_item(spec, root, row, split, f"{path}:{line}", problems)
            if item is not None:
                items.append(item)
    return finish(spec, cache_root, items, problems, DESCRIPTION + " (PNG release)", stratify_by="pneumothorax",
                  version="SIIM-ACR stage 1, PNG release (Kaggle vbookshelf, as BenchX used)")


def _png_item(spec, root: Path, row: dict, split: str, where: str, problems: Problems) -> Item | None:
    name = row["new_filename"]
    stem = Path(name).stem
    image, mask = root / "png_images" / name, root / "png_masks" / name
    missing = next((p for p in (image, mask) if not p.is_file()), None)
    if missing is not None or row["has_pneumo"] not in ("0", "1"):
        reason = f"file {missing} is missing" if missing else f"has_pneumo {row['has_pneumo']!r} is not 0 or 1"
        problems.bad(where, reason, stem or None)
        return None
    if split == "train":
        split = hash_split(stem, (("train", 1 - PNG_VALID), ("valid", PNG_VALID)), spec["seed"])
    return Item(id=stem, image=image, patient_id=row.get("ImageId") or stem, split=split,
                labels={"pneumothorax": float(row["has_pneumo"])}, masks={"pneumothorax": mask})


def _read_codes(path: Path, problems: Problems) -> dict[str, tuple[int, list[str]]]:
    """ImageId -> (first line, the non-empty run-length codes), in file order."""
    out: dict[str, tuple[int, list[str]]] = {}
    bad: set[str] = set()
    for line, row in csv_rows(path, ("ImageId", "EncodedPixels"), problems):
        image_id, rle = row["ImageId"], row["EncodedPixels"]
        if not image_id:
            problems.bad(f"{path}:{line}", "empty ImageId")
            continue
        if image_id in bad:
            continue
        if rle not in ("-1", ""):
            try:
                end = int(parse_relative_rle(rle).sum())
                if end > RELEASE_SIZE * RELEASE_SIZE:
                    raise ValueError(f"run-length code runs to pixel {end}, past a "
                                     f"{RELEASE_SIZE}x{RELEASE_SIZE} image")
            except ValueError as e:
                problems.bad(f"{path}:{line}", str(e), image_id)
                bad.add(image_id)
                out.pop(image_id, None)
                continue
        first, codes = out.get(image_id, (line, []))
        out[image_id] = (first, codes + ([rle] if rle not in ("-1", "") else []))
    return out


def _dicom_files(folder: Path) -> dict[str, Path]:
    """File name -> path for every DICOM in the nested study/series tree."""
    if not folder.is_dir():
        raise DatasetError(f"{READER}: {folder} not found; unpack the training DICOMs there "
                           f"({IMAGES}/<study>/<series>/<ImageId>.dcm)")
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith(".dcm"):
                out[name] = Path(dirpath) / name
    return out


def _union(rles: list[str], rows: int, cols: int, image_id: str) -> np.ndarray:
    mask = np.zeros((rows, cols), dtype=bool)
    for rle in rles:
        try:
            mask |= decode_relative_rle(rle, rows, cols)
        except ValueError as e:
            raise DatasetError(f"{READER}: the mask of {image_id}: {e} (its DICOM is {rows}x{cols})") from e
    return mask


def _codes_hash(rles: list[str]) -> str:
    return xxhash.xxh64_hexdigest(("v1|" + ";".join(sorted(rles))).encode())[:8]
