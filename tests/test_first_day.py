"""A researcher's first day, tried as one would: each problem found then, as a check.

No traceback on a bad cache (every command: tests/test_no_traceback.py), a failure row for
every item (tests/test_hostile.py), near-misses of a known column refused, a plan that says
what is missing, the smaller messages; and, slow, the README's post-demo Python example and
commands run as written from a plain shell after a (tiny) demo made the way `make demo`
makes it.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.helpers import fenced_block, forked, pipe, write_png

ROOT = Path(__file__).resolve().parents[1]


def table(folder: Path, n: int = 24, **columns) -> Path:
    """A pairs table without a split column; ``columns``: extra columns, each a function of the row."""
    rows = []
    for i in range(n):
        write_png(folder / "img" / f"{i:03d}.png", seed=300 + i)
        rows.append({"id": f"{i:04d}", "image": f"img/{i:03d}.png", "report": f"Finding {i % 5}. Study {i}.",
                     "effusion": i % 2, **{k: f(i) for k, f in columns.items()}})
    path = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


# ------------------------------------------------------------------- 3. a cache that is not one
def test_cache_ls_on_a_bad_cache_says_so(tmp_path, monkeypatch):
    """A file, a missing folder and a folder that is no cache: one message each, never "no stores yet", exit 2."""
    monkeypatch.delenv("PIPE_CACHE", raising=False)
    (tmp_path / "notadir.txt").write_text("x")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    for cache, says in ((tmp_path / "notadir.txt", "is a file"), (tmp_path / "notadir.txt" / "sub", "is a file"),
                        (tmp_path / "nothing", "there is no cache at"), (tmp_path / "photos", "is not a cache")):
        r = pipe("cache", "ls", "--cache", str(cache), expect=2)
        assert says in r.output and "no stores yet" not in r.output and "Traceback" not in r.output, r.output
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "fresh"))  # a new machine: nothing embedded yet
    r = pipe("cache", "ls")
    assert "there is no cache at" in r.output and str(tmp_path / "fresh" / "freeze-pipe") in r.output


def test_train_and_evaluate_on_a_file_as_cache_print_no_hint_that_crashes(tmp_path):
    """The issue's chain: embed, train-adaptor and evaluate with `--cache notadir.txt` each say so, once."""
    data = table(tmp_path / "data", n=8)
    bad = tmp_path / "notadir.txt"
    bad.write_text("x")
    for args in (["embed", "-b", "tiny-vit", "-t", "tiny-bert"], ["train-adaptor", "-b", "tiny-vit", "-t", "tiny-bert"],
                 ["evaluate", "--task", "retrieval", "-a", "none", "-b", "tiny-vit", "-t", "tiny-bert"]):
        r = pipe(*args, "-d", str(data), "--cache", str(bad), expect=2)
        assert r.output.count("error:") == 1 and "is a file" in r.output and "Traceback" not in r.output, r.output


# -------------------------------------------------------------- 5. near-misses of a known column
@pytest.mark.parametrize("found, known", [("patientid", "patient_id"), ("PatientID", "patient_id"),
                                          ("subject_id", "patient_id"), ("Patient ID", "patient_id"),
                                          ("text", "report"), ("findings", "report"), ("Report", "report"),
                                          ("image_path", "image"), ("fold", "split")])
def test_a_near_miss_of_a_known_column_is_refused_with_the_mapping(tmp_path, found, known):
    data = table(tmp_path, n=6, **{"patient_id": lambda i: f"p{i // 2}"} if known != "patient_id" else {})
    df = pd.read_csv(data, dtype=str)
    if known in df.columns:
        df = df.rename(columns={known: found})
    else:
        df[found] = [f"p{i // 2}" if known == "patient_id" else "train" for i in range(len(df))]
    df.to_csv(data, index=False)
    r = pipe("data", "info", "-d", str(data), expect=2)
    message = r.output.replace("\n", " ")
    assert f"no `{known}` column" in message and f"`{found}`" in message, message
    assert f"--columns {known}={found}" in message and "Traceback" not in message
    if known == "patient_id":
        assert "--no-patients" in message


