"""`pipe cache verify`: prove that every committed row can be read back intact; and
`--repair`: turn whatever it finds into a clean state that the next `pipe embed` completes.

A store is checked in four passes, each planning the repair of what it finds:

- **manifest parts**: each must read, keep its rows inside its shard, and name no unit
  another part names. An unreadable part is *quarantined* (moved to ``quarantine/``);
  an inconsistent one is dropped.
- **array metadata**: each array the store's attributes record must have a ``zarr.json``
  that says exactly what the attributes say (shape, dtype, chunking, codecs) and holds
  every committed row. A missing or different one is rewritten from the attributes;
  the data itself is checked against the recorded layout, so it is not lost.
- **chunks**: every chunk holding a committed row is read and checked against its
  crc32c, as is each shard index. A shard with a damaged, missing or unwritten chunk
  loses its manifest part and its files: the next `pipe embed` re-embeds that group
  with exactly the batches of a clean run, into the same shard (new groups take the
  lowest free shard), so the repaired store equals a clean one file for file.
- **leftovers**: claims of dead writers (whose lease has expired, on any host, or whose
  process is gone on this one: cache/claims.py), shard data that no part commits and no
  writer claims, and temporary files of writers that are gone are removed.

Repairs run under the store's lock and re-check each condition first, so a `pipe embed`
running meanwhile is never disturbed: live claims and their shards are not touched.

Each kind of repair is one object in :data:`REPAIR_KINDS` (in the order they are applied):
the finding it answers is recorded with it, :meth:`RepairKind.plan` says what it would do
(`--repair --dry-run`) and :meth:`RepairKind.apply` does it. A store in a bucket is checked
in a fresh local copy of every object and repaired through its storage, by the same code.
"""
from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_bytes, is_temp_name, temp_owner
from cache.claims import claim_is_live, describe, judge
from cache.index import dataset_folders, store_entries
from cache.mirror import pull, storage_at
from cache.npz import NpzCorruption, load_checked
from cache.paths import plain_name
from cache.shards import ShardCorruption, ShardFile, ShardLayout, partial_of
from cache.storage import TEMP_GRACE_S, Storage  # noqa: F401  (TEMP_GRACE_S: a folder's grace for temp files)
from cache.store import CLAIM_RE, QUARANTINE, ZARR_DIR, Store, UnreadablePart, array_metadata


@dataclass
class Repair:
    """One change that `--repair` makes; ``target`` is an array name, a shard or a path."""

    kind: str        # its name in REPAIR_KINDS
    target: object
    shard: int = -1
    rows: int = 0
    finding: str = ""  # what verify found, that this repairs

    def __post_init__(self):
        if self.kind not in REPAIR_KINDS:
            raise ValueError(f"no repair kind {self.kind!r}; the kinds are {', '.join(REPAIR_KINDS)}")


@dataclass
class VerifyReport:
    store: Path
    rows: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)   # what `--repair` did
    planned: list[str] = field(default_factory=list)   # what `--repair` would do (`--dry-run`)
    dropped: int = 0                                   # committed units dropped by the repair
    plan: list[Repair] = field(default_factory=list, repr=False)
    after: "VerifyReport | None" = None                # the store as verified after the repair
    encoder: str = ""
    modality: str = ""

    @property
    def ok(self) -> bool:
        return not (self.after.problems if self.after is not None else self.problems)

    def problem(self, message: str, repair: Repair | None = None) -> None:
        self.problems.append(message)
        self._plan(message, repair)

    def warning(self, message: str, repair: Repair | None = None) -> None:
        self.warnings.append(message)
        self._plan(message, repair)

    def _plan(self, finding: str, repair: Repair | None) -> None:
        if repair is not None:
            repair.finding = repair.finding or finding
            self.plan.append(repair)

    def to_json(self) -> dict:
        out = {"store": str(self.store), "modality": self.modality, "encoder": self.encoder, "ok": self.ok,
               "rows": self.rows, "shards": self.shards, "problems": self.problems, "warnings": self.warnings,
               "repairs": self.repairs, "dropped_units": self.dropped}
        if self.planned:
            out["would_repair"] = self.planned
        if self.after is not None:
            out["after_repair"] = {"problems": self.after.problems, "warnings": self.after.warnings,
                                   "rows": self.after.rows, "shards": self.after.shards}
        return out


