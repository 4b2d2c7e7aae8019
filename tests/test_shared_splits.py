"""Split files other projects publish (BenchX's lists, MGCA's CSVs), read onto our readers' items,
counted and checked; the COVIDx release a folder holds. Miniature files, built here."""
from __future__ import annotations

import pandas as pd
import pytest

from pipeline.datasets import DatasetError, open_dataset
from pipeline.datasets.readers import covidx
from pipeline.datasets.shared_splits import BENCHX_COUNTS, MGCA_COUNTS
from pipeline.datasets.splits import split_lists
from tests.helpers.layouts import (benchx_covidx_name, build_siim, mini_covidx_cxr4, mini_rsna, mini_siim_png,
                                   release_names, split_benchx_style, write_benchx, write_mgca_csv,
                                   write_mgca_detection)


def expect_counts(monkeypatch, table: dict, reader: str, counts: dict[str, int]) -> None:
    """The miniature's own line counts stand in for the published ones."""
    for stem, n in counts.items():
        monkeypatch.setitem(table[reader], stem, n)


def rsna_with_benchx(tmp_path, monkeypatch):
    root, ids = mini_rsna(tmp_path / "rsna")
    lists = split_benchx_style(ids, [int(i % 3 == 0) for i in range(len(ids))])
    counts = write_benchx(tmp_path / "BenchX" / "RSNA", **lists)
    expect_counts(monkeypatch, BENCHX_COUNTS, "rsna-pneumonia", counts)
    return root, lists


def test_benchx_rsna_lists_give_splits_and_the_label_fractions(tmp_path, monkeypatch):
    root, lists = rsna_with_benchx(tmp_path, monkeypatch)
    cache = tmp_path / "cache"
    plain = open_dataset(f"rsna-pneumonia:{root}", cache)
    ds = open_dataset(f"rsna-pneumonia:{root}?splits=benchx:{tmp_path / 'BenchX'}", cache)  # finds RSNA/ below
    assert ds.name != plain.name and ds.split_source == f"benchx:{tmp_path / 'BenchX'}"
    by_split = {s: sorted(it.id for it in ds if it.split == s) for s in ("train", "valid", "test")}
    assert by_split == {"train": sorted(lists["train"]), "valid": sorted(lists["val"]), "test": sorted(lists["test"])}
    assert ds.fractions == {0.01: sorted(lists["train_1"]), 0.1: sorted(lists["train_10"])}
    assert ds.version == "RSNA Pneumonia stage 2 labels"
    # `pipe data splits --write` writes the published subsets, not a draw of ours
    written = split_lists(ds)
    assert written["train_1pct"] == sorted(lists["train_1"]) and written["train_10pct"] == sorted(lists["train_10"])


def test_a_count_that_is_not_the_published_one_names_file_expected_and_found(tmp_path):
    root, ids = mini_rsna(tmp_path / "rsna")
    write_benchx(tmp_path / "RSNA", **split_benchx_style(ids, [int(i % 3 == 0) for i in range(len(ids))]))
    with pytest.raises(DatasetError, match=r"RSNA/train\.txt: expected 18,678 entries \(benchx's "
                                           r"rsna-pneumonia train list, published\), found 24\."):
        open_dataset(f"rsna-pneumonia:{root}?splits=benchx:{tmp_path / 'RSNA'}", tmp_path / "cache")


def test_a_name_that_is_not_an_item_is_named_with_the_counts(tmp_path, monkeypatch):
    root, lists = rsna_with_benchx(tmp_path, monkeypatch)
    test = tmp_path / "BenchX" / "RSNA" / "test.txt"
    test.write_text(test.read_text().replace(lists["test"][3], "not-a-patient"))
    with pytest.raises(DatasetError, match=r"test\.txt: expected all 8 entries to be items of the dataset "
                                           r"\(40 items\), found 7; e.g. 'not-a-patient' is not one"):
        open_dataset(f"rsna-pneumonia:{root}?splits=benchx:{tmp_path / 'BenchX'}", tmp_path / "cache")
    with pytest.raises(DatasetError, match="unknown split source 'gloria'"):
        open_dataset(f"rsna-pneumonia:{root}?splits=gloria:/x", tmp_path / "cache")


