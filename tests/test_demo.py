"""The built-in phantom chest X-ray demo dataset (pipeline.datasets.demo)."""
from __future__ import annotations

import os
import shutil

import hashlib
import importlib.util
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets import demo
from pipeline.datasets.demo import FINDINGS, MASKED_FINDINGS, DemoSpec, ensure_demo, generate

# Words a reader would look for to see that a finding is reported.
KEYWORDS = {
    "cardiomegaly": ("cardiomegaly", "enlarged", "enlargement"),
    "effusion": ("effusion", "pleural fluid", "costophrenic"),
    "consolidation": ("consolidation", "pneumonia", "airspace", "air space", "infiltrate"),
    "pneumothorax": ("pneumothorax",),
    "nodule": ("nodule", "nodular", "granuloma", "mass"),
}
# Words that, when a sentence uses them, assert the finding (unless negated).
STRICT = {
    "cardiomegaly": r"cardiomegaly|heart is \w* ?enlarged|enlargement of the cardiac|silhouette is \w* ?enlarged",
    "effusion": r"effusion",
    "consolidation": r"consolidation|pneumonia|air ?space|infiltrate",
    "pneumothorax": r"pneumothorax",
    "nodule": r"nodul|granuloma|\bmass",
}
NEGATION = r"\b(?:no|not|without|negative for|free of|clear of)\b"


def sentences(report: str) -> list[str]:
    body = report.replace("FINDINGS:", " ").replace("IMPRESSION:", " ")
    body = re.sub(r"\b\d\.\s", " ", body)  # "1. ", "2. " enumerations
    return [s.strip().lower() for s in re.split(r"(?<=[.;])\s+", body) if s.strip()]


def negated_before(sentence: str, pattern: str) -> bool:
    """Is a mention of ``pattern`` in ``sentence`` preceded by a negation?"""
    for m in re.finditer(pattern, sentence):
        if re.search(NEGATION, sentence[: m.start()]):
            return True
    return False


def tree_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and (p.suffix == ".png" or p.name == "pairs.csv"):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def ds200(tmp_path_factory) -> tuple[Path, pd.DataFrame]:
    root = tmp_path_factory.mktemp("d200") / "demo"
    csv = generate(root, DemoSpec(n=200, size=64, seed=3))
    return root, pd.read_csv(csv, dtype={"id": str})


@pytest.fixture(scope="module")
def ds400(tmp_path_factory) -> pd.DataFrame:
    """Reports without noise: they agree with the labels (the noisy default is tested in
    test_demo_reports.py)."""
    root = tmp_path_factory.mktemp("d400") / "demo"
    df = pd.read_csv(generate(root, DemoSpec(n=400, size=40, seed=11, noise=0)), dtype={"id": str})
    df.attrs["root"] = root
    return df


# --------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    spec = DemoSpec(n=24, size=128, seed=5)
    a = tree_hashes(generate(tmp_path / "a", spec).parent)
    b = tree_hashes(generate(tmp_path / "b", spec).parent)
    c = tree_hashes(generate(tmp_path / "c", DemoSpec(n=24, size=128, seed=6)).parent)
    assert len(a) == 1 + 24 * (1 + len(MASKED_FINDINGS))
    assert a == b
    images = [k for k in a if k.startswith("images/")]
    assert sum(a[k] != c[k] for k in images) == len(images)
    assert a["pairs.csv"] != c["pairs.csv"]


def test_threads_do_not_change_the_output(tmp_path):
    spec = DemoSpec(n=40, size=48, seed=2)
    one = tree_hashes(generate(tmp_path / "one", spec, workers=1).parent)
    two = tree_hashes(generate(tmp_path / "two", spec, workers=2).parent)
    assert one == two


# --------------------------------------------------------------------------- layout, labels, masks