@dataclass
class Part:
    shard: int
    path: Path
    offsets: list[int]   # committed rows, as offsets within the shard


def verify_store(path: Path, repair: bool = False, dry_run: bool = False) -> VerifyReport:
    """Check one store; with ``repair``, fix what was found and verify again (``report.after``);
    with ``dry_run``, only say what the repair would do (``report.planned``)."""
    rep = VerifyReport(Path(path))
    try:
        store = Store.open(path)
    except Exception as e:  # an unreadable zarr.json is itself the finding
        rep.problem(f"cannot open: {e}. Remove the store with `pipe cache rm {path}` and re-run `pipe embed`")
        return rep
    rep.encoder, rep.modality = str(store.attrs.get("encoder", "")), str(store.attrs.get("modality", ""))
    pull(store.storage)  # a store in a bucket is checked in a fresh local copy of every object
    parts = _check_manifest(store, rep)
    layouts = _check_metadata(store, parts, rep)
    _check_chunks(parts, layouts, rep)
    _check_leftovers(store, parts, rep)
    if (repair or dry_run) and rep.plan:
        apply_repairs(store, rep, dry_run)
        if not dry_run:
            rep.after = verify_store(path)
    return rep


# ------------------------------------------------------------------------------ manifest
def _check_manifest(store: Store, rep: VerifyReport) -> dict[int, Part]:
    """Read every part; return the readable, consistent ones by shard."""
    S = store.shard_rows
    parts: dict[int, Part] = {}
    seen: dict[tuple[str, int], str] = {}
    doubled: set[int] = set()
    for shard, _, p in store.parts():
        try:
            t = store.read_part(p)
        except UnreadablePart as e:
            rep.problem(f"manifest part {p.name} is unreadable ({e.reason}); --repair moves it aside",
                        Repair("quarantine", p, shard))
            continue
        rows = t.column("row").to_pylist()
        keys = list(zip(t.column("key").to_pylist(), t.column("view").to_pylist()))
        bad = [r for r in rows if not shard * S <= r < (shard + 1) * S]
        twice = [k for k in keys if k in seen]
        if bad or set(t.column("shard").to_pylist()) - {shard}:
            rep.problem(f"manifest part {p.name} has rows outside shard {shard} (e.g. row {bad[:1]})",
                        Repair("drop", p, shard, len(rows)))
        elif twice:
            rep.problem(f"key {twice[0][0]} view {twice[0][1]} is stored twice ({seen[twice[0]]} and {p.name})",
                        Repair("drop", p, shard, len(rows)))
        elif shard in parts or shard in doubled:
            # two writers took one shard (a file system whose flock does not reach across hosts):
            # whose rows its files hold is unknown, so every part of it goes
            first = parts.pop(shard, None)
            if first is not None:
                doubled.add(shard)
                rep.rows -= len(first.offsets)
                rep.plan.append(Repair("drop", first.path, shard, len(first.offsets)))
            rep.problem(f"manifest part {p.name} commits shard {shard}, which another part commits too (two writers "
                        "on a file system whose flock does not reach across hosts?); --repair drops them all",
                        Repair("drop", p, shard, len(rows)))
        else:
            seen.update(dict.fromkeys(keys, p.name))
            parts[shard] = Part(shard, p, [r - shard * S for r in rows])
            rep.rows += len(rows)
    rep.shards = len(parts)
    return parts