def test_benchx_siim_names_the_png_release(tmp_path, monkeypatch):
    root, stems = mini_siim_png(tmp_path / "siim-png" / "siim-acr-pneumothorax")
    train = [s for s in stems if "_train_" in s]
    lists = {"train": train[:24], "val": train[24:], "test": [s for s in stems if "_test_" in s],
             "train_1": [train[0], train[1]], "train_10": train[:4]}
    expect_counts(monkeypatch, BENCHX_COUNTS, "siim-pneumothorax", write_benchx(tmp_path / "BenchX" / "SIIM", **lists))
    ds = open_dataset(f"siim-pneumothorax:{tmp_path / 'siim-png'}?splits=benchx:{tmp_path / 'BenchX'}",
                      tmp_path / "cache")
    assert ds.version.startswith("SIIM-ACR stage 1, PNG release")
    assert sorted(it.id for it in ds if it.split == "test") == sorted(lists["test"])
    assert {it.id: it.labels["pneumothorax"] for it in ds}["0_train_1_"] == 1.0
    # the DICOM release has other names: the message says which release the lists fit
    dicom = build_siim(tmp_path / "siim-dicom", extra=4)
    with pytest.raises(DatasetError, match=r"found 0; e\.g\. '0_train_1_' is not one\. The names fit the PNG release"):
        open_dataset(f"siim-pneumothorax:{dicom}?splits=benchx:{tmp_path / 'BenchX'}", tmp_path / "cache")


def test_benchx_covidx_shared_names_and_the_line_pandas_ate(tmp_path, monkeypatch, capsys):
    root = mini_covidx_cxr4(tmp_path / "covidx")
    names = {s: release_names(root, s) for s in ("train", "val", "test")}
    # BenchX read each release file with a header: its first line is in none of the lists
    listed = {s: [benchx_covidx_name(s, n) for n in names[s][1:]] for s in names}
    lists = {"train": listed["train"], "val": listed["val"], "test": listed["test"],
             "train_1": listed["train"][:2], "train_10": listed["train"][:5]}
    expect_counts(monkeypatch, BENCHX_COUNTS, "covidx", write_benchx(tmp_path / "COVIDx", **lists))
    monkeypatch.setitem(covidx.RELEASES, "CXR-4", (40, 10, 10))
    ds = open_dataset(f"covidx:{root}?splits=benchx:{tmp_path / 'COVIDx'}", tmp_path / "cache")
    assert ds.version == "COVIDx CXR-4 (from the split files' line counts 40 / 10 / 10)"
    by_id = {it.id: it.split for it in ds}
    assert by_id[names["train"][0]] is None and by_id[names["val"][0]] is None  # the first lines
    assert sum(s == "train" for s in by_id.values()) == 39
    # DX.train.4.png, DX.train.9.png, ... are all "train/DX.png" to BenchX: each entry takes one of them
    assert {i for i, s in by_id.items() if i.startswith("DX.train") and s == "train"} == \
        {n for n in names["train"] if n.startswith("DX.")}
    out = capsys.readouterr().err
    assert "3 item(s) of the dataset are in none of benchx's lists" in out and "first dot" in out


def test_covidx_release_from_file_names_counts_or_stated(tmp_path):
    root = mini_covidx_cxr4(tmp_path / "c")
    assert open_dataset(f"covidx:{root}", tmp_path / "cache").version is None  # counts of no known release
    assert open_dataset(f"covidx:{root}?version=CXR-4", tmp_path / "cache").version == "COVIDx CXR-4 (stated)"
    for s in ("train", "test"):
        (root / f"{s}.txt").rename(root / f"{s}_COVIDx5.txt")
    (root / "val.txt").unlink()
    assert open_dataset(f"covidx:{root}", tmp_path / "cache").version == \
        "COVIDx v5 (from the file name train_COVIDx5.txt)"
    with pytest.raises(DatasetError, match=r"version=CXR-4 was stated, but the folder holds COVIDx v5"):
        open_dataset(f"covidx:{root}?version=CXR-4", tmp_path / "cache")


