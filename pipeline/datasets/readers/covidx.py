"""COVIDx CXR (the COVID-Net data set).

Layout::

    <root>/train.txt   <root>/val.txt (optional)   <root>/test.txt
    <root>/train/<filename>   <root>/test/<filename>   (<root>/val/<filename> where shipped)

Versioned file names (``train_COVIDx9A.txt``, ``train_split_v3.txt``...) are accepted when
the plain name is absent and exactly one such file exists. Each line is space-separated:
``patient_id filename class [data_source]``; the older releases have no data_source
column. ``class`` is ``normal``, ``pneumonia`` or ``COVID-19`` in the 3-class releases and
``positive`` / ``negative`` (COVID-19 or not) in the binary CXR-3/CXR-4 releases.

Labels: ``label``, one multi-class label with COVID-Net's mapping normal = 0,
pneumonia = 1, COVID-19 = 2 (``positive`` = 2; ``negative`` could be 0 or 1 and is NaN);
and ``covid`` = 1 for COVID-19/positive, else 0, in every release.

Items: one per line, id = the file name, patient = patient_id.

Splits: official: train.txt -> train, test.txt -> test, val.txt -> valid. A release
without a validation file gets one carved from train: 10% of the training patients, by a
seeded hash of the patient id (``seed=``), so no patient is in both.

Release: papers used different ones (BenchX CXR-4; MGCA's paper names v6 while its code
reads COVIDx9A), so the reader says which the folder holds: from a versioned file name
(``train_COVIDx9A.txt`` is v9A, ``train_COVIDx5.txt`` v5), else from the files' line counts
where they are a known release's (v5 13,958 / 300; v6 14,311 / 200; CXR-4 67,863 / 8,473 /
8,482), else only if stated (``version=v9A``). A stated version that the files contradict is
an error. The Adaptor authors' README says v5, but their code reads MGCA's constants
(``train_COVIDx9A.txt``, ``test_COVIDx9A.txt``: 3 classes, 400 test images) and all 45
accuracies of their results notebook are multiples of 1/400, 16 of them impossible on v5's
300 test images: they used COVIDx9A (``configs/paper/authors/classification.yaml``).
"""
from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path

from cache.paths import plain_name
from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.readers._common import (SEED, Opt, Problems, Spec, finish, open_text, parse_spec,
                                               require_root, unmaterialised)
from pipeline.datasets.splits import hash_split
from pipeline.datasets.table import DatasetError

READER = "covidx"
CLASSES = {"normal": 0.0, "pneumonia": 1.0, "covid-19": 2.0, "covid19": 2.0, "positive": 2.0, "negative": math.nan}
COVID = {"covid-19", "covid19", "positive"}
CARVED_VALID = 0.1
SPLIT_FILES = (("train", ("train",), ("train",)), ("valid", ("val", "valid"), ("val", "train")),
               ("test", ("test",), ("test",)))
DESCRIPTION = "COVIDx CXR: normal / pneumonia / COVID-19"
# Line counts of each release's train, val (None: no val file) and test files (COVID-Net's docs;
# CXR-4: BenchX's lists plus the one line each that pandas read as their header).
RELEASES = {"v5": (13_958, None, 300), "v6": (14_311, None, 200), "CXR-4": (67_863, 8_473, 8_482)}
SCHEMA = {**SEED, "version": Opt("", str, "the COVIDx release the folder holds (v9A, v5, v6, CXR-4, ...), where "
                                          "its files do not say")}


@register_reader(READER, SCHEMA, DESCRIPTION)
def open_covidx(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, SCHEMA)
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "label")
    require_root(spec)
    problems = Problems(READER, spec["allow_failures"])
    items: list[Item] = []
    found = {}
    seen: dict[str, str] = {}
    for split, stems, folders in SPLIT_FILES:
        path = _split_file(spec.root, stems)
        if path is None:
            if split != "valid":
                raise DatasetError(f"{READER}: {spec.root / (stems[0] + '.txt')} not found. Give the COVIDx folder "
                                   "that holds train.txt, test.txt and the train/ and test/ image folders.")
            continue
        found[split] = path
        items += _read(spec, path, split, folders, problems, seen)
    if "valid" not in found:
        items = [_carve(it, spec) for it in items]
    version = release(found, spec["version"])
    return finish(spec, cache_root, items, problems, f"{DESCRIPTION} ({version or 'release not known'})",
                  stratify_by="label", version=version)


