"""A store in an S3 bucket (or any S3-compatible server): the second :class:`cache.storage.Storage`.

``s3://bucket/prefix`` holds the same keys a cache folder holds, byte for byte. What a
file system gives the store through ``flock`` and ``rename`` is done with objects:

- every object is written whole (a PUT); a reader sees the old object or the new one;
- a manifest part (the commit) and a claim are created with a conditional put
  (``If-None-Match: *``): it fails if the object exists, so two writers never both create it;
- the guard (the ``.lock`` object) is created the same way and carries a lease: its holder
  deletes it when done; one whose lease lapsed (its writer died inside the guard) is taken
  over with a put conditional on its ETag (``If-Match``), so two writers never both take it;
- a shard file is written to a local file (cache/shards.py) and published under its
  final key by the commit, inside the guard, only while the writer's claim is its own.

The local file a shard was written to, and every shard a reader fetches, is kept in a
local mirror of the store (``$PIPE_OBJECT_MIRROR``, else ``<user cache>/freeze-pipe/objects``),
next to the ETag it was fetched at: later reads use local disk, and a mirror copy whose
object changed is fetched again. Readers check every chunk's crc32c as for a local store.

Credentials and the endpoint come from the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE`` through
boto3's chain when it is installed). Nothing of them is logged or written into the cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Iterator

from cache.storage import LOCK, Storage, StoreError
from core.atomic import atomic_write_bytes
from core.processes import me

GUARD_LEASE_S = 60.0   # the guard is held for a few requests (a shard's upload at most)
GUARD_POLL_S = 0.02
MIRROR_ENV = "PIPE_OBJECT_MIRROR"
MIRROR_GB_ENV = "PIPE_OBJECT_MIRROR_GB"  # the read copies a process keeps, at most (default 50)
RANGE_BYTES = 8 << 20  # a shard is fetched in range requests of this size ...
RANGES_AT_ONCE = 8     # ... this many at a time
_S3 = re.compile(r"^s3:/{1,2}([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")


def parse_s3(url: str | os.PathLike) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket/prefix`` (also as ``Path()`` leaves it: ``s3:/bucket/prefix``)."""
    m = _S3.match(os.fspath(url))
    if not m:
        raise StoreError(f"{os.fspath(url)!r} is not an S3 location: write it s3://<bucket>/<prefix>, with a bucket "
                         "name of 3-63 lower-case letters, digits, '.' and '-'.")
    return m[1], (m[2] or "").strip("/")


def s3_url(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix}".rstrip("/")


def default_mirror(bucket: str, prefix: str) -> Path:
    base = os.environ.get(MIRROR_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                                      "freeze-pipe", "objects")
    return Path(base).expanduser().resolve() / bucket / prefix


def connect(bucket: str, prefix: str = ""):
    """An obstore S3 client for the bucket, configured from the AWS environment."""
    from obstore.store import S3Store  # lazy: only object-store caches need it

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    options = {"allow_http": True} if endpoint.startswith("http://") else {}
    provider = None
    if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        with contextlib.suppress(ImportError):
            from obstore.auth.boto3 import Boto3CredentialProvider  # lazy: boto3 is optional (profiles)

            provider = Boto3CredentialProvider()
    return S3Store(bucket, prefix=prefix or None, client_options=options, credential_provider=provider,
                   **({"region": os.environ["AWS_REGION"]} if os.environ.get("AWS_REGION") else {}))