def test_mgca_csvs_and_its_pandas_draw_of_the_fractions(tmp_path, monkeypatch):
    root, ids = mini_rsna(tmp_path / "rsna")
    parts = {"train.csv": ids[:24], "val.csv": ids[24:32], "test.csv": ids[32:]}
    for name, values in parts.items():  # in the dataset folder, where MGCA's preprocess/rsna.py writes them
        write_mgca_csv(root / name, "patientId", values, {"bbox": ["[]"] * len(values), "Target": [0] * len(values)})
    with pytest.raises(DatasetError, match=r"train\.csv: expected 18,678 entries \(mgca's rsna-pneumonia train "
                                           r"list, as its preprocess/rsna\.py splits the 26,684 patients\), found 24"):
        open_dataset(f"rsna-pneumonia:{root}?splits=mgca", tmp_path / "cache")
    expect_counts(monkeypatch, MGCA_COUNTS, "rsna-pneumonia", {"train": 24, "val": 8, "test": 8})
    ds = open_dataset(f"rsna-pneumonia:{root}?splits=mgca", tmp_path / "cache")
    assert sorted(it.id for it in ds if it.split == "valid") == sorted(parts["val.csv"])
    train = pd.read_csv(root / "train.csv")
    for f in (0.01, 0.1):  # what MGCA's RSNAImageDataset draws: df.sample(frac=f, random_state=42)
        assert ds.fractions[f] == sorted(train.sample(frac=f, random_state=42)["patientId"])


def test_mgca_siim_rows_in_two_files_keep_the_later_split(tmp_path, capsys):
    root = build_siim(tmp_path / "siim", extra=12)
    image_ids = [line.split(",")[0] for line in (root / "train-rle.csv").read_text().splitlines()[1:]]
    distinct = list(dict.fromkeys(image_ids))
    write_mgca_csv(root / "train.csv", "ImageId", distinct[:10] + [distinct[1]])   # a region row of image 1 ...
    write_mgca_csv(root / "valid.csv", "ImageId", distinct[10:12] + [distinct[1]])  # ... and another one here
    write_mgca_csv(root / "test.csv", "ImageId", distinct[12:])
    ds = open_dataset(f"siim-pneumothorax:{root}?splits=mgca:{root}", tmp_path / "cache")
    assert {it.id: it.split for it in ds}[distinct[1]] == "valid" and not ds.fractions
    assert "1 item(s) are in two of the split files" in capsys.readouterr().err


def test_mgca_detection_split_for_rsna_segmentation_and_a_pickle_that_would_run_code(tmp_path, monkeypatch):
    """``splits=mgca-detection`` reads MGCA's detection pickles (the split its RSNA segmentation
    uses, not its classification CSVs), counted against its code's 16,010 / 5,337 / 5,337; only
    numpy arrays are unpickled, so a file naming anything else is refused, not run."""
    import os
    import pickle

    root, ids = mini_rsna(tmp_path / "rsna")
    parts = {"train.pkl": ids[:20], "val.pkl": ids[20:30], "test.pkl": ids[30:]}
    write_mgca_detection(root, parts)
    with pytest.raises(DatasetError, match=r"train\.pkl: expected 16,010 entries"):
        open_dataset(f"rsna-pneumonia:{root}?splits=mgca-detection", tmp_path / "cache")
    expect_counts(monkeypatch, MGCA_COUNTS, "rsna-detection", {"train": 20, "val": 10, "test": 10})
    ds = open_dataset(f"rsna-pneumonia:{root}?splits=mgca-detection", tmp_path / "cache")
    assert sorted(it.id for it in ds if it.split == "test") == sorted(parts["test.pkl"])
    assert sorted(it.id for it in ds if it.split == "train") == sorted(parts["train.pkl"])

    class Boom:
        def __reduce__(self):
            return os.system, ("touch " + str(tmp_path / "ran"),)

    (root / "val.pkl").write_bytes(pickle.dumps([Boom(), []]))
    with pytest.raises(DatasetError, match=r"val\.pkl is not an MGCA detection file .*only numpy arrays"):
        open_dataset(f"rsna-pneumonia:{root}?splits=mgca-detection", tmp_path / "cache2")
    assert not (tmp_path / "ran").exists()
