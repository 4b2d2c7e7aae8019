"""What every reader shares: the option syntax, names, CSV rows with line numbers,
bad-row handling, and mask files in the cache.

Option syntax (one for all readers)::

    <reader>:<root>?<key>=<value>&<key>=<value>

e.g. ``chexpert:/data/CheXpert-v1.0-small?uncertain=ones&frontal=0``. Quote it in a
shell (``&`` and ``?`` are special there). Every reader knows ``allow_failures`` (skip
and count bad rows instead of stopping) and readers without official splits know
``seed`` (the seed of their patient-level hash split).
"""
from __future__ import annotations

import csv
import gzip
import io
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
import xxhash

from core.atomic import atomic_write_text
from core.console import err, progress, escape
from pipeline.datasets.base import Dataset
from pipeline.datasets.masks import save_mask
from pipeline.datasets.reports import SECTION_CHOICES
from pipeline.datasets.shared_splits import SplitRef, import_splits, parse_split_ref
from pipeline.datasets.spec import DatasetSpec
from pipeline.datasets.table import DatasetError

TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")
UNCERTAIN = ("ignore", "ones", "zeros")
BLANK = ("nan", "zeros")
NAMELESS = {"allow_failures", "version"}  # options that never change which items a dataset has, or their splits
SKIP_KINDS = {"no-report": "without usable report text", "bad-row": "bad row(s)", "no-image": "without images"}


@dataclass(frozen=True)
class Opt:
    default: str
    parse: Callable[[str], object]
    help: str = ""


def flag(default: bool, help: str = "") -> Opt:
    def parse(v: str) -> bool:
        if v.lower() in TRUE:
            return True
        if v.lower() in FALSE:
            return False
        raise ValueError("expected 1/0 (or true/false)")
    return Opt("1" if default else "0", parse, help)


def choice(default: str, choices: Sequence[str], help: str = "") -> Opt:
    def parse(v: str) -> str:
        if v.lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return v.lower()
    return Opt(default, parse, help)


def integer(default: int, help: str = "") -> Opt:
    return Opt(str(default), int, help)


def path_opt(help: str = "") -> Opt:
    return Opt("", lambda v: Path(v).expanduser().resolve() if v else None, help)


COMMON = {"allow_failures": flag(False, "skip and count bad rows instead of stopping"),
          "splits": Opt("", parse_split_ref, "split files another project published, read onto the items: "
                        "benchx:FOLDER, mgca[:FOLDER] or mgca-detection[:FOLDER] (pipeline/datasets/shared_splits.py)")}
SEED = {"seed": integer(0, "seed of the patient-level hash split")}
SECTIONS = {"sections": choice("both", SECTION_CHOICES, "report sections: impression, findings or both"),
            "clean": flag(True, "MGCA sentence cleaning of the report text")}
LABELS = {"uncertain": choice("ignore", UNCERTAIN, "uncertain (-1) labels: ignore (NaN), ones or zeros"),
          "blank": choice("nan", BLANK, "blank (unmentioned) labels: nan or zeros")}


@dataclass(frozen=True)
class Spec:
    """A parsed ``<reader>:<root>?options`` argument."""

    reader: str
    root: Path
    raw: dict[str, str]          # options as given
    options: dict[str, object]   # every option, parsed, defaults filled in
    schema: dict[str, Opt]

    def __getitem__(self, key: str):
        return self.options[key]

    @property
    def spec(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.raw.items())
        return f"{self.reader}:{self.root}" + (f"?{query}" if query else "")

    @property
    def name(self) -> str:
        """Stable and distinct per root and per option that changes the items."""
        base = f"{self.reader}-{xxhash.xxh64_hexdigest(str(self.root).encode())[:8]}"
        parts = []
        for key in sorted(self.raw):
            value = self.options[key]
            if key in NAMELESS or value == self.schema[key].parse(self.schema[key].default):
                continue
            if isinstance(value, (Path, SplitRef)):
                text = xxhash.xxh64_hexdigest(str(value).encode())[:8]
            elif isinstance(value, bool):
                text = "1" if value else "0"
            else:
                text = "".join(c if c.isalnum() or c == "." else "_" for c in str(value).lower())
            parts.append(f"{key}_{text}")
        return "-".join([base, *parts])


