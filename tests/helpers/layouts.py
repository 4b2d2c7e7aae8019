"""Miniature copies of the paper's datasets in their published layouts, and of the split files
others publish for them (BenchX's lists, MGCA's CSVs): built by the tests, never copied from
those projects. Small enough to embed with the tiny encoders in seconds, large enough that
every split of every fraction holds both classes. The readers' own tests use the smaller
trees at the end (a few rows each, with the cases a reader must handle)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.files import write_csv, write_dicom, write_jpg

# MIMIC-CXR's CheXpert label columns and metadata columns, in the release's order
MIMIC_LABELS = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Fracture",
                "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other", "Pneumonia",
                "Pneumothorax", "Support Devices"]
META_COLS = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition", "Rows",
             "Columns", "StudyDate", "StudyTime", "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
             "PatientOrientationCodeSequence_CodeMeaning"]

REPORTS = ["Small right pleural effusion. No pneumothorax.", "Heart size is normal. Lungs are clear.",
           "Patchy left basal consolidation, likely pneumonia.", "Mild cardiomegaly without edema.",
           "Right apical pneumothorax, small.", "No acute cardiopulmonary process."]


def mini_mimic(root: Path, n: int = 48) -> Path:
    """n frontal studies (one image each), with reports and the official split file; a few laterals."""
    meta, split, chex = [], [], []
    for i in range(n):
        subject, study, dicom = f"1{i:07d}", f"5{i:07d}", f"d-{i:04d}"
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        write_jpg(folder / f"s{study}" / f"{dicom}.jpg", seed=i, size=(32, 32))
        (folder / f"s{study}.txt").write_text(f"FINAL REPORT\n\n FINDINGS: {REPORTS[i % 6]} Study {i}.\n\n"
                                              f" IMPRESSION: {REPORTS[(i + 1) % 6]}\n")
        view = "LATERAL" if i % 16 == 15 else ("PA" if i % 2 else "AP")
        meta.append([dicom, subject, study, "CHEST", view, 32, 32, 21800506, 1.0, "CHEST", "pa", "Erect"])
        split.append([dicom, study, subject, "train" if i % 8 < 6 else ("validate" if i % 8 == 6 else "test")])
        chex.append([subject, study, *["1.0" if j == i % 14 else "" for j in range(len(MIMIC_LABELS))]])
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", META_COLS, meta)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split, gz=True)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *MIMIC_LABELS], chex, gz=True)
    return root


def mini_rsna(root: Path, n: int = 40) -> tuple[Path, list[str]]:
    """n patients, every third with a box; returns the root and the patient ids in file order."""
    rows, ids = [], []
    for i in range(n):
        pid = f"{i:08d}-0000-0000-0000-{i:012d}"
        ids.append(pid)
        rows.append([pid, 4.0, 4.0, 8.0, 6.0, 1] if i % 3 == 0 else [pid, "", "", "", "", 0])
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", rows=24, cols=24, seed=i)
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    return root, ids


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def mini_siim_png(root: Path, n_train: int = 32, n_test: int = 8) -> tuple[Path, list[str]]:
    """The PNG release: png_images/, png_masks/ and the two stage-1 CSVs; returns the stems."""
    rng = np.random.default_rng(0)
    stems = []
    for split, count in (("train", n_train), ("test", n_test)):
        rows = []
        for i in range(count):
            positive = i % 3 == 0
            stem = f"{i}_{split}_{int(positive)}_"
            stems.append(stem)
            _png(root / "png_images" / f"{stem}.png", (rng.random((32, 32)) * 255).astype(np.uint8))
            mask = np.zeros((32, 32), np.uint8)
            if positive:
                mask[8:20, 6:14] = 255
            _png(root / "png_masks" / f"{stem}.png", mask)
            rows.append([f"{stem}.png", int(positive), f"1.2.276.{split}.{i}"])
        write_csv(root / f"stage_1_{split}_images.csv", ["new_filename", "has_pneumo", "ImageId"], rows)
    return root, stems


def mini_covidx_cxr4(root: Path, n_train: int = 40, n_val: int = 10, n_test: int = 10) -> Path:
    """A CXR-4-like release: train/val/test.txt (4 columns, binary classes) and folders; some file
    names carry dots (``DX.1.2.png``), as the release's do."""
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        lines = []
        for i in range(count):
            name = f"DX.{split}.{i}.png" if i % 5 == 4 else f"sub-{split}-{i:03d}.png"
            cls = "positive" if i % 2 == 0 else "negative"
            lines.append(f"{1000 + i} {name} {cls} {'rsna' if i % 2 else 'bimcv'}")
            write_jpg(root / split / name, seed=i, size=(24, 24))
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def release_names(root: Path, split: str) -> list[str]:
    """The file names of a COVIDx split file, in file order."""
    return [line.split()[1] for line in (root / f"{split}.txt").read_text().splitlines() if line.strip()]


