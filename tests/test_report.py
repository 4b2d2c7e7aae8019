"""`pipe report`: Markdown off a terminal, CSV and JSON, and the one-page HTML report, opened
in a real browser (headless Chromium over the DevTools protocol: tests/helpers/browser.py)."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import forked
from tests.helpers.browser import INSTALL_HINT, blank, check_page, find_chromium
from tests.helpers import SMALL, SMALL_HEADS, SMALL_SEG, embed_json, make_table, pipe

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PIPE_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
SECTIONS = ("results", "training", "classification", "zero-shot", "segmentation", "retrieval", "data", "provenance")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """The real `pipe` in a subprocess: stdout is a pipe, not a terminal."""
    return forked.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=ROOT)


DATASET = "demo?n=120"
TINY = ["-b", "tiny-vit", "-t", "tiny-bert"]
ADAPTOR = [*SMALL, "batch_size=16", "epochs=3", "optim.lr=2e-5"]  # lr: the default (the page is tested, not the Adaptor)
HEADS = [*SMALL_HEADS, "bootstrap=100", "seeds=2", "fractions=[0.5,1.0]"]
SEG = [*SMALL_SEG, "bootstrap=100", "seeds=1", "fractions=[1.0]", "seg.target=effusion", "seg.overlays=4"]
TASKS = {"retrieval": [], "zero-shot": [], "classification": HEADS, "segmentation": SEG}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo's runs, small and quick: 120 phantom pairs, the tiny test encoders, a pooled and
    a tokens-mode Adaptor, every task (the no-Adaptor rows with the pooled one), and the page
    `pipe report --html` makes of the output folder. (`pipe demo` itself writing its page is
    tested in test_demo.py, which runs the whole demo.)"""
    root = tmp_path_factory.mktemp("report")
    cache, out = root / "cache", root / "out"
    pipe("embed", "-d", DATASET, *TINY, "--cache", str(cache))
    for mode in ("pooled", "tokens"):
        extra = ["adaptor.mode=tokens", "adaptor.grid_pool=4"] if mode == "tokens" else []
        pipe("train-adaptor", "-d", DATASET, *TINY, "--cache", str(cache), "--out",
             str(out / f"adaptor-{mode}"), *ADAPTOR, *extra)
        for task, settings in TASKS.items():
            if mode == "tokens" and task in ("classification", "segmentation"):
                continue  # side by side in retrieval and zero-shot is enough here
            pipe("evaluate", "--task", task, "-d", DATASET, "--adaptor", str(out / f"adaptor-{mode}"), "--cache",
                 str(cache), "--out", str(out / f"{task}-{mode}"), *settings,
                 *(["--baseline"] if mode == "pooled" else []))
    r = pipe("report", str(out), "--html", str(out / "report.html"), "--format", "md")
    return {"out": out, "page": out / "report.html", "output": r.output}


@pytest.fixture(scope="module")
def chromium():
    """The system's Chromium. Missing: a failure in CI (which installs it), a skip elsewhere."""
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium in CI, so the report's browser test cannot run: {INSTALL_HINT}")
        pytest.skip(f"no Chromium on this machine: {INSTALL_HINT}")
    return path


def sections(page: str) -> dict[str, str]:
    found = re.findall(r'<section id="([^"]+)">(.*?)</section>', page, re.S)
    return dict(found)


