"""Split files that other projects publish, read onto a dataset of this project.

    rsna-pneumonia:/data/rsna?splits=benchx:/src/BenchX/preprocess/datasets/RSNA
    siim-pneumothorax:/data/siim-png?splits=benchx:/src/BenchX/preprocess/datasets
    covidx:/data/covidx-cxr4?splits=benchx:/src/BenchX/preprocess/datasets/COVIDx
    rsna-pneumonia:/data/rsna?splits=mgca         (MGCA's CSVs, in the dataset folder, where MGCA writes them)
    rsna-pneumonia:/data/rsna?splits=mgca-detection   (MGCA's detection split, which its segmentation reads)

The source's files replace the reader's train/valid/test assignment; where a source
fixes label fractions, those become the 1% and 10% training subsets, the same for every
seed. Every file is counted: a BenchX list whose line count is not the published one, a
name that is not an item of the dataset, or a subset that leaves the training split, is
one message naming the file, the count expected and the count found.

**BenchX** (``preprocess/datasets/<DS>/{train,train_1,train_10,val,test}.txt``): one name
a line. RSNA: the ``patientId``. SIIM: the file stem in the PNG release BenchX used
(Kaggle ``vbookshelf/pneumothorax-chest-xray-images-and-masks``, e.g. ``1898_train_0_``),
which ``siim-pneumothorax`` reads when pointed at that release. COVIDx (CXR-4):
``<folder>/<stem>.png``, where BenchX cut each file name at its first dot (``DX.1.2.3.png``
is ``train/DX.png``): distinct images then share a name, and a name listed k times takes
the first k of its images in id order (the import says how many). BenchX read each
release file with ``pandas.read_csv(sep=' ')``, whose header is the first line: that line's
image is in none of its lists (67,862 / 8,472 / 8,481 where the release has one more each).

**MGCA** (the CSVs its ``preprocess/*.py`` write; MGCA does not publish them, so they are
yours): RSNA ``train.csv``, ``val.csv``, ``test.csv`` (``patientId``); SIIM ``train.csv``,
``valid.csv``, ``test.csv`` (``ImageId``, one row per region of ``train-rle.csv``: MGCA
split rows, not images, so an image can have rows in two files; it is kept in the later of
train, valid, test and counted); COVIDx ``train.csv``, ``valid.csv``, ``test.csv``
(``filename``). MGCA's classification draws its 1% and 10% at run time with
``DataFrame.sample(frac=f, random_state=42)`` over the training CSV's rows; the import
repeats that draw. Its SIIM subsets come from numpy's global generator after it balances
the negatives and cannot be rebuilt from its files: ours are drawn within its train split.

**MGCA's detection split** (``mgca-detection``): RSNA ``train.pkl``, ``val.pkl``, ``test.pkl``
(``[filenames, boxes]``, pickled by its ``preprocess/rsna.py``; 16,010 / 5,337 / 5,337
patients), which MGCA's and the Adaptor authors' RSNA *segmentation* reads instead of the
classification CSVs. Only numpy arrays are unpickled from them (any other class is refused).
"""
from __future__ import annotations

import csv
import pickle
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pipeline.datasets.base import DatasetError, Item

SPLIT_ORDER = ("train", "valid", "test")

# The published line counts of BenchX's lists (preprocess/datasets/<DS>/*.txt at its release).
BENCHX_COUNTS = {
    "rsna-pneumonia": {"train": 18_678, "train_1": 186, "train_10": 1_867, "val": 4_003, "test": 4_003},
    "siim-pneumothorax": {"train": 9_303, "train_1": 93, "train_10": 930, "val": 1_372, "test": 1_372},
    "covidx": {"train": 67_862, "train_1": 678, "train_10": 6_786, "val": 8_472, "test": 8_481},
}
# MGCA's RSNA CSVs: sklearn's train_test_split of the 26,684 labelled patients, 0.3 then 0.5
# (preprocess/rsna.py). Derived from its code, not published; the other CSVs depend on the release.
MGCA_COUNTS = {"rsna-pneumonia": {"train": 18_678, "val": 4_003, "test": 4_003},
               "rsna-detection": {"train": 16_010, "val": 5_337, "test": 5_337}}  # prepare_detection_data


