"""A pairs table: CSV or Parquet with `image`, `report`, optional `split`, and labels."""
from __future__ import annotations

import math
from dataclasses import replace
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


def items_from_table(path: Path) -> list[Item]:
    """Items of a pairs table; image and mask paths are relative to the table's folder."""
    path = Path(path)
    df = read_table(path)
    if "image" not in df.columns:
        raise DatasetError(f"table {path} has no `image` column (it has: {', '.join(map(str, df.columns))}). "
                           "A pairs table needs `image` (a path relative to the table) and `report`; "
                           "`split`, `patient_id`, `mask` and label columns are optional.")
    base = path.resolve().parent
    labels = [c for c in df.columns if c not in KNOWN and not str(c).startswith("mask_")
              and pd.api.types.is_numeric_dtype(df[c])]
    masks = [c for c in df.columns if c == "mask" or str(c).startswith("mask_")]
    items = []
    for i, row in enumerate(df.to_dict("records")):
        items.append(Item(
            id=str(row["id"]) if "id" in row and _present(row["id"]) else str(i),
            image=base / str(row["image"]) if _present(row["image"]) else base / "<missing image path>",
            report=row["report"] if "report" in row and _present(row["report"]) else None,
            patient_id=str(row["patient_id"]) if _present(row.get("patient_id")) else None,
            split=str(row["split"]) if _present(row.get("split")) else None,
            labels={c: float(row[c]) for c in labels},
            masks={_mask_name(c): base / str(row[c]) for c in masks if _present(row.get(c))},
        ))
    return items


def table_dataset(path: Path) -> Dataset:
    """A pairs table as a dataset, with a split for every item.

    The ``split`` column may spell valid as val/validation/dev; without the column, each
    patient (or item, without ``patient_id``) gets a seeded, deterministic split, logged
    here and recorded with the dataset index (``dataset.json``: ``split_rule``).
    """
    path = Path(path)
    items = items_from_table(path)
    has_column = any(it.split is not None for it in items)
    if has_column:
        missing = [it.id for it in items if it.split is None]
        if missing:
            raise DatasetError(f"table {path}: {len(missing)} row(s) have an empty split (e.g. item {missing[0]!r}). "
                               "Fill them in, or drop the split column to have splits assigned by patient.")
        splits, rule = canonical_splits([it.split for it in items], f"table {path}"), "the table's split column"
    else:
        by_patient = any(it.patient_id for it in items)
        splits = assign_splits([it.patient_id or f"item:{it.id}" for it in items])
        rule = split_rule("patient_id" if by_patient else "the item id")
        counts = {s: splits.count(s) for s in ("train", "valid", "test")}
        _note_once(str(path), f"[yellow]note:[/] {escape(str(path))} has no split column: {escape(rule)} "
                              f"(train {counts['train']:,}, valid {counts['valid']:,}, test {counts['test']:,} items)")
    items = [replace(it, split=s) for it, s in zip(items, splits)]
    return Dataset(name=table_name(path), spec=str(path.resolve()), items=items,
                   description=f"pairs table {path}", split_rule=rule)


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