# ------------------------------------------------------------------------------ metadata
def _check_metadata(store: Store, parts: dict[int, Part], rep: VerifyReport) -> dict[str, ShardLayout]:
    """Compare each array's zarr.json with what the attributes record; return the recorded layouts."""
    expected = store.expected_arrays()
    if not isinstance(expected, dict):
        rep.problems.append(f"the store's attributes record its arrays as {type(expected).__name__}, not as an "
                            f"object; remove the store with `pipe cache rm {store.path}` and re-run `pipe embed`")
        return {}
    hostile = [n for n, e in expected.items() if not plain_name(n) or not isinstance(e, dict)]
    for name in hostile:  # never a path: --repair writes <store>/embeddings.zarr/<name>/zarr.json
        rep.problems.append(f"the store's attributes name an array {name!r}, which is not a plain name (no '/', '\\', "
                            "'..', leading '.' or absolute path): the attributes were edited by hand or "
                            f"damaged. --repair leaves it alone; remove the store with `pipe cache rm {store.path}` "
                            "and re-run `pipe embed`")
    expected = {n: e for n, e in expected.items() if n not in hostile}
    if hostile:
        return {}
    if "arrays" not in store.attrs:
        _check_legacy_arrays(store, expected, parts, rep)
    if parts and not expected:
        for part in parts.values():
            rep.problem(f"shard {part.shard}: the manifest commits rows but the store records no arrays",
                        Repair("drop", part.path, part.shard, len(part.offsets)))
        return {}
    S, C = store.shard_rows, int(store.attrs["chunk_rows"])
    need = (max(parts) + 1) * S if parts else 0
    rows = max([need] + [_shape0(store.zpath / n / "zarr.json") for n in expected])
    layouts = {}
    for name, entry in expected.items():
        want = json.loads(array_metadata(entry, S, C, rows))
        finding = _metadata_finding(store.zpath / name / "zarr.json", want, need)
        if finding is not None:
            severe, message = finding
            (rep.problem if severe else rep.warning)(f"array {name}: {message}", Repair("meta", name, rows=rows))
        layouts[name] = ShardLayout(store.zpath / name, tuple(entry["row_shape"]), np.dtype(entry["dtype"]), S, C)
    return layouts


LEGACY_ARRAYS = {"image": ("pooled", "tokens"), "text": ("length", "pooled", "tokens")}


def _check_legacy_arrays(store: Store, expected: dict, parts: dict[int, Part], rep: VerifyReport) -> None:
    """A store an older version wrote records no arrays: its modality says which it must have.
    (A store with no arrays and no commits is not one: it was created, and the run that created
    it stopped before its first shard; `pipe embed` fills it.)"""
    if not parts and not expected:
        return
    lost = [n for n in LEGACY_ARRAYS.get(store.modality, ()) if n not in expected]
    for name in lost:
        rep.problem(f"array {name}: {ZARR_DIR}/{name}/zarr.json is missing, and this store (written by an older "
                    "version) does not record the array's shape to rebuild it from; --repair drops every manifest "
                    "part, so that `pipe embed` rebuilds the store")
    if lost:
        rep.plan += [Repair("drop", p.path, p.shard, len(p.offsets)) for p in parts.values()]
    elif expected:
        rep.warning("the store's attributes do not record its arrays (an older version wrote it); "
                    "--repair records them", Repair("attrs", expected))


def _inside(store: Store, path: Path) -> bool:
    """Does ``path`` (which need not exist yet) stay inside the store's group folder?"""
    base = store.zpath.resolve()
    return Path(os.path.realpath(path)).is_relative_to(base) and not store.zpath.is_symlink()


def _shape0(meta: Path) -> int:
    try:
        return int(json.loads(meta.read_text())["shape"][0])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


# what decides how the bytes are laid out and read (other keys may differ between zarr versions)
_LAYOUT_KEYS = ("data_type", "chunk_grid", "chunk_key_encoding", "fill_value", "codecs")


