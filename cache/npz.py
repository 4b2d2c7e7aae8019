"""``.npz`` files that carry a crc32c of every array they hold: the derived caches' format.

The Adaptor-output cache and the aligned-mask cache keep their arrays in ``.npz`` files,
rewritten atomically when they grow. Each file also holds ``_crc32c``: one checksum per
array, in sorted name order, so a reader checks every byte it uses, as the embedding
readers do. A file without checksums (written by an older version) is not trusted: its
contents are computed again.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import google_crc32c
import numpy as np

from core.atomic import atomic_write_with
from core.errors import PipeError

CRC_KEY = "_crc32c"


class NpzCorruption(PipeError, ValueError):
    """A derived-cache file whose bytes do not match their checksums; the message names the fix."""


def _crc(a: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def save_checked(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and their checksums to ``path`` all or nothing."""
    names = sorted(arrays)
    crcs = np.array([_crc(np.asarray(arrays[n])) for n in names], dtype=np.uint32)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: np.savez(tmp, **arrays, **{CRC_KEY: crcs}), suffix=".npz")


def load_checked(path: Path, fix: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``path`` after checking them; None when the file has no checksums.

    A damaged file raises :class:`NpzCorruption`, whose message ends with ``fix``.
    """
    try:
        with np.load(path) as z:
            arrays = {n: z[n] for n in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise NpzCorruption(f"{path} is unreadable ({type(e).__name__}: {e}). {fix}") from None
    crcs = arrays.pop(CRC_KEY, None)
    if crcs is None:
        return None
    names = sorted(arrays)
    if len(crcs) != len(names):
        raise NpzCorruption(f"{path} holds {len(names)} arrays but {len(crcs)} checksums. {fix}")
    for name, crc in zip(names, crcs):
        if _crc(arrays[name]) != int(crc):
            raise NpzCorruption(f"{path}: array {name} fails its crc32c checksum. {fix}")
    return arrays