@dataclass(frozen=True)
class SplitRef:
    """A ``splits=`` option: which project's files, and the folder holding them ("" = the dataset's)."""

    source: str
    folder: str = ""

    def __str__(self) -> str:
        return f"{self.source}:{self.folder}" if self.folder else self.source


def parse_split_ref(text: str) -> SplitRef | None:
    """``benchx:/path`` or ``mgca[:/path]`` (the option's value); "" is no source."""
    if not text:
        return None
    source, _, folder = text.partition(":")
    if source not in SOURCES:
        raise ValueError(f"unknown split source {source!r}; known: {', '.join(SOURCES)} (e.g. benchx:/path/to/RSNA)")
    if source == "benchx" and not folder:
        raise ValueError("benchx needs the folder of its lists, e.g. benchx:/src/BenchX/preprocess/datasets/RSNA")
    return SplitRef(source, str(Path(folder).expanduser().resolve()) if folder else "")


@dataclass(frozen=True)
class ListFile:
    """One published file: the split it gives (or the fraction of the training split it lists)."""

    name: str                       # the file name in the source's folder
    split: str                      # train / valid / test, or "train" for a fraction's subset
    fraction: float | None = None   # 0.01 for BenchX's train_1.txt


@dataclass(frozen=True)
class Layout:
    """What one source publishes for one reader."""

    folder: str                                  # its subfolder name under the source's dataset folder
    files: tuple[ListFile, ...]
    read: Callable[[Path], list[str]]            # the names a file lists, in file order
    key: Callable[[Item], str] = lambda it: it.id   # the name an item has in the files
    counts: dict[str, int] = field(default_factory=dict)   # file stem -> published line count
    draw: tuple[float, ...] = ()                 # fractions drawn like MGCA's pandas sample
    needs: str = ""                              # what the dataset must be for the names to match
    counted: str = "published"                   # where the expected counts come from


@dataclass
class Imported:
    source: str                                  # "benchx:/path/RSNA"
    splits: dict[str, str]                       # item id -> train / valid / test
    fractions: dict[float, list[str]]            # fraction -> training item ids
    notes: list[str]


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


