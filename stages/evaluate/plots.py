"""PNG figures of an evaluation run (matplotlib, Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib  # lazy: matplotlib takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import

    return plt


def roc_grid(curves: dict[str, list[tuple]], path: Path, title: str) -> Path:
    """One panel per label; each panel holds (legend, fpr, tpr[, matplotlib style]) curves and the
    chance diagonal."""
    plt = _plt()
    n = max(1, len(curves))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.0 * rows), squeeze=False)
    for ax, (label, lines) in zip(axes.flat, curves.items()):
        for legend, fpr, tpr, *style in lines:
            ax.plot(fpr, tpr, lw=1.6, label=legend, **(style[0] if style else {}))
        ax.plot([0, 1], [0, 1], ":", color="grey", lw=1)
        ax.set(title=label, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01))
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def overlays(rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Per test image: the image, the true mask over it (green), the predicted mask (red)."""
    plt = _plt()
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3.1 * len(rows)), squeeze=False)
    for ax_row, (name, image, true, pred) in zip(axes, rows):
        for ax, mask, colour, what in ((ax_row[0], None, None, "image"), (ax_row[1], true, (0, 1, 0), "true mask"),
                                       (ax_row[2], pred, (1, 0, 0), "predicted mask")):
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            if mask is not None:
                rgba = np.zeros((*mask.shape, 4))
                rgba[..., :3] = colour
                rgba[..., 3] = 0.45 * mask
                ax.imshow(rgba)
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=0.8)
            ax.set_title(f"{name} · {what}" + (f" ({int(mask.sum())} px)" if mask is not None else ""), fontsize=8)
            ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.4 / fig.get_figheight()))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def recall_bars(values: dict[str, dict[str, float]], path: Path, title: str,
                chance: dict[str, float] | None = None) -> Path:
    """Grouped bars: one group per recall metric, one bar per method; a black tick marks chance."""
    plt = _plt()
    methods = list(values)
    keys = list(next(iter(values.values()))) if values else []
    fig, ax = plt.subplots(figsize=(1.1 * len(keys) + 3, 3.6))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        ax.bar(np.arange(len(keys)) + i * width, [100 * values[m].get(k, np.nan) for k in keys], width, label=m)
    centres = np.arange(len(keys)) + width * (len(methods) - 1) / 2
    for i, k in enumerate(keys):
        if chance and k in chance:
            ax.hlines(100 * chance[k], centres[i] - 0.45, centres[i] + 0.45, colors="black", linestyles="--",
                      label="chance" if i == 0 else None)
    ax.set_xticks(centres, keys, fontsize=8)
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
