"""Installed as users install it: the wheel, its data files, and the commands run from any folder.

The slow test builds the sdist and the wheel (``python -m build``, checked by ``twine check``),
installs the wheel into a fresh virtual environment outside the repository and runs the
commands there from an empty folder. The dependencies (torch & co) are not installed again:
a ``.pth`` file lets the fresh environment see this interpreter's site-packages, whose own
``.pth`` files (an editable install of this tree among them) are not processed that way, and
the wheel goes in with ``--no-deps``. The test asserts that ``cli`` and ``configs`` are
imported from the fresh environment, never from this tree.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.helpers import make_table, pipe
from pipeline import resources

ROOT = Path(__file__).resolve().parents[1]
DATA = {"demo.yaml", "demo_tokens.yaml", "adaptor_paper.yaml", "adaptor_tokens.yaml", "sweep_demo.yaml",
        "prompts/chest_xray.yaml", "paper/classification.yaml", "paper/segmentation.yaml",
        "paper/rsna_classification.yaml", "paper/covidx_classification.yaml"}
SKIP = shutil.ignore_patterns(".git", ".venv", "__pycache__", "build", "dist", "*.egg-info", "site", ".pipe-cache",
                              "demo-out", "runs", "results", "tests", "wt-*", ".pytest_cache")


# ------------------------------------------------------------------------------ the data, found by name
def test_a_preset_is_found_by_name_with_or_without_yaml_or_by_its_clone_path():
    expected = resources.folder() / "demo.yaml"
    assert resources.find("demo") == resources.find("demo.yaml") == resources.find("configs/demo.yaml") == expected
    assert resources.find("paper") == resources.folder() / "adaptor_paper.yaml"  # the alias
    assert resources.find("paper/rsna_classification") == resources.folder("paper") / "rsna_classification.yaml"
    assert resources.find("chest_xray", "prompts") == resources.folder("prompts") / "chest_xray.yaml"
    for bad in ("nope", "../pyproject.toml", "/etc/passwd", "", "paper/../demo"):
        assert resources.find(bad) is None, bad


def test_an_unknown_preset_lists_the_presets_the_package_holds(tmp_path):
    r = pipe("train-adaptor", "-d", "x.csv", "-b", "tiny-vit", "-t", "tiny-bert", "--config", "nosuch",
             "--cache", str(tmp_path), expect=2)
    assert "'nosuch': no such file, and no such preset" in r.output
    assert "demo, demo_tokens" in r.output.replace("\n", " ") and "adaptor_paper (or paper)" in r.output.replace("\n", " ")
    assert "Traceback" not in r.output


@pytest.mark.parametrize("damage", ["no package", "no data files"])
def test_an_install_without_its_data_says_so_and_how_to_reinstall(tmp_path, monkeypatch, damage):
    if damage == "no package":
        monkeypatch.setattr(resources, "PACKAGE", "freeze_pipe_no_such_package")
    else:  # the package is there, its YAML files are not (a wheel built without its package data)
        empty = tmp_path / "site" / "configs_empty"
        empty.mkdir(parents=True)
        (empty / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
        monkeypatch.setattr(resources, "PACKAGE", "configs_empty")
    for args in (["train-adaptor", "-d", "x.csv", "-b", "tiny-vit", "-t", "tiny-bert", "--config", "demo",
                  "--cache", str(tmp_path / "cache")], ["reproduce", "classification", "--plan"], ["sweep", "sweep_demo"]):
        r = pipe(*args, expect=2)
        text = r.output.replace("\n", " ")
        assert "installation" in text and "pip install --force-reinstall freeze-pipe" in text, r.output
        assert "Traceback" not in r.output


def test_the_version_comes_from_the_package_metadata():
    r = pipe("--version")
    assert r.output.strip().endswith(importlib.metadata.version("freeze-pipe"))


# ------------------------------------------------------------------------------ the wheel, installed
def _build(tmp: Path) -> tuple[Path, Path]:
    """The sdist and the wheel built from a copy of the tree (the build leaves nothing in it);
    the wheel is built from the sdist, so the sdist must be complete too."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=SKIP)
    dist = tmp / "dist"
    r = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(src)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    [sdist], [wheel] = sorted(dist.glob("*.tar.gz")), sorted(dist.glob("*.whl"))
    check = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(sdist), str(wheel)],
                           capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.count("PASSED") == 2, check.stdout + check.stderr
    return sdist, wheel


