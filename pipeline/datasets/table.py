"""A pairs table: CSV or Parquet with `image`, `report`, optional `split`, and labels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import xxhash

from core.console import err, escape
from pipeline.datasets.base import Dataset, DatasetError, Item
from pipeline.datasets.splits import assign_splits, canonical_splits, split_rule

KNOWN = {"id", "image", "report", "split", "patient_id", "mask"}


def is_text_column(name) -> bool:
    """Columns read as text, never numbers: ids keep their leading zeros (``000123``), paths stay paths."""
    name = str(name)
    return name in KNOWN or name.startswith("mask_") or name.endswith("_id")


def read_table(path: Path) -> pd.DataFrame:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"table {path} does not exist. Give a CSV or Parquet pairs table, "
                           "a built-in name (demo), or <reader>:<root>.")
    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(path)
        header = pd.read_csv(path, nrows=0).columns
        return pd.read_csv(path, keep_default_na=True, dtype={c: str for c in header if is_text_column(c)})
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

    def present(self, column: str) -> pd.Series:
        """Rows where ``column`` holds a value (not empty, not NaN)."""
        if column not in self.frame.columns:
            return pd.Series(False, index=self.frame.index)
        col = self.frame[column]
        return col.notna() & (col.astype(str) != "")


def table_columns(path: Path) -> TableColumns:
    """Read a pairs table and settle its ids and splits (see :func:`table_dataset`)."""
    path = Path(path)
    df = read_table(path)
    if "image" not in df.columns:
        raise DatasetError(f"table {path} has no `image` column (it has: {', '.join(map(str, df.columns))}). "
                           "A pairs table needs `image` (a path relative to the table) and `report`; "
                           "`split`, `patient_id`, `mask` and label columns are optional.")
    labels = [c for c in df.columns if c not in KNOWN and not str(c).startswith("mask_")
              and pd.api.types.is_numeric_dtype(df[c])]
    masks = {_mask_name(c): c for c in df.columns if c == "mask" or str(c).startswith("mask_")}
    cols = TableColumns(path, df, [], [], "", labels, masks)
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


def items_from_table(path: Path) -> list[Item]:
    """Items of a pairs table, with their splits (see :func:`table_dataset`)."""
    return items_from_columns(table_columns(path))


def table_dataset(path: Path, materialise: bool = True) -> Dataset:
    """A pairs table as a dataset, with a split for every item.

    The ``split`` column may spell valid as val/validation/dev; without the column, each
    patient (or item, without ``patient_id``) gets a seeded, deterministic split, logged
    here and recorded with the dataset index (``dataset.json``: ``split_rule``). With
    ``materialise=False`` the table is not read at all: its name comes from its path.
    """
    path = Path(path)
    if not materialise:
        if not path.exists():
            read_table(path)  # raises the message that names the missing table
        return Dataset(name=table_name(path), spec=str(path.resolve()), items=[], description=f"pairs table {path}")
    cols = table_columns(path)
    return Dataset(name=table_name(path), spec=str(path.resolve()), items=items_from_columns(cols),
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
