"""A pairs table: CSV or Parquet with `image`, `report`, optional `split`, and labels.

A table whose columns are named otherwise is read through a mapping in its dataset spec,
``pairs.csv?report=text&patient_id=subject_id`` (the CLI's ``--columns report=text,...``);
``patient_id=none`` says the table has no patients (``--no-patients``). A column that
nearly names a known one (``patientid``, ``PatientID``, ``subject_id`` for ``patient_id``;
``text``, ``findings`` for ``report``) is refused unless mapped: read as something else,
it would put one patient's studies in two splits, or leave every report out, silently.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import xxhash

from core.console import err, escape
from pipeline.datasets.base import Dataset, DatasetError, Item
from pipeline.datasets.spec import parse_query
from pipeline.datasets.splits import assign_splits, canonical_splits, split_rule

KNOWN = {"id", "image", "report", "split", "patient_id", "mask"}
TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")
NONE = "none"   # `patient_id=none`: the table has no such column (its near-misses are not it)
# Columns that are taken for a known one, compared with letters and digits only, in lower case
# (so `PatientID`, `patient-id` and `Patient ID` are near-misses of `patient_id`, too).
NEAR_MISSES = {
    "patient_id": ("patient", "patients", "subject", "subjectid", "pid", "mrn", "patientno", "patientnumber",
                   "patientkey", "personid"),
    "report": ("text", "reporttext", "reports", "findings", "impression", "findingsimpression", "note", "notes",
               "caption", "radiologyreport", "narrative"),
    "image": ("path", "imagepath", "img", "imgpath", "file", "filename", "filepath", "imagefile", "images"),
    "split": ("fold", "subset", "partition", "splits"),
    "id": ("itemid",),
}


def is_text_column(name) -> bool:
    """Columns read as text, never numbers: ids keep their leading zeros (``000123``), paths stay paths."""
    name = str(name)
    return name in KNOWN or name.startswith("mask_") or name.endswith("_id")


def _squash(name) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def near_misses(columns, known: str) -> list[str]:
    """The columns that look like ``known`` without being it."""
    wanted = {_squash(known), *NEAR_MISSES.get(known, ())}
    return [str(c) for c in columns if str(c) != known and _squash(c) in wanted]


@dataclass(frozen=True)
class TableSpec:
    """A table's path and how its columns map onto the known ones (``{known: column or "none"}``)."""

    path: Path
    columns: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        query = "&".join(f"{k}={v}" for k, v in self.columns.items())
        return f"{self.path.resolve()}?{query}" if query else str(self.path.resolve())


def looks_like_table(text: str) -> bool:
    head = str(text).partition("?")[0]
    return Path(head).suffix.lower() in TABLE_SUFFIXES


def parse_table_spec(text: str) -> TableSpec:
    """``pairs.csv`` or ``pairs.csv?report=text&patient_id=none``: the path and the column mapping."""
    head, q, query = str(text).partition("?")
    if not q or not looks_like_table(text):
        return TableSpec(Path(text).expanduser())
    columns = parse_query(query)
    unknown = sorted(set(columns) - (KNOWN - {"mask"}))
    if unknown:
        raise DatasetError(f"table {head}: {', '.join(map(repr, unknown))} is not a column a pairs table maps "
                           f"(the known columns: {', '.join(sorted(KNOWN - {'mask'}))}). Write KNOWN=COLUMN, "
                           "e.g. `pairs.csv?report=text&patient_id=subject_id` (CLI: --columns report=text,...).")
    return TableSpec(Path(head).expanduser(), columns)


