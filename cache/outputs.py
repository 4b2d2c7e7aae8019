"""The Adaptor-output cache: a frozen Adaptor's outputs per (checkpoint, store), computed once.

The Adaptor's outputs are a pure function of (checkpoint bytes, cached embeddings), so
they are cached too, under ``<cache>/adaptor-outputs/<checkpoint hash[:16]>-<store
fingerprint[:16]>/``: ``meta.json`` naming both, and one ``.npz`` per output kind with the
store rows it holds and their values, rewritten atomically when rows are added. A second
evaluation of the same checkpoint on the same cache runs the Adaptor zero times.

Each ``.npz`` carries a crc32c per array (:mod:`cache.npz`) checked whenever it is read;
a damaged file stops the evaluation with the command that removes it. It is committed
through the cache's storage (:func:`cache.npz.commit_checked`): for a cache in a bucket,
as an object written over the version read, so another host's evaluation reuses it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from cache.marker import ensure_marker
from cache.mirror import storage_at
from cache.npz import commit_checked, read_checked

OUTPUTS_DIR = "adaptor-outputs"


def outputs_folder(cache_root: Path, checkpoint_hash: str, fingerprint: str) -> Path:
    return Path(cache_root) / OUTPUTS_DIR / f"{checkpoint_hash[:16]}-{fingerprint[:16]}"


def ensure_outputs_meta(folder: Path, meta: dict) -> None:
    """Write ``meta.json`` the first time a folder is used (what made these outputs)."""
    storage = storage_at(Path(folder).parent.parent)
    key = storage.key_of(Path(folder) / "meta.json")
    if storage.kind(key) != "file":
        ensure_marker(storage)
        storage.mkdirs(storage.key_of(folder))
        storage.create(key, json.dumps({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())


class OutputCache:
    """Rows -> values for one output kind, in one ``.npz``, committed whole over the version read."""

    def __init__(self, folder: Path, kind: str):
        self.path = Path(folder) / f"{kind}.npz"
        self.root = self.path.parent.parent.parent
        self.storage = storage_at(self.root)
        self.key = self.storage.key_of(self.path)
        self.fix = (f"Run `pipe cache verify --repair --cache {self.root}` to remove it; the next evaluation computes "
                    "these outputs again.")

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows held and their values, checksum-checked (nothing, for a file without checksums)."""
        arrays, _ = read_checked(self.storage, self.key, self.fix)
        return _columns(arrays)

    def get(self, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
        """Values for ``rows`` (in that order) and how many rows had to be computed."""
        arrays, version = read_checked(self.storage, self.key, self.fix)
        have_rows, have = _columns(arrays)
        want = np.unique(rows)
        missing = want[~np.isin(want, have_rows)]
        if len(missing):
            new = compute(missing)
            kept = commit_checked(self.storage, self.key, _merged(arrays, missing, new), version,
                                  lambda theirs: _merged(theirs, missing, new), self.fix)
            have_rows, have = kept["rows"], kept["values"]
        return have[np.searchsorted(have_rows, rows)], len(missing)


def _columns(arrays: dict | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(rows, values) of an outputs file; nothing for none (or one written before outputs carried checksums)."""
    return (arrays["rows"], arrays["values"]) if arrays is not None else (np.zeros(0, np.int64), None)


def _merged(arrays: dict | None, rows: np.ndarray, values: np.ndarray) -> dict[str, np.ndarray]:
    """An outputs file's rows with ``rows`` added (those it holds already are kept as they are), sorted."""
    have_rows, have = _columns(arrays)
    new = ~np.isin(rows, have_rows)
    all_rows = np.concatenate([have_rows, rows[new]])
    all_values = values[new] if have is None else np.concatenate([have, values[new].astype(have.dtype)])
    order = np.argsort(all_rows)
    return {"rows": all_rows[order], "values": all_values[order]}