def _column(name: str) -> Callable[[Path], list[str]]:
    def read(path: Path) -> list[str]:
        with open(path, encoding="utf-8-sig", newline="") as f:
            rows = csv.DictReader(f)
            header = [h.strip() for h in rows.fieldnames or []]
            if name not in header:
                raise DatasetError(f"{path} has no {name!r} column (it has: {', '.join(header)}); is it the file "
                                   "MGCA's preprocess script wrote?")
            return [row[next(h for h in rows.fieldnames if h.strip() == name)].strip() for row in rows]
    return read


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays and nothing else (MGCA's detection files hold two):
    any other class a file names is refused, so a file cannot run code when it is read."""

    ALLOWED = {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}; only numpy arrays are read from it")
        return super().find_class(module, name)


def _detection_files(path: Path) -> list[str]:
    """The patient ids of an MGCA RSNA detection file (``[filenames, boxes]``, pickled by its
    preprocess/rsna.py: ``prepare_detection_pkl``), in file order."""
    try:
        with open(path, "rb") as f:
            filenames = _ArraysOnly(f).load()[0]
    except (pickle.UnpicklingError, EOFError, IndexError, TypeError, ValueError) as e:
        raise DatasetError(f"{path} is not an MGCA detection file ([filenames, boxes] arrays): {e}") from None
    return [str(name).removesuffix(".dcm") for name in filenames]


def _benchx_covidx_key(it: Item) -> str:
    return f"{it.image.parent.name}/{it.id.split('.')[0]}.png"


BENCHX_FILES = (ListFile("train.txt", "train"), ListFile("val.txt", "valid"), ListFile("test.txt", "test"),
                ListFile("train_1.txt", "train", 0.01), ListFile("train_10.txt", "train", 0.1))
PNG_RELEASE = ("the PNG release BenchX used (Kaggle vbookshelf/pneumothorax-chest-xray-images-and-masks: "
               "png_images/, png_masks/, stage_1_train_images.csv): point siim-pneumothorax at that folder")
SOURCES: dict[str, dict[str, Layout]] = {
    "benchx": {
        "rsna-pneumonia": Layout("RSNA", BENCHX_FILES, _lines, counts=BENCHX_COUNTS["rsna-pneumonia"]),
        "siim-pneumothorax": Layout("SIIM", BENCHX_FILES, _lines, counts=BENCHX_COUNTS["siim-pneumothorax"],
                                    needs=PNG_RELEASE),
        "covidx": Layout("COVIDx", BENCHX_FILES, _lines, key=_benchx_covidx_key, counts=BENCHX_COUNTS["covidx"],
                         needs="COVIDx CXR-4 (BenchX's release), with its train/, val/ and test/ folders"),
    },
    "mgca": {
        "rsna-pneumonia": Layout("", (ListFile("train.csv", "train"), ListFile("val.csv", "valid"),
                                      ListFile("test.csv", "test")), _column("patientId"),
                                 counts=MGCA_COUNTS["rsna-pneumonia"], draw=(0.01, 0.1),
                                 counted="as its preprocess/rsna.py splits the 26,684 patients"),
        "siim-pneumothorax": Layout("", (ListFile("train.csv", "train"), ListFile("valid.csv", "valid"),
                                         ListFile("test.csv", "test")), _column("ImageId"),
                                    needs="the DICOM release with train-rle.csv, which MGCA split"),
        "covidx": Layout("", (ListFile("train.csv", "train"), ListFile("valid.csv", "valid"),
                              ListFile("test.csv", "test")), _column("filename"), draw=(0.01, 0.1)),
    },
    # MGCA's detection split of RSNA (another one: 10,674 patients held out, then halved), which its
    # segmentation reads (RSNASegmentDataset: train.pkl, val.pkl, test.pkl)
    "mgca-detection": {
        "rsna-pneumonia": Layout("", (ListFile("train.pkl", "train"), ListFile("val.pkl", "valid"),
                                      ListFile("test.pkl", "test")), _detection_files,
                                 counts=MGCA_COUNTS["rsna-detection"],
                                 counted="as its preprocess/rsna.py holds out 2 x 5,337 of the 26,684 patients"),
    },
}


def layout_for(ref: SplitRef, reader: str) -> Layout:
    layouts = SOURCES[ref.source]
    if reader not in layouts:
        raise DatasetError(f"{ref.source} publishes no splits for {reader}; it has: {', '.join(layouts)}")
    return layouts[reader]


def _folder(ref: SplitRef, layout: Layout, dataset_root: Path) -> Path:
    """The folder holding the files: the given one, its ``<DS>`` subfolder, or the dataset's own."""
    base = Path(ref.folder) if ref.folder else Path(dataset_root)
    for candidate in (base, base / layout.folder) if layout.folder else (base,):
        if all((candidate / f.name).is_file() for f in layout.files if f.fraction is None):
            return candidate
    wanted = ", ".join(f.name for f in layout.files)
    where = f"{base} or {base / layout.folder}" if layout.folder else str(base)
    raise DatasetError(f"{ref}: the split files ({wanted}) are not in {where}")


def import_splits(ref: SplitRef, reader: str, dataset_root: Path, items: Sequence[Item]) -> Imported:
    """The splits and fixed training subsets that ``ref``'s files give ``items`` (see the module doc)."""
    layout = layout_for(ref, reader)
    folder = _folder(ref, layout, dataset_root)
    by_key: dict[str, list[str]] = defaultdict(list)
    for it in items:
        by_key[layout.key(it)].append(it.id)
    for ids in by_key.values():
        ids.sort()
    notes: list[str] = []
    listed: dict[str, list[str]] = {}
    for f in layout.files:
        path = folder / f.name
        if f.fraction is not None and not path.is_file():
            continue
        names = layout.read(path)
        _check_count(path, layout, len(names), ref, reader)
        listed[f.name] = _match(path, names, by_key, layout, notes, len(items))
    splits = _splits(layout, listed, notes)
    fractions = {f.fraction: sorted(set(listed[f.name])) for f in layout.files
                 if f.fraction is not None and f.name in listed}
    for f, ids in fractions.items():
        outside = [i for i in ids if splits.get(i) != "train"]
        if outside:
            raise DatasetError(f"{folder}: the {f:.0%} subset lists {len(outside):,} item(s) outside its train split "
                               f"(e.g. {outside[0]!r}); the files do not belong together")
    if layout.draw:
        fractions.update(_pandas_draws(layout, listed))
    unlisted = [it.id for it in items if it.id not in splits]
    if unlisted:
        notes.append(f"{len(unlisted):,} item(s) of the dataset are in none of {ref.source}'s lists (e.g. "
                     f"{unlisted[0]!r}) and are left out of every split")
    return Imported(str(ref), splits, fractions, notes)


def _check_count(path: Path, layout: Layout, n: int, ref: SplitRef, reader: str) -> None:
    expected = layout.counts.get(path.stem)
    if expected is not None and n != expected:
        raise DatasetError(f"{path}: expected {expected:,} entries ({ref.source}'s {reader} {path.stem} list, "
                           f"{layout.counted}), found {n:,}. Is it {ref.source}'s file, unedited?")


def _match(path: Path, names: list[str], by_key: dict[str, list[str]], layout: Layout, notes: list[str],
           n_items: int) -> list[str]:
    """The item ids a file's names give; names shared by several items take them in id order."""
    found = sum(n in by_key for n in names)
    if found < len(names):
        missing = next(n for n in names if n not in by_key)
        needs = f" The names fit {layout.needs}." if layout.needs else ""
        raise DatasetError(f"{path}: expected all {len(names):,} entries to be items of the dataset "
                           f"({n_items:,} items), found {found:,}; e.g. {missing!r} is not one.{needs}")
    seen: dict[str, int] = defaultdict(int)
    out, shared = [], 0
    for name in names:
        ids = by_key[name]
        if len(ids) > 1:
            shared += 1
        out.append(ids[min(seen[name], len(ids) - 1)])
        seen[name] += 1
    if shared:
        notes.append(f"{path.name}: {shared:,} entries name an image that several files share once cut at their "
                     "first dot (BenchX's renaming); they take those files in id order")
    return out


def _splits(layout: Layout, listed: dict[str, list[str]], notes: list[str]) -> dict[str, str]:
    """item id -> split; an item in two split files keeps the later one (train, valid, test)."""
    out: dict[str, str] = {}
    twice = 0
    for f in sorted((f for f in layout.files if f.fraction is None), key=lambda f: SPLIT_ORDER.index(f.split)):
        for i in listed[f.name]:
            if out.get(i, f.split) != f.split:
                twice += 1
            out[i] = f.split
    if twice:
        notes.append(f"{twice:,} item(s) are in two of the split files (MGCA split the rows of train-rle.csv, not "
                     "the images); each is kept in the later split (test before valid before train)")
    return out


def _pandas_draws(layout: Layout, listed: dict[str, list[str]]) -> dict[float, list[str]]:
    """MGCA's classification subsets: ``DataFrame.sample(frac=f, random_state=42)`` over the training
    CSV's rows, as its datasets draw them (classification_dataset.py)."""
    import pandas as pd  # lazy: only MGCA's draws need a DataFrame

    train = next(f.name for f in layout.files if f.split == "train" and f.fraction is None)
    rows = pd.DataFrame({"id": listed[train]})
    return {f: sorted(set(rows.sample(frac=f, random_state=42)["id"])) for f in layout.draw}
