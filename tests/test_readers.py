"""The real-dataset readers, on small trees with the published names, columns and nesting."""
from __future__ import annotations

import gzip
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets import DatasetError, load_mask, open_dataset
from pipeline.datasets.masks import boxes_to_mask, decode_relative_rle
from pipeline.datasets.readers.covidx import parse_line
from pipeline.datasets.readers.iu_xray import mesh_labels
from pipeline.datasets.reports import (clean_report, extract_sections, normalise_section_name, report_text,
                                       select_text, split_sections)
from pipeline.datasets.splits import patients_in_several_splits
from tests.helpers import pipe
from tests.helpers.files import write_csv, write_jpg
from tests.helpers.layouts import SIIM_IDS, build_covidx, build_mimic, build_rsna, build_siim

NAN = float("nan")


def line_of(path: Path, needle: str) -> int:
    data = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return next(i for i, line in enumerate(data.splitlines(), 1) if needle in line)


# ------------------------------------------------------------------------ MIMIC-CXR


def test_mimic_frontal_items_official_splits_and_reports(tmp_path):
    root = build_mimic(tmp_path / "mimic-cxr-jpg" / "2.0.0")
    ds = open_dataset(f"mimic-cxr:{root}", tmp_path / "cache")
    by_id = {it.id: it for it in ds}
    # Laterals dropped; the study whose impression is only "___" is skipped and listed.
    assert sorted(by_id) == ["d-aaaa-01", "d-aaab-01", "d-bbbb-01", "d-bbbb-02", "d-cccc-01"]
    assert [s["id"] for s in ds.skipped] == ["s58000000"] and ds.skipped[0]["kind"] == "no-report"
    assert "s58000000" in (tmp_path / "cache" / "derived" / ds.name / "skipped.csv").read_text()
    first = by_id["d-aaaa-01"]
    assert first.image == root / "files/p10/p10000032/s50414267/d-aaaa-01.jpg" and first.image.is_file()
    assert first.patient_id == "10000032" and first.split == "train"
    assert {by_id["d-bbbb-01"].split, by_id["d-cccc-01"].split} == {"valid", "test"}  # validate kept apart
    # Impression first, then findings; lower-case, no punctuation, list markers gone.
    assert first.report == ("small right effusion no focal consolidation heart size is within normal limits "
                            "there is a small right pleural effusion no pneumothorax is seen")
    # No headers: the last paragraph.
    assert by_id["d-aaab-01"].report == ("the endotracheal tube ends about four centimeters above the carina "
                                         "lungs are clear of consolidation")
    assert first.labels["Pleural Effusion"] == 1.0 and math.isnan(first.labels["Pneumonia"])
    assert math.isnan(first.labels["No Finding"]) and by_id["d-aaab-01"].labels["No Finding"] == 0.0
    assert len(first.labels) == 14
    assert not patients_in_several_splits(ds)


def test_mimic_options_sections_policies_and_names(tmp_path):
    root = build_mimic(tmp_path / "m", reports_under="", gz=False)  # reports unpacked into the JPG tree
    cache = tmp_path / "cache"
    ones = open_dataset(f"mimic-cxr:{root}?uncertain=ones&sections=findings", cache)
    first = next(it for it in ones if it.id == "d-aaaa-01")
    assert first.labels["Pneumonia"] == 1.0
    assert first.report.startswith("heart size is within normal limits") and "focal" not in first.report
    zeros = open_dataset(f"mimic-cxr:{root}?uncertain=zeros&blank=zeros", cache)
    z = next(it for it in zeros if it.id == "d-aaaa-01")
    assert z.labels["Pneumonia"] == 0.0 and z.labels["No Finding"] == 0.0
    every = open_dataset(f"mimic-cxr:{root}?frontal=0", cache)
    assert "d-aaaa-02" in {it.id for it in every}
    names = {ds.name for ds in (ones, zeros, every, open_dataset(f"mimic-cxr:{root}", cache))}
    assert len(names) == 4
    assert open_dataset(f"mimic-cxr:{root}", cache, materialise=False).name == \
        open_dataset(f"mimic-cxr:{root}?allow_failures=1", cache).name
    assert open_dataset(f"mimic-cxr:{root}", cache, materialise=False).items == []