def test_a_mapped_patient_column_keeps_every_patient_in_one_split(tmp_path):
    """subject_id mapped onto patient_id: the split rule reads it (no leak), on the CLI and in a spec."""
    from pipeline.datasets import open_dataset

    data = table(tmp_path, n=60, subject_id=lambda i: f"s{i // 3}")
    r = pipe("data", "info", "-d", str(data), "--columns", "patient_id=subject_id", "--json")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert sum(s["patients"] for s in summary["splits"].values()) == 20  # each of the 20 patients in one split
    items = open_dataset(f"{data}?patient_id=subject_id", tmp_path / "cache").items
    splits = pd.DataFrame({"p": [it.patient_id for it in items], "s": [it.split for it in items]})
    assert splits.groupby("p").s.nunique().max() == 1 and splits.p.nunique() == 20
    r = pipe("data", "info", "-d", str(data), "--columns", "patient_id=subjectid", expect=2)
    assert "does not have" in r.output and "subject_id" in r.output


def test_a_table_without_patients_warns_that_splits_are_per_item_unless_told(tmp_path):
    warned = pipe("data", "info", "-d", str(table(tmp_path / "a", n=12))).output.replace("\n", " ")
    assert "warning:" in warned and "no patient_id column" in warned and "per item" in warned
    told = pipe("data", "info", "-d", str(table(tmp_path / "b", n=12)), "--no-patients").output  # notes: once a table
    assert "warning:" not in told and "seeded hash of the item id" in told.replace("\n", " ")
    r = pipe("data", "info", "-d", "demo?n=20", "--no-patients", expect=2)
    assert "a reader knows its own columns" in r.output.replace("\n", " ")


def test_embed_and_train_read_the_mapping_the_same_way(tmp_path):
    """`--columns report=text` on embed and on train-adaptor: the reports are embedded and trained on;
    training without the mapping is refused, not run on a table without reports."""
    data = table(tmp_path / "data", n=24)
    pd.read_csv(data, dtype=str).rename(columns={"report": "text"}).to_csv(data, index=False)
    cache = str(tmp_path / "cache")
    r = pipe("embed", "-d", str(data), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", cache, "--no-patients",
             "--columns", "report=text", "--json")
    assert json.loads(r.stdout.strip().splitlines()[-1])["embedded"] == 48
    assert "peak memory CPU (max resident set)" in r.output.replace("\n", " ") and "cpu_peak_mb" not in r.stderr
    small = ["epochs=1", "batch_size=8", "adaptor.d_model=32", "adaptor.n_heads=2", "adaptor.ffn_dim=32"]
    pipe("train-adaptor", "-d", str(data), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", cache,
         "--columns", "report=text", "--no-patients", "--out", str(tmp_path / "run"), *small)
    r = pipe("train-adaptor", "-d", str(data), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", cache,
             "--out", str(tmp_path / "run2"), *small, expect=2)
    assert "--columns report=text" in r.output.replace("\n", " ")


# ------------------------------------------------------------------------ 6. --fraction 0.01
def test_a_fraction_too_small_says_how_large_a_training_split_it_needs():
    """One binary label: 1% needs a positive and a negative, so round(0.01 n) >= 2: n >= 150."""
    from stages.evaluate.fractions import FractionTooSmallError, plan_subsets

    y = (np.arange(60) % 2).astype(float)[:, None]
    with pytest.raises(FractionTooSmallError) as e:
        plan_subsets(y, ["effusion"], [0.01, 0.1, 1.0], [0])
    message = str(e.value)
    assert "training split of at least 150 items" in message and "0.0333" in message
    assert plan_subsets(np.tile(y, (3, 1))[:150], ["effusion"], [0.01], [0])[0][0.01].size == 2  # 150 is enough


