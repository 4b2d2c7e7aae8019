"""MIMIC-CXR-JPG 2.x with the free-text reports of MIMIC-CXR.

Layout (PhysioNet ``mimic-cxr-jpg/2.0.0/`` or ``2.1.0/``)::

    <root>/mimic-cxr-2.0.0-metadata.csv[.gz]   dicom_id, subject_id, study_id, ..., ViewPosition, ...
    <root>/mimic-cxr-2.0.0-split.csv[.gz]      dicom_id, study_id, subject_id, split
    <root>/mimic-cxr-2.0.0-chexpert.csv[.gz]   subject_id, study_id, 14 CheXpert labels
    <root>/mimic-cxr-2.0.0-negbio.csv[.gz]     (the same with NegBio labels; labels=negbio)
    <root>/files/p10/p10000032/s50414267/<dicom_id>.jpg

The reports (``mimic-cxr-reports.zip`` from MIMIC-CXR) unpack to
``files/p10/p10000032/s50414267.txt``; they are looked for under the ``reports=`` folder if
given, else ``<root>/mimic-cxr-reports/``, else ``<root>`` itself (the zip unpacked into
the JPG tree puts each ``sXXXXXXXX.txt`` next to its image folder).

Items: one per frontal image (ViewPosition PA or AP; ``frontal=0`` keeps all views),
id = dicom_id, patient = subject_id. The report is the chosen sections of the study's
report (``sections=``), cleaned as MGCA does (see ``pipeline.datasets.reports``). Studies
whose report has no usable text are skipped and listed (about 9k on the full release).

Splits: the official split file. ``validate`` becomes ``valid`` and ``test`` stays
``test``; unlike MGCA, the two are kept apart rather than merged.

Labels: the 14 CheXpert-labeller findings per study: 1, 0, -1 (uncertain, under the
``uncertain=`` policy) and blank (not mentioned: NaN, or 0 with ``blank=zeros``).
"""
from __future__ import annotations

import re
from pathlib import Path

from cache.paths import plain_name
from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.readers._common import (LABELS, SECTIONS, Problems, Spec, chexpert_value, choice,
                                               csv_rows, find_file, finish, flag, parse_spec, path_opt,
                                               require_root, unmaterialised)
from pipeline.datasets.reports import report_text
from pipeline.datasets.table import DatasetError
from core.console import err, escape

READER = "mimic-cxr"
PREFIX = "mimic-cxr-2.0.0"
CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
SPLIT_NAMES = {"train": "train", "validate": "valid", "test": "test"}
FRONTAL = ("PA", "AP")
SCHEMA = {
    **SECTIONS, **LABELS,
    "frontal": flag(True, "frontal (PA/AP) images only"),
    "labels": choice("chexpert", ("chexpert", "negbio"), "which labeller's file to read"),
    "reports": path_opt("folder holding the reports' files/ tree"),
}
DESCRIPTION = "MIMIC-CXR-JPG frontal images with report findings/impression"


@register_reader(READER, SCHEMA, DESCRIPTION)
def open_mimic_cxr(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, SCHEMA)
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "No Finding")
    require_root(spec)
    problems = Problems(READER, spec["allow_failures"])
    splits = _read_splits(_need(spec.root, "split"), problems)
    labels = _read_labels(spec, problems)
    reports = _ReportFinder(spec, problems)
    metadata = _need(spec.root, "metadata")
    items: list[Item] = []
    for line, row in csv_rows(metadata, ("dicom_id", "subject_id", "study_id", "ViewPosition"), problems):
        if spec["frontal"] and row["ViewPosition"].upper() not in FRONTAL:
            continue
        item = _item(spec, row, f"{metadata}:{line}", splits, labels, reports, problems)
        if item is not None:
            items.append(item)
    reports.check_any_found()
    release = spec.root.name if re.fullmatch(r"\d+\.\d+\.\d+", spec.root.name) else "release not known"
    return finish(spec, cache_root, items, problems, DESCRIPTION, stratify_by="No Finding",
                  version=f"MIMIC-CXR-JPG {release} ({'frontal' if spec['frontal'] else 'all'} views)")


