"""A pairs table: CSV or Parquet with `image`, `report`, optional `split`, and labels."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import xxhash

from pipeline.datasets.base import Item
from pipeline.errors import InputError

KNOWN = {"id", "image", "report", "split", "patient_id", "mask"}


def is_text_column(name) -> bool:
    """Columns read as text, never numbers: ids keep their leading zeros (``000123``), paths stay paths."""
    name = str(name)
    return name in KNOWN or name.startswith("mask_") or name.endswith("_id")


class DatasetError(InputError):
    """A dataset that cannot be read; the message names the file, the row and the fix."""


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


def _mask_name(column: str) -> str:
    return column[len("mask_"):] if column.startswith("mask_") else "mask"


def _present(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v) != ""
