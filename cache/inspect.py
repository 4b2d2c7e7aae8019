"""Summaries of the stores under a cache root, for `pipe cache ls` and `pipe doctor`."""
from __future__ import annotations

import os
from pathlib import Path

from cache.store import Store, find_stores


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except OSError:
                pass
    return total


def list_stores(root: Path) -> list[dict]:
    rows = []
    for path in find_stores(root):
        try:
            s = Store.open(path)
            items, failed = s.manifest().num_rows, s.failures().num_rows
            rows.append({"modality": s.modality, "encoder": s.attrs.get("encoder", "?"),
                         "fingerprint": s.fingerprint, "items": items, "failed": failed,
                         "bytes": dir_bytes(path), "path": str(path)})
        except Exception as e:  # list what we can; verify explains the rest
            rows.append({"modality": "?", "encoder": f"unreadable: {e}", "fingerprint": "?", "items": 0,
                         "failed": 0, "bytes": dir_bytes(path), "path": str(path)})
    return rows
