"""The first hour with the command line: every input a user gives works or gets one clear message."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.helpers import forked
from tests.helpers import embed_json, make_table, pipe, write_png
from tests.helpers.layouts import build_mimic

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PIPE_NO_PROGRESS": "1"}


def no_split_table(folder: Path, n: int = 24, missing: int | None = None, patients: bool = True) -> Path:
    """A table with image, report and a label, no split column; ``missing``: one row whose image is absent."""
    rows = []
    for i in range(n):
        if i != missing:
            write_png(folder / "img" / f"{i:03d}.png", seed=100 + i)
        rows.append({"id": f"{i:06d}", "image": f"img/{i:03d}.png", "report": f"Finding {i % 5}. Study {i}.",
                     **({"patient_id": f"p{i // 2}"} if patients else {}), "effusion": i % 2})
    table = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `pipe` in a subprocess: its stdout and stderr apart, no terminal."""
    return forked.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=ROOT)


# ----------------------------------------------------------------------------------- 1. splits
def test_a_table_without_a_split_column_gets_a_seeded_patient_level_split(tmp_path):
    table = no_split_table(tmp_path / "data", n=40)
    cache = tmp_path / "cache"
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache))
    assert "has no split column" in r.output and "patient_id" in r.output
    folder = next((cache / "datasets").iterdir())
    items = pd.read_parquet(folder / "items.parquet")
    assert set(items.split) == {"train", "valid", "test"}
    assert items.groupby("patient_id").split.nunique().max() == 1  # no patient in two splits
    assert "seeded hash of patient_id" in json.loads((folder / "dataset.json").read_text())["split_rule"]
    again = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache), "--json")
    assert json.loads(again.stdout.strip().splitlines()[-1])["embedded"] == 0
    assert pd.read_parquet(folder / "items.parquet").split.tolist() == items.split.tolist()  # deterministic
    trained = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
                   "--out", str(tmp_path / "run"), "epochs=1", "batch_size=8", "adaptor.d_model=32",
                   "adaptor.n_heads=2", "adaptor.ffn_dim=32", "--json")
    assert "val_loss" in json.loads(trained.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("spelling", ["val", "validation", "dev", "VALID"])
def test_common_spellings_of_the_validation_split(tmp_path, spelling):
    table = make_table(tmp_path / "data", 8)
    df = pd.read_csv(table)
    df["split"] = df.split.replace({"valid": spelling})
    df.to_csv(table, index=False)
    from pipeline.datasets import open_dataset

    ds = open_dataset(str(table), tmp_path / "c")
    assert {it.split for it in ds.items} == {"train", "valid", "test"}


def test_an_unknown_split_name_lists_the_names_found(tmp_path):
    table = make_table(tmp_path / "data", 8)
    df = pd.read_csv(table)
    df.loc[0, "split"] = "holdout"
    df.to_csv(table, index=False)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(tmp_path / "c"),
             expect=2)
    assert "unknown split name(s) 'holdout'" in r.output and "holds: holdout, test, train, valid" in r.output


def test_train_split_that_does_not_exist_lists_the_splits(tmp_path):
    table = make_table(tmp_path / "data", 12)
    embed_json(table, tmp_path / "cache")
    r = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache",
             str(tmp_path / "cache"), "train_split=training_set", expect=2)
    assert "train_split='training_set' is not a split" in r.output and "test, train, valid" in r.output


