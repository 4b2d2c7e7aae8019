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
"""
from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_bytes, is_temp_name, temp_owner
from core.processes import pid_running
from cache.claims import claim_is_live, describe, judge
from cache.index import dataset_folders, store_entries
from cache.npz import NpzCorruption, load_checked
from cache.objects import ObjectStorage, remote_root
from cache.paths import plain_name
from cache.shards import ShardCorruption, ShardFile, ShardLayout, partial_of
from cache.storage import LocalStorage
from cache.store import CLAIM_RE, QUARANTINE, ZARR_DIR, Store, UnreadablePart, array_metadata

TEMP_GRACE_S = 600  # a temporary file younger than this may belong to a writer on another host


@dataclass
class Repair:
    """One change that `--repair` makes; ``target`` is an array name, a shard or a path."""

    kind: str        # attrs, meta, quarantine, drop, unclaim, clear, unlink
    target: object
    shard: int = -1
    rows: int = 0


@dataclass
class VerifyReport:
    store: Path
    rows: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)   # what `--repair` did
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
        if repair is not None:
            self.plan.append(repair)

    def warning(self, message: str, repair: Repair | None = None) -> None:
        self.warnings.append(message)
        if repair is not None:
            self.plan.append(repair)

    def to_json(self) -> dict:
        out = {"store": str(self.store), "modality": self.modality, "encoder": self.encoder, "ok": self.ok,
               "rows": self.rows, "shards": self.shards, "problems": self.problems, "warnings": self.warnings,
               "repairs": self.repairs, "dropped_units": self.dropped}
        if self.after is not None:
            out["after_repair"] = {"problems": self.after.problems, "warnings": self.after.warnings,
                                   "rows": self.after.rows, "shards": self.after.shards}
        return out


@dataclass
class Part:
    shard: int
    path: Path
    offsets: list[int]   # committed rows, as offsets within the shard


def verify_store(path: Path, repair: bool = False) -> VerifyReport:
    """Check one store; with ``repair``, fix what was found and verify again (``report.after``)."""
    rep = VerifyReport(Path(path))
    try:
        store = Store.open(path)
    except Exception as e:  # an unreadable zarr.json is itself the finding
        rep.problem(f"cannot open: {e}. Remove the store with `pipe cache rm {path}` and re-run `pipe embed`")
        return rep
    rep.encoder, rep.modality = str(store.attrs.get("encoder", "")), str(store.attrs.get("modality", ""))
    store.storage.mirror()  # a store in a bucket is checked in a fresh local copy of every object
    parts = _check_manifest(store, rep)
    layouts = _check_metadata(store, parts, rep)
    _check_chunks(parts, layouts, rep)
    _check_leftovers(store, parts, rep)
    if repair and rep.plan:
        apply_repairs(store, rep)
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
    """A store an older version wrote records no arrays: its modality says which it must have."""
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
    now = time.time()
    for shard in sorted(set(data) & set(parts)):
        for p in data[shard]:
            if partial_of(p.name) and dead_temp(p, now, partial_of(p.name)[1]):
                rep.warning(f"{p.relative_to(store.path)} is a temporary file of a writer that is gone",
                            Repair("unlink", p))
    for p in temp_files(store.path, now):
        rep.warning(f"{p.relative_to(store.path)} is a temporary file of a writer that is gone", Repair("unlink", p))
    quarantined = sorted((store.path / QUARANTINE).glob("*")) if (store.path / QUARANTINE).is_dir() else []
    if quarantined:
        rep.warnings.append(f"{len(quarantined)} manifest part(s) kept in {store.path / QUARANTINE} for inspection "
                            "(moved aside by an earlier repair; delete them when done)")


def _check_claims(store: Store, rep: VerifyReport) -> set[int]:
    """Warn about claims; plan to remove dead ones (and their shards' files). Returns every claimed shard."""
    claimed = set()
    for p in sorted((store.path / "claims").iterdir()):
        m = CLAIM_RE.match(p.name)
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


def dead_temp(path: Path, now: float, pid: int | None) -> bool:
    """Is this temporary file a leftover: its writer is not running here, and it is old enough
    that it cannot be a write in progress on another host (pids there mean nothing here)?"""
    if pid is None or pid_running(pid):
        return False
    try:
        return now - path.stat().st_mtime >= TEMP_GRACE_S
    except OSError:
        return False


def temp_files(folder: Path, now: float) -> list[Path]:
    """Temporary files of atomic writes (``.<name>.<pid>-<tid>.tmp``) under ``folder`` whose writer is gone."""
    out = []
    for dirpath, _, files in os.walk(folder):
        for f in files:
            if is_temp_name(f) and dead_temp(Path(dirpath) / f, now, temp_owner(f)):
                out.append(Path(dirpath) / f)
    return sorted(out)


# ------------------------------------------------------------------------------ repair
_ORDER = ["attrs", "meta", "quarantine", "drop", "unclaim", "clear", "unlink"]


def apply_repairs(store: Store, rep: VerifyReport) -> None:
    """Carry out ``rep.plan`` under the store's guard, re-checking each condition first.

    In a bucket the plan was made on a fresh local copy of every object (``mirror``): each
    file a repair removes or writes there is removed or written as an object too."""
    with store.storage.guard():
        done: set[tuple] = set()
        for r in sorted(rep.plan, key=lambda r: _ORDER.index(r.kind)):
            key = (r.kind, str(r.target))
            if key in done:
                continue
            done.add(key)
            message = _REPAIRS[r.kind](store, r, rep)
            if message:
                rep.repairs.append(message)


def _repair_attrs(store: Store, r: Repair, rep: VerifyReport) -> str:
    import zarr  # lazy: only a repair of an old store writes attributes

    if not all(plain_name(n) for n in r.target):
        return ""

    zarr.open_group(str(store.zpath), mode="r+").attrs.update({"arrays": r.target})
    _upload(store, store.zpath / "zarr.json")
    store.attrs["arrays"] = r.target
    return "recorded the arrays' row shapes, dtypes and dimension names in the store's attributes"


def _repair_meta(store: Store, r: Repair, rep: VerifyReport) -> str:
    entry = store.expected_arrays()[r.target]
    meta = store.zpath / r.target / "zarr.json"
    if not plain_name(r.target) or not _inside(store, meta):  # checked when planned; checked again before writing
        rep.problems.append(f"array {r.target!r}: not rewritten, its metadata would land outside {store.zpath}")
        return ""
    meta.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(meta, array_metadata(entry, store.shard_rows, int(store.attrs["chunk_rows"]), r.rows))
    _upload(store, meta)
    return f"rewrote {ZARR_DIR}/{r.target}/zarr.json from the store's attributes ({r.rows} rows)"


def _live_claims(store: Store) -> set[int]:
    return {s for s, _, info in store.claims() if claim_is_live(info)}


def _repair_quarantine(store: Store, r: Repair, rep: VerifyReport) -> str:
    if not r.target.exists():
        return ""
    dest = store.path / QUARANTINE / f"{r.target.name}.{time.strftime('%Y%m%dT%H%M%S')}"
    dest.parent.mkdir(exist_ok=True)
    os.replace(r.target, dest)
    if not isinstance(store.storage, LocalStorage):  # in a bucket: the part's bytes go up under their new key first
        _upload(store, dest)
        _remove(store, r.target)
    cleared = _clear_if_free(store, r.shard)
    return f"moved the unreadable manifest part {r.target.name} to {dest}" + (
        f" and removed shard {r.shard}'s files; its items are re-embedded by the next `pipe embed`" if cleared else "")


def _repair_drop(store: Store, r: Repair, rep: VerifyReport) -> str:
    if not r.target.exists():
        return ""
    _remove(store, r.target)
    rep.dropped += r.rows
    _clear_if_free(store, r.shard)
    return (f"dropped manifest part {r.target.name} ({r.rows} units) and shard {r.shard}'s files; the next "
            "`pipe embed` re-embeds them")


def _repair_unclaim(store: Store, r: Repair, rep: VerifyReport) -> str:
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


def _repair_clear(store: Store, r: Repair, rep: VerifyReport) -> str:
    return f"removed the uncommitted files of shard {r.shard}" if _clear_if_free(store, r.shard) else ""


def _repair_unlink(store: Store, r: Repair, rep: VerifyReport) -> str:
    if not r.target.exists():
        return ""
    _remove(store, r.target)
    return f"removed the leftover temporary file {r.target.relative_to(store.path)}"


def _remove(store: Store, path: Path) -> None:
    """Remove a file of the store (in a bucket: its object, and the local copy)."""
    path.unlink(missing_ok=True)
    store.storage.delete(store.storage.key_of(path))


def _upload(store: Store, path: Path) -> None:
    """In a bucket, write the object of a file a repair wrote locally (a folder's file is already in place)."""
    if not isinstance(store.storage, LocalStorage):
        store.storage.write(store.storage.key_of(path), path.read_bytes())


def _clear_if_free(store: Store, shard: int) -> bool:
    """Remove a shard's files unless a part commits it or a live writer claims it (checked now, locked)."""
    if any(s == shard for s, _, _ in store.parts()) or shard in _live_claims(store):
        return False
    if not store.shard_files(shard):
        return False
    store.clear_shard(shard)
    return True


_REPAIRS = {"attrs": _repair_attrs, "meta": _repair_meta, "quarantine": _repair_quarantine, "drop": _repair_drop,
            "unclaim": _repair_unclaim, "clear": _repair_clear, "unlink": _repair_unlink}



# ------------------------------------------------------------------------------ the rest of the cache
DERIVED = ("adaptor-outputs", "masks")


def verify_derived(root: Path, repair: bool = False) -> VerifyReport:
    """The cache's files outside the stores: the datasets' store entries, the derived caches'
    checksums (Adaptor outputs, aligned masks) and temporary files of writers that are gone."""
    root = Path(root)
    rep = VerifyReport(root, modality="cache")
    for folder in dataset_folders(root):
        for modality, encoder, recorded, store in store_entries(folder):
            if not (store / ZARR_DIR / "zarr.json").exists():
                rep.warnings.append(f"dataset {folder.name} records the {modality} store {recorded} of "
                                    f"{encoder}, which is not in this cache; `pipe embed` rebuilds it")
    for sub in DERIVED:
        for p in sorted((root / sub).rglob("*.npz")) if (root / sub).is_dir() else []:
            if not p.name.startswith("."):
                try:
                    load_checked(p, "")
                except NpzCorruption as e:
                    rep.problem(f"{str(e).strip()} (--repair removes it: it is computed again when next needed)",
                                Repair("unlink", p))
    now = time.time()
    for sub in ("datasets", *DERIVED):
        for p in temp_files(root / sub, now):
            rep.warning(f"{p.relative_to(root)} is a temporary file of a writer that is gone", Repair("unlink", p))
    if repair and rep.plan:
        bucket = remote_root(root)
        for r in rep.plan:
            if r.target.exists():
                r.target.unlink()
                if bucket is not None:  # the local mirror of a cache in a bucket: its object goes too
                    ObjectStorage(bucket[0], bucket[1]).delete(r.target.relative_to(bucket[1]).as_posix())
                rep.repairs.append(f"removed {r.target.relative_to(root)}")
        rep.after = verify_derived(root)
    return rep