class ObjectStorage(Storage):
    """One store under ``s3://bucket/prefix``; ``mirror`` is its local folder (see the module)."""

    def __init__(self, url: str, mirror: Path | None = None, lease_s: float = GUARD_LEASE_S):
        import obstore  # lazy: only object-store caches need it

        self.bucket, self.prefix = parse_s3(url)
        self.url = s3_url(self.bucket, self.prefix)
        self.path = Path(mirror) if mirror is not None else default_mirror(self.bucket, self.prefix)
        self.client = connect(self.bucket, self.prefix)
        self.obs = obstore
        self.lease_s = lease_s

    @property
    def where(self) -> str:
        return self.url

    def child(self, folder: str) -> "ObjectStorage":
        """The storage of ``folder`` under this one (a store under a cache), sharing the client."""
        out = object.__new__(ObjectStorage)
        out.__dict__.update(self.__dict__)
        out.prefix = f"{self.prefix}/{folder}".strip("/")
        out.url, out.path = s3_url(self.bucket, out.prefix), self.path / folder
        out.client = connect(self.bucket, out.prefix)
        return out

    # -- objects -------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        return bytes(self.obs.get(self.client, key).bytes())

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return bytes(self.obs.get_range(self.client, key, start=start, end=end))

    def head(self, key: str) -> dict | None:
        try:
            return self.obs.head(self.client, key)
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def names(self, folder: str) -> list[str]:
        listed = self.obs.list_with_delimiter(self.client, folder.rstrip("/") + "/")
        return ([p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"]]
                + [o["path"].rsplit("/", 1)[-1] for o in listed["objects"]])

    def keys(self, folder: str = "") -> list[dict]:
        """Every object below ``folder`` (recursively), with its size and ETag."""
        prefix = folder.rstrip("/") + "/" if folder else None
        return [o for batch in self.obs.list(self.client, prefix=prefix) for o in batch]

    def listing(self, folder: str) -> dict[str, dict]:
        return {o["path"]: o for o in self.keys(folder)}

    def write(self, key: str, data: bytes) -> None:
        self.obs.put(self.client, key, data)

    def create(self, key: str, data: bytes) -> bool:
        from obstore.exceptions import AlreadyExistsError  # lazy: only object-store caches need it

        try:
            self.obs.put(self.client, key, data, mode="create")
            return True
        except AlreadyExistsError:
            return False

    def swap(self, key: str, data: bytes, etag: str) -> bool:
        """Replace ``key`` only if it still has ``etag`` (``If-Match``); False if it changed."""
        from obstore.exceptions import PreconditionError  # lazy: only object-store caches need it

        try:
            self.obs.put(self.client, key, data, mode={"e_tag": etag})
            return True
        except (PreconditionError, FileNotFoundError):
            return False

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.obs.delete(self.client, key)
        self._forget(key)

    def remove_tree(self, folder: str) -> None:
        found = self.keys(folder)
        if found:
            self.obs.delete(self.client, [o["path"] for o in found])
        self.delete(folder)  # a 1-D array's shard is an object, not a folder

    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        """Make the finished file ``tmp`` the object ``key``: uploaded whole from here (it stays
        as the mirror's copy), or, when a worker on another host staged it (:meth:`stage`),
        copied inside the bucket and the staged object dropped."""
        final = self.local(key)
        if Path(tmp).is_file():
            with open(tmp, "rb") as f:
                meta = self.obs.put(self.client, key, f)
            os.replace(tmp, final)
            _etag_file(final).write_text(meta["e_tag"] or "")
            MIRROR_BUDGET.add(final, final.stat().st_size)  # a writer's copies count against the budget too
            return
        staged = self.key_of(tmp)
        self.obs.copy(self.client, staged, key)
        self.obs.delete(self.client, staged)
        self._forget(key)

    def stage(self, tmp: Path) -> None:
        """Upload a finished temporary file under its own (hidden, writer-unique) name, for a
        committer on another host to :meth:`publish`; the local file is dropped."""
        with open(tmp, "rb") as f:
            self.obs.put(self.client, self.key_of(tmp), f)
        Path(tmp).unlink()

    # -- the read-through mirror ---------------------------------------------------------------
    def fetch(self, key: str, meta: dict | None = None) -> Path:
        """A local copy of ``key``, current with the object (fetched when missing or changed);
        ``meta``: the object's size and ETag when a listing gave them already."""
        final = self.local(key)
        meta = meta or self.head(key)
        if meta is None:
            self._forget(key)
            return final  # the reader reports the missing shard
        sidecar = _etag_file(final)
        with contextlib.suppress(OSError):
            if final.stat().st_size == meta["size"] and sidecar.read_text() == (meta["e_tag"] or ""):
                return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.fetch-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self._download(key, int(meta["size"]), tmp)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        MIRROR_BUDGET.add(final, int(meta["size"]))
        sidecar.write_text(meta["e_tag"] or "")
        return final

    def mirror(self) -> int:
        """Bring the whole local mirror of this prefix up to date (for checks that read files):
        every object fetched if changed, every file no object backs removed. Returns the objects."""
        found = {o["path"]: o for o in self.keys()}
        self.mkdirs("manifest", "claims", "failures")  # the folders a store always has, empty or not
        for key, meta in found.items():
            self.fetch(key, meta)
        for p in sorted(self.path.rglob("*"), reverse=True):
            if p.is_file() and not p.name.startswith(".") and self.key_of(p) not in found:
                self._forget(self.key_of(p))
        return len(found)

    def _download(self, key: str, size: int, dest: Path) -> None:
        """The object's bytes into ``dest``: a large object in parallel range requests."""
        with open(dest, "wb") as f:
            if size <= RANGE_BYTES:
                f.write(self.read(key))
                return
            starts = list(range(0, size, RANGE_BYTES))
            for i in range(0, len(starts), RANGES_AT_ONCE):  # bounded memory: a few ranges in flight
                batch = starts[i:i + RANGES_AT_ONCE]
                parts = self.obs.get_ranges(self.client, key, starts=batch,
                                            ends=[min(s + RANGE_BYTES, size) for s in batch])
                for part in parts:
                    f.write(memoryview(part))

    def _forget(self, key: str) -> None:
        final = self.local(key)
        with contextlib.suppress(OSError):
            final.unlink()
        with contextlib.suppress(OSError):
            _etag_file(final).unlink()

    # -- the guard -------------------------------------------------------------------------
    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Not re-entrant (neither is the flock of a local store): threads of one process contend like processes."""
        token = self._acquire()
        try:
            yield
        finally:
            self._release(token)

    def _record(self, token: str) -> bytes:
        now = time.time()
        return json.dumps({"writer": me().writer, "host": me().host, "token": token, "time": now,
                           "expires": now + self.lease_s}).encode()

    def _acquire(self) -> str:
        token = secrets.token_hex(8)
        while True:
            if self.create(LOCK, self._record(token)):
                return token
            try:
                got = self.obs.get(self.client, LOCK)
                etag, info = got.meta["e_tag"], json.loads(bytes(got.bytes()))
                expired = float(info.get("expires", 0)) < time.time()
            except FileNotFoundError:
                continue  # released meanwhile: try to create it again
            except (ValueError, TypeError, AttributeError):
                expired = True  # not a record of ours: never a live holder
            if expired and etag and self.swap(LOCK, self._record(token), etag):
                return token
            time.sleep(GUARD_POLL_S)

    def _release(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(self.read(LOCK)).get("token") == token:
                self.obs.delete(self.client, LOCK)

    def in_use(self):
        return contextlib.nullcontext()

    def mkdirs(self, *folders: str) -> None:
        """Only the mirror's folders: a bucket has none."""
        for f in ("", *folders):
            self.local(f).mkdir(parents=True, exist_ok=True) if f else self.path.mkdir(parents=True, exist_ok=True)


class MirrorBudget:
    """The shard copies this process fetched, least recently fetched first: past the budget
    the oldest are removed (a reader that still maps one keeps its pages; the next reader
    fetches it again)."""

    def __init__(self):
        self.files: dict[Path, int] = {}

    @property
    def limit(self) -> int:
        raw = os.environ.get(MIRROR_GB_ENV, "").strip()
        try:
            gb = float(raw) if raw else 50.0
        except ValueError:
            raise StoreError(f"${MIRROR_GB_ENV}={raw!r}: give the size of the local read copies in GB "
                             "(a number, e.g. 50)") from None
        return int(gb * 2**30)

    def add(self, path: Path, size: int) -> None:
        self.files.pop(path, None)
        self.files[path] = size
        limit, total = self.limit, sum(self.files.values())
        for old in list(self.files):
            if total <= limit or old == path:
                break
            total -= self.files.pop(old)
            with contextlib.suppress(OSError):
                old.unlink()
            with contextlib.suppress(OSError):
                _etag_file(old).unlink()


MIRROR_BUDGET = MirrorBudget()


def _etag_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.etag")


def digest_keys(storage: ObjectStorage, folder: str = "") -> dict[str, str]:
    """sha256 of every object below ``folder``, by key relative to it (for comparisons)."""
    cut = len(folder.rstrip("/")) + 1 if folder else 0
    return {o["path"][cut:]: hashlib.sha256(storage.read(o["path"])).hexdigest() for o in storage.keys(folder)}


# -- a whole cache in a bucket --------------------------------------------------------------
# Its stores are read and written through ObjectStorage. Everything else a cache holds (the
# dataset indexes, the marker) is small: a command works on it in the local mirror of the
# cache root, fetched whole when the command starts (:func:`attach`) and uploaded whole
# when a writing command ends (:func:`push`). The mirror's root names its bucket in REMOTE.
REMOTE = ".remote.json"
STORES = "stores"


def attach(url: str | os.PathLike) -> Path:
    """The local mirror of the cache at ``url``, brought up to date with the bucket's small files.

    Credentials are never written: REMOTE holds the URL only.
    """
    cache = ObjectStorage(os.fspath(url))
    cache.path.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(cache.path / REMOTE, json.dumps({"url": cache.url}).encode())  # ranks attach at once
    top = cache.obs.list_with_delimiter(cache.client, None)
    for o in top["objects"]:
        cache.fetch(o["path"], o)
    for folder in (p.rstrip("/") for p in top["common_prefixes"]):
        if folder != STORES:  # dataset indexes and other small files: whole
            for o in cache.keys(folder):
                cache.fetch(o["path"], o)
    for modality in cache.names(STORES):  # of the stores, only each one's group metadata (a listing finds it)
        for name in cache.names(f"{STORES}/{modality}"):
            key = f"{STORES}/{modality}/{name}/embeddings.zarr/zarr.json"
            if cache.exists(key):
                cache.fetch(key)
    return cache.path


def remote_root(path: str | os.PathLike) -> tuple[str, Path] | None:
    """(URL, mirror root) when ``path`` is inside the mirror of a cache in a bucket, else None.

    Only a note at the mirror's own place (:func:`default_mirror` of its URL) counts, so a
    stray note elsewhere never turns a folder into a bucket.
    """
    for folder in [Path(path), *Path(path).parents]:
        note = folder / REMOTE
        if note.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, StoreError):
                url = json.loads(note.read_text())["url"]
                if default_mirror(*parse_s3(url)) == folder.resolve():
                    return url, folder
    return None