def _need(root: Path, what: str) -> Path:
    path = find_file(root, [f"{PREFIX}-{what}.csv"])
    if path is None:
        raise DatasetError(f"{READER}: {root / f'{PREFIX}-{what}.csv'} (or .csv.gz) not found. Give the "
                           "MIMIC-CXR-JPG folder that holds the CSV files and files/ (e.g. .../mimic-cxr-jpg/2.0.0).")
    return path


def _read_splits(path: Path, problems: Problems) -> dict[str, str]:
    out = {}
    for line, row in csv_rows(path, ("dicom_id", "split"), problems):
        split = SPLIT_NAMES.get(row["split"].lower())
        if split is None:
            problems.bad(f"{path}:{line}", f"unknown split {row['split']!r} (expected train, validate or test)",
                         row["dicom_id"])
            continue
        out[row["dicom_id"]] = split
    return out


def _read_labels(spec: Spec, problems: Problems) -> dict[tuple[str, str], dict[str, float]]:
    path = find_file(spec.root, [f"{PREFIX}-{spec['labels']}.csv"])
    if path is None:
        err.print(f"[yellow]{READER}: {PREFIX}-{spec['labels']}.csv not found in {escape(str(spec.root))}; "
                  "items get no labels[/]")
        return {}
    out = {}
    for line, row in csv_rows(path, ("subject_id", "study_id", *CHEXPERT_LABELS), problems):
        try:
            out[(row["subject_id"], row["study_id"])] = {
                name: chexpert_value(row[name], spec["uncertain"], spec["blank"]) for name in CHEXPERT_LABELS}
        except ValueError as e:
            problems.bad(f"{path}:{line}", str(e).replace("label value", "a label value"), f"s{row['study_id']}")
    return out


def _item(spec: Spec, row: dict, where: str, splits: dict, labels: dict, reports: "_ReportFinder",
          problems: Problems) -> Item | None:
    dicom_id, subject, study = row["dicom_id"], row["subject_id"], row["study_id"]
    if not (subject.isdigit() and study.isdigit() and len(subject) >= 2 and plain_name(dicom_id)):
        problems.bad(where, f"unparseable ids (subject_id={subject!r}, study_id={study!r}, dicom_id={dicom_id!r})",
                     dicom_id or None)
        return None
    if dicom_id not in splits:
        problems.bad(where, f"image {dicom_id} is not in {PREFIX}-split.csv", dicom_id)
        return None
    study_dir = Path("files") / f"p{subject[:2]}" / f"p{subject}"
    image = spec.root / study_dir / f"s{study}" / f"{dicom_id}.jpg"
    if not image.is_file():
        problems.bad(where, f"image file {image} is missing", dicom_id)
        return None
    report = reports.text(study_dir / f"s{study}.txt", study)
    if not report:
        return None
    empty = dict.fromkeys(CHEXPERT_LABELS, float("nan")) if labels else {}
    return Item(id=dicom_id, image=image, report=report, patient_id=subject, split=splits[dicom_id],
                labels=dict(labels.get((subject, study), empty)))


class _ReportFinder:
    """Reads each study's report once; records studies without usable text."""

    def __init__(self, spec: Spec, problems: Problems):
        given = spec["reports"]
        if given is not None and given.name == "files":
            given = given.parent
        self.bases = [given] if given is not None else [spec.root / "mimic-cxr-reports", spec.root]
        self.spec, self.problems = spec, problems
        self.cache: dict[str, str] = {}
        self.found = 0
        self.missing = 0

    def text(self, rel: Path, study: str) -> str:
        if study in self.cache:
            return self.cache[study]
        path = next((b / rel for b in self.bases if (b / rel).is_file()), None)
        if path is None:
            self.missing += 1
            text = ""
            self.problems.no_report(f"s{study}", str(self.bases[0] / rel), "report file not found")
        else:
            self.found += 1
            raw = path.read_text(encoding="utf-8", errors="replace")
            text = report_text(raw, self.spec["sections"], self.spec["clean"])
            if not text:
                self.problems.no_report(f"s{study}", str(path), f"no usable {self.spec['sections']} text")
        self.cache[study] = text
        return text

    def check_any_found(self) -> None:
        if self.missing and not self.found:
            where = " or ".join(str(b / "files") for b in self.bases)
            raise DatasetError(f"{READER}: no report files found under {where}. Unpack mimic-cxr-reports.zip "
                               "there, or pass the folder holding its files/ tree as the option reports=PATH.")