def _wheel_metadata(wheel: Path) -> tuple[set[str], str, str]:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    return names, meta, entry


def _venv(tmp: Path, wheel: Path) -> tuple[Path, dict]:
    """A fresh environment outside the repository holding the wheel alone, seeing this one's dependencies."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                        "--ignore-installed", str(wheel)], capture_output=True, text=True)
    assert r.returncode == 0 and "Successfully installed freeze-pipe" in r.stdout, r.stdout + r.stderr
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # after: pip must not see ours
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env.update(HF_HUB_OFFLINE="1", PIPE_NO_PROGRESS="1", PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               PIPE_CACHE=str(tmp / "work" / "cache"))
    return venv, env


def _run(venv: Path, env: dict, cwd: Path, *args: str) -> str:
    r = subprocess.run([str(venv / "bin" / "pipe"), *args], capture_output=True, text=True, env=env, cwd=cwd,
                       timeout=600)
    assert r.returncode == 0, f"pipe {' '.join(args)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr
    return r.stdout


@pytest.mark.slow
def test_the_wheel_installed_in_a_fresh_environment_runs_from_an_empty_folder(tmp_path):
    assert not tmp_path.is_relative_to(ROOT)
    sdist, wheel = _build(tmp_path)
    names, meta, entry = _wheel_metadata(wheel)
    assert {f"configs/{n}" for n in DATA} <= names, sorted(DATA - {n.removeprefix("configs/") for n in names})
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in meta and "Project-URL: " in meta and "pipe = cli:main" in entry
    assert not any(n.startswith(("tests/", "bench/", "docs/")) for n in names)
    venv, env = _venv(tmp_path, wheel)
    work = tmp_path / "work" / "empty"
    work.mkdir(parents=True)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cli, configs, pipeline; "
                            "print(cli.__file__); print(configs.__file__); print(pipeline.__file__)"],
                           capture_output=True, text=True, env=env, cwd=work, check=True).stdout.split()
    assert all(Path(p).is_relative_to(venv) for p in where), where  # nothing from the tree or its editable install
    assert _run(venv, env, work, "--version").strip().endswith(importlib.metadata.version("freeze-pipe"))
    assert "tiny-vit" in _run(venv, env, work, "encoders")
    _the_pipeline_runs(venv, env, work, make_table(tmp_path / "work" / "data", 24))
    assert sorted(p.name for p in work.iterdir()) == ["runs"]  # runs/ beside the command; nothing else written here


def _the_pipeline_runs(venv: Path, env: dict, work: Path, table: Path) -> None:
    enc = ["-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert"]
    summary = json.loads(_run(venv, env, work, "embed", *enc, "--json").strip().splitlines()[-1])
    assert summary["embedded"] == 48 and summary["failed"] == 0
    for preset in ("demo", "paper"):
        _run(venv, env, work, "train-adaptor", *enc, "--config", preset, "epochs=1", "batch_size=6",
             "--out", f"runs/{preset}")
        assert (work / "runs" / preset / "last.safetensors").exists()
    zs = _run(venv, env, work, "evaluate", "--task", "zero-shot", *enc, "-a", "runs/demo", "--out", "runs/zs")
    assert "effusion" in zs
    cls = _run(venv, env, work, "evaluate", "--task", "classification", *enc, "-a", "runs/paper", "--fraction", "1.0",
               "--seeds", "1", "heads.epochs=2", "--out", "runs/cls")
    assert "AUROC" in cls or "auroc" in cls