# ---------------------------------------------------------------- 7. plans say what is missing
def test_the_plan_says_which_weights_data_and_flags_are_missing(tmp_path, monkeypatch):
    from pipeline.encoders import resolve_encoder_name
    from pipeline.encoders.weights import weights_available

    monkeypatch.delenv("PIPE_TRUST_REMOTE_CODE", raising=False)
    r = pipe("reproduce", "classification", "--plan", "--json", "--cache", str(tmp_path / "cache"),
             "--out", str(tmp_path / "paper"), "--data", f"rsna={tmp_path / 'no-such-folder'}")
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    missing = {m["kind"]: [] for m in summary["missing"]}
    for m in summary["missing"]:
        missing[m["kind"]].append(m["message"])
    encoders = ["dinov2-s-pad", "dinov2-b-pad", "resnet-ae-pad", "bert", "biobert", "clinicalbert", "pubmedbert",
                "cxr-bert"]  # the recipe's image encoders: the authors' pad-to-square geometry
    absent = [e for e in encoders if not weights_available(resolve_encoder_name(e))[0]]
    assert sorted(m.split()[2] for m in missing.get("weights", [])) == sorted(absent)
    data = " ".join(missing["data"])
    assert "--data mimic=FOLDER" in data and "--data covidx=FOLDER" in data and "no-such-folder" in data
    assert any("cxr-bert" in m and "--trust-remote-code" in m for m in missing["flag"])
    cxr = next(s for s in summary["steps"] if s["id"] == "embed/mimic/text/cxr-bert")
    assert cxr["command"].endswith("--trust-remote-code")
    assert "missing here" in r.output and "Traceback" not in r.output
    run = pipe("reproduce", "classification", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "paper"),
               "--only", "dinov2-s+none/rsna", "--data", f"rsna={tmp_path / 'no-such-folder'}", "--substitute",
               "dinov2-s=tiny-vit", expect=2)  # a run refuses what it lacks before its first step
    assert "before this table can run" in run.output and "no-such-folder" in run.output
    assert not (tmp_path / "paper").exists() and not (tmp_path / "cache").exists()


# -------------------------------------------------------------------------- 8. smaller things
def test_a_config_error_names_the_yaml_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("epochs: ten\noptim:\n  lrr: 0.1\n")
    r = pipe("train-adaptor", "-d", "demo", "-b", "tiny-vit", "-t", "tiny-bert", "--config", str(bad),
             "--cache", str(tmp_path / "cache"), expect=2)
    assert re.search(r"2 problems in TrainConfig config \(from \S*mine\.yaml", r.output.replace("\n", " ")), r.output


def test_the_reports_classification_tile_shows_the_fewest_labels():
    """The page's headline tile for classification shows its smallest label fraction (1% in the demo), where
    an Adaptor helps, not the largest, where every method is near the ceiling."""
    from stages.report.page import Page
    from stages.report.runs import load_runs

    runs = load_runs([Path(__file__).resolve().parent / "data" / "results-v1"])
    table = next(t for r in runs.evals for t in r.record.tables if t.task == "classification"
                 and t.metric == "macro_auroc")
    fewest, most = table.columns[0], table.columns[-1]
    assert fewest.fraction < most.fraction
    tile = re.search(r'<div class="tt">Classification</div><div class="ts">([^<]*)</div>(.*?)</div></div>',
                     Page(runs).results(), flags=re.S)
    assert tile and tile[1].endswith(f"{fewest.name} labels")
    adaptor = next(r for r in table.rows if r.method.type.measured)
    assert f"{100 * adaptor.cell(fewest.name).value:.1f}" in tile[2]


def test_every_reader_lists_its_options():
    import dataclasses

    from pipeline.datasets import DEMO_OPTIONS
    from pipeline.datasets.demo import DemoSpec

    r = pipe("data", "readers", "--json")
    readers = {x["reader"]: {o["name"] for o in x["options"]} for x in json.loads(r.stdout)}
    assert {"frontal", "sections", "labels", "uncertain", "reports"} <= readers["mimic-cxr"]
    assert set(readers) >= {"mimic-cxr", "chexpert", "rsna-pneumonia", "siim-pneumothorax", "covidx", "iu-xray", "demo"}
    assert {k: o.default for k, o in DEMO_OPTIONS.items()} == {f.name: str(f.default)
                                                               for f in dataclasses.fields(DemoSpec)}
    assert "pipe data readers" in pipe("data", "info", "--help").output


