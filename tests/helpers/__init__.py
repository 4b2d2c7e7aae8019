"""What the tests share: pairs tables with real image files, the command line in-process, and the
settings that make a training or evaluation run take seconds.

The other builders live beside this one: ``files`` (JPEG, DICOM and CSV files), ``layouts`` (the
datasets' published layouts in miniature), ``stores`` (a store from a fixed table, and how two
stores are compared), ``kills`` (running ``pipe`` in its own process and killing it),
``s3server`` (a local S3 server), ``browser`` (headless Chromium) and ``object_writer`` (a writer
process for the bucket tests). Fixtures are in ``tests/conftest.py``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[2]  # the repository's root

# A small Adaptor trained on a few items: the one definition. A test adds what it varies after it
# (``[*SMALL, "epochs=1"]``; a later override of the same key wins).
SMALL = ("adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=8", "optim.lr=1e-3")
# Downstream heads and the segmentation decoder trained briefly (a test adds its bootstrap and seeds).
SMALL_HEADS = ("heads.epochs=4", "heads.min_steps=20", "heads.patience=2")
SMALL_SEG = ("seg.channels=[8,8,8,8]", "seg.epochs=2", "seg.min_steps=4", "seg.batch_size=8")

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


def make_eval_table(folder: Path, n: int = 48, mask_shape: tuple[int, int] | None = None,
                    with_labels: bool = True) -> Path:
    """Images (72 wide, 64 high), reports, splits, two 0/1 labels, a 3-class grade and effusion masks."""
    rows = []
    for i in range(n):
        img = np.random.default_rng(1000 + i).integers(0, 255, (64, 72)).astype(np.uint8)
        effusion = int(i % 3 == 0)
        if effusion:
            img[36:56, 8:30] = 250
        (folder / "img").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / "img" / f"{i:04d}.png")
        mask = np.zeros(mask_shape or img.shape, np.uint8)
        if effusion:
            mask[36:56, 8:30] = 255
        (folder / "mask").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(folder / "mask" / f"{i:04d}.png")
        row = {"id": f"e{i}", "image": f"img/{i:04d}.png", "report": f"{FINDINGS[i % 6]} Study {i}.",
               "split": ["train", "train", "valid", "test"][i % 4], "mask_effusion": f"mask/{i:04d}.png"}
        if with_labels:
            row |= {"effusion": effusion, "nodule": int(i % 5 == 0), "grade": i % 3}
        rows.append(row)
    path = folder / "pairs.csv"
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
    root = Path(__file__).resolve().parents[2]
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for block in re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S):
            if containing in block:
                return block
    raise AssertionError(f"no ```{language} block holding {containing!r} in README.md or docs/")
