"""A trained Adaptor outside the cache: the Python API, `pipe predict` and `pipe export`.

One small phantom demo (tiny test encoders) is embedded once, a pooled and a tokens-mode
Adaptor are trained on it, and the pooled one is evaluated (zero-shot, classification with
its heads saved), laid out as `pipe demo` lays out demo-out/.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.helpers import SMALL, SMALL_HEADS, fenced_block, pipe
from tests.helpers.files import dicom_bytes

ROOT = Path(__file__).resolve().parents[1]
SPEC = "demo?n=100&size=64"
TWO_EPOCHS = [*SMALL, "batch_size=16", "epochs=2"]
FAST_HEADS = ["--fraction", "1.0", "--seeds", "1", *SMALL_HEADS, "bootstrap=50"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    cache, out = root / "cache", root / "demo-out"
    pipe("embed", "-d", SPEC, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache), "--device", "cpu")
    runs = {}
    for mode in ("pooled", "tokens"):
        runs[mode] = out / f"adaptor-{mode}"
        pipe("train-adaptor", "-d", SPEC, "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(runs[mode]), "--device", "cpu", *TWO_EPOCHS, f"adaptor.mode={mode}", "adaptor.grid_pool=4")
    for task, extra in (("zero-shot", ["bootstrap=50"]), ("classification", FAST_HEADS)):
        pipe("evaluate", "--task", task, "-d", SPEC, "-a", str(runs["pooled"]), "--cache", str(cache),
             "--out", str(out / f"{task}-pooled"), "--device", "cpu", *extra)
    from pipeline.datasets import open_dataset

    items = open_dataset(SPEC, cache).items
    return {"root": root, "cache": cache, "out": out, "runs": runs, "items": items,
            "test": [it for it in items if it.split == "test"]}


@pytest.fixture
def in_cache(world, monkeypatch):
    monkeypatch.setenv("PIPE_CACHE", str(world["cache"]))
    monkeypatch.setenv("PIPE_NO_PROGRESS", "1")
    return world


def load(path, **kw):
    from pipeline.api import load_adaptor

    return load_adaptor(path, device="cpu", **kw)


def cached_rows(world, items):
    """The items' cached image and report rows, through stage one's index."""
    from cache.pairs import load_pairs
    from pipeline.datasets import open_dataset

    name = open_dataset(SPEC, world["cache"], materialise=False).name
    data = load_pairs(world["cache"], name, SPEC, "tiny-vit", "tiny-bert")
    pos = [list(data.items.id).index(it.id) for it in items]
    return data, data.image_rows[pos, 0], data.text_rows[pos]


# ---------------------------------------------------------------------- the API equals the cache
@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_an_image_encoded_through_the_api_equals_its_cached_row(world, mode):
    """Stage one's preprocessing and arithmetic: a new image through the frozen encoder and the
    Adaptor gives what its cached row gives through the same Adaptor (to fp16 rounding)."""
    from stages.evaluate.features import FrozenAdaptor

    model, items = load(world["runs"][mode]), world["items"][:40]
    data, img_rows, txt_rows = cached_rows(world, items)
    frozen = FrozenAdaptor.load(world["runs"][mode], torch.device("cpu"), world["cache"])
    api = model.encode_images([it.image for it in items], batch_size=7)  # batches unlike stage one's
    np.testing.assert_allclose(api, frozen.image_embeddings(data.image, img_rows), atol=2e-3)
    texts = model.encode_texts([it.report for it in items], batch_size=5)
    np.testing.assert_allclose(texts, frozen.text_embeddings(data.text, txt_rows), atol=2e-3)
    assert api.shape == (40, model.dim) and np.allclose(np.linalg.norm(api, axis=1), 1, atol=1e-5)


def test_paths_bytes_arrays_pil_and_dicom_are_the_same_image(world, tmp_path):
    from pipeline.api.encode import decode_input, image_label
    from pipeline.imaging import ImageDecodeError

    model = load(world["runs"]["pooled"])
    path = world["test"][0].image
    arr = np.asarray(Image.open(path))
    inputs = [path, Path(path).read_bytes(), arr, Image.open(path), torch.from_numpy(arr.copy())]
    decoded = [decode_input(x, image_label(x, i)) for i, x in enumerate(inputs)]
    assert all(np.array_equal(decoded[0], d) for d in decoded[1:])  # the same pixels, whatever the input
    same = model.encode_images(inputs)
    np.testing.assert_allclose(same[1:], np.repeat(same[:1], 4, 0), atol=1e-6)  # rows of one batch round apart
    dcm = tmp_path / "study.dcm"
    dcm.write_bytes(dicom_bytes(arr.astype(np.uint16) * 16))
    # both stretched min..max, as 16-bit data is: the same pixels
    assert np.array_equal(decode_input(dcm, "dcm"), decode_input(arr.astype(np.uint16), "array"))
    grey16 = model.encode_images([dcm, arr.astype(np.uint16)])
    np.testing.assert_allclose(grey16[0], grey16[1], atol=1e-6)
    with pytest.raises(ImageDecodeError, match="float array must hold grey values"):
        from pipeline.imaging import decode_array
        decode_array(arr.astype(np.float32))


def test_an_unreadable_image_is_named_or_left_as_nan(world, tmp_path):
    from pipeline.api import ImageInputError

    model = load(world["runs"]["pooled"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    images = [world["test"][0].image, bad, tmp_path / "missing.png"]
    with pytest.raises(ImageInputError, match=r"2 of 3 images could not be read: .*bad.png.*not a recognised"):
        model.encode_images(images)
    emb = model.encode_images(images, on_error="nan")
    assert np.isfinite(emb[0]).all() and np.isnan(emb[1:]).all()


def test_similarity_zero_shot_and_a_report_bank(in_cache):
    world = in_cache
    model = load(world["runs"]["pooled"])
    img = model.encode_images([it.image for it in world["test"]])
    own = model.encode_texts([it.report for it in world["test"]])
    sim = model.similarity(img, own)
    assert sim.shape == (len(img), len(img)) and np.allclose(np.diag(model.similarity(own, own)), 1)
    zs = model.zero_shot(img)
    assert zs.findings == ["cardiomegaly", "effusion", "consolidation", "pneumothorax", "nodule"]
    assert zs.probabilities.shape == zs.scores.shape == (len(img), 5)
    assert np.array_equal(np.argsort(zs.scores[:, 1]), np.argsort(zs.probabilities[:, 1]))  # same ranking
    cached = model.report_bank(SPEC, split="train")
    table = world["root"] / "bank.csv"
    import pandas as pd
    pd.DataFrame({"id": [it.id for it in world["items"] if it.split == "train"],
                  "report": [it.report for it in world["items"] if it.split == "train"]}).to_csv(table, index=False)
    encoded = model.report_bank(table)  # the same reports, through the text encoder
    assert cached.ids == encoded.ids and len(cached) > 20
    np.testing.assert_allclose(cached.embeddings, encoded.embeddings, atol=2e-3)
    hits = cached.search(img[:3], k=4)
    assert [len(h) for h in hits] == [4, 4, 4] and hits[0][0].rank == 1
    assert hits[0][0].similarity >= hits[0][1].similarity
    assert hits[0][0].similarity == pytest.approx(float(img[0].astype(np.float64) @ cached.embeddings[
        cached.ids.index(hits[0][0].id)].astype(np.float64)))


# ---------------------------------------------------------------------------------- pipe predict
def predict_json(*args, expect=0) -> dict:
    r = pipe("predict", *map(str, args), "--json", "--device", "cpu", expect=expect)
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_pipe_predict_zero_shot_gives_the_auroc_of_pipe_evaluate(world):
    """On the demo's test images, `pipe predict`'s zero-shot scores rank as `pipe evaluate
    --task zero-shot` ranks the cached rows: the same AUROC per finding."""
    from stages.evaluate.metrics import auroc

    test = world["test"]
    got = predict_json(*[it.image for it in test], "--adaptor", world["runs"]["pooled"], "--cache", world["cache"])
    assert got["failed"] == 0 and [r["image"] for r in got["images"]] == [str(it.image) for it in test]
    evaluated = json.loads((world["out"] / "zero-shot-pooled" / "results.json").read_text())
    adaptor = next(m for m in evaluated["methods"] if m["features"] == "adaptor")
    compared = 0
    for f in got["findings"]:
        y = np.array([it.labels[f] for it in test], np.float64)
        ours = auroc(y, np.array([r["zero_shot"][f]["score"] for r in got["images"]]))
        theirs = adaptor["auroc"][f]
        if theirs is None:
            assert not np.isfinite(ours)
            continue
        assert ours == pytest.approx(theirs, abs=1e-9), f
        compared += 1
    assert compared >= 3


def test_pipe_predict_applies_a_head_and_a_bank_and_lists_failures(world, tmp_path):
    test, heads = world["test"][:4], world["out"] / "classification-pooled"
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    args = [test[0].image, bad, test[1].image, tmp_path / "missing.png", "--adaptor", world["runs"]["pooled"],
            "--head", heads, "--bank", SPEC, "--bank-split", "train", "-k", "2", "--cache", world["cache"]]
    got = predict_json(*args, expect=1)
    ok, failed = [r for r in got["images"] if not r["error"]], [r for r in got["images"] if r["error"]]
    assert [r["image"] for r in ok] == [str(test[0].image), str(test[1].image)] and got["failed"] == 2
    assert "corrupt.png" in failed[0]["error"] and "file not found" in failed[1]["error"]
    assert got["head"] == "adaptor-mlp" and set(ok[0]["head"]) >= {"effusion", "nodule"}
    assert [h["rank"] for h in ok[0]["reports"]] == [1, 2] and ok[0]["reports"][0]["report"]
    # the head is the one `pipe evaluate` scored the test split with
    saved = np.load(heads / "predictions.npz")
    ids = list(saved["ids"])
    for r, it in zip(ok, test[:2]):
        row = saved["m0/mlp/100%/seed0"][ids.index(it.id)]
        np.testing.assert_allclose([r["head"][n] for n in saved["label_names"]], row, atol=1e-4)
    r = pipe("predict", *map(str, args), "--allow-failures")
    assert "nearest reports" in r.stdout and "adaptor-mlp" in r.stdout and "corrupt.png" in r.output


def test_evaluate_saves_the_heads_it_trained_on_the_adaptor(world):
    from pipeline.models.heads import load_head

    run = world["out"] / "classification-pooled"
    res = json.loads((run / "results.json").read_text())
    assert res["data"]["heads"] == ["heads/adaptor-mlp.safetensors"]
    module, meta = load_head(run / res["data"]["heads"][0])
    assert meta["features"] == "adaptor" and meta["fraction"] == 1.0 and meta["seed"] == 0
    assert meta["adaptor_weights"] == load(world["runs"]["pooled"]).weights_hash and not module.training


# ---------------------------------------------------------------------------------- pipe export
def test_export_then_load_is_bit_identical_without_the_cache(world, tmp_path, monkeypatch):
    pkg = tmp_path / "exported"
    r = pipe("export", str(world["runs"]["pooled"]), "--out", str(pkg), "--heads",
             str(world["out"] / "classification-pooled"), "--cache", str(world["cache"]), "--json")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["files"]) == {"config.json", "model.safetensors", "README.md", "prompts.yaml",
                                     "heads/adaptor-mlp.safetensors"}
    run = load(world["runs"]["pooled"])
    images, texts = [it.image for it in world["test"]], [it.report for it in world["test"]]
    a_img, a_txt = run.encode_images(images), run.encode_texts(texts)
    monkeypatch.setenv("PIPE_CACHE", str(tmp_path / "no-cache-here"))
    shutil.move(str(world["runs"]["pooled"]), str(tmp_path / "moved-away"))  # the run is not needed either
    try:
        package = load(pkg)
        assert np.array_equal(package.encode_images(images), a_img)
        assert np.array_equal(package.encode_texts(texts), a_txt)
        assert package.weights_hash == run.weights_hash and package.source.kind == "package"
        assert np.array_equal(package.zero_shot(a_img).scores, run.zero_shot(a_img).scores)
        heads = world["out"] / "classification-pooled"
        assert np.array_equal(package.classify(a_img, "adaptor-mlp").probabilities,
                              run.classify(a_img, heads).probabilities)
        got = predict_json(images[0], "--adaptor", pkg, "--head", "adaptor-mlp")
        assert got["failed"] == 0 and "effusion" in got["images"][0]["head"]
    finally:
        shutil.move(str(tmp_path / "moved-away"), str(world["runs"]["pooled"]))
    assert not (tmp_path / "no-cache-here").exists()


def test_evaluate_reads_an_exported_package_as_it_reads_the_run(world, tmp_path):
    pkg = tmp_path / "pkg"
    pipe("export", str(world["runs"]["pooled"]), "--out", str(pkg), "--cache", str(world["cache"]))
    results = {}
    for name, adaptor in (("run", world["runs"]["pooled"]), ("package", pkg)):
        out = tmp_path / name
        pipe("evaluate", "--task", "zero-shot", "-d", SPEC, "-a", str(adaptor), "--cache", str(world["cache"]),
             "--out", str(out), "--device", "cpu", "bootstrap=50")
        results[name] = json.loads((out / "results.json").read_text())
    a, b = (results[k]["methods"][0] for k in ("run", "package"))
    assert a["auroc"] == b["auroc"] and a["ci"] == b["ci"] and a["auroc"]
    assert results["package"]["checkpoint"]["fingerprints"] == results["run"]["checkpoint"]["fingerprints"]
    assert results["package"]["checkpoint"]["trained_on"] == SPEC
    (pkg / "model.safetensors").write_bytes(b"not weights")
    bad = pipe("evaluate", "--task", "zero-shot", "-d", SPEC, "-a", str(pkg), "--cache", str(world["cache"]),
               "--out", str(tmp_path / "bad"), "--device", "cpu", expect=None)
    assert bad.exit_code != 0 and "model.safetensors" in bad.output


def test_the_model_card_names_encoders_data_results_and_use(world, tmp_path):
    pkg = tmp_path / "card"
    pipe("export", str(world["runs"]["pooled"]), "--out", str(pkg), "--cache", str(world["cache"]),
         "--license", "cc-by-nc-4.0")
    card = (pkg / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    config = json.loads((pkg / "config.json").read_text())
    assert front["license"] == "cc-by-nc-4.0" and front["library_name"] == "freeze-pipe"
    for m, name in (("image", "tiny-vit"), ("text", "tiny-bert")):
        assert front["encoders"][m]["name"] == name
        assert front["encoders"][m]["fingerprint"] == config["encoders"][m]["fingerprint"] == \
            load(world["runs"]["pooled"]).fingerprints[m]
    assert front["training_data"]["dataset"] == SPEC and front["training_data"]["train_split"] == "train"
    assert set(front["training_data"]["items"]) == {"train", "valid", "test"}
    assert "zero-shot · AUROC on the test split" in card and "classification · macro AUROC" in card
    assert re.search(r"\| Adaptor \(pooled\) tiny-vit \+ tiny-bert \| .*\[", card)  # figures with their CIs
    assert "Not for clinical use" in card and "hf upload" in card and "## Limitations" in card
    index = front["model-index"][0]
    assert index["name"].startswith("Adaptor (pooled)")
    by_task = {r["task"]["name"]: r for r in index["results"]}
    assert set(by_task) == {"zero-shot", "classification"}
    assert by_task["zero-shot"]["task"]["type"] == "zero-shot-image-classification"
    zs = json.loads((world["out"] / "zero-shot-pooled" / "results.json").read_text())
    adaptor_row = next(r for t in zs["tables"] for r in t["rows"] if r["method"].startswith("Adaptor"))
    first = next(c for c in adaptor_row["cells"].values() if c != "n/a")           # n/a cells are left out
    assert by_task["zero-shot"]["metrics"][0]["value"] == float(first.split()[0])   # the cell's own figure
    assert all(m["value"] == m["value"] and m["type"] for r in index["results"] for m in r["metrics"])
    assert config["training"]["checkpoint"] == "best.safetensors" and "cache" not in config["training"]["config"]


def test_export_replaces_only_an_earlier_export(world, tmp_path):
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    r = pipe("export", str(world["runs"]["pooled"]), "--out", str(mine), expect=2)
    assert "is not a package written by `pipe export`" in r.output and (mine / "thesis.tex").read_text() == "keep me"
    pkg = tmp_path / "pkg"
    pipe("export", str(world["runs"]["pooled"]), "--out", str(pkg))
    pipe("export", str(world["runs"]["tokens"]), "--out", str(pkg))  # an earlier export is replaced whole
    assert json.loads((pkg / "config.json").read_text())["mode"] == "tokens"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "pkg"]  # no temporary folder left
    r = pipe("export", str(world["runs"]["pooled"]), "--out", str(tmp_path / "x"), "--heads",
             str(world["runs"]["tokens"]), expect=2)
    assert "has no heads/ folder" in r.output


def test_a_package_for_other_encoder_weights_is_refused(world, tmp_path):
    from pipeline.api import EncoderMismatchError

    pkg = tmp_path / "pkg"
    pipe("export", str(world["runs"]["pooled"]), "--out", str(pkg))
    config = json.loads((pkg / "config.json").read_text())
    real = config["encoders"]["image"]["fingerprint"]
    config["encoders"]["image"]["fingerprint"] = "0" * 32
    config["encoders"]["image"]["spec"]["weights"] = "hf:facebook/dinov2-small@0000"
    (pkg / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderMismatchError) as e:
        load(pkg)
    msg = str(e.value)
    assert "image encoder 'tiny-vit'" in msg and "0" * 32 in msg and real in msg and "weights" in msg
    r = pipe("predict", str(world["test"][0].image), "--adaptor", str(pkg), expect=2)
    assert r.output.count("error:") == 1 and real in r.output.replace("\n", "")
    with pytest.raises(EncoderMismatchError, match="random-dinov2-s"):  # another encoder named for the same slot
        load(world["runs"]["pooled"], image_encoder="random-dinov2-s")


# ------------------------------------------------------------------------------ the documented example
def test_the_readme_example_and_commands_run(world, tmp_path, monkeypatch, capsys):
    """The documentation's "Using a trained Adaptor" page as written, on the small demo: the Python
    example, then its commands (only the dataset spec is swapped for the small demo's)."""
    example = fenced_block("python", "load_adaptor(")  # found by content, wherever the section moves
    commands = fenced_block("bash", "--bank demo")
    work = tmp_path / "work"
    shutil.copytree(world["out"], work / "demo-out")
    monkeypatch.chdir(work)
    monkeypatch.setenv("PIPE_CACHE", str(world["cache"]))
    monkeypatch.setenv("PIPE_NO_PROGRESS", "1")
    exec(compile(example.replace('"demo"', json.dumps(SPEC)), "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "effusion" in printed and "[" in printed
    shutil.copy(world["test"][0].image, work / "chest1.png")
    (work / "chest2.dcm").write_bytes(dicom_bytes(np.asarray(Image.open(world["test"][1].image)).astype(np.uint16)))
    ran = []
    for line in commands.strip().splitlines():
        line = line.split("#")[0].strip()
        if not line.startswith("pipe "):
            continue
        args = [SPEC if a == "demo" else a for a in line.split()[1:]]
        ran.append(args[0])
        pipe(*args)
    assert ran.count("predict") >= 2 and "export" in ran
    assert (work / "exported" / "adaptor-pooled" / "README.md").exists()