def release(files: dict[str, Path], stated: str = "") -> str | None:
    """``"COVIDx v5 (from train_COVIDx5.txt)"``: the release the split files show, else the stated one.

    Raises DatasetError when a stated release contradicts the files."""
    detected, evidence = _detect(files)
    if stated and detected and stated.lower().removeprefix("v") != detected.lower().removeprefix("v"):
        raise DatasetError(f"{READER}: version={stated} was stated, but the folder holds COVIDx {detected} "
                           f"({evidence}). Drop the option, or point at the {stated} folder.")
    if detected:
        return f"COVIDx {detected} ({evidence})"
    return f"COVIDx {stated} (stated)" if stated else None


def _detect(files: dict[str, Path]) -> tuple[str | None, str]:
    for path in files.values():
        m = re.search(r"_COVIDx(\d+[A-Za-z]?)\.txt$", path.name) or re.search(r"_split_v(\d+)\.txt$", path.name)
        if m:
            return f"v{m.group(1)}", f"from the file name {path.name}"
    counts = tuple(_count_lines(files[s]) if s in files else None for s in ("train", "valid", "test"))
    for name, expected in RELEASES.items():
        if counts == expected:
            return name, "from the split files' line counts " + " / ".join(f"{c:,}" for c in counts if c)
    return None, ""


def _count_lines(path: Path) -> int:
    with open_text(path) as f:
        return sum(1 for line in f if line.strip())


def _split_file(root: Path, stems: tuple[str, ...]) -> Path | None:
    for stem in stems:
        if (root / f"{stem}.txt").is_file():
            return root / f"{stem}.txt"
    for stem in stems:
        matches = sorted(root.glob(f"{stem}_*.txt"))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise DatasetError(f"{READER}: several {stem} files in {root}: {', '.join(m.name for m in matches)}. "
                               f"Keep one, or copy the one to use to {stem}.txt.")
    return None


def parse_line(text: str) -> tuple[str, str, str, str | None]:
    """(patient_id, filename, class, data_source or None) of one split-file line.

    Raises ValueError when no known class is in the third-last or last place.
    """
    tokens = text.split()
    if len(tokens) >= 4 and tokens[-2].lower() in CLASSES:
        return tokens[0], " ".join(tokens[1:-2]), tokens[-2], tokens[-1]
    if len(tokens) >= 3 and tokens[-1].lower() in CLASSES:
        return tokens[0], " ".join(tokens[1:-1]), tokens[-1], None
    raise ValueError(f"expected 'patient_id filename class [data_source]' with class one of "
                     f"normal, pneumonia, COVID-19, positive, negative; got {text.strip()[:80]!r}")


def _read(spec: Spec, path: Path, split: str, folders: tuple[str, ...], problems: Problems,
          seen: dict[str, str]) -> list[Item]:
    items = []
    with open_text(path) as f:
        for line_no, text in enumerate(f, start=1):
            if not text.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                patient, filename, cls, _ = parse_line(text)
            except ValueError as e:
                problems.bad(where, str(e))
                continue
            if not all(plain_name(part) for part in filename.split("/")) or filename.startswith("/"):
                problems.bad(where, f"file name {filename!r} leads out of the image folders (it holds '..', a "
                             "leading '/' or '.', or a control character)", filename)
                continue
            if filename in seen:
                problems.bad(where, f"file {filename} is already listed at {seen[filename]}", filename)
                continue
            image = next((spec.root / d / filename for d in folders if (spec.root / d / filename).is_file()), None)
            if image is None:
                problems.bad(where, f"image file {spec.root / folders[0] / filename} is missing", filename)
                continue
            seen[filename] = where
            items.append(Item(id=filename, image=image, patient_id=patient, split=split,
                              labels={"label": CLASSES[cls.lower()], "covid": float(cls.lower() in COVID)}))
    return items


def _carve(item: Item, spec: Spec) -> Item:
    if item.split != "train":
        return item
    split = hash_split(item.patient_id, (("train", 1 - CARVED_VALID), ("valid", CARVED_VALID)), spec["seed"])
    return item if split == "train" else replace(item, split="valid")
