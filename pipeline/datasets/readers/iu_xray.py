"""IU X-ray (Indiana University chest X-rays, as distributed by Open-i).

Layout::

    <root>/ecgen-radiology/<n>.xml         one report per file (NLMCXR_reports.tgz)
    <root>/NLMCXR_png/<image id>.png        (NLMCXR_png.tgz; PNGs directly in <root> work too)

A report's ``<AbstractText Label="FINDINGS">`` and ``Label="IMPRESSION"`` hold the text;
``<MeSH><major>`` the indexing terms ("Cardiomegaly/mild", "Pleural Effusion/left",
"normal"); each ``<parentImage id="CXR1_1_IM-0001-3001">`` names one image of the study.

Items: one per image, id = the image id, patient = the report's ``uId`` (``CXR1``; the
collection has one study per patient). All views: the XML does not say which images are
frontal. The report is the chosen sections (``sections=``), cleaned as for MIMIC-CXR.
Reports with no usable text or no images are skipped and listed.

Labels from the major MeSH terms, matched on the term's first part (before "/"):

* cardiomegaly: Cardiomegaly; Cardiac Shadow/enlarged
* effusion: Pleural Effusion (not Pericardial Effusion)
* pneumothorax: Pneumothorax
* opacity: Opacity, Consolidation, Airspace Disease, Infiltrate, Pneumonia
* nodule: Nodule, Mass
* atelectasis: Pulmonary Atelectasis
* normal: normal

A term not in the list sets nothing; every label of a report indexed only as
"No Indexing" (or not at all) is NaN, otherwise the labels are 0/1.

Splits: none official; patients are split 70/10/20 (train/valid/test) by a seeded hash
of the report id (``seed=``).
"""
from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

from pipeline.datasets.registry import register_reader
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.readers._common import (SECTIONS, SEED, Problems, Spec, finish, parse_spec, require_root,
                                               unmaterialised)
from pipeline.datasets.reports import choose_sections, clean_report
from pipeline.datasets.splits import hash_split
from pipeline.datasets.table import DatasetError

READER = "iu-xray"
PROPORTIONS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
FINDINGS = ("cardiomegaly", "effusion", "pneumothorax", "opacity", "nodule", "atelectasis", "normal")
MESH = {
    "cardiomegaly": "cardiomegaly", "pleural effusion": "effusion", "pneumothorax": "pneumothorax",
    "opacity": "opacity", "consolidation": "opacity", "airspace disease": "opacity", "infiltrate": "opacity",
    "pneumonia": "opacity", "nodule": "nodule", "mass": "nodule", "pulmonary atelectasis": "atelectasis",
    "normal": "normal",
}
UNINDEXED = "no indexing"
DESCRIPTION = "IU X-ray (Open-i) images with findings/impression and MeSH-derived labels"


@register_reader(READER, {**SECTIONS, **SEED}, DESCRIPTION)
def open_iu_xray(arg: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    spec = parse_spec(READER, arg, {**SECTIONS, **SEED})
    if not materialise:
        return unmaterialised(spec, DESCRIPTION, "normal")
    require_root(spec)
    xml_dir = spec.root / "ecgen-radiology"
    if not xml_dir.is_dir():
        raise DatasetError(f"{READER}: {xml_dir} not found. Unpack NLMCXR_reports.tgz (its ecgen-radiology/ "
                           "folder) and NLMCXR_png.tgz into the folder you give.")
    png_dir = spec.root / "NLMCXR_png" if (spec.root / "NLMCXR_png").is_dir() else spec.root
    problems = Problems(READER, spec["allow_failures"])
    items: list[Item] = []
    for path in sorted(xml_dir.glob("*.xml"), key=_numeric):
        items += _read(spec, path, png_dir, problems)
    return finish(spec, cache_root, items, problems, DESCRIPTION, stratify_by="normal")


def _numeric(path: Path) -> tuple[int, str]:
    return (int(path.stem), "") if path.stem.isdigit() else (math.inf, path.stem)


def mesh_labels(terms: list[str]) -> dict[str, float]:
    """The finding labels of a report's major MeSH terms (see the module docstring)."""
    heads = [t.strip().lower() for t in terms if t and t.strip()]
    if not heads or all(h == UNINDEXED for h in heads):
        return dict.fromkeys(FINDINGS, math.nan)
    labels = dict.fromkeys(FINDINGS, 0.0)
    for term in heads:
        parts = [p.strip() for p in term.split("/")]
        name = MESH.get(parts[0])
        if parts[0] == "cardiac shadow" and "enlarged" in parts[1:]:
            name = "cardiomegaly"
        if name:
            labels[name] = 1.0
    return labels


def _read(spec: Spec, path: Path, png_dir: Path, problems: Problems) -> list[Item]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        problems.bad(str(path), f"unparseable XML ({e})", path.stem)
        return []
    uid = root.find("uId")
    report_id = uid.get("id") if uid is not None and uid.get("id") else f"CXR{path.stem}"
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().lower()
        if label in ("findings", "impression"):
            sections[label] = " ".join("".join(node.itertext()).split())
    text = choose_sections(sections, spec["sections"])
    report = clean_report(text) if spec["clean"] else " ".join(text.split())
    images = [n.get("id") for n in root.iter("parentImage") if n.get("id")]
    if not images:
        problems.skipped.append({"id": report_id, "source": str(path), "reason": "the report has no images",
                                 "kind": "no-image"})
        return []
    if not report:
        problems.no_report(report_id, str(path), f"no usable {spec['sections']} text")
        return []
    labels = mesh_labels([n.text or "" for n in root.iter("major")])
    split = hash_split(report_id, PROPORTIONS, spec["seed"])
    items = []
    for image_id in images:
        if not re.fullmatch(r"[\w.-]+", image_id):
            problems.bad(str(path), f"parentImage id {image_id!r} is not a file name", image_id)
            continue
        image = png_dir / f"{image_id}.png"
        if not image.is_file():
            problems.bad(str(path), f"image {image_id}: file {image} is missing", image_id)
            continue
        items.append(Item(id=image_id, image=image, report=report, patient_id=report_id, split=split,
                          labels=dict(labels)))
    return items
