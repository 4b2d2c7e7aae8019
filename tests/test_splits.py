"""Seeded patient-level splits, nested stratified fractions, and the ID lists with SHA-256."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections import Counter

import pytest

from pipeline.datasets import Dataset, Item, open_dataset
from pipeline.datasets.splits import (fraction_name, hash_split, manifest_of, nested_fractions,
                                      patients_in_several_splits, read_list, split_lists, verify_lists, write_lists)
from tests.helpers import pipe
from tests.helpers.layouts import build_covidx, build_rsna


def _labelled(n: int, positive_every: int = 5) -> tuple[list[str], list[float]]:
    ids = [f"img{i:05d}" for i in range(n)]
    return ids, [1.0 if i % positive_every == 0 else 0.0 for i in range(n)]


def test_fractions_are_nested_sized_and_stratified():
    ids, labels = _labelled(2000)
    out = nested_fractions(ids, labels, (0.01, 0.1, 1.0), seed=0)
    one, ten, full = (set(out[f]) for f in (0.01, 0.1, 1.0))
    assert one < ten < full and full == set(ids)
    assert len(out[0.01]) == 20 and len(out[0.1]) == 200
    pos = {i for i, y in zip(ids, labels) if y == 1.0}
    assert len(one & pos) == 4 and len(ten & pos) == 40  # 20% positives, kept exactly
    assert out[0.1] == sorted(out[0.1])


def test_fractions_are_deterministic_and_seeded():
    ids, labels = _labelled(500, positive_every=3)
    a = nested_fractions(ids, labels, seed=0)
    order = list(range(len(ids)))
    random.Random(1).shuffle(order)
    b = nested_fractions([ids[i] for i in order], [labels[i] for i in order], seed=0)
    assert a == b  # independent of the input order
    assert nested_fractions(ids, labels, seed=1)[0.1] != a[0.1]
    # Without labels: one stratum, still nested.
    plain = nested_fractions(ids, None, (0.1, 0.02), seed=3)
    assert set(plain[0.02]) < set(plain[0.1]) and len(plain[0.1]) == 50
    assert len(nested_fractions(ids[:20], None, (0.01,))[0.01]) == 1  # never empty


def test_rare_class_kept_and_nan_is_a_stratum():
    ids = [f"x{i}" for i in range(600)]
    labels = [2.0 if i < 3 else (float("nan") if i < 60 else i % 2) for i in range(600)]
    out = nested_fractions(ids, labels, (0.01, 0.1), seed=0)
    by_id = dict(zip(ids, labels))
    assert len(out[0.01]) == 6
    assert sum(by_id[i] == 2.0 for i in out[0.01]) == 1  # the 1% draw still holds the rare class
    assert sum(by_id[i] != by_id[i] for i in out[0.01]) == 1  # and one of the unknowns
    assert set(out[0.01]) <= set(out[0.1])
    with pytest.raises(ValueError, match="unique"):
        nested_fractions(["a", "a"], None)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        nested_fractions(["a"], None, (0.0,))


def test_fraction_names():
    assert [fraction_name(f) for f in (0.01, 0.1, 0.005)] == ["train_1pct", "train_10pct", "train_0.5pct"]


def _items(n_patients: int, per_patient: int = 3, seed: int = 0) -> list[Item]:
    props = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
    out = []
    for p in range(n_patients):
        split = hash_split(f"patient{p}", props, seed)
        for k in range(per_patient):
            out.append(Item(id=f"p{p}-{k}", image=f"/x/{p}-{k}.png", patient_id=f"patient{p}", split=split,
                            labels={"y": float((p + k) % 4 == 0)}))
    return out


def test_hash_split_is_patient_level_and_proportional():
    items = _items(3000)
    ds = Dataset(name="t", spec="t", items=items)
    assert not patients_in_several_splits(ds)
    counts = Counter(it.split for it in items[::3])
    assert abs(counts["train"] / 3000 - 0.7) < 0.03 and abs(counts["test"] / 3000 - 0.2) < 0.03
    # A patient's split does not depend on who else is in the dataset.
    assert all(hash_split(it.patient_id, (("train", .7), ("valid", .1), ("test", .2))) == it.split
               for it in items[:30])
    leaky = Dataset(name="t", spec="t", items=[*items, Item(id="extra", image="/x", patient_id="patient0",
                                                            split="valid" if items[0].split != "valid" else "test")])
    assert set(patients_in_several_splits(leaky)) == {"patient0"}


def test_lists_verify_and_detect_changes(tmp_path):
    ds = Dataset(name="t", spec="t", items=_items(400), stratify_by="y")
    lists = split_lists(ds)
    assert set(lists) == {"train", "valid", "test", "train_1pct", "train_10pct"}
    assert set(lists["train_1pct"]) <= set(lists["train_10pct"]) <= set(lists["train"])
    manifest = write_lists(tmp_path, lists)
    for name, ids in lists.items():
        path = tmp_path / f"{name}.txt"
        assert read_list(path) == sorted(ids)
        assert manifest[f"{name}.txt"] == {"count": len(ids), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert verify_lists(tmp_path, lists) == []
    # A list edited by hand: its checksum no longer matches the manifest.
    valid = tmp_path / "valid.txt"
    valid.write_text("".join(f"{i}\n" for i in lists["valid"][1:]))
    problems = verify_lists(tmp_path, lists)
    assert len(problems) == 1 and problems[0].startswith("valid: ") and "changed after its manifest" in problems[0]
    n = len(lists["valid"])
    assert f"file has {n - 1} ids" in problems[0] and f"manifest says {n} ids" in problems[0]
    write_lists(tmp_path, lists)
    # The dataset changed: a test item is gone.
    smaller = Dataset(name="t", spec="t", items=[it for it in ds.items if it.id != lists["test"][0]],
                      stratify_by="y")
    problems = verify_lists(tmp_path, split_lists(smaller))
    n = len(lists["test"])
    assert problems == [f"test: the dataset has {n - 1} ids, the list has {n} (0 not in the list, 1 missing "
                        f"from the dataset; e.g. {lists['test'][0]!r})"]
    assert "does not exist" in verify_lists(tmp_path / "nowhere", lists)[0]
    assert manifest_of(lists) == manifest


def test_cli_write_then_verify_real_reader(tmp_path):
    root = build_rsna(tmp_path / "rsna", n_negative=300)
    cache = tmp_path / "cache"
    spec = f"rsna-pneumonia:{root}"
    pipe("data", "splits", spec, "--write", "--cache", str(cache))
    name = open_dataset(spec, cache, materialise=False).name
    folder = cache / "splits" / name
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest) == {"train.txt", "valid.txt", "test.txt", "train_1pct.txt", "train_10pct.txt"}
    assert sum(manifest[f"{s}.txt"]["count"] for s in ("train", "valid", "test")) == 303
    assert json.loads((folder / "about.json").read_text())["stratified_by"] == "pneumonia"
    r = pipe("data", "splits", spec, "--verify", "--cache", str(cache), "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["problems"] == []
    # Someone shares their lists: verify against a copy, then against a tampered copy.
    shared = tmp_path / "shared"
    shutil.copytree(folder, shared)
    pipe("data", "splits", spec, "--verify", "--lists", str(shared), "--cache", str(cache))
    train = shared / "train.txt"
    train.write_text(train.read_text() + "not-an-id\n")
    bad = pipe("data", "splits", spec, "--verify", "--lists", str(shared), "--cache", str(cache), expect=1)
    assert "train: " in bad.output and "changed after its manifest" in bad.output
    # The data changed: an image was removed (and skipped with --allow-failures).
    victim = read_list(folder / "test.txt")[0]
    (root / "stage_2_train_images" / f"{victim}.dcm").unlink()
    bad = pipe("data", "splits", spec, "--verify", "--allow-failures", "--cache", str(cache), expect=1)
    count = manifest["test.txt"]["count"]
    assert f"test: the dataset has {count - 1} ids, the list has {count}" in bad.output
    pipe("data", "splits", spec, "--verify", "--seed", "5", "--cache", str(cache), "--allow-failures", expect=1)


def test_cli_lists_of_official_splits(tmp_path):
    root = build_covidx(tmp_path / "covidx", with_val=True, n_train=120)
    r = pipe("data", "splits", f"covidx:{root}", "--cache", str(tmp_path / "c"), "--json")
    lists = json.loads(r.stdout.strip().splitlines()[-1])["lists"]
    assert lists["valid.txt"]["count"] == 1 and lists["test.txt"]["count"] == 3
    assert lists["train.txt"]["count"] == 120 and lists["train_10pct.txt"]["count"] == 12
    bad = pipe("data", "splits", f"covidx:{root}", "--write", "--verify", expect=2)
    assert "not both" in bad.output