def write_benchx(folder: Path, train: list[str], val: list[str], test: list[str],
                 train_1: list[str], train_10: list[str]) -> dict[str, int]:
    """BenchX's five lists, one name a line; returns the line count per file stem."""
    folder.mkdir(parents=True, exist_ok=True)
    lists = {"train": train, "val": val, "test": test, "train_1": train_1, "train_10": train_10}
    for stem, names in lists.items():
        (folder / f"{stem}.txt").write_text("".join(f"{n}\n" for n in names))
    return {stem: len(names) for stem, names in lists.items()}


def benchx_covidx_name(split: str, filename: str) -> str:
    """How BenchX names a COVIDx image: its folder, and the file name cut at the first dot, as .png."""
    return f"{split}/{filename.split('.')[0]}.png"


def write_mgca_csv(path: Path, column: str, values: list[str], extra: dict[str, list] | None = None) -> Path:
    """An MGCA split CSV: the id column and whatever else its preprocess script writes."""
    extra = extra or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([column, *extra])
        for i, v in enumerate(values):
            w.writerow([v, *(col[i] for col in extra.values())])
    return path


def split_benchx_style(ids: list[str], labels: list[int]) -> dict[str, list[str]]:
    """A 60/20/20 split with 1% and 10% subsets that each hold both classes (a miniature's 1% is 2 items)."""
    n = len(ids)
    train, val, test = ids[: int(0.6 * n)], ids[int(0.6 * n): int(0.8 * n)], ids[int(0.8 * n):]
    lab = dict(zip(ids, labels))
    pos = [i for i in train if lab[i]]
    neg = [i for i in train if not lab[i]]
    return {"train": train, "val": val, "test": test, "train_1": [pos[0], neg[0]],
            "train_10": [*pos[:2], *neg[:3]]}


# ------------------------------------------------------------ the readers' small trees
REPORT_FULL = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ year old with a cough, assess for infiltrate.

 COMPARISON:  None.

 FINDINGS:

 Heart size is within normal limits.  There is a small right pleural
 effusion.  No pneumothorax is seen.

 IMPRESSION:

 1. Small right effusion. 2. No focal consolidation.
"""
REPORT_NO_HEADERS = """ Portable upright view of the chest was obtained.

 The endotracheal tube ends about four centimeters above the carina.
 Lungs are clear of consolidation.
"""
REPORT_EMPTY = """                                 FINAL REPORT
 EXAMINATION:  CHEST PORTABLE

 INDICATION:  line check

 IMPRESSION:  ___