# -------------------------------------------------------------------- 2. --allow-failures and readers
def test_allow_failures_reaches_the_dataset_readers(tmp_path):
    root = build_mimic(tmp_path / "m")
    (root / "files/p11/p11000011/s56699142/d-bbbb-02.jpg").unlink()
    args = ["embed", "-d", f"mimic-cxr:{root}", "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(tmp_path / "c")]
    strict = pipe(*args, "--json", expect=1)
    summary = json.loads(strict.stdout.strip().splitlines()[-1])
    assert summary["failed"] == 1 and "d-bbbb-02.jpg is missing" in strict.output
    assert "1 item(s) failed" in strict.output
    from cache.store import Store, find_stores

    reasons = [r for s in find_stores(tmp_path / "c") for r in Store.open(s).failures().column("reason").to_pylist()]
    assert any("d-bbbb-02.jpg is missing" in r for r in reasons)
    relaxed = pipe(*args, "--allow-failures", "--json", expect=0)
    assert json.loads(relaxed.stdout.strip().splitlines()[-1])["failed"] == 1


# ----------------------------------------------------------------------------- 3. values rejected
def test_a_file_that_is_not_a_checkpoint_is_one_message(tmp_path):
    table = make_table(tmp_path / "data", 8)
    embed_json(table, tmp_path / "cache")
    bogus = tmp_path / "notes.safetensors"
    bogus.write_text("these are my notes, not a checkpoint")
    r = pipe("evaluate", "--task", "classification", "-d", str(table), "--adaptor", str(bogus), "--cache",
             str(tmp_path / "cache"), expect=2)
    assert "is not a checkpoint written by `pipe train-adaptor`" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) <= 4


def test_bad_training_values_are_config_errors_together(tmp_path):
    r = pipe("train-adaptor", "-d", "x.csv", "-b", "tiny-vit", "-t", "tiny-bert", "batch_size=0", "epochs=0",
             "optim.lr=-1", "adaptor.dropout=1.5", expect=2)
    for line in ("batch_size: must be >= 1, got 0", "epochs: must be >= 1, got 0",
                 "optim.lr: must be a positive learning rate, got -1.0", "adaptor.dropout: must lie in [0, 1)"):
        assert line in r.output, r.output
    assert "4 problems" in r.output


# ------------------------------------------------------------------ 4. reports up front, failed count
def test_a_table_without_reports_is_caught_before_any_work(tmp_path):
    table = make_table(tmp_path / "data", 6)
    pd.read_csv(table).drop(columns=["report"]).to_csv(table, index=False)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(tmp_path / "c"),
             expect=2)
    assert "has no reports" in r.output and "--text-encoder none" in r.output
    assert not (tmp_path / "c" / "stores").exists()
    pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "none", "--cache", str(tmp_path / "c"))


def test_the_summary_counts_items_that_could_not_be_keyed(tmp_path):
    table = make_table(tmp_path / "data", 6)
    (tmp_path / "data" / "img" / "0002.png").unlink()
    summary = embed_json(table, tmp_path / "c", expect=1)
    image = next(m for m in summary["per_modality"] if m["modality"] == "image")
    assert image["failed"] == 1 and summary["failed"] == 1


def test_nothing_to_do_is_said(tmp_path):
    table = make_table(tmp_path / "data", 2)
    r = pipe("embed", "-d", str(table), "-b", "none", "-t", "none", "--cache", str(tmp_path / "c"), expect=2)
    assert "nothing to do" in r.output


# -------------------------------------------------------------------------- 5. markup is escaped
def test_square_brackets_in_messages_and_help_survive():
    r = run_cli("train-adaptor", "--help")
    assert "[default: runs/adaptor-...]" in r.stdout and "[default: $PIPE_CACHE" in r.stdout
    from cli.common import fail
    from core.console import err

    with err.capture() as cap, pytest.raises(Exception):
        fail("install it: pip install 'freeze-pipe[xrv]'")
    assert "freeze-pipe[xrv]" in cap.get()


# ----------------------------------------------------------------------------- 6. output streams
def test_listings_go_to_stdout_and_logs_to_stderr(tmp_path):
    r = run_cli("encoders")
    assert r.returncode == 0 and "dinov2-s-derived" in r.stdout and "dinov2-s-derived" not in r.stderr
    j = run_cli("encoders", "--json")
    assert any(e["name"] == "tiny-vit" for e in json.loads(j.stdout))
    doctor = run_cli("doctor", "--json")
    assert json.loads(doctor.stdout)["freeze_pipe"] and "pipe doctor" in doctor.stderr


