"""Which storage a cache location is, and keeping the local mirror of a cache in a bucket in step with it.

A command is given a cache as a folder or as ``s3://bucket/prefix``. :func:`locate` turns
either into the local folder the command works in, and :func:`storage_at` turns any path
in it back into its :class:`cache.storage.Storage`: the folder itself, or the objects of
the bucket it mirrors. These two, and cache/storage.py and cache/objects.py, are the only
code that knows which backends exist.

A cache in a bucket: its stores are read and written through
:class:`cache.objects.ObjectStorage`. Everything else a cache holds (the dataset indexes,
the marker, the derived files) is small: a command works on it in the local mirror of the
cache root, fetched whole when the command starts (:func:`attach`); what a command changes
there goes up as it is written (:meth:`Storage.put_if`, :meth:`Storage.upload`) or, for a
writing command's indexes, when it ends (:func:`push`). :func:`pull` brings the copies
below a folder up to date (every object fetched if changed, every copy no object backs
dropped). Each is a no-op on a folder, whose files are their own copies.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from cache.objects import REMOTE, ObjectStorage, remote_root
from cache.retries import BucketUnavailable
from cache.storage import LocalStorage, Storage, StoreError
from core.atomic import atomic_write_bytes
from core.errors import InputError

STORES = "stores"
# ``scheme://...``; also as ``Path()`` leaves it (``s3:/bucket``): typer hands ``--cache`` over as a Path
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def url_scheme(value: str | os.PathLike) -> str | None:
    """The scheme of a cache location written as a URL (``s3`` for ``s3://bucket/c``), else None."""
    m = _URL.match(os.fspath(value))
    return m[1].lower() if m else None


SET_CACHE = "Pass --cache DIR (or set $PIPE_CACHE) to a folder: a new one, or an existing cache."


def usable_folder(path: Path, what: str) -> Path:
    """``path``, when it is or can become a readable folder; else one :class:`InputError` that
    says what is in the way (a file, a file among its parents, a folder that cannot be read)."""
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} is a file ({path}), not a folder; a cache is a folder. {SET_CACHE}")
    if path.is_dir() and not os.access(path, os.R_OK | os.X_OK):
        raise InputError(f"{what}: the folder {path} cannot be read (permission denied). {SET_CACHE}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{what}: {parent} is a file, so no folder can be made inside it ({path}). {SET_CACHE}")
    return path


def locate(value: str | os.PathLike, where: str) -> Path:
    """The folder a command works in for the cache location ``value`` (``where`` names the
    option it came from): a folder as given, resolved; for ``s3://bucket/prefix`` its local
    mirror, attached. Any other URL is refused: it would otherwise become a local folder
    named ``gs:`` (or ``http:``...) in the working directory."""
    scheme = url_scheme(value)
    if scheme is None:
        return usable_folder(Path(value).expanduser().resolve(), f"{where} {os.fspath(value)!r}")
    if scheme != "s3":
        raise InputError(f"{where} {os.fspath(value)!r}: a cache at a {scheme}:// URL is not supported; nothing was "
                         "written. Give a local folder (an absolute path, or a relative one without a scheme) or an "
                         "S3 location (s3://bucket/prefix) with --cache or $PIPE_CACHE.")
    return attach_or_explain(os.fspath(value), where)


def storage_of(path: str | os.PathLike) -> ObjectStorage | None:
    """The object storage behind a path of a mirror (or an ``s3://`` URL), else None (a folder)."""
    if url_scheme(path) == "s3":
        return ObjectStorage(os.fspath(path))
    found = remote_root(path)
    if found is None:
        return None
    url, root = found
    rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
    return ObjectStorage(url if rel == "." else f"{url}/{rel}", Path(path))


def storage_at(path: str | os.PathLike) -> Storage:
    """A folder, or (inside the mirror of a cache in a bucket, or an ``s3://`` URL) the objects."""
    return storage_of(path) or LocalStorage(path)


def pull(storage: Storage, folder: str = "", drop: bool = True) -> int:
    """Bring the local copies below ``folder`` up to date (for checks that read files): every
    file fetched if changed, and (``drop``) every copy that nothing backs any more dropped.
    Returns the files."""
    found = {e.key: e for e in storage.entries(folder)}
    for key, entry in found.items():
        storage.fetch(key, entry)
    base = storage.local(folder)
    for p in sorted(base.rglob("*"), reverse=True) if drop and base.is_dir() else []:
        if p.is_file() and not p.name.startswith(".") and storage.key_of(p) not in found:
            storage.forget(storage.key_of(p))
    return len(found)


def attach(url: str | os.PathLike) -> Path:
    """The local mirror of the cache at ``url``, brought up to date with the bucket's small files.

    Credentials are never written: REMOTE holds the URL only.
    """
    cache = ObjectStorage(os.fspath(url))
    cache.path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache.path / REMOTE, json.dumps({"url": cache.url}).encode())  # ranks attach at once
    for name, kind in cache.scan("").items():
        if kind == "file":
            cache.fetch(name)
        elif name != STORES:  # dataset indexes, derived files and other small files: whole
            pull(cache, name, drop=False)  # a copy this host wrote and has not pushed yet stays
    for modality in cache.names(STORES):  # of the stores, only each one's group metadata (a listing finds it)
        for name in cache.names(f"{STORES}/{modality}"):
            key = f"{STORES}/{modality}/{name}/embeddings.zarr/zarr.json"
            if cache.exists(key):
                cache.fetch(key)
    return cache.path


def push(root: Path) -> int:
    """Upload the mirror's small files (not the stores, which their commits wrote) that the
    bucket lacks or holds other bytes of; returns how many. A no-op for a local cache."""
    found = remote_root(root)
    if found is None:
        return 0
    cache = ObjectStorage(found[0], found[1])
    have = {e.key: e.version.strip('"') for e in cache.entries()}
    sent = 0
    for p in sorted(found[1].rglob("*")):
        key = p.relative_to(found[1]).as_posix()
        if not p.is_file() or key.startswith(f"{STORES}/") or any(s.startswith(".") for s in key.split("/")):
            continue
        if have.get(key) != hashlib.md5(p.read_bytes()).hexdigest():  # a single PUT's ETag is its MD5
            cache.upload(key)
            sent += 1
    return sent


def attach_or_explain(url: str, where: str) -> Path:
    """:func:`attach`, with a failure to reach the bucket said in one message."""
    from obstore.exceptions import BaseError, InvalidPathError  # lazy: only object-store caches need it

    try:
        return attach(url)
    except InvalidPathError as e:
        reason = str(e).splitlines()[0][:300]
        raise StoreError(f"{where} {url}: the cache holds an object whose key cannot be listed ({reason}). Keys with an "
                         "empty, '.' or '..' segment are not the cache's: move or delete such objects with your S3 "
                         "tools, then run the command again. Nothing was changed.") from None
    except BucketUnavailable as e:
        raise StoreError(f"{where} {url}: cannot reach the bucket. {e} Check the bucket exists, the endpoint "
                         "($AWS_ENDPOINT_URL) and the credentials (the AWS environment or profile).") from None
    except (BaseError, OSError) as e:
        reason = str(e).splitlines()[0][:300]
        raise StoreError(f"{where} {url}: cannot reach the bucket ({type(e).__name__}: {reason}). Check the bucket "
                         "exists, the endpoint ($AWS_ENDPOINT_URL) and the credentials (the AWS environment or "
                         "profile), then run the command again.") from None