def test_layout_and_columns(ds200):
    root, df = ds200
    expected = ["id", "image", "report", "patient_id", "split", *FINDINGS, "normal",
                "mask_pneumothorax", "mask_effusion"]
    assert list(df.columns) == expected
    assert len(df) == 200 and df["id"].is_unique
    assert df["id"].iloc[0] == "000000" and df["image"].iloc[123] == "images/000123.png"
    meta = json.loads((root / "demo.json").read_text())
    assert meta["format_version"] == demo.FORMAT_VERSION
    assert meta["spec"] == {"n": 200, "size": 64, "seed": 3, "reports": "synthetic", "noise": 1,
                            "omit": 0.15, "uncertain": 0.1, "spurious": 0.05}
    mentions = pd.read_csv(root / "mentions.csv", dtype={"id": str}, keep_default_na=False)
    assert list(mentions.columns) == ["id", *FINDINGS] and (mentions["id"] == df["id"]).all()
    assert set(mentions[list(FINDINGS)].stack()) <= {"", "positive", "hedged", "negated"}
    assert set(meta["report_agreement"]) >= {"mentioned", "hedged", "contradicted", "false_mention", "negated"}
    for col in (*FINDINGS, "normal"):
        assert set(df[col].unique()) <= {0, 1}
    assert (df["normal"] == (df[list(FINDINGS)].sum(axis=1) == 0)).all()
    assert df["report"].str.match(r"^FINDINGS: .+ IMPRESSION: .+").all()


def test_labels_agree_with_masks(ds200):
    root, df = ds200
    for _, row in df.iterrows():
        img = np.asarray(Image.open(root / row["image"]))
        assert img.dtype == np.uint8 and img.shape == (64, 64)
        for f in MASKED_FINDINGS:
            mask = np.asarray(Image.open(root / row[f"mask_{f}"]))
            assert mask.shape == img.shape and mask.dtype == np.uint8
            assert set(np.unique(mask)) <= {0, 255}
            assert bool(mask.any()) == bool(row[f]), (row["id"], f)


def test_render_case_masks_for_every_finding():
    rng = np.random.default_rng(0)
    for i in range(40):
        case_rng = np.random.default_rng([9, i])
        patient = demo.sample_patient(case_rng)
        findings = demo.sample_findings(case_rng)
        img, masks = demo.render_case(rng, 96, patient, findings)
        assert img.shape == (96, 96) and img.dtype == np.uint8
        assert set(masks) == set(FINDINGS)
        for f in FINDINGS:
            assert masks[f].shape == img.shape and masks[f].dtype == bool
            assert bool(masks[f].any()) == (f in findings)


# --------------------------------------------------------------------------- reports


def test_reports_agree_with_labels(ds400):
    """With noise=0 every positive is reported, nothing absent is asserted, and the
    agreement measured at generation time says so."""
    for _, row in ds400.iterrows():
        report = row["report"]
        low = report.lower()
        sents = sentences(report)
        for f in FINDINGS:
            if row[f]:
                assert any(k in low for k in KEYWORDS[f]), (f, report)
                for s in sents:
                    assert not negated_before(s, STRICT[f]), (f, s, report)
            else:
                for s in sents:
                    if re.search(STRICT[f], s):
                        assert re.search(NEGATION, s), (f, s, report)
        if row["normal"]:
            assert re.search(NEGATION + r"|normal|clear", low), report
    agreement = json.loads((ds400.attrs["root"] / "demo.json").read_text())["report_agreement"]
    for f in ("all", *FINDINGS):
        assert agreement["mentioned"][f] == 1.0 and agreement["false_mention"][f] == 0.0, f
        assert agreement["contradicted"][f] == 0.0, f
    assert agreement["positives"]["all"] == int(ds400[list(FINDINGS)].to_numpy().sum())
    assert 0.0 < agreement["hedged"]["all"] < 0.3  # subtle findings are reported with a hedge
    mentions = pd.read_csv(ds400.attrs["root"] / "mentions.csv", dtype={"id": str}, keep_default_na=False)
    for f in FINDINGS:
        said = mentions[f].isin(["positive", "hedged"])
        assert (said == (ds400[f] == 1)).all(), f


def test_report_wording_matches_laterality_and_size():
    rng = np.random.default_rng(0)
    for side in ("left", "right", "bilateral"):
        for size in ("small", "moderate", "large"):
            for _ in range(5):
                r = demo.write_report(rng, {"effusion": {"side": side, "size": size, "subtle": False}}).lower()
                assert side in r and size in r
                other = {"left", "right", "bilateral"} - {side}
                assert not any(re.search(rf"\b{o}\b", r) for o in other), r
    subtle = [demo.write_report(rng, {"effusion": {"side": "left", "size": "small", "subtle": True}})
              for _ in range(10)]
    assert all(re.search(r"possibl|may represent|suspected|probable", r.lower()) for r in subtle)