def parse_spec(reader: str, parsed: DatasetSpec, schema: dict[str, Opt]) -> Spec:
    schema = {**COMMON, **schema}
    root_text = parsed.root
    if not root_text:
        raise DatasetError(f"{reader}: give the dataset folder, e.g. {reader}:/data/{reader}")
    raw: dict[str, str] = {}
    for key, value in parsed.options.items():
        if key not in schema:
            raise DatasetError(f"{reader}: unknown option {key!r}. Known options: "
                               + "; ".join(f"{k} ({o.help}, default {o.default or 'none'})"
                                           for k, o in schema.items()))
        raw[key] = value
    options = {}
    for key, opt in schema.items():
        try:
            options[key] = opt.parse(raw.get(key, opt.default))
        except ValueError as e:
            raise DatasetError(f"{reader}: option {key}={raw.get(key)!r} is invalid: {e}") from None
    root = Path(root_text).expanduser().resolve()
    return Spec(reader, root, raw, options, schema)


def require_root(spec: Spec) -> None:
    if not spec.root.is_dir():
        raise DatasetError(f"{spec.reader}: folder {spec.root} does not exist. Give the folder where the "
                           f"dataset was unpacked, e.g. {spec.reader}:/data/{spec.reader}")


def find_file(folder: Path, names: Sequence[str]) -> Path | None:
    """The first of ``names`` (or its ``.gz``) that exists in ``folder``."""
    for name in names:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


class Problems:
    """Bad rows: raise a DatasetError naming the row, or, with allow_failures, skip and count."""

    def __init__(self, reader: str, allow: bool):
        self.reader, self.allow = reader, allow
        self.skipped: list[dict] = []

    def bad(self, source: str, reason: str, id: str | None = None) -> None:
        if not self.allow:
            raise DatasetError(f"{self.reader}: {source}: {reason}. Fix the file, or skip such rows with "
                               f"the option allow_failures=1 (CLI: --allow-failures).")
        self.skipped.append({"id": id, "source": source, "reason": reason, "kind": "bad-row"})

    def no_report(self, id: str, source: str, reason: str = "no usable findings or impression text") -> None:
        self.skipped.append({"id": id, "source": source, "reason": reason, "kind": "no-report"})


def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def csv_rows(path: Path, required: Sequence[str], problems: Problems) -> Iterator[tuple[int, dict[str, str]]]:
    """(line number, {column: stripped value}) for each row; malformed rows go to ``problems``.

    Header names are stripped too (SIIM's file has a column named " EncodedPixels").
    """
    with open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip().lstrip("\ufeff") for h in next(reader)]
        except StopIteration:
            raise DatasetError(f"{path} is empty; expected a header row with {', '.join(required)}") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DatasetError(f"{path} lacks column(s) {', '.join(missing)} (it has: {', '.join(header)}). "
                               "Is this the file from the official release?")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                problems.bad(f"{path}:{reader.line_num}", f"unparseable row ({e})")
                continue
            if not any(v.strip() for v in row):
                continue
            if len(row) != len(header):
                problems.bad(f"{path}:{reader.line_num}",
                             f"unparseable row: {len(row)} field(s) where the header has {len(header)}")
                continue
            yield reader.line_num, {h: v.strip() for h, v in zip(header, row)}


def chexpert_value(text: str, uncertain: str, blank: str) -> float:
    """A CheXpert-labeller cell (1, 0, -1 or blank) under the uncertain/blank policies.

    Raises ValueError for any other value.
    """
    if text == "":
        return 0.0 if blank == "zeros" else math.nan
    value = float(text)
    if value == 1.0 or value == 0.0:
        return value
    if value == -1.0:
        return {"ones": 1.0, "zeros": 0.0}.get(uncertain, math.nan)
    raise ValueError(f"label value {text!r} is out of range (expected 1, 0, -1 or blank)")


