"""The Adaptor-output cache: a frozen Adaptor's outputs per (checkpoint, store), computed once.

The Adaptor's outputs are a pure function of (checkpoint bytes, cached embeddings), so
they are cached too, under ``<cache>/adaptor-outputs/<checkpoint hash[:16]>-<store
fingerprint[:16]>/``: ``meta.json`` naming both, and one ``.npz`` per output kind with the
store rows it holds and their values, rewritten atomically when rows are added. A second
evaluation of the same checkpoint on the same cache runs the Adaptor zero times.

Each ``.npz`` carries a crc32c per array (:mod:`cache.npz`) checked whenever it is read;
a damaged file stops the evaluation with the command that removes it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import numpy as np

from core.atomic import atomic_write_bytes
from cache.marker import ensure_marker
from cache.npz import load_checked, save_checked

OUTPUTS_DIR = "adaptor-outputs"


def outputs_folder(cache_root: Path, checkpoint_hash: str, fingerprint: str) -> Path:
    return Path(cache_root) / OUTPUTS_DIR / f"{checkpoint_hash[:16]}-{fingerprint[:16]}"


def ensure_outputs_meta(folder: Path, meta: dict) -> None:
    """Write ``meta.json`` the first time a folder is used (what made these outputs)."""
    path = folder / "meta.json"
    if not path.exists():
        ensure_marker(Path(folder).parent.parent)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps({**meta, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())


class OutputCache:
    """Rows -> values for one output kind, in one ``.npz`` written with tmp + os.replace."""

    def __init__(self, folder: Path, kind: str):
        self.path = Path(folder) / f"{kind}.npz"

    def load(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The rows held and their values, checksum-checked (nothing, for a file without checksums)."""
        if not self.path.exists():
            return np.zeros(0, np.int64), None
        root = self.path.parent.parent.parent
        arrays = load_checked(self.path, f"Run `pipe cache verify --repair --cache {root}` to remove it; the next "
                                         "evaluation computes these outputs again.")
        if arrays is None:  # written before outputs carried checksums: computed again
            return np.zeros(0, np.int64), None
        return arrays["rows"], arrays["values"]

    def get(self, rows: np.ndarray, compute: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, int]:
        """Values for ``rows`` (in that order) and how many rows had to be computed."""
        have_rows, have = self.load()
        want = np.unique(rows)
        missing = want[~np.isin(want, have_rows)]
        if len(missing):
            new = compute(missing)
            have_rows = np.concatenate([have_rows, missing])
            have = new if have is None else np.concatenate([have, new.astype(have.dtype)])
            order = np.argsort(have_rows)
            have_rows, have = have_rows[order], have[order]
            self._write(have_rows, have)
        return have[np.searchsorted(have_rows, rows)], len(missing)

    def _write(self, rows: np.ndarray, values: np.ndarray) -> None:
        save_checked(self.path, {"rows": rows, "values": values})
