"""The bytes a store writes, pinned: every file of a store built from a fixed table is
compared with a digest list checked in beside this test (tests/data/store_digests.json).

Moving code around in ``cache/`` (the ``Store`` split into arrays, manifest and claims,
and the storage backends under them) must not change one byte on disk. What legitimately
varies between runs and machines is named and left out, nothing else:

- the group's ``zarr.json`` attributes ``created`` (a timestamp) and ``versions`` (the
  installed library versions): the rest of that file is compared after they are blanked;
- a Parquet file's ``created_by`` (the pyarrow version, in its footer): the data pages are
  compared byte for byte, and the footer's metadata field by field without ``created_by``;
- the names of files written by a run are fixed here (the run id is given), so none vary.

If a deliberate format change alters the bytes, re-record with
``PIPE_RECORD_DIGESTS=1 python -m pytest tests/test_store_bytes.py`` and say why in the commit.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow.parquet as pq

from tests.helpers.stores import build

DIGESTS = Path(__file__).parent / "data" / "store_digests.json"
VARYING_ATTRS = ("created", "versions")


def parquet_digest(data: bytes, path: Path) -> str:
    footer = int.from_bytes(data[-8:-4], "little")
    meta = pq.read_metadata(path).to_dict()
    meta.pop("created_by")
    meta.pop("serialized_size")  # the footer's length, which created_by's length changes
    pages = data[: len(data) - 8 - footer]
    return hashlib.sha256(pages + json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()


def digest(path: Path, rel: str) -> str:
    data = path.read_bytes()
    if rel.endswith(".parquet"):
        return parquet_digest(data, path)
    if rel == "embeddings.zarr/zarr.json":
        meta = json.loads(data)
        for k in VARYING_ATTRS:
            assert k in meta["attributes"], k  # still written, only not compared
            meta["attributes"][k] = "<varies>"
        data = json.dumps(meta, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def store_digests(store: Path) -> dict[str, str]:
    return {p.relative_to(store).as_posix(): digest(p, p.relative_to(store).as_posix())
            for p in sorted(store.rglob("*")) if p.is_file()}


def test_a_store_built_from_a_fixed_table_has_the_recorded_bytes(tmp_path):
    got = store_digests(build(tmp_path / "cache"))
    if os.environ.get("PIPE_RECORD_DIGESTS"):
        DIGESTS.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(DIGESTS.read_text())
    assert sorted(got) == sorted(want), "the files differ: " + str(sorted(set(got) ^ set(want)))
    changed = [f for f in want if got[f] != want[f]]
    assert not changed, f"these files' bytes changed: {changed}"
    assert (tmp_path / "cache" / "freeze-pipe-cache.json").is_file()


def test_the_digests_see_a_changed_byte(tmp_path):
    """The comparison is not blind: one flipped byte in a shard or a manifest part is caught."""
    store = build(tmp_path / "cache")
    before = store_digests(store)
    shard = store / "embeddings.zarr" / "tokens" / "c" / "1" / "0" / "0"
    part = next((store / "manifest").glob("part-000002-*.parquet"))
    for f in (shard, part):
        raw = bytearray(f.read_bytes())
        raw[5] ^= 1
        f.write_bytes(bytes(raw))
    after = store_digests(store)
    assert {k for k in before if before[k] != after[k]} == {shard.relative_to(store).as_posix(),
                                                            part.relative_to(store).as_posix()}
