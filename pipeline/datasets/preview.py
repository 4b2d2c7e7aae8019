"""A contact sheet of a dataset: images with their masks, labels and report snippets.

Each cell is ``CELL_PX`` wide and ``CELL_PX * 4/3`` tall: the image (masks overlaid in
semi-transparent colour, one colour per target) above its id, positive labels and the
start of its report. The grid has ``ceil(sqrt(n))`` columns, so the PNG is exactly
``cols * CELL_PX`` by ``rows * CELL_PX * 4/3`` pixels.
"""
from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.masks import load_mask
from pipeline.imaging import read_and_decode

CELL_PX = 300
DPI = 100
DISPLAY_PX = 384  # images are shrunk to this before drawing: a preview needs no more
MASK_COLOURS = ((1.0, 0.15, 0.15), (0.1, 0.6, 1.0), (0.2, 0.9, 0.3), (1.0, 0.8, 0.1))
MASK_ALPHA = 0.45


def pick(ds: Dataset, n: int, seed: int = 0) -> list[Item]:
    """``n`` items drawn without replacement by a seeded generator, in dataset order."""
    if n <= 0 or not ds.items:
        return []
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(ds.items), size=min(n, len(ds.items)), replace=False))
    return [ds.items[i] for i in idx]


def grid_shape(n: int) -> tuple[int, int]:
    cols = max(1, math.ceil(math.sqrt(n)))
    return max(1, math.ceil(n / cols)), cols


def render_preview(ds: Dataset, out: Path, n: int = 16, seed: int = 0) -> tuple[int, int]:
    """Write the grid PNG to ``out``; returns its (width, height) in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib takes a second to import
    from matplotlib.figure import Figure  # lazy: matplotlib takes a second to import

    items = pick(ds, n, seed)
    rows, cols = grid_shape(max(len(items), 1))
    cell_w, cell_h = CELL_PX / DPI, CELL_PX * 4 / 3 / DPI
    fig = Figure(figsize=(cols * cell_w, rows * cell_h), dpi=DPI, facecolor="white")
    FigureCanvasAgg(fig)
    if not items:
        fig.text(0.5, 0.5, f"{ds.name}: no items", ha="center", va="center")
    for i, item in enumerate(items):
        r, c = divmod(i, cols)
        left, bottom = c / cols, 1 - (r + 1) / rows
        w, h = 1 / cols, 1 / rows
        ax = fig.add_axes((left + 0.02 * w, bottom + 0.27 * h, 0.96 * w, 0.71 * h))
        ax.set_anchor("S")
        _draw_image(ax, item)
        fig.text(left + 0.03 * w, bottom + 0.255 * h, _caption(item), va="top", ha="left", fontsize=6.5,
                 family="monospace", wrap=False)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    with Image.open(out) as img:
        return img.size


def _draw_image(ax, item: Item) -> None:
    ax.set_axis_off()
    try:
        _, img = read_and_decode(item.image)
    except Exception as e:  # a preview shows what is wrong instead of stopping
        ax.text(0.5, 0.5, textwrap.fill(f"cannot show image: {e}", 40), ha="center", va="center", fontsize=6,
                color="red", transform=ax.transAxes)
        return
    shown = _shrink(img)
    ax.imshow(shown, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
    for colour, (name, path) in zip(MASK_COLOURS, item.masks.items()):
        try:
            mask = load_mask(path)
        except Exception:
            continue
        if mask.shape != shown.shape:
            mask = np.asarray(Image.fromarray(mask).resize(shown.shape[::-1], Image.NEAREST))
        overlay = np.zeros((*shown.shape, 4), dtype=np.float32)
        overlay[mask] = (*colour, MASK_ALPHA)
        ax.imshow(overlay, interpolation="nearest")


def _shrink(img: np.ndarray) -> np.ndarray:
    h, w = img.shape
    scale = DISPLAY_PX / max(h, w)
    if scale >= 1:
        return img
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize(size, Image.BILINEAR))


def label_summary(labels: dict[str, float]) -> str:
    """Positive and multi-class labels ("pneumothorax", "label=2"); unknown ones left out."""
    shown = []
    for name, value in labels.items():
        if value is None or (isinstance(value, float) and math.isnan(value)) or value == 0:
            continue
        shown.append(name if value == 1 else f"{name}={value:g}")
    if shown:
        return ", ".join(shown)
    return "no positive labels" if labels else "no labels"


def _caption(item: Item) -> str:
    lines = [_clip(item.id, 44)]
    lines += textwrap.wrap(f"[{item.split or '-'}] {label_summary(item.labels)}", 46)[:2]
    report = " ".join(str(item.report).split()) if item.report else ""
    lines += textwrap.wrap(report, 46)[:5] if report else ["(no report)"]
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