# ----------------------------------------------------------------------------- the runs' files
def test_evaluation_runs_save_what_the_page_draws(demo):
    out = demo["out"]
    seg = json.loads((out / "segmentation-pooled" / "results.json").read_text())
    z = np.load(out / "segmentation-pooled" / "overlays.npz")
    kinds = list(z["kind"])
    assert "best" in kinds and "worst" in kinds and z["image"].dtype == np.uint8
    assert z["image"].shape[1:] == z["true"].shape[1:] == z["pred0"].shape[1:]
    dice = z["dice0"]
    best, worst = dice[z["kind"] == "best"], dice[z["kind"] == "worst"]
    assert best.min() >= worst.max()  # the best cases are no worse than the worst
    assert seg["files"]["overlays"] == "overlays.npz" and seg["data"]["overlays"]["seed"] == 0

    ex = json.loads((out / "retrieval-pooled" / "examples.json").read_text())
    assert len(ex["image_to_text"]) == 4 and len(ex["text_to_image"]) == 3
    for q in ex["image_to_text"]:
        assert len(q["top"]) == 5 and all(c["id"] in ex["reports"] for c in q["top"])
        assert (q["true_rank"] <= 5) == any(c["true"] for c in q["top"])
    thumbs = np.load(out / "retrieval-pooled" / "thumbnails.npz")
    assert {q["query"] for q in ex["image_to_text"]} <= set(thumbs["ids"]) and thumbs["images"].dtype == np.uint8
    tok = json.loads((out / "retrieval-tokens" / "examples.json").read_text())
    assert [q["query"] for q in tok["image_to_text"]] == [q["query"] for q in ex["image_to_text"]]  # side by side

    zs = np.load(out / "zero-shot-pooled" / "predictions.npz")
    assert zs["m0"].shape == zs["y"].shape == (len(zs["ids"]), len(zs["label_names"]))

    res = json.loads((out / "classification-pooled" / "results.json").read_text())
    card = res["data_card"]
    assert set(card["splits"]) == {"train", "valid", "test"} and sum(card["splits"].values()) == card["items"]
    assert card["prevalence"]["effusion"]["test"]["known"] == card["splits"]["test"]
    assert card["report_agreement"]["mentioned"]["all"] > 0 and card["failures"]["count"] == 0
    prov = res["provenance"]
    assert prov["versions"]["torch"] and prov["versions"]["python"] and prov["command"]
    assert json.loads((out / "adaptor-pooled" / "provenance.json").read_text())["versions"]["freeze-pipe"]


def test_overlay_cases_are_the_best_and_the_worst():
    from stages.evaluate.segment import pick_cases

    # [intersection, predicted, true] per image: Dice 1.0, 0.5, 0 (empty), 0.8, 0.0
    counts = np.array([[10, 10, 10], [5, 10, 10], [0, 3, 0], [8, 10, 10], [0, 5, 10]])
    assert pick_cases(counts, 4) == [(0, "best"), (3, "best"), (1, "worst"), (4, "worst")]
    assert pick_cases(counts, 1) == [(0, "best")]
    assert pick_cases(counts[2:3], 2) == [(0, "best")]  # no non-empty mask: the empty ones by predicted area


# ---------------------------------------------------------------------------------- the page
def test_the_page_is_one_self_contained_file_with_every_section(demo):
    page_path = demo["page"]
    assert str(page_path) in demo["output"]
    page = page_path.read_text()
    assert "<script" not in page and "<link" not in page and "@import" not in page and "url(" not in page
    assert not re.findall(r'(?:src|href)="(?!data:image/png;base64,|#)', page)  # pictures inline, links in-page
    found = sections(page)
    assert list(found) == list(SECTIONS)
    for sid in ("training", "segmentation", "retrieval", "data"):
        assert 'class="missing"' not in found[sid].replace("Not measured", ""), sid  # the demo has all of it
    assert found["training"].count("<img") == 1 and "s / epoch" in found["training"]
    assert "Adaptor (pooled) tiny-vit + tiny-bert" in found["results"]
    for ref in ("no Adaptor tiny-vit", "linear map, least squares", "all-empty predictor", "chance"):
        assert ref in found["results"], ref
    assert "2 seeds per cell" in found["results"] and "95% bootstrap interval" in found["results"]
    assert "reliability" in found["classification"] and found["classification"].count("<img") >= 5
    assert "best" in found["segmentation"] and "worst" in found["segmentation"]
    assert found["retrieval"].count('class="hit"') >= 1 and "A report, and the images" in found["retrieval"]
    assert "Label–report agreement" in found["data"] and "No item of this dataset failed" in found["data"]
    for what in ("cache fingerprints", "checkpoint", "command", "torch", "config of classification-pooled"):
        assert what in found["provenance"], what


def test_the_page_in_a_real_browser(demo, chromium):
    c = check_page(demo["page"])
    assert c.console_errors == []
    assert c.requests == []                      # nothing fetched: not a font, not an image
    assert len(c.images) >= 20 and c.broken_images == []
    assert not blank(c.screenshot)
    from PIL import Image

    shot = Image.open(io.BytesIO(c.screenshot))
    assert shot.width == 1280 and shot.height > 3000  # the whole page, every section laid out