def storage_of(path: str | os.PathLike) -> "ObjectStorage | None":
    """The object storage behind a path of a mirror (or an ``s3://`` URL), else None (a folder)."""
    if os.fspath(path).startswith("s3:/"):
        return ObjectStorage(os.fspath(path))
    found = remote_root(path)
    if found is None:
        return None
    url, root = found
    rel = Path(path).resolve().relative_to(root.resolve()).as_posix()
    return ObjectStorage(url if rel == "." else f"{url}/{rel}", Path(path))


def push(root: Path) -> int:
    """Upload the mirror's small files (not the stores, which their commits wrote) that the
    bucket lacks or holds other bytes of; returns how many. A no-op for a local cache."""
    found = remote_root(root)
    if found is None:
        return 0
    cache = ObjectStorage(found[0], found[1])
    have = {o["path"]: (o["e_tag"] or "").strip('"') for o in cache.keys()}
    sent = 0
    for p in sorted(found[1].rglob("*")):
        key = p.relative_to(found[1]).as_posix()
        if not p.is_file() or key.startswith(f"{STORES}/") or any(s.startswith(".") for s in key.split("/")):
            continue
        data = p.read_bytes()
        if have.get(key) != hashlib.md5(data).hexdigest():  # a single PUT's ETag is its MD5
            cache.write(key, data)
            _etag_file(p).write_text(cache.head(key)["e_tag"] or "")
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
    except (BaseError, OSError) as e:
        reason = str(e).splitlines()[0][:300]
        raise StoreError(f"{where} {url}: cannot reach the bucket ({type(e).__name__}: {reason}). Check the bucket "
                         "exists, the endpoint ($AWS_ENDPOINT_URL) and the credentials (the AWS environment or "
                         "profile), then run the command again.") from None
