"""CheXpert v1.0 (the full and the ``-small`` release).

Layout::

    <root>/train.csv    Path, Sex, Age, Frontal/Lateral, AP/PA, <14 labels>
    <root>/valid.csv    the same columns
    <root>/test.csv or test_labels.csv   (optional: the later test-set release; Path + labels)
    <root>/train/patient00001/study1/view1_frontal.jpg
    <root>/valid/patient64541/study1/view1_frontal.jpg

``Path`` starts with the release folder (``CheXpert-v1.0-small/train/...`` or
``CheXpert-v1.0/train/...``); that first folder is the root. The root may also be the
folder that contains ``CheXpert-v1.0-small/`` or ``CheXpert-v1.0/``.

Items: one per image, id = the image path inside the release without extension
(``train/patient00001/study1/view1_frontal``), patient = ``patientNNNNN``. Frontal views
only by default (``frontal=0`` keeps laterals); the view is read from ``Frontal/Lateral``,
else from the file name. No reports.

Splits: official. train.csv -> train, valid.csv -> valid, and the test file -> test when
present; CheXpert ships no other test split, and none is invented.

Labels: 14 findings; -1 under ``uncertain=`` (ignore -> NaN, ones, zeros); blank under
``blank=`` (nan or zeros).
"""
from __future__ import annotations

import re
from pathlib import Path, PurePosixPath

from cache.paths import plain_name
from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.readers._common import (LABELS, Problems, Spec, chexpert_value, csv_rows, find_file, finish,
                                               flag, parse_spec, require_root, unmaterialised)
from pipeline.datasets.table import DatasetError

READER = "chexpert"
LABEL_NAMES = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
               "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
               "Fracture", "Support Devices")
FILES = (("train", ("train.csv",)), ("valid", ("valid.csv",)), ("test", ("test.csv", "test_labels.csv")))
RELEASES = ("CheXpert-v1.0-small", "CheXpert-v1.0")
SCHEMA = {**LABELS, "frontal": flag(True, "frontal views only")}
DESCRIPTION = "CheXpert v1.0 images with 14 labeller findings"
_PATIENT = re.compile(r"patient\d+")


@register_reader(READER, SCHEMA, DESCRIPTION)
def open_chexpert(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, SCHEMA)
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "No Finding")
    require_root(spec)
    folder = _release_folder(spec.root)
    problems = Problems(READER, spec["allow_failures"])
    items: list[Item] = []
    for split, names in FILES:
        path = find_file(folder, names)
        if path is None:
            if split == "train":
                raise DatasetError(f"{READER}: {folder / 'train.csv'} not found. Give the CheXpert-v1.0-small "
                                   "(or CheXpert-v1.0) folder that holds train.csv, valid.csv, train/ and valid/.")
            continue
        items += _read(spec, folder, path, split, problems)
    return finish(spec, cache_root, items, problems, DESCRIPTION, stratify_by="No Finding")


def _release_folder(root: Path) -> Path:
    if (root / "train.csv").is_file():
        return root
    for name in RELEASES:
        if (root / name / "train.csv").is_file():
            return root / name
    return root


def _read(spec: Spec, folder: Path, path: Path, split: str, problems: Problems) -> list[Item]:
    items = []
    for line, row in csv_rows(path, ("Path", *LABEL_NAMES), problems):
        where = f"{path}:{line}"
        rel = _relative(row["Path"])
        if rel is None:
            problems.bad(where, f"Path {row['Path']!r} is not a patient/study/view image path")
            continue
        if spec["frontal"] and not _is_frontal(row, rel):
            continue
        image = folder / rel
        item_id = str(rel.with_suffix(""))
        if not image.is_file():
            problems.bad(where, f"image file {image} is missing", item_id)
            continue
        try:
            labels = {n: chexpert_value(row[n], spec["uncertain"], spec["blank"]) for n in LABEL_NAMES}
        except ValueError as e:
            problems.bad(where, str(e), item_id)
            continue
        items.append(Item(id=item_id, image=image, patient_id=_PATIENT.search(str(rel)).group(0), split=split,
                          labels=labels))
    return items


def _relative(path_text: str) -> PurePosixPath | None:
    """The image path inside the release folder (the leading CheXpert-v1.0* folder dropped)."""
    parts = PurePosixPath(path_text.replace("\\", "/")).parts
    if parts and parts[0].startswith("CheXpert-v1.0"):
        parts = parts[1:]
    rel = PurePosixPath(*parts) if parts else None
    if rel is None or rel.is_absolute() or not all(plain_name(p) for p in parts) or not _PATIENT.search(str(rel)):
        return None
    return rel


def _is_frontal(row: dict, rel: PurePosixPath) -> bool:
    view = row.get("Frontal/Lateral", "")
    if view:
        return view.lower() == "frontal"
    return "frontal" in rel.name.lower()
