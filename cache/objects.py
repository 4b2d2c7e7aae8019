"""A store in an S3 bucket (or any S3-compatible server): the second :class:`cache.storage.Storage`.

``s3://bucket/prefix`` holds the same keys a cache folder holds, byte for byte. What a
file system gives the store through ``flock`` and ``rename`` is done with objects:

- every object is written whole (a PUT); a reader sees the old object or the new one;
- a manifest part (the commit) and a claim are created with a conditional put
  (``If-None-Match: *``): it fails if the object exists, so two writers never both create it;
  a derived file (Adaptor outputs, aligned masks) is replaced only at the ETag it was read
  at (``If-Match``), so two hosts adding rows never drop each other's;
- the guard (the ``.lock`` object) is created the same way and carries a lease
  (:data:`GUARD_LEASE_S`, ``$PIPE_GUARD_LEASE_S``) that its holder renews from a thread
  every quarter lease while it works, and deletes when done. One whose lease lapsed (its
  holder died inside the guard) is taken over with a put conditional on its ETag
  (``If-Match``), so two writers never both take it: a dead holder's guard is free at most
  one lease after its last renewal, so within one lease of its death;
- a shard file is written to a local file (cache/shards.py) and published under its
  final key by the commit, inside the guard, only while the writer's claim is its own.

S3 has no conditional DELETE that every server honours: :meth:`ObjectStorage.delete_if`
checks the ETag with a HEAD just before the DELETE. It is used on writer-unique names
(a dead writer's staged ``.partial-`` object) that no writer rewrites.

The local file a shard was written to, and every shard a reader fetches, is kept in a
local mirror of the store (``$PIPE_OBJECT_MIRROR``, else ``<user cache>/freeze-pipe/objects``),
next to the ETag it was fetched at: later reads use local disk, and a mirror copy whose
object changed is fetched again. Readers check every chunk's crc32c as for a local store.
Keeping a whole cache's mirror in step with its bucket is cache/mirror.py's.

Every request goes through the retry policy of cache/retries.py (which failures are
retried, how often, the backoff and the timeouts; a conditional put whose answer was lost is
read back before it is sent again): :meth:`ObjectStorage._request` and :meth:`ObjectStorage._put`.

Credentials and the endpoint come from the usual AWS environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``AWS_PROFILE`` through
boto3's chain when it is installed). Nothing of them is logged or written into the cache.
:func:`connect` is the one place an S3 client is made.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from cache.claims import describe, judge, lease_seconds, live_run
from cache.retries import RetryPolicy, ShortRead, transient
from cache.storage import IN_USE, LOCK, Entry, Hold, Storage, StoreError
from core.atomic import atomic_write_bytes
from core.errors import PipeError
from core.processes import me

GUARD_LEASE_S = 20.0   # the guard's lease; renewed every quarter of it while held
GUARD_LEASE_ENV = "PIPE_GUARD_LEASE_S"
GUARD_RENEWALS = 4     # renewals per lease: three may fail before it lapses
GUARD_POLL_S = 0.02    # a waiter asks again after this, backing off ...
GUARD_POLL_MAX_S = 0.5  # ... to at most this
MIRROR_ENV = "PIPE_OBJECT_MIRROR"
MIRROR_GB_ENV = "PIPE_OBJECT_MIRROR_GB"  # the read copies a process keeps, at most (default 50)
RANGE_BYTES = 8 << 20  # a shard is fetched in range requests of this size ...
RANGES_AT_ONCE = 8     # ... this many at a time
_S3 = re.compile(r"^s3:/{1,2}([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?$")

log = logging.getLogger(__name__)
T = TypeVar("T")


class _ConditionFailed(Exception):
    """A conditional put answered that its condition does not hold (the object is another's)."""


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


def guard_lease_seconds() -> float:
    """The guard's lease: ``$PIPE_GUARD_LEASE_S``, else :data:`GUARD_LEASE_S`."""
    raw = os.environ.get(GUARD_LEASE_ENV, "").strip()
    if not raw:
        return GUARD_LEASE_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise StoreError(f"${GUARD_LEASE_ENV}={raw!r}: the guard's lease is a positive number of seconds "
                         f"(the default is {GUARD_LEASE_S:.0f})")
    return value


def connect(bucket: str, prefix: str = "", policy: RetryPolicy | None = None):
    """An obstore S3 client for the bucket, configured from the AWS environment and the retry
    policy's timeouts, its own retries off (the policy makes them): the only place one is made."""
    from obstore.store import S3Store  # lazy: only object-store caches need it

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    policy = policy or RetryPolicy.from_env()
    options = {**policy.client_options(), **({"allow_http": True} if endpoint.startswith("http://") else {})}
    provider = None
    if os.environ.get("AWS_PROFILE") and not os.environ.get("AWS_ACCESS_KEY_ID"):
        with contextlib.suppress(ImportError):
            from obstore.auth.boto3 import Boto3CredentialProvider  # lazy: boto3 is optional (profiles)

            provider = Boto3CredentialProvider()
    return S3Store(bucket, prefix=prefix or None, client_options=options, retry_config=policy.client_retry(),
                   credential_provider=provider,
                   **({"region": os.environ["AWS_REGION"]} if os.environ.get("AWS_REGION") else {}))


def _entry(o: dict, cut: int = 0) -> Entry:
    when = o.get("last_modified")
    return Entry(o["path"][cut:], int(o["size"]), o.get("e_tag") or "", when.timestamp() if when else 0.0)


class ObjectStorage(Storage):
    """One store under ``s3://bucket/prefix``; ``mirror`` is its local folder (see the module)."""

    def __init__(self, url: str, mirror: Path | None = None, lease_s: float | None = None):
        import obstore  # lazy: only object-store caches need it

        self.bucket, self.prefix = parse_s3(url)
        self.url = s3_url(self.bucket, self.prefix)
        self.path = Path(mirror) if mirror is not None else default_mirror(self.bucket, self.prefix)
        self.policy = RetryPolicy.from_env()
        self.client = connect(self.bucket, self.prefix, self.policy)
        self.obs = obstore
        self.lease_s = lease_s if lease_s is not None else guard_lease_seconds()

    @property
    def where(self) -> str:
        return self.url

    def where_of(self, key: str) -> str:
        return f"{self.url}/{key}".rstrip("/")

    def child(self, folder: str) -> "ObjectStorage":
        """The storage of ``folder`` under this one (a store under a cache)."""
        out = object.__new__(ObjectStorage)
        out.__dict__.update(self.__dict__)
        out.prefix = f"{self.prefix}/{folder}".strip("/")
        out.url, out.path = s3_url(self.bucket, out.prefix), self.local(folder)
        out.client = connect(self.bucket, out.prefix, self.policy)
        return out

    def key_for(self, name: str) -> list[tuple[str | None, str | None]]:
        """A key, or the same written as a URL or as a path in the local mirror."""
        rel = name.rstrip("/")
        for base in (self.url + "/", str(self.path) + "/"):
            rel = rel[len(base):] if rel.startswith(base) else rel
        return [(rel, None)]

    # -- requests ------------------------------------------------------------------------
    def _request(self, what: str, key: str, call: Callable[[], T]) -> T:
        """One request (or a few that stand or fall together), retried as the policy says."""
        return self.policy.run(call, f"{what} {self.where_of(key)}")

    def _get(self, key: str) -> tuple[bytes, str]:
        """The object's bytes and ETag."""
        return self._request("reading", key, lambda: self._get_once(key))

    def _get_once(self, key: str) -> tuple[bytes, str]:
        """One try; a body shorter than its own length is a failure to retry."""
        got = self.obs.get(self.client, key)
        data = bytes(got.bytes())
        if len(data) != got.meta["size"]:
            raise ShortRead(f"{key}: {len(data)} of {got.meta['size']} bytes")
        return data, got.meta.get("e_tag") or ""

    # -- objects -------------------------------------------------------------------------
    def read(self, key: str) -> bytes:
        return self._get(key)[0]

    def read_range(self, key: str, start: int, end: int) -> bytes:
        return self._request("reading", key, lambda: bytes(self.obs.get_range(self.client, key, start=start, end=end)))

    def head(self, key: str) -> dict | None:
        try:
            return self._request("looking up", key, lambda: self.obs.head(self.client, key))
        except FileNotFoundError:
            return None

    def exists(self, key: str) -> bool:
        return self.head(key) is not None

    def stat(self, key: str) -> Entry | None:
        meta = self.head(key)
        return _entry(meta) if meta is not None else None

    def names(self, folder: str) -> list[str]:
        return list(self.scan(folder))

    def scan(self, folder: str) -> dict[str, str]:
        listed = self._list_folder(folder)
        out = {p.rstrip("/").rsplit("/", 1)[-1]: "folder" for p in listed["common_prefixes"]}
        out.update({o["path"].rsplit("/", 1)[-1]: "file" for o in listed["objects"]})
        return out

    def kind(self, key: str) -> str | None:
        if key and self.head(key) is not None:
            return "file"
        listed = self._list_folder(key)
        return "folder" if listed["objects"] or listed["common_prefixes"] else None

    def _list_folder(self, folder: str) -> dict:
        prefix = folder.rstrip("/") + "/" if folder else None
        return self._request("listing", folder, lambda: self.obs.list_with_delimiter(self.client, prefix))

    def keys(self, folder: str = "") -> list[dict]:
        """Every object below ``folder`` (recursively), with its size and ETag, as the client lists it."""
        prefix = folder.rstrip("/") + "/" if folder else None
        return self._request("listing", folder,
                             lambda: [o for batch in self.obs.list(self.client, prefix=prefix) for o in batch])

    def entries(self, folder: str = "") -> list[Entry]:
        return [_entry(o) for o in self.keys(folder)]

    def listing(self, folder: str) -> dict[str, Entry]:
        return {e.key: e for e in self.entries(folder)}

    def write(self, key: str, data: bytes) -> None:
        self._request("writing", key, lambda: self.obs.put(self.client, key, data))

    def create(self, key: str, data: bytes) -> bool:
        return self._put(key, data, None) is not None

    def swap(self, key: str, data: bytes, etag: str) -> bool:
        """Replace ``key`` only if it still has ``etag`` (``If-Match``); False if it changed."""
        return self._put(key, data, etag) is not None

    def _put(self, key: str, data: bytes, etag: str | None) -> str | None:
        """A conditional put (``etag`` None: only if absent; else only at that ETag): the new ETag, or
        None when the condition fails (the object is another writer's).

        After a try whose outcome is unknown (no answer: a reset, a timeout; or a 5xx), the object
        is read back before anything is sent again: holding our bytes, that try landed; absent
        (create) or still at ``etag`` (swap), the put is sent again; else the condition failed.
        So a lost answer never makes a second write nor a missing one."""
        unsure = []  # set once a try failed without an answer we can trust

        def attempt() -> str | None:
            if unsure:
                settled, found = self._settled(key, data, etag)
                if settled:
                    return found
            try:
                return self._put_once(key, data, etag)
            except _ConditionFailed:
                return self._settled(key, data, etag)[1] if unsure else None
            except Exception as e:
                if transient(e):
                    unsure.append(e)
                raise

        return self._request("writing", key, attempt)

    def _put_once(self, key: str, data: bytes, etag: str | None) -> str:
        from obstore.exceptions import AlreadyExistsError, PreconditionError  # lazy: only object-store caches need it

        try:
            meta = self.obs.put(self.client, key, data, mode="create" if etag is None else {"e_tag": etag})
        except (AlreadyExistsError, PreconditionError, FileNotFoundError):
            raise _ConditionFailed from None
        return meta.get("e_tag") or (self.head(key) or {}).get("e_tag") or ""

    def _settled(self, key: str, data: bytes, etag: str | None) -> tuple[bool, str | None]:
        """After a put whose outcome is unknown: (True, its ETag) if the object holds ``data`` (it
        landed), (True, None) if the condition fails now, (False, None) if the put may be sent again."""
        try:
            now, now_etag = self._get(key)
        except FileNotFoundError:
            return (etag is not None), None  # gone: a create may go again, a swap's version is lost
        if now == data:
            return True, now_etag
        return (etag is None or now_etag != etag), None

    def put_if(self, key: str, data: bytes, version: str | None) -> bool:
        etag = self._put(key, data, version)
        if etag is None:
            return False
        final = self.local(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(final, data)  # the local copy is the object's, at its new ETag
        _etag_file(final).write_text(etag)
        return True

    def upload(self, key: str) -> None:
        final = self.local(key)
        meta = self._put_file(key, final)
        _etag_file(final).write_text(meta.get("e_tag") or "")

    def _put_file(self, key: str, path: Path) -> dict:
        """Upload a local file whole (opened again for each try)."""
        def call() -> dict:
            with open(path, "rb") as f:
                return self.obs.put(self.client, key, f)

        return self._request("uploading", key, call)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._request("deleting", key, lambda: self.obs.delete(self.client, key))
        self.forget(key)

    def delete_many(self, keys: list[str]) -> None:
        if keys:
            self._request("deleting", keys[0], lambda: self.obs.delete(self.client, list(keys)))
        for key in keys:
            self.forget(key)

    def delete_if(self, key: str, version: str) -> bool:
        now = self.stat(key)
        if now is None or now.version != version:
            return False
        self.delete(key)
        return True

    def rename(self, key: str, new: str) -> None:
        """Copied inside the bucket, then the old key deleted; the local copies are fetched again when read."""
        self._copy(key, new)
        self.delete(key)
        self.forget(new)

    def _copy(self, key: str, new: str) -> None:
        self._request("copying", key, lambda: self.obs.copy(self.client, key, new))

    def remove_tree(self, folder: str) -> None:
        self.delete_many([e.key for e in self.entries(folder)])
        if folder:
            self.delete(folder)  # a 1-D array's shard is an object, not a folder
        _prune(self.local(folder))

    def publish(self, tmp: Path, key: str, fsync: bool = True) -> None:
        """Make the finished file ``tmp`` the object ``key``: uploaded whole from here (it stays
        as the mirror's copy), or, when a worker on another host staged it (:meth:`stage`),
        copied inside the bucket and the staged object dropped."""
        final = self.local(key)
        if Path(tmp).is_file():
            meta = self._put_file(key, Path(tmp))
            os.replace(tmp, final)
            _etag_file(final).write_text(meta["e_tag"] or "")
            MIRROR_BUDGET.add(final, final.stat().st_size)  # a writer's copies count against the budget too
            return
        staged = self.key_of(tmp)
        self._copy(staged, key)
        self.delete(staged)

    def stage(self, tmp: Path) -> None:
        """Upload a finished temporary file under its own (hidden, writer-unique) name, for a
        committer on another host to :meth:`publish`; the local file is dropped. A staged
        object its committer never publishes (it died) is `gc`'s once older than the claim lease."""
        self._put_file(self.key_of(tmp), Path(tmp))
        Path(tmp).unlink()

    # -- the read-through copies ---------------------------------------------------------------
    def fetch(self, key: str, meta: Entry | None = None) -> Path:
        """A local copy of ``key``, current with the object (fetched when missing or changed);
        ``meta``: the object's entry when a listing gave it already."""
        final = self.local(key)
        meta = meta or self.stat(key)
        if meta is None:
            self.forget(key)
            return final  # the reader reports the missing shard
        sidecar = _etag_file(final)
        with contextlib.suppress(OSError):
            if final.stat().st_size == meta.size and sidecar.read_text() == meta.version:
                return final
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.fetch-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            self._request("fetching", key, lambda: self._download(key, meta.size, tmp))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        MIRROR_BUDGET.add(final, meta.size)
        sidecar.write_text(meta.version)
        return final

    def _download(self, key: str, size: int, dest: Path) -> None:
        """The object's bytes into ``dest`` (one try: the caller retries it whole): a large object in
        parallel range requests, each checked to be as long as asked."""
        with open(dest, "wb") as f:
            if size <= RANGE_BYTES:
                f.write(self._get_once(key)[0])
                return
            starts = list(range(0, size, RANGE_BYTES))
            for i in range(0, len(starts), RANGES_AT_ONCE):  # bounded memory: a few ranges in flight
                batch = starts[i:i + RANGES_AT_ONCE]
                parts = self.obs.get_ranges(self.client, key, starts=batch,
                                            ends=[min(s + RANGE_BYTES, size) for s in batch])
                for start, part in zip(batch, parts):
                    if len(part) != min(start + RANGE_BYTES, size) - start:
                        raise ShortRead(f"{key}: {len(part)} bytes of the range at {start}")
                    f.write(memoryview(part))

    def forget(self, key: str) -> None:
        final = self.local(key)
        with contextlib.suppress(OSError):
            final.unlink()
        with contextlib.suppress(OSError):
            _etag_file(final).unlink()

    # -- the guard, and the busy checks ----------------------------------------------------------
    @contextlib.contextmanager
    def guard(self) -> Iterator["LeasedObject"]:
        """Not re-entrant (neither is the flock of a local store): threads of one process contend like processes."""
        lease = self._acquire()
        lease.start()
        try:
            yield lease
        finally:
            lease.release()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator["LeasedObject | None"]:
        """The guard (it waits for a committer's few requests), once no running `pipe embed` marks
        the store as in use (None then): both are checked and made under the guard."""
        with self.guard() as lease:
            yield None if self._live_mark() else lease

    def _record(self, token: str, lease_s: float | None = None) -> bytes:
        now, lease_s = time.time(), lease_s or self.lease_s
        return json.dumps({**me().record(), "token": token, "run": token, "time": now, "lease_s": lease_s,
                           "expires": now + lease_s}).encode()

    def _acquire(self) -> "LeasedObject":
        token, wait = secrets.token_hex(8), GUARD_POLL_S
        while True:
            etag = self._put(LOCK, self._record(token), None)
            if etag is not None:
                return LeasedObject(self, LOCK, token, self.lease_s, etag)
            try:
                record, current = self._get(LOCK)
            except FileNotFoundError:
                continue  # released meanwhile: try to create it again
            if _lapsed(record) and current:
                etag = self._put(LOCK, self._record(token), current)
                if etag is not None:
                    return LeasedObject(self, LOCK, token, self.lease_s, etag)
            time.sleep(wait)
            wait = min(wait * 1.5, GUARD_POLL_MAX_S)

    @contextlib.contextmanager
    def in_use(self) -> Iterator[None]:
        """Mark the store as being written: an object ``.inuse/<writer>-<token>.json`` with the claim
        lease, renewed while the block runs and deleted after it (one left by a writer that died is
        dead once its process is seen gone, or its lease lapsed). It is made under the guard, after
        checking that the store is still there: a `gc` that removed it meanwhile is said, not written into."""
        token = secrets.token_hex(8)
        key, lease_s = f"{IN_USE}/{me().writer}-{token}.json", lease_seconds()
        with live_run(token):  # what makes the mark live for a judge in this process
            with self.guard():
                for entry, info in self._marks():
                    if info is None or not judge(info).live:  # a dead writer's mark: never a live one's
                        self.delete_if(entry.key, entry.version)
                if not set(self.scan("")) - {IN_USE, LOCK}:
                    raise StoreError(f"{self.url} was removed while it was being opened (by `pipe cache gc` or "
                                     "`pipe cache rm`?); run the command again")
                mark = LeasedObject(self, key, token, lease_s, self._put(key, self._record(token, lease_s), None) or "")
            mark.start()
            try:
                yield
            finally:
                mark.release()

    def _marks(self) -> list[tuple[Entry, dict | None]]:
        """The in-use marks of the store, with their records (None: unreadable)."""
        out = []
        for entry in self.entries(IN_USE):
            try:
                info = json.loads(self.read(entry.key))
            except (FileNotFoundError, ValueError):
                info = None
            out.append((entry, info if isinstance(info, dict) else None))
        return out

    def _live_mark(self) -> str | None:
        for _, info in self._marks():
            if info is not None and judge(info).live:
                return f"held by a running `pipe embed` ({describe(info)})"
        return None

    def writing(self) -> str | None:
        """A guard with a live lease (a writer is committing, or `gc` deleting, right now), or a
        live in-use mark (a `pipe embed` is writing the store, between its claims too)."""
        try:
            guard = json.loads(self.read(LOCK))
            if float(guard.get("expires", 0)) > time.time():
                return f"being committed to by {guard.get('writer', 'a writer')} on {guard.get('host', 'a host')}"
        except (FileNotFoundError, ValueError, TypeError, AttributeError):
            pass
        return self._live_mark()

    def abandoned(self, entry: Entry, pid: int | None, now: float) -> bool:
        """Older than the claim lease: pids say nothing about workers on other hosts; a staged
        object is published (or its shard's claim lapses) within one lease of its upload."""
        return entry.kind == "file" and now - entry.mtime >= lease_seconds()

    # -- removing a whole store ----------------------------------------------------------------
    def retire(self, commits: str) -> "ObjectStorage":
        """Its commits are deleted first (a bucket cannot rename a prefix): nothing reads as
        committed; its group metadata, deleted last, lets the next `gc` finish a removal cut short."""
        self.delete_many([e.key for e in self.entries(commits)])
        return self

    def vacate(self) -> None:
        """Only the local copies: an object made now is a new writer's (its guard, its claim)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def mkdirs(self, *folders: str) -> None:
        """Only the mirror's folders: a bucket has none."""
        for f in ("", *folders):
            self.local(f).mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def errors(self, command: str) -> Iterator[None]:
        """An error of the bucket (an object key the client cannot parse, a refused request) as one message."""
        from obstore.exceptions import BaseError  # lazy: only object-store caches need it

        try:
            yield
        except BaseError as e:
            reason = str(e).splitlines()[0][:300]
            raise PipeError(f"{command} on {self.url} stopped: the bucket answered {type(e).__name__}: {reason}. Keys "
                            "with an empty, '.' or '..' segment cannot be listed: move or delete such objects with "
                            "your S3 tools (they are not the cache's), check the credentials otherwise, then run the "
                            "command again; it removes nothing it has not identified.") from None


class LeasedObject(Hold):
    """An object this process holds with a lease (the guard, an in-use mark), renewed from a
    thread every quarter lease.

    A renewal is a put conditional on the ETag of the last one: one that fails because the
    object changed means another writer took it over (this process was paused past its
    lease): ``lost`` is set, and renewals stop. Releasing deletes the object only while it
    is still this holder's."""

    def __init__(self, storage: ObjectStorage, key: str, token: str, lease_s: float, etag: str):
        self.storage, self.key, self.token, self.lease_s, self.etag = storage, key, token, lease_s, etag
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="object-lease", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _loop(self) -> None:
        from obstore.exceptions import BaseError  # lazy: only object-store caches need it

        while not self._stop.wait(self.lease_s / GUARD_RENEWALS):
            try:
                etag = self.storage._put(self.key, self.storage._record(self.token, self.lease_s), self.etag)
            except (BaseError, OSError, PipeError) as e:  # a refused request, or the bucket gone quiet: try again next time
                log.warning("could not renew %s/%s (%s); retrying", self.storage.url, self.key, e)
                continue
            if etag is None:
                self.lost = True
                log.warning("%s/%s was taken over by another writer after this process's lease lapsed",
                            self.storage.url, self.key)
                return
            self.etag, self.renewals = etag, self.renewals + 1

    def release(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if not self.lost:
            with contextlib.suppress(FileNotFoundError):
                self.storage.delete_if(self.key, self.etag)


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


def _lapsed(record: bytes) -> bool:
    """Has the guard whose object holds ``record`` lapsed? (Not a record of ours: never a live holder.)"""
    try:
        return float(json.loads(record).get("expires", 0)) < time.time()
    except (ValueError, TypeError, AttributeError):
        return True


def _etag_file(path: Path) -> Path:
    return path.with_name(f".{path.name}.etag")


def _prune(folder: Path) -> None:
    """Remove the empty folders under ``folder`` (and it, when empty): what a removal left of the local copies."""
    if not folder.is_dir() or folder.is_symlink():
        return
    for dirpath, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
        with contextlib.suppress(OSError):
            os.rmdir(dirpath)


def digest_keys(storage: ObjectStorage, folder: str = "") -> dict[str, str]:
    """sha256 of every object below ``folder``, by key relative to it (for comparisons)."""
    cut = len(folder.rstrip("/")) + 1 if folder else 0
    return {o["path"][cut:]: hashlib.sha256(storage.read(o["path"])).hexdigest() for o in storage.keys(folder)}


# -- where a cache in a bucket keeps its local mirror ----------------------------------------
# A command works on a cache in a bucket through the local mirror of its root (cache/mirror.py
# keeps it in step). The mirror's root names its bucket in REMOTE.
REMOTE = ".remote.json"


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