"""
# (subject, study, split, report, [(dicom_id, view)], chexpert labels by name)
MIMIC_STUDIES = [
    ("10000032", "50414267", "train", REPORT_FULL, [("d-aaaa-01", "PA"), ("d-aaaa-02", "LATERAL")],
     {"Pleural Effusion": "1.0", "Pneumonia": "-1.0", "No Finding": ""}),
    ("10000032", "53189527", "train", REPORT_NO_HEADERS, [("d-aaab-01", "AP")], {"Support Devices": "1.0",
                                                                               "No Finding": "0.0"}),
    ("11000011", "56699142", "validate", REPORT_FULL, [("d-bbbb-01", "AP"), ("d-bbbb-02", "PA")],
     {"No Finding": "1.0"}),
    ("12000022", "57375967", "test", REPORT_FULL, [("d-cccc-01", "PA")], {"Cardiomegaly": "-1.0"}),
    ("12000022", "58000000", "test", REPORT_EMPTY, [("d-cccc-02", "PA")], {"No Finding": "1.0"}),
]


def build_mimic(root: Path, reports_under: str = "mimic-cxr-reports", gz: bool = True) -> Path:
    meta, split, chex = [], [], []
    for i, (subject, study, sp, report, images, labels) in enumerate(MIMIC_STUDIES):
        folder = root / "files" / f"p{subject[:2]}" / f"p{subject}"
        for j, (dicom_id, view) in enumerate(images):
            write_jpg(folder / f"s{study}" / f"{dicom_id}.jpg", seed=10 * i + j)
            meta.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, 3056, 2544, 21800506, 213014.531,
                         "CHEST (PA AND LAT)", "postero-anterior", "Erect"])
            split.append([dicom_id, study, subject, sp])
        reports = (root / reports_under if reports_under else root) / "files" / f"p{subject[:2]}" / f"p{subject}"
        reports.mkdir(parents=True, exist_ok=True)
        (reports / f"s{study}.txt").write_text(report)
        chex.append([subject, study, *[labels.get(n, "") for n in MIMIC_LABELS]])
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv", META_COLS, meta)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"], split, gz=gz)
    write_csv(root / "mimic-cxr-2.0.0-chexpert.csv", ["subject_id", "study_id", *MIMIC_LABELS], chex, gz=gz)
    return root


RSNA_ROWS = [["0004cfab-0000-0000-0000-000000000001", "", "", "", "", 0],
             ["00436515-0000-0000-0000-000000000002", 2.0, 3.0, 4.0, 2.0, 1],
             ["00436515-0000-0000-0000-000000000002", 10.0, 1.0, 3.0, 5.0, 1],
             ["00704310-0000-0000-0000-000000000003", 0.0, 0.0, 1.0, 1.0, 1]]


def build_rsna(root: Path, n_negative: int = 0) -> Path:
    rows = [list(r) for r in RSNA_ROWS]
    rows += [[f"neg-{i:04d}", "", "", "", "", 0] for i in range(n_negative)]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for i, pid in enumerate(dict.fromkeys(r[0] for r in rows)):
        write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", rows=12, cols=16, seed=i)
    return root


SIIM_IDS = ["1.2.276.0.7230010.3.1.4.8323329.1000.1517875165.878027",
            "1.2.276.0.7230010.3.1.4.8323329.1001.1517875165.878030",
            "1.2.276.0.7230010.3.1.4.8323329.1002.1517875165.878033"]


def build_siim(root: Path, extra: int = 0) -> Path:
    ids = SIIM_IDS + [f"1.2.276.0.7230010.3.1.4.8323329.{2000 + i}.1517875170.1" for i in range(extra)]
    lines = ["ImageId, EncodedPixels",
             f"{ids[0]}, -1",
             f"{ids[1]}, 1 2 3 1",
             f"{ids[1]}, 9 2",
             f"{ids[2]}, -1"] + [f"{i}, -1" for i in ids[3:]]
    root.mkdir(parents=True, exist_ok=True)
    (root / "train-rle.csv").write_text("\n".join(lines) + "\n")
    for n, image_id in enumerate(ids):
        study, series = f"1.2.276.0.7230010.3.1.2.{n}.1", f"1.2.276.0.7230010.3.1.3.{n}.1"
        write_dicom(root / "dicom-images-train" / study / series / f"{image_id}.dcm", rows=3, cols=4, seed=n,
                    photometric="MONOCHROME1" if n == 1 else "MONOCHROME2")
    return root


def build_covidx(root: Path, with_val: bool = False, n_train: int = 30) -> Path:
    classes = ["normal", "pneumonia", "COVID-19"]
    train = [f"{100 + i // 2} img-{i:03d}.png {classes[i % 3]} {'rsna' if i % 3 < 2 else 'cohen'}"
             for i in range(n_train)]
    test = ["900 test-000.jpeg COVID-19", "901 test-001.png normal", "902 test 002.png pneumonia"]  # old 3 columns
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.txt").write_text("\n".join(train) + "\n")
    (root / "test.txt").write_text("\n".join(test) + "\n")
    for line in train:
        write_jpg(root / "train" / line.split()[1], seed=len(line), size=(8, 8))
    for name in ("test-000.jpeg", "test-001.png", "test 002.png"):
        write_jpg(root / "test" / name, seed=1, size=(8, 8))
    if with_val:
        (root / "val.txt").write_text("950 val-000.png normal sirm\n")
        write_jpg(root / "train" / "val-000.png", seed=2, size=(8, 8))
    return root


def write_mgca_detection(root: Path, parts: dict[str, list[str]]) -> None:
    """MGCA's RSNA detection files (preprocess/rsna.py, prepare_detection_pkl): per split a pickled
    ``[filenames, boxes]``, the file names ``<patientId>.dcm`` and one [k, 4] box array per image."""
    import pickle

    for name, pids in parts.items():
        boxes = np.empty(len(pids), dtype=object)
        for i in range(len(pids)):
            boxes[i] = np.zeros((1, 4)) if i % 2 else np.array([[4.0, 4.0, 12.0, 10.0]])
        with open(root / name, "wb") as f:
            pickle.dump([np.array([f"{p}.dcm" for p in pids]), boxes], f)