def derived_dir(cache_root: Path, name: str) -> Path:
    """Files a reader derives from a dataset (masks, skipped rows) live here."""
    return Path(cache_root) / "derived" / name


def record_skipped(cache_root: Path, name: str, skipped: list[dict], what: str) -> None:
    """Log skipped rows and list them in ``<cache>/derived/<name>/skipped.csv``."""
    path = derived_dir(cache_root, name) / "skipped.csv"
    if not skipped:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    pd.DataFrame(skipped, columns=["id", "source", "reason", "kind"]).to_csv(buf, index=False)
    atomic_write_text(path, buf.getvalue())
    kinds: dict[str, int] = {}
    for s in skipped:
        kinds[s["kind"]] = kinds.get(s["kind"], 0) + 1
    text = ", ".join(f"{n:,} {SKIP_KINDS.get(k, k)}" for k, n in kinds.items())
    err.print(f"[yellow]{escape(str(what))}: skipped {escape(str(text))}[/]; listed in {escape(str(path))}", soft_wrap=True)


def make_masks(jobs: list[tuple[Path, Path, Callable[[int, int], np.ndarray]]], desc: str) -> None:
    """Write the masks that do not exist yet: (destination, DICOM, fn(rows, cols) -> mask).

    The mask's size is read from the DICOM header (no pixels are read).
    """
    todo = [j for j in jobs if not j[0].exists()]
    if not todo:
        return

    def one(job):
        dest, dicom, render = job
        rows, cols = dicom_size(dicom)
        save_mask(dest, render(rows, cols))

    with progress(transient=True) as bar, ThreadPoolExecutor(8) as pool:
        task = bar.add_task(desc, total=len(todo))
        for _ in pool.map(one, todo):
            bar.advance(task)


def dicom_size(path: Path) -> tuple[int, int]:
    """(Rows, Columns) from a DICOM header, without reading the pixels."""
    import pydicom  # lazy: pydicom is needed only for DICOM files

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"], force=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception as e:
        raise DatasetError(f"cannot read the DICOM header of {path} ({type(e).__name__}: {e}); "
                           "the file may be truncated: re-copy it, or drop it from the labels file") from e


def finish(spec: Spec, cache_root: Path, items: list, problems: Problems, description: str,
           stratify_by: str | None = None, version: str | None = None) -> Dataset:
    """The dataset of a reader's items; with ``splits=``, the splits (and label fractions) a
    published source gives them instead of the reader's own."""
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        seen, dup = set(), None
        for i in ids:
            if i in seen:
                dup = i
                break
            seen.add(i)
        raise DatasetError(f"{spec.reader}: item id {dup!r} occurs twice in {spec.root}")
    fractions = {}
    if spec["splits"] is not None:
        imported = import_splits(spec["splits"], spec.reader, spec.root, items)
        items = [replace(it, split=imported.splits.get(it.id)) for it in items]
        fractions = imported.fractions
        for note in imported.notes:
            err.print(f"[yellow]note:[/] {escape(spec.reader)} splits from {escape(imported.source)}: {escape(note)}",
                      soft_wrap=True)
    record_skipped(cache_root, spec.name, problems.skipped, spec.reader)
    return Dataset(name=spec.name, spec=spec.spec, items=items, description=description,
                   skipped=problems.skipped, stratify_by=stratify_by, version=version,
                   split_source=_source(spec), fractions=fractions)


def _source(spec: Spec) -> str | None:
    return None if spec["splits"] is None else str(spec["splits"])


def unmaterialised(spec: Spec, description: str, stratify_by: str | None = None) -> Dataset:
    return Dataset(name=spec.name, spec=spec.spec, items=[], description=description, stratify_by=stratify_by,
                   split_source=_source(spec))
