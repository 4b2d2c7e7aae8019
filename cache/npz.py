"""``.npz`` files that carry a crc32c of every array they hold: the derived caches' format.

The Adaptor-output cache and the aligned-mask cache keep their arrays in ``.npz`` files,
rewritten atomically when they grow. Each file also holds ``_crc32c``: one checksum per
array, in sorted name order, so a reader checks every byte it uses, as the embedding
readers do. A file without checksums (written by an older version) is not trusted: its
contents are computed again.

A derived file is committed as a store's shard is: written whole (a reader sees the old
file or the new one), and only over the version that was read (:meth:`cache.storage.Storage.put_if`:
in a bucket, a put conditional on the object's ETag). When another writer (another
evaluation, on this host or another sharing the cache) committed rows meanwhile, theirs
are read again and merged with ours before the next try (:func:`commit_checked`), so no
writer's rows are dropped and a second host reuses what the first computed.
"""
from __future__ import annotations

import io
import logging
import zipfile
from pathlib import Path
from typing import Callable

import google_crc32c
import numpy as np

from cache.storage import Storage
from core.atomic import atomic_write_with
from core.errors import PipeError

CRC_KEY = "_crc32c"
COMMIT_TRIES = 8  # another writer's commit in between: theirs are merged in and the commit tried again

log = logging.getLogger(__name__)


class NpzCorruption(PipeError, ValueError):
    """A derived-cache file whose bytes do not match their checksums; the message names the fix."""


def _crc(a: np.ndarray) -> int:
    return google_crc32c.value(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _with_crcs(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = sorted(arrays)
    return {**arrays, CRC_KEY: np.array([_crc(np.asarray(arrays[n])) for n in names], dtype=np.uint32)}


def save_checked(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` and their checksums to ``path`` all or nothing."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda tmp: np.savez(tmp, **_with_crcs(arrays)), suffix=".npz")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """The bytes of the ``.npz`` file :func:`save_checked` writes."""
    buf = io.BytesIO()
    np.savez(buf, **_with_crcs(arrays))
    return buf.getvalue()


def read_checked(storage: Storage, key: str, fix: str) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The checked arrays of ``key`` (None: there is no file, or one without checksums) and the
    version they were read at (None: there is no file), for :func:`commit_checked`."""
    entry = storage.stat(key)
    if entry is None:
        return None, None
    return load_checked(storage.fetch(key, entry), fix), entry.version


def commit_checked(storage: Storage, key: str, arrays: dict[str, np.ndarray], version: str | None,
                   merge: Callable[[dict[str, np.ndarray] | None], dict[str, np.ndarray]], fix: str) -> dict:
    """Write ``arrays`` (with checksums) to ``key`` only over ``version``; when another writer
    committed meanwhile, ``merge(theirs)`` gives what to write over theirs, and it is tried again.
    Returns what was committed (after :data:`COMMIT_TRIES` lost races: ours, unwritten; it is
    computed again when next needed)."""
    for _ in range(COMMIT_TRIES):
        if storage.put_if(key, npz_bytes(arrays), version):
            return arrays
        theirs, version = read_checked(storage, key, fix)
        arrays = merge(theirs)
    log.warning("%s changed under every one of %d commits; its new rows were not kept", storage.where_of(key),
                COMMIT_TRIES)
    return arrays


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