def test_report_writes_its_table_to_stdout(tmp_path):
    table = make_table(tmp_path / "data", 16)
    embed_json(table, tmp_path / "cache")
    out = tmp_path / "ret"
    pipe("evaluate", "--task", "retrieval", "-d", str(table), "--adaptor", "none", "-b", "tiny-vit", "-t",
         "tiny-bert", "--cache", str(tmp_path / "cache"), "--out", str(out))
    r = run_cli("report", str(out))
    assert r.returncode == 0 and "retrieval" in r.stdout and "chance" in r.stdout
    j = run_cli("report", str(out), "--json")
    assert json.loads(j.stdout)["tables"][0]["title"].startswith("retrieval")


# -------------------------------------------------------------------- 7. version, fast start
def test_version():
    from cli.app import version

    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"freeze-pipe {version()}"
    assert version()[0].isdigit()


def test_help_starts_without_importing_torch():
    # CPU seconds, not wall-clock: the suite runs in several processes, on a machine maybe busy
    code = ("import sys, time; t = time.process_time(); import cli; "
            "print(time.process_time() - t, 'torch' in sys.modules, 'pandas' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=ENV)
    seconds, torch_loaded, pandas_loaded = r.stdout.split()
    assert torch_loaded == "False" and pandas_loaded == "False", r.stdout
    assert float(seconds) < 1.0


# ------------------------------------------------------------------------------- 8. consistency
def _commands():
    from cli import app
    from typer.main import get_command

    root = get_command(app)
    for name, cmd in root.commands.items():
        for sub, c in getattr(cmd, "commands", {}).items():
            yield f"{name} {sub}", c
        if not getattr(cmd, "commands", None):
            yield name, cmd


def test_every_command_has_an_example_and_flags_show_no_metavar():
    for name, cmd in _commands():
        assert "pipe " + name.split()[0] in (cmd.epilog or ""), f"`pipe {name} --help` has no example"
    r = run_cli("embed", "--help")
    assert "<bool>" not in r.stdout and "--allow-failures" in r.stdout


def test_data_commands_take_the_dataset_like_the_others(tmp_path):
    table = make_table(tmp_path / "data", 8)
    by_option = pipe("data", "info", "-d", str(table), "--cache", str(tmp_path / "c"), "--json")
    by_argument = pipe("data", "info", str(table), "--cache", str(tmp_path / "c"), "--json")
    assert json.loads(by_option.stdout)["items"] == json.loads(by_argument.stdout)["items"] == 8
    assert "-d/--dataset" in pipe("data", "info", "--cache", str(tmp_path / "c"), expect=2).output


def test_data_info_counts_a_table_without_building_items(tmp_path, monkeypatch):
    """The summary from the table's columns equals the one from its items, and no item is built for it."""
    import numpy as np

    import pipeline.datasets.table as table_mod
    from pipeline.datasets import open_dataset
    from pipeline.datasets.summary import summarise

    table = make_table(tmp_path / "data", 30)
    df = pd.read_csv(table)
    rng = np.random.default_rng(0)
    df["effusion"] = rng.choice([0.0, 1.0, np.nan], len(df))      # a label with unknowns
    df["patient_id"] = [f"p{i // 3}" if i % 5 else "" for i in range(len(df))]  # some without a patient
    df.loc[3, "report"] = ""                                         # one without a report
    df = df.drop(columns=["split"], errors="ignore")                 # splits assigned by patient
    df.to_csv(table, index=False)
    expected = summarise(open_dataset(str(table), tmp_path / "c"))

    def no_items(*a, **k):
        raise AssertionError("data info built an item to count a table")

    monkeypatch.setattr(table_mod, "Item", no_items)
    got = json.loads(pipe("data", "info", "-d", str(table), "--cache", str(tmp_path / "c"), "--json").stdout)
    assert got == expected
    assert got["labels"]["effusion"]["known"] == int(df["effusion"].notna().sum())
    assert sum(s["reports"] for s in got["splits"].values()) == len(df) - 1


def test_a_cuda_device_on_a_machine_without_one_is_one_message(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    table = make_table(tmp_path / "data", 2)
    r = pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "none", "--cache", str(tmp_path / "c"),
             "--device", "cuda:1", expect=2)
    assert "no CUDA device is visible" in r.output
    assert "'tpu' is not a device" in pipe("embed", "-d", str(table), "-b", "tiny-vit", "-t", "none", "--cache",
                                       str(tmp_path / "c"), "--device", "tpu", expect=2).output


# ----------------------------------------------------------------------------------- 9. presets
def test_a_sweep_file_copied_elsewhere_finds_its_preset(tmp_path):
    from stages.sweep import load_sweep
    from stages.sweep.stage import run  # noqa: F401  (the stage the command runs)

    copy = tmp_path / "elsewhere" / "my_sweep.yaml"
    copy.parent.mkdir()
    shutil.copy(ROOT / "configs" / "sweep_demo.yaml", copy)
    spec = load_sweep(copy)
    from pipeline.config import load_config
    from stages.train import TrainConfig

    cfg = load_config(TrainConfig, spec.preset, list(spec.overrides))
    assert cfg.adaptor.d_model == yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())["adaptor"]["d_model"]


