"""Hostile inputs and the commands that delete: each input is one item's failure (or one
command's refusal) with a clear message, and nothing outside the target changes.

Every test hashes the whole test folder (the cache, the user's data beside it, folders a
hostile path points at) before and after, and checks that only the target changed. Each
input tried is registered in ``CASES``; the documentation's "Hostile inputs" section reports the
count, and :func:`test_the_readme_reports_these_counts` keeps the two equal.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import xxhash
from PIL import Image

from core.locks import owned_folder, OWNER_LOCK
from cache.marker import MARKER
from cache.store import Store, find_stores
from tests.helpers import forked
from tests.helpers import append_rows, embed_json, make_table, pipe, write_png
from tests.helpers.files import write_csv, write_dicom
from tests.helpers.layouts import build_covidx, build_siim

ROOT = Path(__file__).resolve().parents[1]
CASES: list[str] = []  # every hostile or bad input tried in this module


def inputs(*names: str):
    """Register the inputs a test tries (the documentation reports how many)."""
    CASES.extend(names)
    return lambda f: f


# ------------------------------------------------------------------------------ helpers
def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` (symlinks not followed) with its content hash, link target or kind."""
    out = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath) / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[rel] = "dir"
            elif p.is_file():
                out[rel] = xxhash.xxh3_128_hexdigest(p.read_bytes())
            else:
                out[rel] = "special"
    return out


def changed(before: dict, after: dict) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def only_under(paths: set[str], *targets: str) -> set[str]:
    """The changed paths that lie outside every target (what must be empty)."""
    return {p for p in paths if not any(p == t or p.startswith(t + "/") for t in targets)}


def rel(p: Path, base: Path) -> str:
    return p.relative_to(base).as_posix()


@pytest.fixture(scope="module")
def clean(embedded):
    """24 items embedded once (tiny encoders); tests work on copies."""
    made = embedded(24)
    return made.table, made.cache


@pytest.fixture
def world(clean, tmp_path):
    """A copy of the clean cache, and a user's folder beside it (the table stays where it was
    embedded from: a table's dataset name is its path)."""
    table, cache = clean
    shutil.copytree(cache, tmp_path / "cache", symlinks=True)
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "thesis.txt").write_text("four years of work")
    return table, tmp_path / "cache", home


def store_of(cache: Path, modality: str) -> Path:
    return next(p for p in find_stores(cache) if Store.open(p).modality == modality)


# ------------------------------------------------------------------------------ 1. pipe cache rm
RM_TARGETS = ["stores/image/..", "abs:stores/image/..", "abs:.", "abs:stores", "abs:stores/image", "symlink-out",
              "store-elsewhere", "folder-without-metadata", "name-without-metadata", "not-hex-prefix"]


@inputs(*(f"rm {t}" for t in RM_TARGETS))
@pytest.mark.parametrize("target", RM_TARGETS)
def test_rm_accepts_only_a_store_of_this_cache(world, tmp_path, target):
    table, cache, home = world
    img = store_of(cache, "image")
    if target == "symlink-out":  # a store-looking name that leads out of the cache
        fake = home / "fake-store"
        shutil.copytree(img, fake)
        (cache / "stores" / "image" / f"evil-{'0' * 16}").symlink_to(fake)
        arg = str(cache / "stores" / "image" / f"evil-{'0' * 16}")
    elif target == "store-elsewhere":  # a real store, but of another cache
        shutil.copytree(img, home / "stores" / "image" / img.name)
        arg = str(home / "stores" / "image" / img.name)
    elif target in ("folder-without-metadata", "name-without-metadata"):
        notes = cache / "stores" / "image" / "my-notes"
        notes.mkdir()
        (notes / "notes.txt").write_text("mine")
        arg = str(notes) if target == "folder-without-metadata" else "my-notes"
    elif target == "not-hex-prefix":
        arg = "../../.."
    elif target.startswith("abs:"):
        arg = str(cache / target[4:]) if target[4:] != "." else str(cache)
    else:
        arg = target  # relative to the cache root
    before = tree(tmp_path)
    r = pipe("cache", "rm", arg, "--cache", str(cache), "--force", expect=2)
    assert "Nothing was removed" in r.output or "no store" in r.output, r.output
    assert tree(tmp_path) == before  # not one file changed anywhere