def _metadata_finding(meta: Path, want: dict, need: int) -> tuple[bool, str] | None:
    """(is it a problem, what) for an array's zarr.json, or None when it is as recorded."""
    if not meta.exists():
        return True, f"{ZARR_DIR}/{meta.parent.name}/zarr.json is missing"
    try:
        have = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        return True, f"zarr.json is unreadable ({e})"
    if not isinstance(have, dict) or not isinstance(have.get("shape"), list) or not have["shape"]:
        return True, "zarr.json is not Zarr v3 array metadata"
    if have["shape"][0] < need:
        return True, f"zarr.json says {have['shape'][0]} rows, the manifest commits rows up to {need}"
    differ = [k for k in _LAYOUT_KEYS if have.get(k) != want.get(k)]
    if have["shape"][1:] != want["shape"][1:]:
        differ.insert(0, "shape")
    if differ:
        k = differ[0]
        return True, (f"zarr.json says {k} {json.dumps(have.get(k))}, the store's attributes say "
                      f"{json.dumps(want.get(k))}" + (f" (and {', '.join(differ[1:])} differ)" if differ[1:] else ""))
    if have.get("dimension_names") != want.get("dimension_names"):
        return False, (f"zarr.json has dimension names {have.get('dimension_names')}, not "
                       f"{want['dimension_names']} (an older version wrote it); --repair adds them")
    return None