def test_mimic_reports_option(tmp_path):
    root = build_mimic(tmp_path / "jpg", reports_under="")
    reports = tmp_path / "elsewhere"
    (root / "files").rename(tmp_path / "moved")
    build_mimic(root)  # images again, reports under mimic-cxr-reports/
    (root / "mimic-cxr-reports").rename(reports)
    with pytest.raises(DatasetError, match="reports=PATH"):
        open_dataset(f"mimic-cxr:{root}", tmp_path / "c")
    ds = open_dataset(f"mimic-cxr:{root}?reports={reports}", tmp_path / "c")
    assert len(ds) == 5


def test_mimic_bad_rows_name_file_and_line(tmp_path):
    root = build_mimic(tmp_path / "m")
    (root / "files/p11/p11000011/s56699142/d-bbbb-02.jpg").unlink()
    meta = root / "mimic-cxr-2.0.0-metadata.csv"
    with pytest.raises(DatasetError) as e:
        open_dataset(f"mimic-cxr:{root}", tmp_path / "c")
    assert f"{meta}:{line_of(meta, 'd-bbbb-02')}" in str(e.value) and "d-bbbb-02.jpg is missing" in str(e.value)
    ds = open_dataset(f"mimic-cxr:{root}?allow_failures=1", tmp_path / "c")
    assert len(ds) == 4 and [s["id"] for s in ds.skipped if s["kind"] == "bad-row"] == ["d-bbbb-02"]
    # A label out of range and an unparseable row, each named by its line.
    chex = root / "mimic-cxr-2.0.0-chexpert.csv.gz"
    original = chex.read_bytes()
    text = gzip.decompress(original).decode().replace("57375967,,-1.0", "57375967,,2.0")
    chex.write_bytes(gzip.compress(text.encode()))
    with pytest.raises(DatasetError, match=rf"chexpert\.csv\.gz:{line_of(chex, '57375967')}: .*out of range"):
        open_dataset(f"mimic-cxr:{root}?allow_failures=0", tmp_path / "c")
    chex.write_bytes(original)
    write_jpg(root / "files/p11/p11000011/s56699142/d-bbbb-02.jpg", seed=0)
    with meta.open("a") as f:
        f.write("d-extra,10000032,50414267,too,few\n")
    with pytest.raises(DatasetError, match=rf"metadata\.csv:{line_of(meta, 'd-extra')}: unparseable row"):
        open_dataset(f"mimic-cxr:{root}", tmp_path / "c")
    ds = open_dataset(f"mimic-cxr:{root}?allow_failures=1", tmp_path / "c")
    assert [s["source"] for s in ds.skipped if s["kind"] == "bad-row"] == [f"{meta}:{line_of(meta, 'd-extra')}"]


def test_unknown_option_and_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="unknown option 'uncertian'.*uncertain"):
        open_dataset(f"chexpert:{tmp_path}?uncertian=ones", tmp_path)
    with pytest.raises(DatasetError, match="option uncertain='maybe' is invalid"):
        open_dataset(f"chexpert:{tmp_path}?uncertain=maybe", tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        open_dataset(f"rsna-pneumonia:{tmp_path / 'nope'}", tmp_path)
    with pytest.raises(DatasetError, match="mimic-cxr-2.0.0-split.csv"):
        open_dataset(f"mimic-cxr:{tmp_path}", tmp_path)


# ------------------------------------------------------------------------- CheXpert

CHEXPERT_LABELS = ["No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
                   "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
                   "Fracture", "Support Devices"]
CHEXPERT_COLS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]


