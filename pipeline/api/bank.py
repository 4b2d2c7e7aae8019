"""A report bank: reports embedded once by a trained Adaptor, searched by image embeddings.

Reports come from a list, a table, or a dataset in the cache. A cached dataset's reports
are read from its text store (the rows `pipe embed` wrote) and only the Adaptor runs, after
checking that the store's fingerprint is the one the Adaptor was trained on.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cache.index import load_index
from cache.keys import normalise_report, text_key
from cache.pairs import embed_command, find_store
from cache.paths import cache_root, cache_source
from cache.reader import RowReader
from cache.store import Store
from pipeline.api.encode import adaptor_text
from pipeline.datasets import open_dataset
from pipeline.datasets.table import NONE, TableSpec, parse_table_spec
from pipeline.encoders import canonical_name
from core.errors import InputError, MissingFileError, PipeError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


@dataclass
class Hit:
    rank: int
    id: str
    report: str
    similarity: float


@dataclass
class ReportBank:
    """Distinct reports (``ids``: the first item that has each), their embeddings ``[n, d]``,
    and where they came from."""

    ids: list[str]
    reports: list[str]
    embeddings: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.reports)

    def search(self, image_embeddings: np.ndarray, k: int = 5) -> list[list[Hit]]:
        """The ``k`` most similar reports of each image (cosine similarity, highest first)."""
        q = np.asarray(image_embeddings, np.float64)
        if q.ndim == 1:
            q = q[None]
        sim = q @ self.embeddings.astype(np.float64).T
        k = min(k, len(self))
        out = []
        for row in sim:
            if not np.isfinite(row).all():  # an image that could not be read
                out.append([])
                continue
            top = np.argsort(-row, kind="stable")[:k]
            out.append([Hit(r + 1, self.ids[j], self.reports[j], float(row[j])) for r, j in enumerate(top)])
        return out


def _distinct(ids: list[str], reports: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Ids, normalised reports and keys of the distinct non-empty reports, in order of first appearance."""
    seen: dict[str, int] = {}
    out_ids, out_reports, keys = [], [], []
    for i, r in zip(ids, reports):
        norm = normalise_report(r)
        if norm and (key := text_key(norm)) not in seen:
            seen[key] = len(keys)
            out_ids.append(str(i))
            out_reports.append(norm)
            keys.append(key)
    return out_ids, out_reports, keys


def build_bank(model, reports, *, split: str | None = None, cache: str | os.PathLike | None = None,
               batch_size: int = 32) -> ReportBank:
    """See :meth:`pipeline.api.model.TrainedAdaptor.report_bank`."""
    if not isinstance(reports, (str, os.PathLike)):
        texts = [str(r) for r in reports]
        ids, texts, _ = _distinct([str(i) for i in range(len(texts))], texts)
        return ReportBank(ids, texts, model.encode_texts(texts, batch_size=batch_size), "list")
    spec = os.fspath(reports)
    roots = caches_to_search(model, cache)
    for root in roots:
        cached = _cached_reports(model, spec, root, split)
        if cached is not None:
            return cached
    table = parse_table_spec(spec)
    path = table.path
    if path.is_file():
        ids, texts = _table_reports(table, split)
        ids, texts, _ = _distinct(ids, texts)
        return ReportBank(ids, texts, model.encode_texts(texts, batch_size=batch_size), str(path))
    searched = " or ".join(f"{r} ({why})" for r, why in zip(roots, _why(model, cache, roots)))
    raise MissingFileError(f"report bank {spec!r} is neither a table nor a dataset in the cache at {searched}. Give "
                           "the cache that holds it (cache=... in Python; --cache DIR or $PIPE_CACHE on the command "
                           "line), a CSV/Parquet table with a `report` column, a text file with one report per line, "
                           "or embed the dataset first:\n  "
                           + embed_command(spec, "none", model.encoder_configs["text"].name, roots[0]))


def caches_to_search(model, cache: str | os.PathLike | None) -> list[Path]:
    """The cache given; else the default one, then the one the Adaptor was trained from (when it is here)."""
    if cache:
        return [cache_root(cache)]
    first = cache_root()
    trained = model.training_cache
    return [first] + ([trained.resolve()] if trained is not None and trained.resolve() != first else [])


def _why(model, cache, roots: list[Path]) -> list[str]:
    if cache:
        return ["given"]
    return [cache_source(), "where the Adaptor was trained"][:len(roots)]


def _table_reports(table: TableSpec, split: str | None) -> tuple[list[str], list[str]]:
    path = table.path
    if path.suffix.lower() not in TABLE_SUFFIXES:
        lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        return [f"{path.name}:{i + 1}" for i in range(len(lines))], lines
    if path.suffix.lower() in (".parquet", ".pq"):
        df = pd.read_parquet(path)
    else:
        df = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",", dtype=str, keep_default_na=False)
    if table.columns:  # the spec's mapping (`reports.csv?report=text`)
        df = df.rename(columns={c: k for k, c in table.columns.items() if c != NONE})
    if "report" not in df.columns:
        raise InputError(f"{path} has no `report` column (it has: {', '.join(map(str, df.columns))})")
    if split is not None:
        if "split" not in df.columns:
            raise InputError(f"{path} has no `split` column, so split={split!r} cannot be chosen")
        df = df[df["split"].astype(str) == split]
    ids = df["id"].astype(str).tolist() if "id" in df.columns else [f"row {i}" for i in range(len(df))]
    return ids, df["report"].fillna("").astype(str).tolist()


def _cached_reports(model, spec: str, root: Path, split: str | None) -> ReportBank | None:
    """The dataset's reports from its text store, through the Adaptor; None when it is not cached."""
    try:
        name = open_dataset(spec, root, materialise=False, skip_bad_rows=True).name
        index = load_index(root, name)
    except (PipeError, OSError, ValueError):
        return None
    text = model.encoder_configs["text"].name
    store = find_store(index, "text", canonical_name(text), embed_command(spec, "none", text, root))
    if store.fingerprint != model.fingerprints["text"]:
        raise InputError(f"the reports of {spec!r} in the cache were embedded with another {text} configuration "
                         f"(fingerprint {store.fingerprint}) than the Adaptor was trained on "
                         f"({model.fingerprints['text']}); give the reports as a table instead")
    table = index.table
    if split is not None:
        if split not in set(table["split"]):
            raise InputError(f"dataset {spec!r} has no {split!r} split (it has: {', '.join(sorted(set(table['split'])))})")
        table = table[table["split"] == split]
    ids, texts, keys = _distinct(table["id"].astype(str).tolist(), table["report"].fillna("").tolist())
    where = store.row_index()
    held = [i for i, k in enumerate(keys) if (k, 0) in where]  # reports that failed at embedding are left out
    rows = np.array([where[(keys[i], 0)] for i in held], np.int64)
    emb = _stored_text_embeddings(model, store, rows)
    return ReportBank([ids[i] for i in held], [texts[i] for i in held], emb, f"{spec} (cache {root})")


def _stored_text_embeddings(model, store: Store, rows: np.ndarray, batch: int = 256) -> np.ndarray:
    """The Adaptor's text embeddings of store rows, as evaluation computes them."""
    names = ("tokens", "length") if model.mode.sequences else ("pooled",)
    readers = {n: RowReader(store, n) for n in names}
    out = [np.zeros((0, model.dim), np.float32)]
    for s in range(0, len(rows), batch):
        feats = {n: torch.from_numpy(r.take(rows[s:s + batch])).to(model.device) for n, r in readers.items()}
        out.append(adaptor_text(model.model, feats))
    return np.concatenate(out)
