"""Small builders shared by the tests: pairs tables with real image files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from cli import app

FINDINGS = ["No acute cardiopulmonary process.", "Small left pleural effusion.", "Right apical pneumothorax.",
            "Mild cardiomegaly. No effusion.", "Patchy right basal consolidation.", "Lungs are clear."]


def write_png(path: Path, seed: int, size: int = 64, mode: str = "L") -> Path:
    rng = np.random.default_rng(seed)
    arr = (rng.random((size, size)) * 255).astype(np.uint8)
    if mode == "RGB":
        arr = np.stack([arr] * 3, -1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_table(folder: Path, n: int, start: int = 0, name: str = "pairs.csv") -> Path:
    """n distinct images and reports, with splits and a binary label."""
    rows = []
    for i in range(start, start + n):
        write_png(folder / "img" / f"{i:04d}.png", seed=i)
        rows.append({"id": f"s{i}", "image": f"img/{i:04d}.png", "report": f"{FINDINGS[i % 6]} Study {i}.",
                     "split": ["train", "train", "valid", "test"][i % 4], "effusion": i % 2})
    path = folder / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def append_rows(table: Path, rows: list[dict]) -> None:
    df = pd.read_csv(table)
    pd.concat([df, pd.DataFrame(rows)], ignore_index=True).to_csv(table, index=False)


def pipe(*args: str, expect: int | None = 0):
    result = CliRunner().invoke(app, list(args))
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.output, result.exception)
    return result


def embed_json(table: Path, cache: Path, *extra: str, expect: int | None = 0) -> dict:
    r = pipe("embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
             "--cache", str(cache), "--json", *extra, expect=expect)
    return json.loads(r.stdout.strip().splitlines()[-1])


def embedded_table(root: Path, n: int, *extra: str) -> tuple[Path, Path]:
    """A table of n items under root/data, embedded into root/cache: what training tests share."""
    table = make_table(root / "data", n)
    embed_json(table, root / "cache", *extra)
    return table, root / "cache"


def fenced_block(language: str, containing: str) -> str:
    """The first ```language block holding ``containing``, in the README or any page under docs/:
    found by its content, so a test of the documented commands keeps finding them when they move."""
    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S):
            if containing in block:
                return block
    raise AssertionError(f"no ```{language} block holding {containing!r} in README.md or docs/")
