"""What `pipe data info` shows: items, patients, reports and masks per split, label counts.

One routine counts columns (:func:`summarise_columns`); a pairs table hands it the table's
own columns, so counting a table of any size builds no items (:func:`summarise_spec`),
and a reader's dataset hands it columns gathered from its items (:func:`summarise`).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np

from pipeline.datasets.base import Dataset
from pipeline.datasets.registry import READERS
from pipeline.datasets.spec import parse_dataset_spec
from pipeline.datasets.table import TableColumns, parse_table_spec, table_columns, table_name


def summarise_columns(head: dict, split: Sequence[str | None], patient: Sequence[str | None],
                      has_report: Sequence[bool], has_mask: Sequence[bool],
                      labels: dict[str, np.ndarray], skipped: Sequence[dict] = ()) -> dict:
    """The summary of a dataset given as columns (one entry per item in each sequence)."""
    splits: dict[str, dict] = {}
    patients: dict[str, set] = {}
    for s, p, r, m in zip(split, patient, has_report, has_mask):
        key = s or "-"
        row = splits.setdefault(key, {"items": 0, "patients": 0, "reports": 0, "masks": 0})
        row["items"] += 1
        row["reports"] += bool(r)
        row["masks"] += bool(m)
        patients.setdefault(key, set()).add(p)
    for key, ids in patients.items():
        splits[key]["patients"] = len(ids - {None})
    out_labels = {}
    for name, values in labels.items():
        known = values[~np.isnan(values)]
        counts = Counter(known.tolist())
        out_labels[name] = {"positive": int((known == 1).sum()), "known": int(known.size),
                            "values": ", ".join(f"{k:g}: {n:,}" for k, n in sorted(counts.items()))}
    return {**head, "items": len(split), "splits": splits, "labels": out_labels,
            "skipped": dict(Counter(s.get("kind", "?") for s in skipped))}


def summarise(ds: Dataset) -> dict:
    """The summary of a reader's dataset, from its items."""
    labels = {name: np.array([_number(it.labels.get(name)) for it in ds.items], dtype=float)
              for name in ds.label_names}
    return summarise_columns({"name": ds.name, "spec": ds.spec}, [it.split for it in ds.items],
                             [it.patient_id for it in ds.items], [bool(it.report) for it in ds.items],
                             [bool(it.masks) for it in ds.items], labels, ds.skipped)


def summarise_table(cols: TableColumns) -> dict:
    """The summary of a pairs table, from its columns alone."""
    df = cols.frame
    patient = ([str(p) if has else None for p, has in zip(df["patient_id"], cols.present("patient_id"))]
               if "patient_id" in df.columns else [None] * len(df))
    report = cols.present("report").to_numpy()
    mask = np.zeros(len(df), bool)
    for column in cols.masks.values():
        mask |= cols.present(column).to_numpy()
    labels = {name: df[name].to_numpy(dtype=float) for name in cols.labels}
    head = {"name": table_name(cols.path), "spec": str(cols.path.resolve())}
    return summarise_columns(head, cols.split, patient, report, mask, labels)


def summarise_spec(spec: str, open_dataset) -> tuple[dict, str]:
    """(summary, description) of a dataset argument: a table's columns, or a reader's items.

    ``open_dataset(spec)`` opens a reader's dataset; it is not called for a table.
    """
    table = parse_table_spec(spec)
    if parse_dataset_spec(spec, READERS) is None and table.path.is_file():
        return summarise_table(table_columns(table)), f"pairs table {table.path}"
    ds = open_dataset(spec)
    return summarise(ds), ds.description


def _number(v) -> float:
    return math.nan if v is None else float(v)