@inputs("rm a real store (only it goes)")
def test_rm_removes_the_store_and_nothing_else(world, tmp_path):
    table, cache, home = world
    img = store_of(cache, "image")
    outputs = cache / "adaptor-outputs" / f"{'a' * 16}-{img.name[-16:]}"  # that store's Adaptor outputs
    outputs.mkdir(parents=True)
    (outputs / "meta.json").write_text("{}")
    before = tree(tmp_path)
    pipe("cache", "rm", img.name, "--cache", str(cache), "--force")
    diff = changed(before, tree(tmp_path))
    dataset = next((cache / "datasets").iterdir())
    assert not img.exists() and not outputs.exists()
    # the store, its outputs, and the index that no longer names it: nothing else
    assert only_under(diff, rel(img, tmp_path), rel(outputs, tmp_path), rel(dataset / "stores.json", tmp_path)) == set()


# ------------------------------------------------------------------------------ 1. pipe cache gc
def _unreadable(path: Path, how: str) -> None:
    text = path.read_text()
    if how == "truncated":
        path.write_text(text[: len(text) // 2])
    elif how == "a list":
        path.write_text(json.dumps([json.loads(text)]))
    elif how == "entry without store":
        data = json.loads(text)
        data["image"]["tiny-vit"] = {"path": "elsewhere"}
        path.write_text(json.dumps(data))
    elif how == "a directory":
        path.unlink()
        path.mkdir()


GC_INDEXES = ["truncated", "a list", "entry without store", "a directory"]


@inputs(*(f"gc with a stores.json that is {how}" for how in GC_INDEXES))
@pytest.mark.parametrize("how", GC_INDEXES)
def test_gc_stops_on_an_unreadable_dataset_index(world, tmp_path, how):
    table, cache, home = world
    index = next((cache / "datasets").iterdir()) / "stores.json"
    _unreadable(index, how)
    before = tree(tmp_path)
    r = pipe("cache", "gc", "--cache", str(cache), expect=2)
    out = " ".join(r.output.split())
    assert str(index) in out and "nothing was removed" in out and "pipe embed" in out, out
    assert tree(tmp_path) == before
    assert all(p.exists() for p in find_stores(cache))


@inputs("gc: a user folder under stores/", "gc: a folder whose zarr.json is not a store group",
        "gc: a store whose name does not match its fingerprint", "gc: a .removing- folder of no store",
        "gc: a user folder under adaptor-outputs/", "gc: an outputs-named folder holding a subfolder")
def test_gc_removes_only_what_it_identifies(world, tmp_path):
    table, cache, home = world
    img = store_of(cache, "image")
    for folder in (cache / "datasets").iterdir():  # forget the dataset: both stores become unreferenced
        shutil.rmtree(folder)
    txt = store_of(cache, "text")
    other = make_table(tmp_path / "other", 3)  # a dataset that uses the text store again
    pipe("embed", "-d", str(other), "-b", "none", "-t", "tiny-bert", "--cache", str(cache), "--json")
    foreign = []
    notes = cache / "stores" / "image" / "my-notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "sub" / "a.txt").write_text("mine")
    fake = cache / "stores" / "image" / f"fake-{'1' * 16}" / "embeddings.zarr"
    fake.mkdir(parents=True)
    (fake / "zarr.json").write_text('{"node_type": "array"}')
    renamed = cache / "stores" / "image" / f"copy-{'2' * 16}"
    shutil.copytree(img, renamed)  # a real store's files under a name that is not its fingerprint
    removing = cache / "stores" / "text" / ".removing-mine"
    removing.mkdir()
    (removing / "x").write_text("x")
    mine = cache / "adaptor-outputs" / "my-results"
    mine.mkdir(parents=True)
    (mine / "r.csv").write_text("1")
    nested = cache / "adaptor-outputs" / f"{'c' * 16}-{'d' * 16}"
    (nested / "keep").mkdir(parents=True)
    (nested / "meta.json").write_text("{}")
    orphan = cache / "adaptor-outputs" / f"{'a' * 16}-{img.name[-16:]}"
    orphan.mkdir(parents=True)
    (orphan / "meta.json").write_text("{}")
    (orphan / "image_pooled.npz").write_bytes(b"x")
    foreign += [notes, fake.parent, renamed, removing, mine, nested]
    before = tree(tmp_path)
    rep = json.loads(pipe("cache", "gc", "--cache", str(cache), "--json").stdout)
    assert sorted(r["path"] for r in rep["removed"]) == sorted([str(img), str(orphan)])
    skipped = {r["path"] for r in rep["skipped"]}
    assert {str(notes), str(fake.parent), str(renamed), str(mine), str(nested)} <= skipped
    diff = changed(before, tree(tmp_path))
    assert only_under(diff, rel(img, tmp_path), rel(orphan, tmp_path)) == set()
    assert all(p.exists() for p in foreign) and txt.exists()


# ------------------------------------------------------------------------------ 1. the cache marker
@inputs("gc on a folder that is not a cache", "rm on a folder that is not a cache",
        "verify --repair on a folder that is not a cache")
def test_deleting_commands_refuse_a_folder_that_is_not_a_cache(world, tmp_path):
    table, cache, home = world
    shutil.copytree(store_of(cache, "image"), home / "stores" / "image" / "x")  # looks half like a cache
    before = tree(tmp_path)
    for args in (["cache", "gc"], ["cache", "rm", "x"], ["cache", "verify", "--repair"]):
        r = pipe(*args, "--cache", str(home), expect=2)
        out = " ".join(r.output.split())
        assert "is not a freeze-pipe cache" in out and MARKER in out and "Documents" in out, out
    assert tree(tmp_path) == before


@inputs("gc and rm on a cache written before the marker")
def test_a_cache_without_the_marker_is_adopted_by_repair_only(world, tmp_path):
    table, cache, home = world
    (cache / MARKER).unlink()  # as an older version left it
    before = tree(tmp_path)
    for args in (["cache", "gc"], ["cache", "rm", store_of(cache, "image").name, "--force"]):
        r = pipe(*args, "--cache", str(cache), expect=2)
        out = " ".join(r.output.split())
        assert "has no cache marker" in out and f"pipe cache verify --repair --cache {cache}" in out, out
    assert tree(tmp_path) == before
    r = pipe("cache", "verify", "--repair", "--cache", str(cache))
    assert "marked" in r.output and (cache / MARKER).is_file()
    assert only_under(changed(before, tree(tmp_path)), rel(cache / MARKER, tmp_path)) == set()
    pipe("cache", "gc", "--cache", str(cache))  # now it runs (nothing to remove: the dataset uses both)
    assert len(find_stores(cache)) == 2
    assert "freeze-pipe cache" in (cache / MARKER).read_text()


def test_every_writing_command_marks_its_cache(tmp_path):
    table = make_table(tmp_path / "data", 4)
    embed_json(table, tmp_path / "fresh")
    assert json.loads((tmp_path / "fresh" / MARKER).read_text())["kind"] == "freeze-pipe cache"


# ------------------------------------------------------------------------------ 1. verify --repair
HOSTILE_ARRAYS = ["../../../../../escaped", "/tmp/absolute-escaped", "a/b"]


@inputs(*(f"verify --repair with an array named {n!r} in a store's attributes" for n in HOSTILE_ARRAYS))
@pytest.mark.parametrize("name", HOSTILE_ARRAYS)
def test_repair_never_writes_outside_the_store(world, tmp_path, name):
    table, cache, home = world
    img = store_of(cache, "image")
    meta = img / "embeddings.zarr" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["arrays"][name] = dict(doc["attributes"]["arrays"]["pooled"])
    meta.write_text(json.dumps(doc))
    (img / "embeddings.zarr" / "pooled" / "zarr.json").unlink()  # something --repair would rewrite
    before = tree(tmp_path)
    absolute = Path("/tmp/absolute-escaped")
    existed = absolute.exists()
    r = pipe("cache", "verify", "--repair", "--cache", str(cache), expect=1)
    out = " ".join(r.output.split())
    assert "is not a plain name" in out and "pipe cache rm" in out, out
    assert only_under(changed(before, tree(tmp_path)), rel(img, tmp_path)) == set()
    assert not (tmp_path / "escaped").exists() and absolute.exists() == existed
    assert not list(tmp_path.rglob("escaped")) and not list(tmp_path.rglob("b/zarr.json"))


# ------------------------------------------------------------------------------ 1. the demo generator
@inputs("demo into a user folder holding a demo.json and other files", "demo into a folder with a foreign demo.json")
def test_the_demo_generator_replaces_only_its_own_folder(tmp_path):
    from pipeline.datasets.demo import DemoSpec, ensure_demo
    from pipeline.datasets.demo.generator import DemoTargetError

    root = tmp_path / "demo"
    ensure_demo(root, DemoSpec(n=4, size=48))
    (root / "my-analysis.ipynb").write_text("{}")  # the user's own work, beside the generator's files
    user = tmp_path / "mine"
    user.mkdir()
    (user / "demo.json").write_text('{"mine": true}')
    (user / "pairs.csv").write_text("id\n1\n")
    before = tree(tmp_path)
    with pytest.raises(DemoTargetError, match="my-analysis.ipynb"):
        ensure_demo(root, DemoSpec(n=6, size=48))
    with pytest.raises(DemoTargetError, match="did not write"):
        ensure_demo(user, DemoSpec(n=4, size=48))
    assert tree(tmp_path) == before
    (root / "my-analysis.ipynb").unlink()  # its own folder, holding nothing else, is replaced
    ensure_demo(root, DemoSpec(n=6, size=48))
    assert len(pd.read_csv(root / "pairs.csv")) == 6


# ------------------------------------------------------------------------------ 3. one owner per run folder
def _hold(folder: Path, command: str) -> subprocess.Popen:
    code = ("import sys, time; from core.locks import owned_folder\n"
            "with owned_folder(sys.argv[1], sys.argv[2]):\n    print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder), command], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "held"
    return p


@inputs("a second evaluate on the same --out")
def test_a_second_evaluate_on_the_same_out_is_refused_while_the_first_lives(world, tmp_path):
    table, cache, home = world
    out = tmp_path / "eval"
    args = ["evaluate", "--task", "classification", "-d", str(table), "-a", "none", "-b", "tiny-vit", "--fraction",
            "1.0", "--seeds", "1", "--cache", str(cache), "--out", str(out), "heads.epochs=2", "heads.min_steps=4",
            "bootstrap=50"]
    holder = _hold(out, "evaluate")
    try:
        before = tree(tmp_path)
        r = pipe(*args, expect=2)
        out_text = " ".join(r.output.split())
        assert f"pid {holder.pid} on host {socket.gethostname()}" in out_text and "--out" in out_text, out_text
        assert tree(tmp_path) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    pipe(*args)  # the owner died: the folder is free again
    assert (out / "results.json").is_file()


def test_the_owner_lock_is_a_plain_flock_with_a_note(tmp_path):
    from core.locks import FolderBusyError

    with owned_folder(tmp_path / "run", "train-adaptor") as me:
        note = json.loads((tmp_path / "run" / ".owner.json").read_text())
        assert note["pid"] == os.getpid() == me["pid"] and note["host"] == socket.gethostname()
        with pytest.raises(FolderBusyError, match=f"pid {os.getpid()} on host"):
            with owned_folder(tmp_path / "run", "train-adaptor"):
                pass
    assert (tmp_path / "run" / OWNER_LOCK).exists() and not (tmp_path / "run" / ".owner.json").exists()
    with owned_folder(tmp_path / "run", "evaluate"):  # free again
        pass


@inputs("a live writer's checkpoint temp file")
def test_a_checkpoint_save_removes_only_dead_writers_temp_files(tmp_path):
    import torch

    from pipeline.models.checkpoint import save_checkpoint

    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        live_tmp = tmp_path / f".last.safetensors.{alive.pid}-1.tmp"
        dead_tmp = tmp_path / f".last.optim.safetensors.next.{dead.pid}-1.tmp"
        for p in (live_tmp, dead_tmp):
            p.write_bytes(b"half")
        net = torch.nn.Linear(2, 2)
        save_checkpoint(tmp_path / "last.safetensors", net, {"epoch": 1}, torch.optim.AdamW(net.parameters()))
        assert live_tmp.exists() and not dead_tmp.exists()
    finally:
        alive.kill()
        alive.wait()


TRAIN = ["adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=4", "optim.lr=1e-3",
         "epochs=6", "checkpoint_every=1", "--device", "cpu"]


@pytest.mark.slow
@inputs("a second train-adaptor on the same --out", "an interrupted run (SIGKILL), resumed")
def test_a_second_trainer_is_refused_and_a_killed_one_resumes(world, tmp_path):
    from pipeline.models.checkpoint import read_meta

    table, cache, home = world
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cli", "train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert",
           "--cache", str(cache), "--out", str(out), *TRAIN]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PIPE_NO_PROGRESS": "1"}
    first = forked.popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        t0 = time.monotonic()
        while not (out / "last.safetensors").exists():
            assert first.poll() is None and time.monotonic() - t0 < 180, "the first run ended or made no progress"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # alive (and owning the folder) for as long as the second takes to start
        second = forked.run(cmd, env=env, capture_output=True, text=True, timeout=180)
        assert first.poll() is None, "the first run ended before the second was tried"
        text = " ".join(second.stderr.split())
        assert second.returncode == 2 and f"pid {first.pid} on host {socket.gethostname()}" in text, text
        assert "train-adaptor" in text and "--out" in text
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    killed_at = int(read_meta(out / "last.safetensors")["epoch"])
    assert killed_at < 6
    resumed = forked.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr
    assert int(read_meta(out / "last.safetensors")["epoch"]) == 6
    assert len(pd.read_csv(out / "metrics.csv")) == 6


# ------------------------------------------------------------------------------ 4 + the README's bad inputs
def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` pixels, with (almost) no pixel data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def multi_frame_dicom(path: Path, frames: int, rows: int, cols: int) -> np.ndarray:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # multi-frame grayscale byte secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = (np.random.default_rng(0).random((frames, rows, cols)) * 255).astype(np.uint8)
    ds.PixelData = pixels.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return pixels


# name -> (what the row's image is, a phrase its failure reason holds; None: the row embeds)
BAD_ROWS = {
    "corrupt image": ("corrupt.png", "not a recognised image format"),
    "truncated image": ("truncated.png", "truncated or corrupt"),
    "zero-byte image": ("empty.png", "empty file"),
    "non-image file": ("notes.png", "not a recognised image format"),
    "missing file": ("missing.png", "file not found"),
    "empty report": ("img/0000.png", "empty report"),
    "/dev/zero": ("/dev/zero", "a character device, not a regular file"),
    "a FIFO": ("fifo.png", "a FIFO (named pipe), not a regular file"),
    "a directory": ("folder.png", "a directory, not a regular file"),
    "1 x 2,000,000 PNG": ("wide.png", "image too large: resizing 2,000,000x1 pixels"),
    "2,000,000 x 1 PNG": ("tall.png", "image too large: resizing 1x2,000,000 pixels"),
    "12,000 x 12,000 PNG header": ("huge.png", "image too large: decoding 12,000x12,000 pixels"),
    "multi-frame DICOM (embeds one frame)": ("frames.dcm", None),
}


def _bad_table(data: Path) -> Path:
    table = make_table(data, 6)
    (data / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(3000))
    good = write_png(data / "good.png", seed=99).read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    (data / "empty.png").write_bytes(b"")
    (data / "notes.png").write_text("this is not an image\n")
    os.mkfifo(data / "fifo.png")
    (data / "folder.png").mkdir()
    Image.new("L", (2_000_000, 1), 128).save(data / "wide.png")
    Image.new("L", (1, 2_000_000), 128).save(data / "tall.png")
    png_header_only(data / "huge.png", 12_000, 12_000)
    multi_frame_dicom(data / "frames.dcm", frames=40, rows=64, cols=64)
    rows = []
    for i, (name, (image, _)) in enumerate(BAD_ROWS.items()):
        report = "" if name == "empty report" else f"Hostile row {i}: {name}."
        rows.append({"id": f"h{i}", "image": image, "report": report, "split": "train", "effusion": i % 2})
    append_rows(table, rows)
    return table


@inputs(*BAD_ROWS)
def test_every_bad_input_is_one_items_failure(tmp_path):
    data = tmp_path / "data"
    table = _bad_table(data)
    before = tree(data)
    t0 = time.monotonic()
    out = embed_json(table, tmp_path / "cache", expect=1)  # exit 1: items failed; everything else embedded
    assert time.monotonic() - t0 < 300  # nothing hung on a FIFO or read /dev/zero forever
    assert tree(data) == before  # the user's files: not one changed
    n_bad = sum(1 for _, why in BAD_ROWS.values() if why)
    assert out["failed"] == n_bad
    failures = pd.concat([Store.open(p).failures().to_pandas() for p in find_stores(tmp_path / "cache")])
    for name, (image, why) in BAD_ROWS.items():
        if why is None:
            continue
        if name == "empty report":
            hits = failures[failures.source.str.endswith("item h5") | (failures.item == "h5")]
        else:
            hits = failures[failures.source.str.endswith(image.lstrip("/") if image != "/dev/zero" else "/dev/zero")]
        assert len(hits) == 1, (name, failures.to_dict("records"))
        assert why in hits.reason.iloc[0], (name, hits.reason.iloc[0])
        row_id = f"h{list(BAD_ROWS).index(name)}"
        assert hits.item.iloc[0] == row_id, (name, hits.to_dict("records"))  # every failure names its item
    assert (failures.item.str.len() > 0).all() and (failures.source.str.len() > 0).all()
    img = Store.open(store_of(tmp_path / "cache", "image"))
    assert len(img.manifest()) == 6 + 1  # six good images and the DICOM (the empty report's image is one of them)
    assert "✗" not in pipe("cache", "verify", "--cache", str(tmp_path / "cache")).output


@inputs("a multi-frame DICOM under a budget of one frame")
def test_a_multi_frame_dicom_decodes_one_frame(tmp_path, monkeypatch):
    import pydicom

    from pipeline.imaging import ImageBudget, read_and_decode

    pixels = multi_frame_dicom(tmp_path / "f.dcm", frames=64, rows=128, cols=128)
    # every frame would need 64 x 128 x 128 x 16 B = 16 MiB; one frame, 0.25 MiB
    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(lambda self: pytest.fail("decoded every frame")))
    _, img = read_and_decode(tmp_path / "f.dcm", ImageBudget(max_mb=4))
    first = pixels[0].astype(np.float32)
    assert img.shape == (128, 128)
    np.testing.assert_allclose(img, (first - first.min()) / (first.max() - first.min()), atol=1e-6)


@inputs("an error inside preprocessing")
def test_preprocessing_runs_inside_the_items_guard(tmp_path, monkeypatch):
    from cache.index import Unit
    from pipeline.imaging import Preprocess
    from stages.embed.modality import load_image

    path = write_png(tmp_path / "a.png", seed=1)
    key = xxhash.xxh3_128_hexdigest(path.read_bytes())
    pre = Preprocess(resize_size=32, input_size=28, mean=(0.5,) * 3, std=(0.5,) * 3)
    assert load_image(Unit(key, 0, str(path)), pre).shape == (3, 28, 28)

    def boom(self, img, view=0, seed_key=""):
        raise RuntimeError("resize failed")

    monkeypatch.setattr(Preprocess, "__call__", boom)
    got = load_image(Unit(key, 0, str(path)), pre)
    assert isinstance(got, Exception) and "resize failed" in str(got) and str(path) in str(got)


def _rsna(root: Path, ids: list[str]) -> Path:
    rows = [[pid, "", "", "", "", 0] for pid in ids] + [["bad-target", "", "", "", "", 7]]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height", "Target"], rows)
    for i, pid in enumerate(ids):
        if "/" not in pid and not pid.startswith("."):
            write_dicom(root / "stage_2_train_images" / f"{pid}.dcm", rows=12, cols=16, seed=i)
    (root / "stage_2_train_images").mkdir(parents=True, exist_ok=True)
    return root


HOSTILE_IDS = ["../../escaped", "../../../../../../escaped", "/tmp/escaped-absolute", "..", ".hidden"]


@inputs(*(f"RSNA patientId {pid!r}" for pid in HOSTILE_IDS), "RSNA row with Target 7 (a reader's bad row)")
def test_a_hostile_dataset_id_is_that_rows_failure(tmp_path):
    good = [f"good-{i}" for i in range(6)]
    root = _rsna(tmp_path / "rsna", good + HOSTILE_IDS)
    # a DICOM where "../../escaped" points (tmp_path/escaped.dcm): only the name check can stop that row
    write_dicom(root / "stage_2_train_images" / ".." / ".." / "escaped.dcm", rows=12, cols=16)
    in_tmp = sorted(Path("/tmp").glob("escaped-absolute*"))
    before = tree(tmp_path)
    out = embed_json(f"rsna-pneumonia:{root}", tmp_path / "cache", "-t", "none", expect=1)
    assert out["failed"] == len(HOSTILE_IDS) + 1
    diff = changed(before, tree(tmp_path))
    assert only_under(diff, "cache") == set()  # written: the cache, and nothing else
    assert not list(tmp_path.rglob("escaped*.png")) and sorted(Path("/tmp").glob("escaped-absolute*")) == in_tmp
    failures = Store.open(store_of(tmp_path / "cache", "image")).failures().to_pandas()
    for pid in HOSTILE_IDS:
        assert failures.reason.str.contains(f"patientId {pid!r} is not a file name", regex=False).any(), pid
    assert failures.reason.str.contains("Target '7' is out of range").any()
    assert len(Store.open(store_of(tmp_path / "cache", "image")).manifest()) == len(good)


@inputs("SIIM ImageId '../../escaped'", "COVIDx file name '../outside.png'", "table mask column 'mask_../../x'")
def test_other_readers_and_mask_names_stay_inside_their_folders(tmp_path):
    from pipeline.datasets.mask_targets import MaskError, cache_path
    from pipeline.datasets import open_dataset

    siim = build_siim(tmp_path / "siim")
    with open(siim / "train-rle.csv", "a") as f:
        f.write("../../escaped, 1 2\n")
    ds = open_dataset(f"siim-pneumothorax:{siim}?allow_failures=1", tmp_path / "c1")
    assert any("'../../escaped' is not a file name" in s["reason"] for s in ds.skipped)
    assert not list(tmp_path.rglob("escaped*"))

    covidx = build_covidx(tmp_path / "covidx")
    write_png(tmp_path / "outside.png", seed=3)
    with open(covidx / "train.txt", "a") as f:
        f.write("999 ../outside.png normal rsna\n")
    ds = open_dataset(f"covidx:{covidx}?allow_failures=1", tmp_path / "c2")
    assert any("leads out of the image folders" in s["reason"] for s in ds.skipped)
    assert all("outside" not in str(it.image) for it in ds.items)

    with pytest.raises(MaskError, match="cannot be used as a file name"):
        cache_path(tmp_path / "c3", "pairs-0123", "../../x", 256, 224)
    assert cache_path(tmp_path / "c3", "pairs-0123", "effusion", 256, 224).is_relative_to(tmp_path / "c3" / "masks")


@inputs("a table without a report column")
def test_a_table_without_reports_stops_at_once_and_writes_nothing(tmp_path):
    data = tmp_path / "data"
    table = make_table(data, 4)
    pd.read_csv(table).drop(columns=["report"]).to_csv(table, index=False)
    before = tree(tmp_path)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(tmp_path / "cache"),
             expect=2)
    assert "-t none" in " ".join(r.output.split()) or "--text-encoder none" in r.output
    assert only_under(changed(before, tree(tmp_path)), "cache") == set()


CONFIG_MISTAKES = ["nosuchkey=1", "batch_size=0", "optim.lr=-1", "epochs=many"]


@inputs(*(f"config mistake {m}" for m in CONFIG_MISTAKES))
def test_config_mistakes_are_one_message_and_write_nothing(world, tmp_path):
    table, cache, home = world
    before = tree(tmp_path)
    r = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(tmp_path / "run"), *CONFIG_MISTAKES, expect=2)
    out = " ".join(r.output.split())
    for key in ("nosuchkey", "batch_size", "optim.lr", "epochs"):
        assert key in out, (key, out)
    assert "Traceback" not in r.output
    assert tree(tmp_path) == before and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------ the documentation's counts
def test_the_documentation_reports_these_counts():
    readme = (ROOT / "docs" / "concepts" / "reliability.md").read_text()
    section = readme[readme.index("## Hostile inputs"):]
    section = section[: section.index("\n#", 1)] if "\n#" in section[1:] else section
    assert f"{len(CASES)} hostile or bad inputs" in section, len(CASES)
    assert "files lost: 0" in section
