"""Writes that are all or nothing.

Every file the project writes for later reading goes through :func:`atomic_path`:
the bytes go to a hidden temporary name in the same directory (so the rename cannot
cross file systems), the file is fsynced, renamed over its final name, and the directory
is fsynced so the rename itself survives a power cut. A reader therefore sees the old
file or the new one, never half of one. Temporary names start with a dot and end in
``.tmp``; :func:`is_temp_name` recognises them so verify/gc can remove the leftovers of
killed writers.

Files are created with mode 0666 and the process umask applied, like any other file a
tool writes (``tempfile.mkstemp`` would force 0600, which a team on a shared file
system cannot read).
"""
from __future__ import annotations

import contextlib
import os
import re
import threading
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from core.processes import me

# .<name>.<pid>-<thread>-<token>.tmp[.ext]; older versions wrote no token (and once no thread)
_TEMP = re.compile(r"^\..+\.(\d+)(?:-\d+)?(?:-[0-9a-f]{16})?\.tmp(\.[A-Za-z0-9]+)?$")


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(path: Path, suffix: str = "") -> Path:
    """The hidden temporary sibling this process (and thread) writes ``path`` under.

    The writer's token makes the name unique even between processes of equal pid in two
    pid namespaces or on two hosts sharing the cache.
    """
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}-{me().token}.tmp{suffix}")


def is_temp_name(name: str) -> bool:
    return bool(_TEMP.match(name))


def temp_owner(name: str) -> int | None:
    """The pid that wrote a temporary file, from its name (None if it is not one)."""
    m = _TEMP.match(name)
    return int(m[1]) if m else None


def _create(path: Path):
    # O_EXCL: a stale file of a reused pid is replaced, never appended to
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; on success it replaces ``path``.

    For writers that want a file name (``np.savez``, safetensors' ``save_file``): the
    temporary file exists (empty, mode from the umask) when the block starts. ``suffix``
    keeps an extension some writers insist on (``.npz``). On an exception the temporary
    file is removed and ``path`` is untouched.
    """
    path = Path(path)
    tmp = temp_name(path, suffix)
    fd = _create(tmp)
    mode = os.fstat(fd).st_mode & 0o777  # 0666 less the umask
    os.close(fd)
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors writes 0600)
            os.chmod(tmp, mode)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_with(path: str | os.PathLike, write: Callable[[Path], object], suffix: str = "") -> None:
    """Call ``write(tmp_path)``, then move the result into place all or nothing."""
    with atomic_path(path, suffix) as tmp:
        write(tmp)


def write_parquet_atomic(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())
