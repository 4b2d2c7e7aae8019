"""Stage one through the real CLI with the tiny encoders."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import zarr

from tests.helpers import forked
from tests.helpers import append_rows, embed_json, make_table, pipe
from tests.helpers.stores import read_rows, stores_by_modality

ROOT = Path(__file__).resolve().parents[1]


def test_embed_writes_stores_and_json_summary(tmp_path):
    table = make_table(tmp_path / "data", 10)
    out = embed_json(table, tmp_path / "cache")
    assert out["embedded"] == 20 and out["reused"] == 0 and out["failed"] == 0
    st = stores_by_modality(tmp_path / "cache")
    assert set(st) == {"image", "text"} and sorted(out["stores"]) == sorted(str(s.path) for s in st.values())
    img, txt = st["image"], st["text"]
    tokens = zarr.open_group(str(img.zpath))["tokens"]
    assert tokens.dtype == np.float16 and tokens.shape[1:] == (197, 96)
    assert zarr.open_group(str(txt.zpath))["length"].dtype == np.int32
    assert img.manifest().num_rows == 10 and txt.manifest().num_rows == 10


def test_duplicate_content_is_embedded_once(tmp_path):
    data = tmp_path / "data"
    table = make_table(data, 4)
    shutil.copy(data / "img/0000.png", data / "img/copy.png")
    append_rows(table, [{"id": "dup", "image": "img/copy.png", "report": "Small left pleural effusion.  Study 1.",
                         "split": "train", "effusion": 1}])
    out = embed_json(table, tmp_path / "cache")
    # 4 distinct images, and the new report equals report 1 after whitespace normalisation
    assert out["embedded"] == 8
    other = make_table(tmp_path / "other", 4)  # the same bytes in a second table are reused
    out2 = embed_json(other, tmp_path / "cache")
    assert out2["embedded"] == 0 and out2["reused"] == 8


def test_rerun_does_no_forward_and_growth_embeds_only_new(tmp_path, monkeypatch):
    table = make_table(tmp_path / "data", 6)
    embed_json(table, tmp_path / "cache")
    import pipeline.encoders as encoders

    def boom(*a, **k):
        raise AssertionError("an encoder was built on a re-run with nothing new")

    monkeypatch.setattr(encoders, "create_encoder", boom)
    again = embed_json(table, tmp_path / "cache")
    assert again == {**again, "embedded": 0, "reused": 12, "failed": 0}
    monkeypatch.undo()
    make_table(tmp_path / "data", 3, start=6, name="more.csv")
    append_rows(table, pd.read_csv(tmp_path / "data/more.csv").to_dict("records"))
    grown = embed_json(table, tmp_path / "cache")
    assert grown["embedded"] == 6 and grown["reused"] == 12


def test_bad_items_are_recorded_and_the_rest_embedded(tmp_path):
    data = tmp_path / "data"
    table = make_table(data, 4)
    png = (data / "img/0000.png").read_bytes()
    (data / "img/zero.png").write_bytes(b"")
    (data / "img/trunc.png").write_bytes(png[: len(png) // 2])
    (data / "img/notimage.png").write_text("this is a radiology report, not an image")
    (data / "img/corrupt.png").write_bytes(png[:40] + bytes(range(256)) * 4)
    bad = [{"id": i, "image": f"img/{i}.png", "report": f"Report {i}.", "split": "train", "effusion": 0}
           for i in ("zero", "trunc", "notimage", "corrupt", "missing")]
    bad.append({"id": "noreport", "image": "img/0001.png", "report": "   ", "split": "train", "effusion": 0})
    append_rows(table, bad)
    out = embed_json(table, tmp_path / "cache", expect=1)
    assert out["failed"] == 6
    # 4 good images; 4 + 5 distinct non-empty reports
    assert out["embedded"] == 4 + 9
    stores = stores_by_modality(tmp_path / "cache")
    fails = stores["image"].failures().to_pandas()
    reasons = dict(zip(fails.source.map(lambda s: Path(s).name), fails.reason))
    # every bad item is in its store's failure table, the unkeyable ones (no bytes) included
    assert set(reasons) == {"zero.png", "trunc.png", "notimage.png", "corrupt.png", "missing.png"}
    assert all("png" in r for r in reasons.values()) and "file not found" in reasons["missing.png"]
    text_fails = stores["text"].failures().to_pandas()
    assert list(text_fails.item) == ["noreport"] and "empty report" in text_fails.reason[0]
    r = pipe("embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
             "--cache", str(tmp_path / "cache"), "--allow-failures", expect=0)
    assert "missing.png" in r.output and "empty report" in r.output


@pytest.mark.parametrize("args,needle", [
    (["--backbone", "no-such-net"], "no-such-net"),
    (["--dataset", "{missing}"], "does not exist"),
    (["--dataset", "{noimage}"], "no `image` column"),
    (["--dataset", "{garbage}"], "cannot read table"),
])
def test_bad_arguments_get_one_clear_error(tmp_path, args, needle):
    table = make_table(tmp_path / "data", 2)
    (tmp_path / "noimage.csv").write_text("path,report\na.png,hi\n")
    (tmp_path / "garbage.parquet").write_bytes(b"\x00\x01 not parquet")
    subst = {"{missing}": str(tmp_path / "nope.csv"), "{noimage}": str(tmp_path / "noimage.csv"),
             "{garbage}": str(tmp_path / "garbage.parquet")}
    base = {"--dataset": str(table), "--backbone": "tiny-vit", "--text-encoder": "tiny-bert"}
    base.update({args[0]: subst.get(args[1], args[1])})
    flat = [x for kv in base.items() for x in kv]
    r = pipe("embed", *flat, "--cache", str(tmp_path / "cache"), expect=2)
    assert needle in r.output and "Traceback" not in r.output


def test_fingerprint_changes_with_preprocessing_weights_and_dtype():
    from cache.keys import fingerprint
    from pipeline.encoders import resolve_encoder_name
    from stages.embed.stage import EmbedConfig, encoder_spec

    cfg = resolve_encoder_name("tiny-vit")
    base = encoder_spec(cfg, EmbedConfig(dataset="x"))
    assert fingerprint(base) == fingerprint(encoder_spec(cfg, EmbedConfig(dataset="x")))
    assert fingerprint(base) == fingerprint(encoder_spec(cfg, EmbedConfig(dataset="x"), torch.device("cpu")))
    assert fingerprint(base) != fingerprint(encoder_spec(cfg, EmbedConfig(dataset="x"), torch.device("cuda")))
    changed = [
        encoder_spec(dataclasses.replace(cfg, resize_size=240), EmbedConfig(dataset="x")),
        encoder_spec(dataclasses.replace(cfg, mean=(0.4, 0.4, 0.4)), EmbedConfig(dataset="x")),
        {**base, "weights": base["weights"] + "-other"},
        {**base, "dtype": {"tokens": "bfloat16", "pooled": "float32"}},
    ]
    fps = {fingerprint(s) for s in changed} | {fingerprint(base)}
    assert len(fps) == 5


def test_views_are_cached_and_deterministic(tmp_path):
    table = make_table(tmp_path / "data", 3)
    out = embed_json(table, tmp_path / "c1", "--views", "2")
    assert out["embedded"] == 9 + 3
    img = stores_by_modality(tmp_path / "c1")["image"]
    rows = read_rows(img, "pooled")
    key = next(iter(rows))[0]
    assert not np.array_equal(rows[key, 0], rows[key, 1]) and not np.array_equal(rows[key, 1], rows[key, 2])
    embed_json(table, tmp_path / "c2", "--views", "2")
    again = read_rows(stores_by_modality(tmp_path / "c2")["image"], "pooled")
    assert all(np.array_equal(rows[k], again[k]) for k in rows)
    more = embed_json(table, tmp_path / "c1", "--views", "3")  # only the new view is embedded
    assert more["embedded"] == 3


def test_plain_tools_read_the_cache(tmp_path):
    table = make_table(tmp_path / "data", 5)
    embed_json(table, tmp_path / "cache")
    img = stores_by_modality(tmp_path / "cache")["image"]
    manifest = pq.read_table(img.path / "manifest").to_pandas()
    g = zarr.open_group(str(img.path / "embeddings.zarr"), mode="r")
    tokens = da.from_zarr(str(img.path / "embeddings.zarr" / "tokens"))
    pooled = g["pooled"][:]
    for row in manifest.row:
        np.testing.assert_array_equal(tokens[row].compute(), g["tokens"][row])
        assert np.isfinite(pooled[row]).all() and np.abs(pooled[row]).sum() > 0
    assert g.attrs["modality"] == "image" and g.attrs["fingerprint"] == img.fingerprint


def test_verify_catches_flipped_byte_deleted_shard_and_dangling_row(tmp_path):
    table = make_table(tmp_path / "data", 6)
    cache = tmp_path / "cache"
    embed_json(table, cache)
    assert "ok" in pipe("cache", "verify", "--cache", str(cache)).output
    img = stores_by_modality(cache)["image"]
    shard = img.layout("tokens").shard_path(0)

    snapshot = tmp_path / "snap"
    shutil.copytree(cache, snapshot)
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(bytes(raw))
    r = pipe("cache", "verify", "--cache", str(cache), expect=1)
    assert "crc32c" in r.output and "array tokens, shard 0" in r.output

    shutil.rmtree(cache)
    shutil.copytree(snapshot, cache)
    shard.unlink()
    r = pipe("cache", "verify", "--cache", str(cache), expect=1)
    assert "missing" in r.output and "array tokens, shard 0" in r.output

    shutil.rmtree(cache)
    shutil.copytree(snapshot, cache)
    part = next((img.path / "manifest").glob("part-*.parquet"))
    t = pq.read_table(part).to_pandas()
    t.loc[len(t)] = {**t.iloc[0].to_dict(), "key": "f" * 32, "row": img.shard_rows - 1}
    pq.write_table(__import__("pyarrow").Table.from_pandas(t, preserve_index=False), part)
    r = pipe("cache", "verify", "--cache", str(cache), expect=1)
    assert "never written" in r.output


def test_cache_ls_json(tmp_path):
    table = make_table(tmp_path / "data", 3)
    embed_json(table, tmp_path / "cache")
    rows = json.loads(pipe("cache", "ls", "--cache", str(tmp_path / "cache"), "--json").stdout)
    assert {r["modality"] for r in rows} == {"image", "text"}
    assert all(r["items"] == 3 and r["bytes"] > 0 and r["encoder"] in ("tiny-vit", "tiny-bert") for r in rows)


SHARDS = ("--batch-size", "4", "--shard-mb", "0.5")


def _embed_cmd(table: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "embed", "--dataset", str(table), "--backbone", "tiny-vit",
            "--text-encoder", "tiny-bert", "--cache", str(cache), *SHARDS, "--json"]


@pytest.mark.slow
def test_resume_after_sigkill_equals_clean_run(tmp_path):
    table = make_table(tmp_path / "data", 48)
    env = {**os.environ, "PIPE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    embed_json(table, tmp_path / "clean", *SHARDS)  # the reference, in this process
    cache = tmp_path / "killed"
    proc = forked.popen(_embed_cmd(table, cache), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(list(cache.glob("stores/image/*/manifest/part-*.parquet"))) >= 1:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(cache.glob("stores/image/*/manifest/part-*.parquet")))
    assert done_before >= 1
    out = embed_json(table, cache, *SHARDS)  # the run after the kill, in this process
    assert out["reused"] > 0 and out["embedded"] + out["reused"] == 96
    pipe("cache", "verify", "--cache", str(cache))
    a, b = stores_by_modality(tmp_path / "clean"), stores_by_modality(cache)
    for modality in ("image", "text"):
        for name in ("tokens", "pooled"):
            ra, rb = read_rows(a[modality], name), read_rows(b[modality], name)
            assert ra.keys() == rb.keys()
            assert all(np.array_equal(ra[k], rb[k]) for k in ra), f"{modality}/{name} differ after resume"
        assert b[modality].manifest().num_rows == len(set(b[modality].committed_units()))


@pytest.mark.slow
def test_dask_local_cluster_gives_the_same_cache(tmp_path):
    table = make_table(tmp_path / "data", 24)
    single = embed_json(table, tmp_path / "one", "--shard-mb", "0.5", "--batch-size", "4")
    dist = embed_json(table, tmp_path / "two", "--shard-mb", "0.5", "--batch-size", "4", "--workers", "2")
    assert dist["embedded"] == single["embedded"] == 48 and dist["failed"] == 0
    pipe("cache", "verify", "--cache", str(tmp_path / "two"))
    a, b = stores_by_modality(tmp_path / "one"), stores_by_modality(tmp_path / "two")
    assert len(b["image"].parts()) > 1  # several shards, so several tasks ran
    for modality in ("image", "text"):
        for name in ("tokens", "pooled"):
            ra, rb = read_rows(a[modality], name), read_rows(b[modality], name)
            assert ra.keys() == rb.keys()
            assert all(np.array_equal(ra[k], rb[k]) for k in ra), f"{modality}/{name} differ under Dask"


@pytest.mark.slow
def test_decoding_in_spawned_processes_gives_the_same_cache(tmp_path, monkeypatch):
    from stages.embed.stage import EmbedConfig, run

    table = make_table(tmp_path / "data", 8)
    threads = run(EmbedConfig(dataset=str(table), cache=str(tmp_path / "a"), device="cpu", decode_processes=0))
    procs = run(EmbedConfig(dataset=str(table), cache=str(tmp_path / "b"), device="cpu", decode_processes=2))
    assert threads.embedded == procs.embedded == 16
    ra = read_rows(stores_by_modality(tmp_path / "a")["image"], "tokens")
    rb = read_rows(stores_by_modality(tmp_path / "b")["image"], "tokens")
    assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra)


# ---------------------------------------------------------------- keys stream in ahead of the work
def test_the_first_shard_starts_before_the_whole_dataset_is_keyed(tmp_path, monkeypatch):
    import cache.index as index
    from stages import embed
    from stages.embed.embedder import GroupEmbedder

    table = make_table(tmp_path / "data", 64)
    hashed, at_first_forward = [], []
    real_key, real_forward = index._image_key, GroupEmbedder._forward

    def counting_key(path, previous, buf):
        hashed.append(path)
        return real_key(path, previous, buf)

    def first_forward(self, loaded):
        at_first_forward.append(len(hashed))
        return real_forward(self, loaded)

    monkeypatch.setattr(index, "_image_key", counting_key)
    monkeypatch.setattr(GroupEmbedder, "_forward", first_forward)
    cfg = embed.EmbedConfig(dataset=str(table), backbone="tiny-vit", text_encoder="none", cache=str(tmp_path / "c"),
                            batch_size=8, shard_mb=0.01, chunk_rows=16, hash_ahead=4, device="cpu")
    res = embed.run(cfg)
    assert res.embedded == 64 and len(hashed) == 64
    # shards of 16 rows: the first forward needed 16 keys, plus at most 4 (+ a thread's item) ahead
    assert at_first_forward[0] <= 16 + 4 + 1
    index_rows = pd.read_parquet(tmp_path / "c" / "datasets" / res.dataset / "items.parquet")
    assert index_rows.image_key.notna().all() and len(index_rows) == 64  # written once every key was known


def test_the_hasher_stays_a_bounded_distance_ahead_and_hands_errors_over(tmp_path, monkeypatch):
    import cache.index as index

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i}.bin")
        paths[-1].write_bytes(bytes([i]) * 100)
    h = index._Hasher(paths, {}, threads=3, ahead=5)
    try:
        assert h.get(10)[0] is not None
        time.sleep(0.3)  # let the threads run as far as they may
        assert sum(r is not None for r in h.out) <= 10 + 5 + 1
    finally:
        h.close()

    def broken(path, previous, buf):
        if path.name == "7.bin":
            raise RuntimeError("disk controller on fire")
        return ("k", 1, 1, None)

    monkeypatch.setattr(index, "_image_key", broken)
    h = index._Hasher(paths, {}, threads=2, ahead=100)
    try:
        assert h.get(6) == ("k", 1, 1, None)
        with pytest.raises(RuntimeError, match="on fire"):  # raised to the caller, never a hang
            h.get(7)
    finally:
        h.close()