def build_chexpert(parent: Path, release: str = "CheXpert-v1.0-small") -> Path:
    root = parent / release
    rows = {"train": [], "valid": []}
    entries = [("train", "patient00001", "study1", "view1_frontal", "Frontal", "AP",
                {"Edema": "-1.0", "No Finding": ""}),
               ("train", "patient00001", "study1", "view2_lateral", "Lateral", "", {"Edema": "1.0"}),
               ("train", "patient00002", "study2", "view1_frontal", "Frontal", "PA", {"Cardiomegaly": "1.0",
                                                                                    "Edema": "0.0"}),
               ("valid", "patient64541", "study1", "view1_frontal", "Frontal", "AP", {"No Finding": "1.0"})]
    for i, (split, patient, study, view, fl, appa, labels) in enumerate(entries):
        rel = f"{split}/{patient}/{study}/{view}.jpg"
        write_jpg(root / rel, seed=i)
        values = [labels.get(n, "0.0" if split == "valid" else "") for n in CHEXPERT_LABELS]
        rows[split].append([f"{release}/{rel}", "Female", 68, fl, appa, *values])
    for split, r in rows.items():
        write_csv(root / f"{split}.csv", CHEXPERT_COLS, r)
    return root


def test_chexpert_policies_views_and_official_splits(tmp_path):
    root = build_chexpert(tmp_path)
    cache = tmp_path / "cache"
    ds = open_dataset(f"chexpert:{root}", cache)
    by_id = {it.id: it for it in ds}
    assert sorted(by_id) == ["train/patient00001/study1/view1_frontal", "train/patient00002/study2/view1_frontal",
                             "valid/patient64541/study1/view1_frontal"]
    it = by_id["train/patient00001/study1/view1_frontal"]
    assert it.image == root / "train/patient00001/study1/view1_frontal.jpg" and it.patient_id == "patient00001"
    assert it.split == "train" and by_id["valid/patient64541/study1/view1_frontal"].split == "valid"
    assert math.isnan(it.labels["Edema"]) and math.isnan(it.labels["No Finding"]) and it.report is None
    assert by_id["train/patient00002/study2/view1_frontal"].labels["Edema"] == 0.0
    ones = {i.id: i for i in open_dataset(f"chexpert:{root}?uncertain=ones", cache)}
    zeros = {i.id: i for i in open_dataset(f"chexpert:{root}?uncertain=zeros&blank=zeros", cache)}
    assert ones[it.id].labels["Edema"] == 1.0 and zeros[it.id].labels["Edema"] == 0.0
    assert zeros[it.id].labels["No Finding"] == 0.0
    # Laterals on request; the folder above the release works too.
    every = open_dataset(f"chexpert:{tmp_path}?frontal=0", cache)
    assert "train/patient00001/study1/view2_lateral" in {i.id for i in every} and len(every) == 4
    assert len({ds.name, every.name, open_dataset(f"chexpert:{root}?uncertain=ones", cache).name}) == 3


def test_chexpert_bad_rows(tmp_path):
    root = build_chexpert(tmp_path, release="CheXpert-v1.0")
    train = root / "train.csv"
    train.write_text(train.read_text().replace("PA,,,1.0", "PA,,,3.0"))
    with pytest.raises(DatasetError, match=rf"train\.csv:{line_of(train, 'patient00002')}: .*'3.0' is out of range"):
        open_dataset(f"chexpert:{root}", tmp_path / "c")
    (root / "valid/patient64541/study1/view1_frontal.jpg").unlink()
    ds = open_dataset(f"chexpert:{root}?allow_failures=1", tmp_path / "c")
    assert len(ds) == 1 and sorted(s["source"].split(":")[-2][-9:] for s in ds.skipped) == ["train.csv", "valid.csv"]


# --------------------------------------------------------------------- RSNA pneumonia