# ----------------------------------------------------- 1-2. the README's post-demo commands, as written
TINY_DEMO = ["--n", "40", "-b", "tiny-vit", "-t", "tiny-bert", "--seeds", "1", "--no-segmentation",
             "--device", "cpu"]
SPEC = "demo?n=40"


def make_demo_command(out: Path) -> tuple[list[str], dict[str, str]]:
    """The command `make demo` runs and the variables it sets (read from the Makefile), with `pipe`
    as this interpreter's module."""
    done = subprocess.run(["make", "-n", "-s", "-C", str(ROOT), "demo", "-o", ".venv/bin/pipe", f"DEMO_OUT={out}"],
                          capture_output=True, text=True, check=True)
    [line] = [ln for ln in done.stdout.splitlines() if re.search(r"/pipe demo\b", ln)]
    words = shlex.split(line)
    sets = {}
    while re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        key, _, value = words.pop(0).partition("=")
        sets[key] = value
    return [sys.executable, "-m", "cli", *words[1:]], sets


@pytest.mark.slow
def test_the_readme_post_demo_example_and_commands_run_from_a_plain_shell(tmp_path):
    """After a demo made as `make demo` makes it (tiny: 40 phantoms, the test encoders), a new shell
    with only the environment activated (no $PIPE_CACHE, no --cache) runs the README's Python
    example and its `pipe` commands as written; only the dataset spec is swapped for the tiny one."""
    from tests.helpers.files import dicom_bytes

    work, home = tmp_path / "clone", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PIPE_CACHE", "XDG_CACHE_HOME")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PIPE_NO_PROGRESS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # source .venv/bin/activate

    def shell(args: list[str], **kw) -> subprocess.CompletedProcess:
        done = forked.run(args, cwd=work, env=env, capture_output=True, text=True, **kw)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stdout[-3000:], done.stderr[-3000:])
        return done

    command, sets = make_demo_command(work / "demo-out")
    demo = forked.run(command + TINY_DEMO, cwd=work, env={**env, **sets}, capture_output=True, text=True)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert str(home / ".cache" / "freeze-pipe") in demo.stderr  # the demo says where its cache is: the default
    example = fenced_block("python", "load_adaptor(").replace('"demo"', json.dumps(SPEC))
    ran = shell([sys.executable, "-c", example])
    assert "effusion" in ran.stdout and "generating" not in ran.stderr  # nothing generated again elsewhere
    test = [p for p in sorted((home / ".cache" / "freeze-pipe" / "demo").glob("*/images/*.png"))][:2]
    shutil.copy(test[0], work / "chest1.png")
    (work / "chest2.dcm").write_bytes(dicom_bytes(np.asarray(Image.open(test[1])).astype(np.uint16)))
    commands = [ln.split("#")[0].strip() for ln in fenced_block("bash", "--bank demo").splitlines()]
    commands = [c for c in commands if c.startswith("pipe ")]
    assert any("--bank demo" in c for c in commands) and any(c.startswith("pipe export") for c in commands)
    for command in commands:
        args = [SPEC if a == "demo" else a for a in shlex.split(command)[1:]]
        done = shell([sys.executable, "-m", "cli", *args])
        if "--json" in args:  # nothing but the JSON on stdout, and no table on stderr
            assert len(done.stdout.strip().splitlines()) == 1 and json.loads(done.stdout)["images"]
            assert "┃" not in done.stderr and "per image" not in done.stderr, done.stderr
    assert (work / "exported" / "adaptor-pooled" / "README.md").is_file()
    assert len(list((home / ".cache" / "freeze-pipe" / "demo").glob("*/images/*.png"))) == 40  # one demo, one cache