def read_table(path: Path, text: tuple[str, ...] = ()) -> pd.DataFrame:
    """The table; the known columns (and ``text``, the columns mapped onto them) read as text."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"table {path} does not exist. Give a CSV or Parquet pairs table, "
                           "a built-in name (demo), or <reader>:<root>.")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, keep_default_na=True, dtype={c: str for c in header if is_text_column(c) or c in text})
    except Exception as e:
        raise DatasetError(f"cannot read table {path}: {type(e).__name__}: {e}. "
                           "Expected a CSV (comma-separated, header row) or a Parquet file.") from e


def table_name(path: Path) -> str:
    path = Path(path).resolve()
    return f"{path.stem}-{xxhash.xxh64_hexdigest(str(path).encode())[:8]}"


@dataclass
class TableColumns:
    """A pairs table as columns, read once: what a summary counts and what items are built from.

    ``split`` holds every row's canonical split (from the column, or assigned by patient);
    ``labels`` the numeric label columns; ``masks`` the mask columns by target name. Nothing
    here is per item: counting a table of any size costs its columns, not objects.
    """

    path: Path
    frame: pd.DataFrame
    ids: list[str]
    split: list[str]
    rule: str
    labels: list[str]
    masks: dict[str, str]
    no_patients: bool = False      # the spec says the table has no patients (patient_id=none)

    def present(self, column: str) -> pd.Series:
        """Rows where ``column`` holds a value (not empty, not NaN)."""
        if column not in self.frame.columns:
            return pd.Series(False, index=self.frame.index)
        col = self.frame[column]
        return col.notna() & (col.astype(str) != "")


def map_columns(df: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """The table with its columns renamed as the spec maps them; a near-miss of a known column
    that is neither mapped nor declared absent (``none``) is refused, naming both."""
    path, columns = spec.path, spec.columns
    for known, column in columns.items():
        if column == NONE:
            continue
        if column not in df.columns:
            raise DatasetError(f"table {path}: {known}={column} maps a column the table does not have (it has: "
                               f"{', '.join(map(str, df.columns))})")
        if known in df.columns and known != column:
            raise DatasetError(f"table {path}: {known}={column}, but the table also has a `{known}` column; "
                               f"drop or rename one of them")
    renamed = df.rename(columns={c: k for k, c in columns.items() if c != NONE})
    absent = [k for k, c in columns.items() if c == NONE and k in renamed.columns]
    renamed = renamed.drop(columns=absent)
    for known in NEAR_MISSES:
        if known in renamed.columns or known in columns:
            continue
        found = near_misses(renamed.columns, known)
        if found:
            raise DatasetError(_near_miss_message(path, known, found[0]))
    return renamed


def _near_miss_message(path: Path, known: str, found: str) -> str:
    mapping = f"--columns {known}={found} (in a dataset spec: '{path}?{known}={found}')"
    message = (f"table {path} has no `{known}` column, but it has `{found}`, which looks like it; it is not read as "
               f"{known} unless you say so. Rename the column to `{known}` in the table, or map it with {mapping}")
    if known == "patient_id":
        return message + (". If the table has no patients, pass --no-patients (in a spec: patient_id=none); its "
                          "splits are then drawn per item.")
    return message + f", or say the table has none with --columns {known}=none."


def table_columns(path: Path | TableSpec) -> TableColumns:
    """Read a pairs table and settle its ids and splits (see :func:`table_dataset`)."""
    spec = path if isinstance(path, TableSpec) else TableSpec(Path(path))
    path = spec.path
    df = map_columns(read_table(path, tuple(spec.columns.values())), spec)
    if "image" not in df.columns:
        raise DatasetError(f"table {path} has no `image` column (it has: {', '.join(map(str, df.columns))}). "
                           "A pairs table needs `image` (a path relative to the table) and `report`; "
                           "`split`, `patient_id`, `mask` and label columns are optional.")
    labels = [c for c in df.columns if c not in KNOWN and not str(c).startswith("mask_")
              and pd.api.types.is_numeric_dtype(df[c])]
    masks = {_mask_name(c): c for c in df.columns if c == "mask" or str(c).startswith("mask_")}
    cols = TableColumns(path, df, [], [], "", labels, masks, spec.columns.get("patient_id") == NONE)
    cols.ids = ([str(v) if has else str(i) for i, (v, has) in enumerate(zip(df["id"], cols.present("id")))]
                if "id" in df.columns else [str(i) for i in range(len(df))])
    cols.split, cols.rule = _splits(cols)
    return cols


def _splits(cols: TableColumns) -> tuple[list[str], str]:
    """Each row's split: the table's column (canonical names), or seeded by patient (or item id)."""
    path, df = cols.path, cols.frame
    given = cols.present("split")
    if given.any():
        if not given.all():
            first = cols.ids[int((~given).to_numpy().argmax())]
            raise DatasetError(f"table {path}: {int((~given).sum())} row(s) have an empty split (e.g. item {first!r}). "
                               "Fill them in, or drop the split column to have splits assigned by patient.")
        return canonical_splits(df["split"].astype(str).tolist(), f"table {path}"), "the table's split column"
    patients = cols.present("patient_id")
    by_patient = bool(patients.any())
    keys = [str(p) if has else f"item:{i}" for p, has, i in
            zip(df["patient_id"] if "patient_id" in df.columns else [None] * len(df), patients, cols.ids)]
    splits = assign_splits(keys)
    rule = split_rule("patient_id" if by_patient else "the item id")
    counts = {s: splits.count(s) for s in ("train", "valid", "test")}
    _note_once(str(path), f"[yellow]note:[/] {escape(str(path))} has no split column: {escape(rule)} "
                          f"(train {counts['train']:,}, valid {counts['valid']:,}, test {counts['test']:,} items)")
    if "patient_id" not in df.columns and not cols.no_patients:
        _note_once(f"{path} patients", f"[yellow]warning:[/] {escape(str(path))} has no patient_id column, so its "
                   "splits are drawn per item: two studies of one patient can land in different splits. Add a "
                   "patient_id column (or map yours with --columns patient_id=COLUMN), or pass --no-patients to say "
                   "each row is its own patient.")
    return splits, rule


def items_from_columns(cols: TableColumns) -> list[Item]:
    """Items of a table's columns; image and mask paths are relative to the table's folder."""
    base = cols.path.resolve().parent
    df = cols.frame
    items = []
    for i, row in enumerate(df.to_dict("records")):
        items.append(Item(
            id=cols.ids[i],
            image=base / str(row["image"]) if _present(row["image"]) else base / "<missing image path>",
            report=row["report"] if "report" in row and _present(row["report"]) else None,
            patient_id=str(row["patient_id"]) if _present(row.get("patient_id")) else None,
            split=cols.split[i],
            labels={c: float(row[c]) for c in cols.labels},
            masks={name: base / str(row[c]) for name, c in cols.masks.items() if _present(row.get(c))},
        ))
    return items


def items_from_table(path: Path | TableSpec) -> list[Item]:
    """Items of a pairs table, with their splits (see :func:`table_dataset`)."""
    return items_from_columns(table_columns(path))


def table_dataset(path: Path | TableSpec, materialise: bool = True) -> Dataset:
    """A pairs table as a dataset, with a split for every item.

    The ``split`` column may spell valid as val/validation/dev; without the column, each
    patient (or item, without ``patient_id``) gets a seeded, deterministic split, logged
    here and recorded with the dataset index (``dataset.json``: ``split_rule``). With
    ``materialise=False`` the table is not read at all: its name comes from its path.
    """
    spec = path if isinstance(path, TableSpec) else TableSpec(Path(path))
    path = spec.path
    if not materialise:
        if not path.exists():
            read_table(path)  # raises the message that names the missing table
        return Dataset(name=table_name(path), spec=spec.text(), items=[], description=f"pairs table {path}")
    cols = table_columns(spec)
    return Dataset(name=table_name(path), spec=spec.text(), items=items_from_columns(cols),
                   description=f"pairs table {path}", split_rule=cols.rule)


_NOTED: set[str] = set()


def _note_once(key: str, message: str) -> None:
    """Every stage opens the table; say it once per process."""
    if key not in _NOTED:
        _NOTED.add(key)
        err.print(message, soft_wrap=True)


def _mask_name(column: str) -> str:
    return column[len("mask_"):] if column.startswith("mask_") else "mask"


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""