# ------------------------------------------------------------------------------ chunks
def _check_chunks(parts: dict[int, Part], layouts: dict[str, ShardLayout], rep: VerifyReport) -> None:
    """Read and checksum every chunk that holds a committed row, in the recorded layout."""
    for shard, part in sorted(parts.items()):
        found = []
        for name, lay in sorted(layouts.items()):
            chunks = sorted({o // lay.chunk_rows for o in part.offsets})
            try:
                sf = ShardFile(lay, shard)
                missing = [c for c in chunks if not sf.has_chunk(c)]
                if missing:
                    found.append(f"array {name}, shard {shard}: chunks {missing} hold committed rows but were "
                                 "never written")
                for c in chunks:
                    if c not in missing:
                        try:
                            sf.chunk(c)
                        except ShardCorruption as e:
                            found.append(f"{e.where} {e.detail}")
            except ShardCorruption as e:
                found.append(f"{e.where} {e.detail}")
        for i, message in enumerate(found):
            rep.problem(message, Repair("drop", part.path, shard, len(part.offsets)) if i == 0 else None)


# ------------------------------------------------------------------------------ leftovers
def _check_leftovers(store: Store, parts: dict[int, Part], rep: VerifyReport) -> None:
    claimed = _check_claims(store, rep)
    data = shard_data(store)
    for shard in sorted(set(data) - set(parts) - set(claimed)):
        names = sorted({p.relative_to(store.zpath).parts[0] for p in data[shard]})
        if any(not partial_of(p.name) for p in data[shard]):
            rep.problem(f"shard {shard} of {', '.join(names)} holds data that no manifest part commits and no writer "
                        "claims (was its manifest part deleted?); --repair removes it and the next `pipe embed` "
                        "re-embeds what is missing", Repair("clear", shard, shard))
        else:
            rep.warning(f"shard {shard} of {', '.join(names)} has temporary files of a writer that is gone",
                        Repair("clear", shard, shard))
    committed = {store.storage.key_of(p) for shard in set(data) & set(parts) for p in data[shard]}
    for entry in leftovers(store.storage, time.time()):
        if entry.key in committed or not partial_of(entry.name):  # a committed shard's, or an atomic write's
            rep.warning(f"{entry.key} is a temporary file of a writer that is gone",
                        Repair("unlink", store.storage.local(entry.key)))
    quarantined = sorted((store.path / QUARANTINE).glob("*")) if (store.path / QUARANTINE).is_dir() else []
    if quarantined:
        rep.warnings.append(f"{len(quarantined)} manifest part(s) kept in {store.path / QUARANTINE} for inspection "
                            "(moved aside by an earlier repair; delete them when done)")


def _check_claims(store: Store, rep: VerifyReport) -> set[int]:
    """Warn about claims; plan to remove dead ones (and their shards' files). Returns every claimed shard."""
    claimed = set()
    for name in sorted(store.storage.names("claims")):
        m, p = CLAIM_RE.match(name), store.path / "claims" / name
        if not m:
            continue
        shard = int(m[1])
        claimed.add(shard)
        try:
            info = json.loads(p.read_text())
        except (OSError, ValueError):
            rep.warning(f"claim {p.name} is unreadable", Repair("unclaim", p, shard))
            continue
        who, verdict = describe(info), judge(info)
        if verdict.live:
            rep.warnings.append(f"shard {shard} is claimed by {who} (in progress: {verdict.why})")
        else:
            files = [f for f in store.shard_files(shard) if partial_of(f.name)]
            left = (f", with {len(files)} temporary file(s) such as {files[0].relative_to(store.path)}"
                    if files else "")
            rep.warning(f"shard {shard} is claimed by {who}, left by an interrupted run ({verdict.why}){left}; the "
                        "next `pipe embed` redoes it (--repair clears it now)", Repair("unclaim", p, shard))
    return claimed


def shard_data(store: Store) -> dict[int, list[Path]]:
    """Every file under each array's ``c/`` folder, by shard (writers' temp files included)."""
    out: dict[int, list[Path]] = defaultdict(list)
    for cdir in sorted(store.zpath.glob("*/c")):
        for entry in cdir.iterdir():
            name = partial_of(entry.name)[0] if partial_of(entry.name) else entry.name
            if not name.isdigit():
                continue
            files = [p for p in entry.rglob("*") if p.is_file()] if entry.is_dir() else [entry]
            out[int(name)].extend(files)
    return out


def leftovers(storage: Storage, now: float) -> list:
    """The temporary files below a storage whose writers are gone (:meth:`Storage.abandoned`):
    atomic writes' (``.<name>.<pid>-<tid>-<token>.tmp``) and shard writers' (``.<shard>.partial-<pid>-<token>``,
    in a bucket also a staged upload that its committer never published)."""
    out = []
    for entry in storage.entries():
        pid = temp_owner(entry.name) if is_temp_name(entry.name) else (partial_of(entry.name) or (None, None))[1]
        if (is_temp_name(entry.name) or partial_of(entry.name)) and storage.abandoned(entry, pid, now):
            out.append(entry)
    return sorted(out, key=lambda e: e.key)


# ------------------------------------------------------------------------------ repair
class RepairKind:
    """One kind of repair: what it would do (:meth:`plan`, the `--dry-run` line) and doing it
    (:meth:`apply`, under the store's guard, re-checking its condition first; returns what it
    did, or "" when there was nothing left to do). ``subject`` is the store, or the cache's
    own files (:class:`CacheFiles`) for the kinds that only remove a file."""

    name = ""

    def plan(self, subject, r: Repair) -> str:
        raise NotImplementedError

    def apply(self, subject, r: Repair, rep: VerifyReport) -> str:
        raise NotImplementedError


class RecordArrays(RepairKind):
    name = "attrs"

    def plan(self, store: Store, r: Repair) -> str:
        return "record the arrays' row shapes, dtypes and dimension names in the store's attributes"

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        import zarr  # lazy: only a repair of an old store writes attributes

        if not all(plain_name(n) for n in r.target):
            return ""
        zarr.open_group(str(store.zpath), mode="r+").attrs.update({"arrays": r.target})
        store.storage.upload(store.storage.key_of(store.zpath / "zarr.json"))
        store.attrs["arrays"] = r.target
        return "recorded the arrays' row shapes, dtypes and dimension names in the store's attributes"


class RewriteMetadata(RepairKind):
    name = "meta"

    def plan(self, store: Store, r: Repair) -> str:
        return f"rewrite {ZARR_DIR}/{r.target}/zarr.json from the store's attributes ({r.rows} rows)"

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        entry = store.expected_arrays()[r.target]
        meta = store.zpath / r.target / "zarr.json"
        if not plain_name(r.target) or not _inside(store, meta):  # checked when planned; checked again before writing
            rep.problems.append(f"array {r.target!r}: not rewritten, its metadata would land outside {store.zpath}")
            return ""
        meta.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(meta, array_metadata(entry, store.shard_rows, int(store.attrs["chunk_rows"]), r.rows))
        store.storage.upload(store.storage.key_of(meta))
        return f"rewrote {ZARR_DIR}/{r.target}/zarr.json from the store's attributes ({r.rows} rows)"


class Quarantine(RepairKind):
    name = "quarantine"

    def plan(self, store: Store, r: Repair) -> str:
        return (f"move the unreadable manifest part {r.target.name} to {store.path / QUARANTINE} and remove shard "
                f"{r.shard}'s files")

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        if not r.target.exists():
            return ""
        dest = store.path / QUARANTINE / f"{r.target.name}.{time.strftime('%Y%m%dT%H%M%S')}"
        store.storage.rename(store.storage.key_of(r.target), store.storage.key_of(dest))
        cleared = _clear_if_free(store, r.shard)
        return f"moved the unreadable manifest part {r.target.name} to {dest}" + (
            f" and removed shard {r.shard}'s files; its items are re-embedded by the next `pipe embed`" if cleared else "")


class DropPart(RepairKind):
    name = "drop"

    def plan(self, store: Store, r: Repair) -> str:
        return f"drop manifest part {r.target.name} ({r.rows} units) and shard {r.shard}'s files"

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        if not r.target.exists():
            return ""
        _remove(store, r.target)
        rep.dropped += r.rows
        _clear_if_free(store, r.shard)
        return (f"dropped manifest part {r.target.name} ({r.rows} units) and shard {r.shard}'s files; the next "
                "`pipe embed` re-embeds them")


class Unclaim(RepairKind):
    name = "unclaim"

    def plan(self, store: Store, r: Repair) -> str:
        return f"remove the dead claim {r.target.name} and the shard's uncommitted files"

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        try:
            info = json.loads(r.target.read_text())
        except FileNotFoundError:
            return ""
        except (OSError, ValueError):
            info = {}
        if info and claim_is_live(info):
            return ""
        _remove(store, r.target)
        cleared = _clear_if_free(store, r.shard)
        return f"removed the dead claim {r.target.name}" + (" and the shard's uncommitted files" if cleared else "")


class ClearShard(RepairKind):
    name = "clear"

    def plan(self, store: Store, r: Repair) -> str:
        return f"remove the uncommitted files of shard {r.shard}"

    def apply(self, store: Store, r: Repair, rep: VerifyReport) -> str:
        return f"removed the uncommitted files of shard {r.shard}" if _clear_if_free(store, r.shard) else ""


class RemoveTemp(RepairKind):
    name = "unlink"

    def plan(self, subject, r: Repair) -> str:
        return f"remove the leftover temporary file {r.target.relative_to(subject.path)}"

    def apply(self, subject, r: Repair, rep: VerifyReport) -> str:
        if not r.target.exists():
            return ""
        _remove(subject, r.target)
        return f"removed the leftover temporary file {r.target.relative_to(subject.path)}"


class Discard(RepairKind):
    name = "discard"

    def plan(self, subject, r: Repair) -> str:
        return f"remove {r.target.relative_to(subject.path)} (it is computed again when next needed)"

    def apply(self, subject, r: Repair, rep: VerifyReport) -> str:
        if not r.target.exists():
            return ""
        _remove(subject, r.target)
        return f"removed {r.target.relative_to(subject.path)}"


#: every kind of repair, in the order `--repair` applies them
REPAIR_KINDS: dict[str, RepairKind] = {k.name: k for k in (
    RecordArrays(), RewriteMetadata(), Quarantine(), DropPart(), Unclaim(), ClearShard(), RemoveTemp(), Discard())}


@dataclass
class CacheFiles:
    """The cache's own files outside the stores, as the subject of a repair (no guard: each is removed alone)."""

    storage: Storage

    @property
    def path(self) -> Path:
        return self.storage.path

    def hold(self):
        return contextlib.nullcontext()


def _ordered(plan: list[Repair]) -> list[Repair]:
    """The plan in the order of :data:`REPAIR_KINDS`, each (kind, target) once."""
    order, seen, out = list(REPAIR_KINDS), set(), []
    for r in sorted(plan, key=lambda r: order.index(r.kind)):
        if (r.kind, str(r.target)) not in seen:
            seen.add((r.kind, str(r.target)))
            out.append(r)
    return out


def apply_repairs(subject: "Store | CacheFiles", rep: VerifyReport, dry_run: bool = False) -> None:
    """Carry out ``rep.plan`` (with ``dry_run``, only say what it would do, in ``rep.planned``),
    under the store's guard, re-checking each condition first.

    In a bucket the plan was made on a fresh local copy of every object (:func:`cache.mirror.pull`):
    each file a repair removes, moves or writes there is removed, moved or written in the storage too."""
    plan = _ordered(rep.plan)
    if dry_run:
        rep.planned = [REPAIR_KINDS[r.kind].plan(subject, r) for r in plan]
        return
    with subject.hold() if isinstance(subject, CacheFiles) else subject.storage.guard():
        for r in plan:
            message = REPAIR_KINDS[r.kind].apply(subject, r, rep)
            if message:
                rep.repairs.append(message)


def _live_claims(store: Store) -> set[int]:
    return {s for s, _, info in store.claims() if claim_is_live(info)}


def _remove(subject: "Store | CacheFiles", path: Path) -> None:
    """Remove a file of the store or cache (in a bucket: its object, and the local copy)."""
    path.unlink(missing_ok=True)
    subject.storage.delete(subject.storage.key_of(path))


def _clear_if_free(store: Store, shard: int) -> bool:
    """Remove a shard's files unless a part commits it or a live writer claims it (checked now, locked)."""
    if any(s == shard for s, _, _ in store.parts()) or shard in _live_claims(store):
        return False
    if not store.shard_files(shard):
        return False
    store.clear_shard(shard)
    return True


# ------------------------------------------------------------------------------ the rest of the cache
DERIVED = ("adaptor-outputs", "masks")


def verify_derived(root: Path, repair: bool = False, dry_run: bool = False) -> VerifyReport:
    """The cache's files outside the stores: the datasets' store entries, the derived caches'
    checksums (Adaptor outputs, aligned masks) and temporary files of writers that are gone."""
    root = Path(root)
    files = CacheFiles(storage_at(root))
    rep = VerifyReport(root, modality="cache")
    for folder in dataset_folders(root):
        for modality, encoder, recorded, store in store_entries(folder):
            if not (store / ZARR_DIR / "zarr.json").exists():
                rep.warnings.append(f"dataset {folder.name} records the {modality} store {recorded} of "
                                    f"{encoder}, which is not in this cache; `pipe embed` rebuilds it")
    for sub in DERIVED:
        for entry in sorted(files.storage.entries(sub), key=lambda e: e.key):
            if entry.kind == "file" and entry.name.endswith(".npz") and not entry.name.startswith("."):
                try:
                    load_checked(files.storage.fetch(entry.key, entry), "")
                except NpzCorruption as e:
                    rep.problem(f"{str(e).strip()} (--repair removes it: it is computed again when next needed)",
                                Repair("discard", files.storage.local(entry.key)))
    now = time.time()
    for sub in ("datasets", *DERIVED):
        for entry in leftovers(files.storage.child(sub), now):
            key = f"{sub}/{entry.key}"
            rep.warning(f"{key} is a temporary file of a writer that is gone", Repair("unlink", files.storage.local(key)))
    if (repair or dry_run) and rep.plan:
        apply_repairs(files, rep, dry_run)
        if not dry_run:
            rep.after = verify_derived(root)
    return rep