def test_box_rasterisation_by_hand():
    mask = boxes_to_mask([(1, 2, 3, 1), (4.4, 0, 10, 1.6)], height=4, width=6)
    expected = np.array([[0, 0, 0, 0, 1, 1],
                         [0, 0, 0, 0, 1, 1],
                         [0, 1, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert not boxes_to_mask([], 3, 3).any()


def test_rsna_labels_masks_and_splits(tmp_path):
    root = build_rsna(tmp_path / "rsna", n_negative=40)
    cache = tmp_path / "cache"
    ds = open_dataset(f"rsna-pneumonia:{root}", cache)
    by_id = {it.id: it for it in ds}
    assert len(ds) == 43 and ds.stratify_by == "pneumonia"
    two = by_id["00436515-0000-0000-0000-000000000002"]
    assert two.labels == {"pneumonia": 1.0} and two.image.suffix == ".dcm"
    assert two.mask.parent == cache / "derived" / ds.name / "masks"
    mask = load_mask(two.mask)
    assert mask.dtype == bool and mask.shape == (12, 16)  # Rows x Columns of the DICOM
    np.testing.assert_array_equal(mask, boxes_to_mask([(2, 3, 4, 2), (10, 1, 3, 5)], 12, 16))
    neg = by_id["0004cfab-0000-0000-0000-000000000001"]
    assert neg.labels == {"pneumonia": 0.0} and not load_mask(neg.mask).any()
    assert {it.split for it in ds} == {"train", "valid", "test"}
    again = open_dataset(f"rsna-pneumonia:{root}", cache)
    assert [(i.id, i.split) for i in again] == [(i.id, i.split) for i in ds]
    reseeded = open_dataset(f"rsna-pneumonia:{root}?seed=7", cache)
    assert reseeded.name != ds.name and [i.split for i in reseeded] != [i.split for i in ds]
    # Changed boxes give a new mask file; the old one is never reused.
    labels = root / "stage_2_train_labels.csv"
    labels.write_text(labels.read_text().replace("10.0,1.0,3.0,5.0", "10.0,1.0,3.0,2.0"))
    moved = {it.id: it for it in open_dataset(f"rsna-pneumonia:{root}", cache)}
    assert moved[two.id].mask != two.mask
    np.testing.assert_array_equal(load_mask(moved[two.id].mask), boxes_to_mask([(2, 3, 4, 2), (10, 1, 3, 2)], 12, 16))


def test_rsna_bad_rows(tmp_path):
    root = build_rsna(tmp_path / "rsna")
    labels = root / "stage_2_train_labels.csv"
    labels.write_text(labels.read_text().replace("0.0,0.0,1.0,1.0,1", "0.0,0.0,1.0,1.0,2"))
    with pytest.raises(DatasetError, match=r"stage_2_train_labels\.csv:5: Target '2' is out of range"):
        open_dataset(f"rsna-pneumonia:{root}", tmp_path / "c")
    (root / "stage_2_train_images/0004cfab-0000-0000-0000-000000000001.dcm").unlink()
    ds = open_dataset(f"rsna-pneumonia:{root}?allow_failures=1", tmp_path / "c")
    assert [it.id for it in ds] == ["00436515-0000-0000-0000-000000000002"]
    assert len(ds.skipped) == 2 and any("stage_2_train_labels.csv:2" in s["source"] for s in ds.skipped)


# ------------------------------------------------------------------ SIIM pneumothorax


def test_relative_rle_decoding_by_hand():
    # Column-major numbering on a 3-row, 4-column image: pixel k is (k % 3, k // 3).
    # "1 2 3 1": skip 1, set 2 (pixels 1, 2), skip 3 from there (3, 4, 5), set 1 (pixel 6).
    mask = decode_relative_rle("1 2 3 1", height=3, width=4)
    expected = np.array([[0, 0, 1, 0],
                         [1, 0, 0, 0],
                         [1, 0, 0, 0]], dtype=bool)
    np.testing.assert_array_equal(mask, expected)
    assert not decode_relative_rle("-1", 3, 4).any() and decode_relative_rle(" -1", 3, 4).shape == (3, 4)
    with pytest.raises(ValueError, match="past"):
        decode_relative_rle("10 5", 3, 4)
    with pytest.raises(ValueError, match="pairs"):
        decode_relative_rle("1 2 3", 3, 4)


def test_siim_union_of_regions_and_labels(tmp_path):
    root = build_siim(tmp_path / "siim", extra=20)
    ds = open_dataset(f"siim-pneumothorax:{root}", tmp_path / "cache")
    by_id = {it.id: it for it in ds}
    assert len(ds) == 23 and ds.stratify_by == "pneumothorax"
    pos = by_id[SIIM_IDS[1]]
    assert pos.labels == {"pneumothorax": 1.0} and pos.image.parent.parent.parent.name == "dicom-images-train"
    # Two rows: "1 2 3 1" (pixels 1, 2, 6) and "9 2" (pixels 9, 10) -> (1,0) (2,0) (0,2) (0,3) (1,3).
    expected = np.zeros((3, 4), dtype=bool)
    expected[1, 0] = expected[2, 0] = expected[0, 2] = expected[0, 3] = expected[1, 3] = True
    np.testing.assert_array_equal(load_mask(pos.mask), expected)
    assert by_id[SIIM_IDS[0]].labels == {"pneumothorax": 0.0} and not load_mask(by_id[SIIM_IDS[0]].mask).any()
    assert {it.split for it in ds} <= {"train", "valid", "test"} and len({it.split for it in ds}) >= 2


def test_siim_bad_rows(tmp_path):
    root = build_siim(tmp_path / "siim")
    rle = root / "train-rle.csv"
    rle.write_text(rle.read_text().replace(", 9 2", ", 9 2 7"))
    with pytest.raises(DatasetError, match=r"train-rle\.csv:4: run-length code needs"):
        open_dataset(f"siim-pneumothorax:{root}", tmp_path / "c")
    next((root / "dicom-images-train").rglob(f"{SIIM_IDS[2]}.dcm")).unlink()
    ds = open_dataset(f"siim-pneumothorax:{root}?allow_failures=1", tmp_path / "c")
    assert [it.id for it in ds] == [SIIM_IDS[0]]
    reasons = " | ".join(f"{s['source']}: {s['reason']}" for s in ds.skipped)
    assert "train-rle.csv:4" in reasons and f"{SIIM_IDS[2]}.dcm is missing" in reasons


# -------------------------------------------------------------------------- COVIDx


def test_covidx_parse_both_formats():
    assert parse_line("3 SARS-fig1-day0.jpeg COVID-19 cohen\n") == ("3", "SARS-fig1-day0.jpeg", "COVID-19", "cohen")
    assert parse_line("12 a b.png normal") == ("12", "a b.png", "normal", None)
    assert parse_line("419639-003251 MIDRC-1.png positive rsna")[2] == "positive"
    with pytest.raises(ValueError, match="expected 'patient_id filename class"):
        parse_line("12 a.png pneumothorax rsna")


def test_covidx_classes_and_carved_valid(tmp_path):
    root = build_covidx(tmp_path / "covidx", n_train=60)
    ds = open_dataset(f"covidx:{root}", tmp_path / "cache")
    by_id = {it.id: it for it in ds}
    assert len(ds) == 63
    assert by_id["img-000.png"].labels == {"label": 0.0, "covid": 0.0}
    assert by_id["img-001.png"].labels == {"label": 1.0, "covid": 0.0}
    assert by_id["img-002.png"].labels == {"label": 2.0, "covid": 1.0}
    assert by_id["test 002.png"].split == "test" and by_id["test 002.png"].labels["label"] == 1.0
    assert by_id["img-004.png"].patient_id == "102"
    splits = {it.split for it in ds}
    assert splits == {"train", "valid", "test"}  # no val.txt: 10% of train patients carved off
    assert not patients_in_several_splits(ds)
    official = open_dataset(f"covidx:{build_covidx(tmp_path / 'v', with_val=True)}", tmp_path / "cache")
    assert [it.id for it in official if it.split == "valid"] == ["val-000.png"]


def test_covidx_binary_release_and_bad_lines(tmp_path):
    root = build_covidx(tmp_path / "c")
    (root / "test.txt").write_text("900 test-000.jpeg positive bimcv\n901 test-001.png negative rsna\n")
    ds = open_dataset(f"covidx:{root}", tmp_path / "cache")
    tests = {it.id: it.labels for it in ds if it.split == "test"}
    assert tests["test-000.jpeg"] == {"label": 2.0, "covid": 1.0}
    assert math.isnan(tests["test-001.png"]["label"]) and tests["test-001.png"]["covid"] == 0.0
    (root / "test.txt").write_text("900 test-000.jpeg positive bimcv\n901 missing.png normal rsna\n903 x.png odd\n")
    with pytest.raises(DatasetError, match=r"test\.txt:2: image file .*missing\.png is missing"):
        open_dataset(f"covidx:{root}", tmp_path / "cache")
    ds = open_dataset(f"covidx:{root}?allow_failures=1", tmp_path / "cache")
    assert sorted(s["source"].rsplit("/", 1)[-1] for s in ds.skipped) == ["test.txt:2", "test.txt:3"]


# ---------------------------------------------------------------------------- IU X-ray

IU_XML = """<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{n}"/>
   <pmcId id="{n}"/>
   <MedlineCitation Owner="Indiana University" Status="supplied by publisher">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">XXXX.</AbstractText>
            <AbstractText Label="INDICATION">Shortness of breath.</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH>
{mesh}
   </MeSH>
{images}
</eCitation>
"""


def iu_report(n: int, findings: str, impression: str, mesh: list[str], images: list[str]) -> str:
    return IU_XML.format(
        n=n, findings=findings, impression=impression,
        mesh="\n".join(f"      <major>{m}</major>" for m in mesh) + "\n      <automatic>ignored term</automatic>",
        images="\n".join(f'   <parentImage id="{i}">\n      <figureId>F1</figureId>\n'
                         f"      <caption>Xray Chest PA and Lateral</caption>\n   </parentImage>" for i in images))


def build_iu(root: Path) -> Path:
    reports = [
        (1, "The heart is of normal size. The lungs are free of infiltrates.", "Nothing acute in the chest.",
         ["normal"], ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001"]),
        (2, "Heart is enlarged. Blunting of the left costophrenic XXXX.", "Enlarged heart. Small left effusion.",
         ["Cardiomegaly/mild", "Pleural Effusion/left/small", "Pericardial Effusion"], ["CXR2_IM-0652-1001"]),
        (3, "", "Patchy opacity at the right base, likely pneumonia.",
         ["Opacity/lung/base/right", "Pneumonia/right"], ["CXR3_IM-1384-1001"]),
        (4, "", "", ["No Indexing"], ["CXR4_IM-2050-1001"]),
        (5, "Lungs clear.", "No acute findings.", ["No Indexing"], []),
    ]
    (root / "ecgen-radiology").mkdir(parents=True, exist_ok=True)
    for n, findings, impression, mesh, images in reports:
        (root / "ecgen-radiology" / f"{n}.xml").write_text(iu_report(n, findings, impression, mesh, images))
        for i, image in enumerate(images):
            write_jpg(root / "NLMCXR_png" / f"{image}.png", seed=n * 10 + i, size=(10, 12))
    return root


def test_iu_mesh_mapping():
    labels = mesh_labels(["Cardiac Shadow/enlarged", "Pericardial Effusion", "Mass/lung/upper lobe/left"])
    assert labels == {"cardiomegaly": 1.0, "effusion": 0.0, "pneumothorax": 0.0, "opacity": 0.0, "nodule": 1.0,
                      "atelectasis": 0.0, "normal": 0.0}
    assert all(math.isnan(v) for v in mesh_labels(["No Indexing"]).values())
    assert mesh_labels(["Pulmonary Atelectasis/base/left", "Airspace Disease"])["opacity"] == 1.0


def test_iu_items_reports_labels_and_skips(tmp_path):
    root = build_iu(tmp_path / "iu")
    ds = open_dataset(f"iu-xray:{root}", tmp_path / "cache")
    by_id = {it.id: it for it in ds}
    assert sorted(by_id) == ["CXR1_1_IM-0001-3001", "CXR1_1_IM-0001-4001", "CXR2_IM-0652-1001", "CXR3_IM-1384-1001"]
    first = by_id["CXR1_1_IM-0001-3001"]
    assert first.patient_id == "CXR1" and first.split == by_id["CXR1_1_IM-0001-4001"].split
    assert first.report == "nothing acute in the chest the heart is of normal size the lungs are free of infiltrates"
    assert first.labels["normal"] == 1.0 and first.labels["cardiomegaly"] == 0.0
    second = by_id["CXR2_IM-0652-1001"]
    assert second.labels["cardiomegaly"] == 1.0 and second.labels["effusion"] == 1.0
    assert "xxxx" not in second.report and second.report.endswith("blunting of the left costophrenic")
    assert by_id["CXR3_IM-1384-1001"].labels["opacity"] == 1.0
    assert {(s["id"], s["kind"]) for s in ds.skipped} == {("CXR4", "no-report"), ("CXR5", "no-image")}
    findings = {it.id: it for it in open_dataset(f"iu-xray:{root}?sections=findings", tmp_path / "cache")}
    assert findings["CXR1_1_IM-0001-3001"].report.startswith("the heart")
    # Findings asked for but empty: the impression stands in.
    assert findings["CXR3_IM-1384-1001"].report.startswith("patchy opacity")


def test_iu_bad_files(tmp_path):
    root = build_iu(tmp_path / "iu")
    (root / "NLMCXR_png" / "CXR2_IM-0652-1001.png").unlink()
    with pytest.raises(DatasetError, match=r"2\.xml: image CXR2_IM-0652-1001: file .* is missing"):
        open_dataset(f"iu-xray:{root}", tmp_path / "c")
    (root / "ecgen-radiology" / "6.xml").write_text("<eCitation><uId id='CXR6'/>")
    ds = open_dataset(f"iu-xray:{root}?allow_failures=1", tmp_path / "c")
    bad = [s for s in ds.skipped if s["kind"] == "bad-row"]
    assert len(bad) == 2 and any("6.xml" in s["source"] and "unparseable XML" in s["reason"] for s in bad)


# ------------------------------------------------------------------- report sections


def test_sections_with_headers_and_variants():
    text = ("WET READ: ___ 10:20 AM\n  no pneumothorax\n\n FINAL REPORT\n INDICATION:  fever\n\n"
            " FINDINGS: Lungs are clear.\n The heart is normal.\n\n CONCLUSION:\n No acute process.\n")
    names = [n for n, _ in split_sections(text)]
    assert names == ["preamble", "wet read", "indication", "findings", "impression"]
    assert extract_sections(text) == {"findings": "Lungs are clear.\n The heart is normal.",
                                      "impression": "No acute process."}
    for header in ("FINDINGS AND IMPRESSION", "FINDINGS/IMPRESSION", "IMPRESSON", "Impression", "IMPRESSIONS"):
        assert extract_sections(f" {header}: Stable lines.\n") == {"impression": "Stable lines."}, header
    assert normalise_section_name("FINDNGS") == "findings" and normalise_section_name("TECHNIQUE") == "technique"
    # A mixed-case sentence with a colon is not a header.
    assert [n for n, _ in split_sections("Note the following: a nodule.\n")] == ["full report"]
    # The last impression wins (addenda repeat it).
    assert extract_sections("IMPRESSION: first\nADDENDUM: x\nIMPRESSION: second\n")["impression"] == "second"


def test_section_choice_and_fallbacks():
    text = "FINDINGS: Small effusion.\nIMPRESSION: Effusion\n"
    assert select_text(text, "both") == "Effusion.\nSmall effusion."
    assert select_text(text, "impression") == "Effusion."
    assert select_text(text, "findings") == "Small effusion."
    assert select_text("FINDINGS: Clear lungs.\n", "impression") == "Clear lungs."
    # No headers: the last paragraph.
    assert select_text("Two views of the chest.\n\nNo acute disease.\n") == "No acute disease."
    assert select_text("No acute disease seen today.") == "No acute disease seen today."
    # Headers without findings/impression: the last paragraph of the last section, if it has several.
    assert select_text("INDICATION: cough\n\nComparison none.\n\nLungs are clear.\n") == "Lungs are clear."
    assert select_text("INDICATION: cough\nCOMPARISON: none\n") == ""
    assert select_text("") == "" and select_text("   \n ") == ""
    with pytest.raises(ValueError, match="sections must be"):
        select_text(text, "all")


def test_mgca_cleaning():
    assert clean_report("1. No pneumothorax. 2. Stable cardiomegaly.") == "no pneumothorax stable cardiomegaly"
    # One-token sentences are dropped; placeholders are not tokens; non-ASCII removed.
    assert clean_report("Clear. Heart size normal, mediastinum ___ stable. Café-au-lait spots.") == \
        "heart size normal mediastinum stable cafe au lait spots"
    assert clean_report("No effusion.") == ""  # fewer than three tokens: unusable
    assert clean_report("") == "" and clean_report("XXXX. ___.") == ""
    assert report_text("IMPRESSION: Normal chest radiograph\n", clean=False) == "Normal chest radiograph."


# ------------------------------------------------------------------------ preview


def test_preview_grid_png(tmp_path):
    root = build_siim(tmp_path / "siim", extra=3)
    out = tmp_path / "grid.png"
    r = pipe("data", "preview", f"siim-pneumothorax:{root}", "--out", str(out), "--n", "5", "--seed", "1",
             "--cache", str(tmp_path / "cache"))
    assert "wrote" in r.output
    with Image.open(out) as img:
        assert img.size == (3 * 300, 2 * 400)  # 5 items -> 3 columns, 2 rows of 300 x 400 cells
        rgb = np.asarray(img.convert("RGB")).astype(int)
    # The positive image's mask shows up as red-tinted pixels.
    redness = rgb[..., 0] - rgb[..., 1]
    assert (redness > 60).sum() > 100
    iu = build_iu(tmp_path / "iu")
    pipe("data", "preview", f"iu-xray:{iu}", "--out", str(tmp_path / "iu.png"), "--cache", str(tmp_path / "cache"))
    with Image.open(tmp_path / "iu.png") as img:
        assert img.size == (2 * 300, 2 * 400)


def test_data_info_cli(tmp_path):
    root = build_rsna(tmp_path / "rsna", n_negative=5)
    r = pipe("data", "info", f"rsna-pneumonia:{root}", "--cache", str(tmp_path / "c"), "--json")
    summary = pd.read_json(io.StringIO(r.stdout.strip().splitlines()[-1]), typ="series")
    assert summary["items"] == 8 and summary["labels"]["pneumonia"]["positive"] == 2
    bad = pipe("data", "info", f"rsna-pneumonia:{tmp_path / 'none'}", "--cache", str(tmp_path / "c"), expect=2)
    assert "does not exist" in bad.output


def test_one_dataset_spec_grammar_and_the_old_demo_spelling(capsys):
    """`reader:root?k=v&k=v` everywhere; the old `demo:n=..,..` still parses to the same spec
    and says once how to write it now."""
    from pipeline.datasets import READERS
    from pipeline.datasets.spec import parse_dataset_spec, warn_legacy

    new = parse_dataset_spec("demo?n=500&seed=1", READERS)
    old = parse_dataset_spec("demo:n=500,seed=1", READERS)
    assert (new.reader, new.root, new.options, new.legacy) == ("demo", "", {"n": "500", "seed": "1"}, False)
    assert (old.reader, old.root, old.options, old.legacy) == ("demo", "", {"n": "500", "seed": "1"}, True)
    assert old.text() == "demo?n=500&seed=1"
    chex = parse_dataset_spec("chexpert:/data/chexpert?uncertain=ones", READERS)
    assert (chex.root, chex.options) == ("/data/chexpert", {"uncertain": "ones"})
    assert parse_dataset_spec("pairs.csv", READERS) is None
    warn_legacy(old, "demo:n=500,seed=1")
    warn_legacy(old, "demo:n=500,seed=1")
    printed = capsys.readouterr().err
    assert printed.count("deprecated") == 1 and "'demo?n=500&seed=1'" in printed