def test_reports_vary(ds400):
    normal = ds400.loc[ds400["normal"] == 1, "report"]
    assert normal.nunique() > 0.8 * len(normal)
    first = ds400["report"].str.extract(r"FINDINGS: ([^.]+\.)")[0]
    assert first.nunique() > 20  # random sentence order and many templates


# --------------------------------------------------------------------------- patients and splits


def test_splits_are_patient_disjoint(ds200):
    _, df = ds200
    assert set(df["split"]) == {"train", "valid", "test"}
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    studies = df.groupby("patient_id").size()
    assert studies.min() >= 1 and studies.max() <= 3 and (studies > 1).any()
    per_patient = df.drop_duplicates("patient_id")["split"].value_counts(normalize=True)
    assert 0.6 < per_patient["train"] < 0.8
    assert 0.05 < per_patient["valid"] < 0.15
    assert 0.12 < per_patient["test"] < 0.28


def test_prevalences(ds400):
    for f in FINDINGS:
        assert 0.05 <= ds400[f].mean() <= 0.40, f
    assert 0.25 <= ds400["normal"].mean() <= 0.45
    assert (ds400[list(FINDINGS)].sum(axis=1) >= 2).any()  # findings co-occur


# --------------------------------------------------------------------------- idempotence, atomicity