# ---------------------------------------------------------------------------- 10. long log lines
def test_logs_keep_paths_whole_when_not_a_terminal(tmp_path):
    deep = tmp_path / ("a-rather-long-folder-name-" * 4) / "cache"
    table = make_table(tmp_path / "data", 2)
    env = {k: v for k, v in ENV.items() if k != "COLUMNS"}
    r = run_cli("embed", "-d", str(table), "-b", "tiny-vit", "-t", "none", "--cache", str(deep), env=env)
    assert r.returncode == 0, r.stderr
    assert str(deep) in r.stdout.replace("\n", "") and str(deep / "stores") in r.stdout


# ------------------------------------------------------------------------- the README's first hour
def readme_first_hour() -> list[str]:
    """The `pipe` commands of the README's "Using it on your data" block, in order."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Using it on your data"):]
    block = section[section.index("```bash") + len("```bash"):]
    block = block[:block.index("```")]
    return [line.split("#")[0].strip() for line in block.strip().splitlines() if line.startswith("pipe ")]


@pytest.mark.slow
def test_the_readme_first_hour(tmp_path, monkeypatch):
    """Runs the README's commands as written, on a small table with no split column and one
    missing image. Only these are swapped: the tiny test encoders for the real ones (no
    time for a real ViT here), fractions that a 60-item table can stratify, and one seed
    with shorter head training (the heads' defaults are sized for real datasets)."""
    commands = readme_first_hour()
    assert [c.split()[1] for c in commands] == ["data", "embed", "embed", "train-adaptor", "evaluate", "evaluate"]
    no_split_table(tmp_path, n=60, missing=7)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PIPE_CACHE", str(tmp_path / "cache"))
    swaps = {"dinov2-s-derived": "tiny-vit", "minilm": "tiny-bert",
             "0.01 0.1 1.0": "0.5 1.0 --seeds 1 heads.min_steps=100 heads.epochs=10"}
    expected = {1: 1}  # the first embed lists the missing image and exits 1, as the README says
    outputs = []
    for i, command in enumerate(commands):
        for real, test in swaps.items():
            command = command.replace(real, test)
        r = pipe(*command.split()[1:], expect=expected.get(i, 0))
        outputs.append(r.output)
    assert "file not found" in outputs[1] and "007.png" in outputs[1]
    assert "has no split column" in outputs[0]
    assert (tmp_path / "runs" / "mine" / "last.safetensors").exists()
    assert "macro" in outputs[4] or "AUROC" in outputs[4]
    assert "R@1" in outputs[5]
