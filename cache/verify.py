"""`pipe cache verify`: prove that every committed row can be read back intact."""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from cache.shards import ShardCorruption, ShardFile
from cache.store import MANIFEST_SCHEMA, PART_RE, Store, claim_is_live


@dataclass
class VerifyReport:
    store: Path
    rows: int = 0
    shards: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(path: Path) -> VerifyReport:
    rep = VerifyReport(Path(path))
    try:
        store = Store.open(path)
    except Exception as e:  # an unreadable zarr.json is itself the finding
        rep.problems.append(f"cannot open: {e}")
        return rep
    by_shard = _check_manifest(store, rep)
    _check_arrays(store, by_shard, rep)
    _check_leftovers(store, by_shard, rep)
    return rep


def _check_manifest(store: Store, rep: VerifyReport) -> dict[int, list[int]]:
    """Read every part; return committed rows (offsets within the shard) per shard."""
    S = store.shard_rows
    by_shard: dict[int, list[int]] = {}
    seen: dict[tuple[str, int], str] = {}
    for p in sorted((store.path / "manifest").iterdir()):
        m = PART_RE.match(p.name)
        if not m:
            continue
        shard = int(m[1])
        try:
            t = pq.read_table(p, schema=MANIFEST_SCHEMA)
        except Exception as e:
            rep.problems.append(f"manifest part {p.name} is unreadable ({type(e).__name__}: {e})")
            continue
        rows = t.column("row").to_pylist()
        bad = [r for r in rows if not shard * S <= r < (shard + 1) * S]
        if bad or set(t.column("shard").to_pylist()) - {shard}:
            rep.problems.append(f"manifest part {p.name} has rows outside shard {shard} (e.g. row {bad[:1]})")
        for key, view in zip(t.column("key").to_pylist(), t.column("view").to_pylist()):
            if (key, view) in seen:
                rep.problems.append(f"key {key} view {view} is stored twice ({seen[key, view]} and {p.name})")
            seen[key, view] = p.name
        by_shard[shard] = [r - shard * S for r in rows if shard * S <= r < (shard + 1) * S]
        rep.rows += len(rows)
    rep.shards = len(by_shard)
    return by_shard


def _check_arrays(store: Store, by_shard: dict[int, list[int]], rep: VerifyReport) -> None:
    names = store.array_names
    if by_shard and not names:
        rep.problems.append("the manifest names rows but the store holds no arrays")
    for name in names:
        lay = store.layout(name)
        nrows = store.array(name).shape[0]
        for shard, offsets in sorted(by_shard.items()):
            where = f"{name} shard {shard}"
            if (shard + 1) * lay.shard_rows > nrows:
                rep.problems.append(f"{where}: manifest rows point past the array's end ({nrows} rows)")
                continue
            if not lay.shard_path(shard).exists():
                rep.problems.append(f"{where}: the shard file {lay.shard_path(shard)} is missing")
                continue
            try:
                sf = ShardFile(lay, shard)
                chunks = sorted({o // lay.chunk_rows for o in offsets})
                missing = [c for c in chunks if not sf.has_chunk(c)]
                if missing:
                    rep.problems.append(f"{where}: chunks {missing} hold committed rows but were never written")
                sf.verify([c for c in chunks if c not in missing])
            except ShardCorruption as e:
                rep.problems.append(f"{where}: {e}")


def _check_leftovers(store: Store, by_shard: dict[int, list[int]], rep: VerifyReport) -> None:
    for shard, group, info in store.claims():
        state = "in progress" if claim_is_live(info) else "left by an interrupted run; the next `pipe embed` redoes it"
        rep.warnings.append(f"shard {shard} is claimed by pid {info.get('pid')} on {info.get('host')} ({state})")
    claimed = {s for s, _, _ in store.claims()}
    per_shard = defaultdict(set)
    for name in store.array_names:
        cdir = store.zpath / name / "c"
        if cdir.exists():
            for d in cdir.iterdir():
                if d.name.isdigit():
                    per_shard[int(d.name)].add(name)
    for shard in sorted(set(per_shard) - set(by_shard) - claimed):
        rep.warnings.append(f"shard {shard} holds uncommitted data (ignored by readers; reused by the next write)")