def test_ensure_demo_is_idempotent(tmp_path):
    root = tmp_path / "demo"
    spec = DemoSpec(n=12, size=48, seed=1)
    csv = ensure_demo(root, spec)
    assert csv == root / "pairs.csv" and csv.is_file()
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    assert ensure_demo(root, spec) == csv
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before
    # another spec replaces the dataset in place, leaving nothing behind
    ensure_demo(root, DemoSpec(n=8, size=48, seed=2))
    assert len(pd.read_csv(root / "pairs.csv")) == 8
    assert json.loads((root / "demo.json").read_text())["spec"]["n"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_missing_file_triggers_regeneration(tmp_path):
    root = tmp_path / "demo"
    spec = DemoSpec(n=6, size=48)
    ensure_demo(root, spec)
    (root / "masks" / "effusion" / "000003.png").unlink()
    ensure_demo(root, spec)
    assert (root / "masks" / "effusion" / "000003.png").is_file()


@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_generation_leaves_nothing(tmp_path, workers):
    root = tmp_path / "demo"

    def progress(i: int) -> None:
        if i >= 5:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        generate(root, DemoSpec(n=40, size=48), progress=progress, workers=workers)
    assert not (root / "pairs.csv").exists()
    assert not root.exists()
    assert list(tmp_path.iterdir()) == []
    # and a later call completes normally
    assert ensure_demo(root, DemoSpec(n=40, size=48)).is_file()


def test_stale_partial_output_is_cleaned_and_foreign_dirs_kept(tmp_path):
    from core.processes import process_start

    parent = os.getppid()
    stale = tmp_path / ".demo.partial-999999999-1-abc"  # no such process
    reused = tmp_path / f".demo.partial-{parent}-1-abc"  # a live pid, but another process's start time
    live = tmp_path / f".demo.partial-{parent}-{process_start(parent)}-abc"  # a generation still running
    for d in (stale, reused, live):
        (d / "images").mkdir(parents=True)
    generate(tmp_path / "demo", DemoSpec(n=4, size=48))
    assert not stale.exists() and not reused.exists() and live.exists()
    shutil.rmtree(live)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate(foreign, DemoSpec(n=4, size=48))
    assert (foreign / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- visibility


def test_findings_are_visible():
    """Each finding changes the pixels where its mask says it is, compared with the same
    study rendered without it."""
    size = 128
    diffs: dict[str, list[float]] = {f: [] for f in ("consolidation", "effusion", "pneumothorax", "nodule")}
    for i in range(50):
        f = list(diffs)[i % len(diffs)]
        prng = np.random.default_rng([77, i])
        patient = demo.sample_patient(prng)
        params = demo.sample_finding(prng, f)
        with_f, masks = demo.render_case(np.random.default_rng([78, i]), size, patient, {f: params})
        without, _ = demo.render_case(np.random.default_rng([78, i]), size, patient, {})
        m = masks[f]
        diffs[f].append(float(with_f[m].mean()) - float(without[m].mean()))
        outside = ~m
        assert abs(float(with_f[outside].mean()) - float(without[outside].mean())) < 3.0
    for f in ("consolidation", "effusion", "nodule"):
        d = np.array(diffs[f])
        assert (d > 0).mean() >= 0.9 and d.mean() > 10, (f, d)
    d = np.array(diffs["pneumothorax"])
    assert (d < 0).mean() >= 0.9 and d.mean() < -5, d


def test_cardiomegaly_enlarges_the_heart():
    for i in range(12):
        prng = np.random.default_rng([5, i])
        patient = demo.sample_patient(prng)
        big = demo.sample_finding(prng, "cardiomegaly")
        _, m_big = demo.render_case(np.random.default_rng(i), 160, patient, {"cardiomegaly": big})
        normal = {"cardiomegaly": dict(big, ctr=patient.ctr)}  # same shape at the normal ratio
        _, m_norm = demo.render_case(np.random.default_rng(i), 160, patient, normal)
        width = lambda m: np.ptp(np.where(m.any(axis=0))[0]) + 1  # noqa: E731
        assert width(m_big["cardiomegaly"]) > 1.12 * width(m_norm["cardiomegaly"])
        assert big["ctr"] > 0.5 > patient.ctr


# --------------------------------------------------------------------------- IU reports


def test_iu_reports_need_torchxrayvision(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "torchxrayvision" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ImportError) as err:
        generate(tmp_path / "demo", DemoSpec(n=4, size=48, reports="iu"))
    assert str(err.value) == (
        "demo?reports=iu needs the IU reports from the torchxrayvision package: "
        "pip install 'freeze-pipe[xrv]'"
    )
    assert list(tmp_path.iterdir()) == []


# Sentences written for this test; the archive copies the IU XML layout, not its text.
FAKE_REPORTS = [
    ("The heart size is normal. Both lungs are clear. No pneumothorax is seen. "
     "There is no pleural effusion. The bony thorax is intact.",
     "No acute cardiopulmonary disease."),
    ("Small left pleural effusion is present. The heart is mildly enlarged. "
     "No focal consolidation. No pneumothorax.",
     "Small left pleural effusion. Mild cardiomegaly."),
    ("Patchy airspace disease in the right lower lobe. No pleural effusion or pneumothorax. "
     "Heart size is within normal limits.",
     "Right lower lobe pneumonia."),
    ("There is a moderate right pneumothorax. The mediastinum is within normal limits. "
     "No focal airspace consolidation.",
     "Moderate right pneumothorax."),
    ("A nodule is seen in the left upper lobe. No pneumothorax. The trachea is midline.",
     "Left upper lobe nodule."),
    ("XXXX opacity in the right base. Lungs are clear. Large bilateral pleural effusions.",
     "Large bilateral pleural effusions."),
]


def _fake_iu_archive(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for i, (findings, impression) in enumerate(FAKE_REPORTS, start=1):
            xml = f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>
   <meta type="rr"/>
   <uId id="CXR{i}"/>
   <MedlineCitation Owner="test" Status="test">
      <Article PubModel="Electronic">
         <Abstract>
            <AbstractText Label="COMPARISON">None.</AbstractText>
            <AbstractText Label="INDICATION">Cough.</AbstractText>
            <AbstractText Label="FINDINGS">{findings}</AbstractText>
            <AbstractText Label="IMPRESSION">{impression}</AbstractText>
         </Abstract>
      </Article>
   </MedlineCitation>
   <MeSH><major>normal</major></MeSH>
</eCitation>
""".encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{i}.xml")
            info.size = len(xml)
            tar.addfile(info, io.BytesIO(xml))
    return path


def test_iu_reports_from_an_nlmcxr_archive(tmp_path, monkeypatch):
    archive = _fake_iu_archive(tmp_path / "NLMCXR_reports.tgz")
    assert demo.read_iu_reports(archive)[1] == FAKE_REPORTS[1]
    monkeypatch.setattr(demo.iu, "_iu_archive", lambda: archive)
    root = tmp_path / "demo"
    df = pd.read_csv(generate(root, DemoSpec(n=120, size=40, seed=4, reports="iu", noise=0)), dtype={"id": str})
    meta = json.loads((root / "demo.json").read_text())
    assert meta["spec"]["reports"] == "iu" and "CC BY-NC-ND" in meta["reports_license"]
    assert meta["report_agreement"]["mentioned"]["all"] == 1.0
    assert meta["report_agreement"]["false_mention"]["all"] == 0.0

    real = {s.lower() for f, i in FAKE_REPORTS for s in demo._split_sentences(f + " " + i)}
    used = [s for r in df["report"] for s in sentences(r) if s in real]
    assert len(used) > len(df)  # most reports draw on the archive
    assert not any("xxxx" in r.lower() for r in df["report"])  # de-identification gaps skipped
    assert "both lungs are clear." in used and "no acute cardiopulmonary disease." in used
    for _, row in df.iterrows():
        low = row["report"].lower()
        for f in FINDINGS:
            if row[f]:
                assert any(k in low for k in KEYWORDS[f]), (f, row["report"])
                assert not any(negated_before(s, STRICT[f]) for s in sentences(row["report"]))
            else:
                for s in sentences(row["report"]):
                    if re.search(STRICT[f], s):
                        assert re.search(NEGATION, s), (f, s, row["report"])
        # a real sentence naming a side is only used for a finding on that side
        if "small left pleural effusion." in sentences(row["report"]):
            assert row["effusion"] == 1
        if "moderate right pneumothorax." in sentences(row["report"]):
            assert row["pneumothorax"] == 1


def test_iu_reports_with_noise(tmp_path, monkeypatch):
    """The default (noisy) reports=iu still draws on the archive, never asserts a real
    sentence about a finding the image lacks, and records what it said."""
    archive = _fake_iu_archive(tmp_path / "NLMCXR_reports.tgz")
    monkeypatch.setattr(demo.iu, "_iu_archive", lambda: archive)
    root = tmp_path / "demo"
    df = pd.read_csv(generate(root, DemoSpec(n=300, size=32, seed=4, reports="iu")), dtype={"id": str})
    mentions = pd.read_csv(root / "mentions.csv", dtype={"id": str}, keep_default_na=False)
    agreement = json.loads((root / "demo.json").read_text())["report_agreement"]
    assert 0.6 <= agreement["mentioned"]["all"] <= 0.95
    assert 0.0 < agreement["false_mention"]["all"] <= 0.15
    real = {s.lower() for f, i in FAKE_REPORTS for s in demo._split_sentences(f + " " + i)}
    assert sum(s in real for r in df["report"] for s in sentences(r)) > len(df)
    for (_, row), (_, said) in zip(df.iterrows(), mentions.iterrows()):
        low = row["report"].lower()
        for f in FINDINGS:
            if said[f] in ("positive", "hedged"):
                assert any(k in low for k in KEYWORDS[f]), (f, row["report"])
            if said[f] == "positive":
                assert row[f] == 1, (f, row["report"])  # only hedged mentions of what is not there
        if "small left pleural effusion." in sentences(row["report"]):
            assert row["effusion"] == 1


@pytest.mark.slow
def test_pipe_demo_runs_every_step_and_reports_every_method(tmp_path):
    """The demo's own steps end to end, on a small phantom set and the tiny test encoders:
    both Adaptor modes, the no-Adaptor rows and the least-squares map, in one results.md, and
    the page report.html."""
    import json

    from tests.helpers import pipe

    r = pipe("demo", "--n", "40", "-b", "tiny-vit", "-t", "tiny-bert", "--seeds", "1", "--no-segmentation",
             "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "out"), "--json")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(summary["checkpoints"]) == {"pooled", "tokens"} and summary["timings"]["embed"] >= 0
    md = (tmp_path / "out" / "results.md").read_text()
    for row in ("Adaptor (pooled) tiny-vit + tiny-bert", "Adaptor (tokens) tiny-vit + tiny-bert",
                "no Adaptor tiny-vit", "linear map, least squares"):
        assert row in md, row
    assert "reports mention" in r.output  # the phantom reports' agreement with their labels
    page = tmp_path / "out" / "report.html"  # everything on one page, and its path printed
    assert summary["page"] == str(page) and f"everything on one page: {page}" in r.output
    html = page.read_text()
    assert "Adaptor (tokens) tiny-vit + tiny-bert" in html and 'id="training"' in html and "<script" not in html
