"""Find a dataset's cached embeddings and line up image/report pairs, from the cache alone.

Nothing here builds an encoder or decodes an image: the dataset index gives each item's
content keys, the stores' manifests give the rows that hold them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from cache.index import LABEL_PREFIX, MASK_PREFIX, DatasetIndex, load_index, read_stores, resolve_store
from cache.store import Store, StoreError
from core.errors import PipeError


class CacheMissError(PipeError):
    """Items or stores that stage one has not produced; the message names the command."""


def embed_command(dataset: str, backbone: str, text_encoder: str, cache: Path) -> str:
    return f"pipe embed --dataset {dataset} --backbone {backbone} --text-encoder {text_encoder} --cache {cache}"


def find_store(index: DatasetIndex, modality: str, name: str, hint: str) -> Store:
    """The store that ``pipe embed`` recorded for this dataset, modality and (canonical) encoder name,
    always inside the cache being read (see :func:`cache.index.resolve_store`)."""
    stores = read_stores(index.folder)
    entry = stores.get(modality, {}).get(name)
    if entry is None:
        have = ", ".join(stores.get(modality, {})) or "none"
        raise CacheMissError(f"dataset {index.name!r} has no cached {modality} embeddings from {name!r} "
                             f"(cached {modality} encoders: {have}). Run:\n  {hint}")
    try:
        return Store.open(resolve_store(index.folder, entry["store"]))
    except StoreError as e:
        raise CacheMissError(f"{e}\nRebuild it with:\n  {hint}") from e


@dataclass
class PairData:
    """Items of one dataset with the store rows of their image views and report."""

    image: Store
    text: Store
    items: pd.DataFrame              # id, split, patient_id, labels..., masks...
    image_rows: np.ndarray           # [n, V] int64, -1 where a view is absent; column 0 is the plain view
    text_rows: np.ndarray            # [n] int64
    skipped: dict[str, int] = field(default_factory=dict)

    def split(self, name: str | None) -> np.ndarray:
        """Positions of the items in a split (all items when ``name`` is None)."""
        if name is None:
            return np.arange(len(self.items))
        return np.flatnonzero(self.items["split"].to_numpy() == name)

    @property
    def label_names(self) -> list[str]:
        return [c[len(LABEL_PREFIX):] for c in self.items.columns if c.startswith(LABEL_PREFIX)]

    @property
    def mask_names(self) -> list[str]:
        return [c[len(MASK_PREFIX):] for c in self.items.columns if c.startswith(MASK_PREFIX)]

    @property
    def image_grid(self) -> tuple[tuple[int, int] | None, int]:
        enc = self.image.attrs["spec"]["encoder"]
        if enc.get("patch_size"):
            side = enc["input_size"] // enc["patch_size"]
            return (side, side), int(enc.get("num_prefix_tokens", 0))
        return None, int(enc.get("num_prefix_tokens", 0))

    def fingerprints(self) -> dict[str, str]:
        return {"image": self.image.fingerprint, "text": self.text.fingerprint}


def load_pairs(cache: Path, dataset_name: str, dataset_arg: str, backbone: str, text_encoder: str,
               need_text: bool = True, canonical: Callable[[str], str] = str) -> PairData:
    """The dataset's items with the store rows of their embeddings.

    ``canonical`` maps an encoder name as the user gave it (an alias, say) to the name the
    stores are recorded under (``pipe embed`` records canonical names).
    """
    hint = embed_command(dataset_arg, backbone, text_encoder, cache)
    try:
        index = load_index(cache, dataset_name)
    except FileNotFoundError:
        raise CacheMissError(f"dataset {dataset_arg!r} is not in the cache at {cache}. Run:\n  {hint}") from None
    image = find_store(index, "image", canonical(backbone), hint)
    text = find_store(index, "text", canonical(text_encoder), hint) if need_text else image
    table = index.table
    image_rows, img_missing = _image_rows(image, table)
    text_rows, txt_missing = _rows(text, table.report_key) if need_text else (np.zeros(len(table), np.int64), None)
    failed = _failed_keys(image) | (_failed_keys(text) if need_text else set())
    keep = image_rows[:, 0] >= 0
    if need_text:
        keep &= text_rows >= 0
    lost = table[~keep]
    unexplained = lost[~(lost.image_key.isna() | lost.image_key.isin(failed) | lost.report_key.isna()
                         | lost.report_key.isin(failed))]
    if len(unexplained):
        raise CacheMissError(f"{len(unexplained)} item(s) of {dataset_arg!r} are not in the cache "
                             f"(e.g. item {unexplained.id.iloc[0]!r}); the cache is incomplete. Run:\n  {hint}")
    items = table[keep].reset_index(drop=True)
    return PairData(image, text, items, image_rows[keep], text_rows[keep],
                    skipped={"failed_at_embed": int((~keep).sum())})


def _rows(store: Store, keys: pd.Series, view: int = 0) -> tuple[np.ndarray, int]:
    index = store.row_index()
    rows = np.array([index.get((k, view), -1) if isinstance(k, str) else -1 for k in keys], dtype=np.int64)
    return rows, int((rows < 0).sum())


def _image_rows(store: Store, table: pd.DataFrame) -> tuple[np.ndarray, int]:
    n_views = store.views() + 1
    index = store.row_index()
    rows = np.full((len(table), n_views), -1, dtype=np.int64)
    for i, k in enumerate(table.image_key):
        if isinstance(k, str):
            for v in range(n_views):
                rows[i, v] = index.get((k, v), -1)
    return rows, int((rows[:, 0] < 0).sum())


def _failed_keys(store: Store) -> set[str]:
    f = store.failures()
    return {k for k in f.column("key").to_pylist() if k}