def test_the_page_needs_no_javascript(demo, chromium):
    c = check_page(demo["page"], javascript=False)
    assert c.console_errors == [] and c.requests == []
    found = sections(c.html)
    assert list(found) == list(SECTIONS)
    assert found["results"].count("<table") >= 4 and c.html.count("<img") >= 20
    assert "A report, and the images ranked first for it" in c.html
    assert not blank(c.screenshot)


def test_the_browser_check_sees_what_it_looks_for(tmp_path, chromium):
    """The checks above could pass by seeing nothing: a page with each fault is caught."""
    bad = tmp_path / "bad.html"
    bad.write_text('<!DOCTYPE html><html><body><h1>faults</h1><img src="http://127.0.0.1:9/remote.png">'
                   '<img src="data:image/png;base64,AAAA"><script>console.error("boom")</script></body></html>')
    c = check_page(bad)
    assert any("boom" in e for e in c.console_errors)
    assert any(u.startswith("http://127.0.0.1:9/") for u in c.requests)
    assert len(c.broken_images) == 2
    white = tmp_path / "white.html"
    white.write_text("<!DOCTYPE html><html><body></body></html>")
    assert blank(check_page(white).screenshot)


HOSTILE = "<script>alert('x')</script><img src=x onerror=alert(1)>"


def _hostile_run(folder: Path) -> Path:
    """A results.json whose every text is markup, and which has none of the data files."""
    folder.mkdir(parents=True)
    table = {"title": "retrieval · recall@K on the test split (%)", "metric": "recall", "columns": ["R@1", "R@5"],
             "rows": [{"method": f"Adaptor (pooled) {HOSTILE}", "cells": {"R@1": "10.0", "R@5": "50.0"},
                       "values": {"R@1": {"value": 0.1, "ci": [0.05, 0.15]}, "R@5": {"value": 0.5, "ci": None}}},
                      {"method": "chance (10 candidates)", "cells": {"R@1": "10.0", "R@5": "50.0"}, "values": {}}]}
    results = {"task": "retrieval", "dataset": HOSTILE, "dataset_name": f"evil{HOSTILE}", "tables": [table],
               "methods": [{"name": f"Adaptor (pooled) {HOSTILE}"}], "notes": [HOSTILE],
               "checkpoint": {"path": f"/nowhere/{HOSTILE}/last.safetensors", "hash": "ab" * 32, "mode": "pooled"},
               "fingerprints": {"image": "cd" * 32}, "config": {"task": "retrieval", "note": HOSTILE},
               "provenance": {"command": f"pipe evaluate {HOSTILE}", "versions": {"torch": HOSTILE}}}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_run_text_is_escaped_and_missing_data_is_one_line(tmp_path, chromium):
    from stages.report import build_page, load_runs

    page = build_page(load_runs([_hostile_run(tmp_path / "evil")]))
    assert "<script>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    found = sections(page)
    for sid, says in (("training", "training folders"), ("classification", "No classification runs"),
                      ("segmentation", "No segmentation runs"), ("retrieval", "no retrieval examples saved"),
                      ("data", "No data card recorded")):
        assert 'class="missing"' in found[sid] and says in found[sid], sid
    path = tmp_path / "evil.html"
    path.write_text(page)
    c = check_page(path)
    assert c.console_errors == [] and c.requests == [] and c.broken_images == []
    assert "alert('x')" in c.html.replace("&#x27;", "'").replace("&lt;", "<").replace("&gt;", ">")  # shown as text


def test_the_data_card_lists_failures_with_their_reasons(tmp_path):
    from stages.report import build_page, load_runs

    table = make_table(tmp_path / "data", 16)
    (tmp_path / "data" / "img" / "0003.png").unlink()  # item s3, a test item
    embed_json(table, tmp_path / "cache", "--allow-failures")
    out = tmp_path / "ret"
    pipe("evaluate", "--task", "retrieval", "-d", str(table), "--adaptor", "none", *TINY, "--cache",
         str(tmp_path / "cache"), "--out", str(out), "bootstrap=20")
    card = json.loads((out / "results.json").read_text())["data_card"]
    assert card["failures"]["count"] == 1 and card["splits"]["test"] == 3
    (reason,) = card["failures"]["reasons"]
    assert reason["items"] == ["s3"] and reason["modality"] == "image" and "file not found" in reason["reason"]
    assert card["report_agreement"] is None and card["prevalence"]["effusion"]["train"]["known"] == 8
    data = sections(build_page(load_runs([out])))["data"]
    assert "file not found" in data and "s3" in data and "Not measured for this dataset" in data


# ------------------------------------------------------------------------------ text formats
def test_report_writes_markdown_off_a_terminal_and_csv_or_json_when_asked(demo, tmp_path):
    runs = [str(demo["out"] / n) for n in ("retrieval-pooled", "retrieval-tokens", "classification-pooled")]
    md = run_cli("report", *runs)
    assert md.returncode == 0, md.stderr
    assert "| method |" in md.stdout and "**retrieval · recall@K" in md.stdout
    assert not set("┏┃━│─") & set(md.stdout)  # no terminal box drawing in a file
    rows = list(csv.DictReader(io.StringIO(run_cli("report", *runs, "--format", "csv").stdout)))
    assert {"table", "method", "column", "value", "ci_low", "ci_high", "n_seeds"} <= set(rows[0])
    macro = [r for r in rows if r["metric"] == "macro_auroc" and r["column"] == "100%"]
    assert macro and all(0 <= float(r["value"]) <= 1 for r in macro)
    j = json.loads(run_cli("report", *runs, "--format", "json").stdout)
    assert len(j["runs"]) == 3 and j["tables"][0]["rows"]
    r = run_cli("report", *runs, "--out", str(tmp_path / "t.csv"), "--html", str(tmp_path / "p.html"))
    assert r.returncode == 0 and (tmp_path / "t.csv").read_text().startswith("table,metric,method")
    assert "p.html" in r.stderr and "<!DOCTYPE html>" in (tmp_path / "p.html").read_text()


def test_report_takes_a_folder_of_runs_and_training_runs(demo, tmp_path):
    r = run_cli("report", str(demo["out"]), "--html", str(tmp_path / "all.html"), "--format", "md")
    assert r.returncode == 0, r.stderr
    assert "Adaptor (tokens)" in r.stdout
    only = run_cli("report", str(demo["out"] / "adaptor-pooled"))
    assert only.returncode == 2 and "--html" in only.stderr
    r = run_cli("report", str(demo["out"] / "adaptor-pooled"), "--html", str(tmp_path / "train.html"))
    assert r.returncode == 0, r.stderr
    found = sections((tmp_path / "train.html").read_text())
    assert "<img" in found["training"] and "No evaluation runs" in found["results"]
    bad = run_cli("report", str(tmp_path))
    assert bad.returncode == 2 and "neither an evaluation run" in bad.stderr


# ------------------------------------------------------------------------------- the records
def test_the_runs_are_records_that_say_what_each_row_is(demo):
    """Results format 2: every row and method says what it is, every head cell its fraction and seeds,
    and a run read as records writes back the very data of its results.json."""
    from core.jsondata import plain
    from pipeline.methods import METHOD_KINDS
    from pipeline.records import RESULTS_FORMAT, load_results

    out = demo["out"]
    for run in ("classification-pooled", "segmentation-pooled", "retrieval-tokens", "zero-shot-pooled"):
        raw = json.loads((out / run / "results.json").read_text())
        rec = load_results(out / run)
        assert raw["format"] == rec.format == RESULTS_FORMAT
        assert json.loads(json.dumps(plain(rec.to_dict()))) == raw, run
        assert {r["identity"]["kind"] for t in raw["tables"] for r in t["rows"]} <= set(METHOD_KINDS)
    cls = load_results(out / "classification-pooled")
    assert [(m.method.kind, m.features) for m in cls.methods] == [("adaptor", "adaptor"), ("backbone", "backbone")]
    cell = cls.methods[0].heads["mlp"]["50%"]
    assert cell.fraction == 0.5 and cell.seeds == [0, 1] and cell.summary["macro_auroc"].seeds == (0, 1)
    row = next(t for t in cls.tables if t.metric == "macro_auroc").rows[0]
    assert (row.method.head, row.cell("50%").figure) == ("mlp", cell.summary["macro_auroc"])
    seg = load_results(out / "segmentation-pooled")
    assert seg.methods[0].method.variant == "raw-tokens" and seg.methods[0].heads["decoder"]["100%"].fraction == 1.0
    ret = load_results(out / "retrieval-tokens")
    assert [m.method.variant for m in ret.methods if m.method.kind == "adaptor"] == [None, "itm-rerank"]
    chance = ret.tables[0].rows[-1]
    assert chance.method.kind == "chance" and chance.cell(ret.tables[0].column_names[0]).value > 0
