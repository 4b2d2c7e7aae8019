"""The report's pictures, as PNG bytes: matplotlib charts and PIL image panels.

Every method keeps one colour on the whole page (tables, legends, curves), given by
:class:`Palette`. Charts carry no legend of their own where the page prints one in HTML.
"""
from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageFilter

from pipeline.methods import METHOD_KINDS, Method
from stages.evaluate import metrics as M

OURS = ["#1f6feb", "#d9480f", "#8250df", "#bf3989", "#0a7d8c", "#9a6700"]
# The fixed colours of the references, by method kind (each kind's own, pipeline/methods.py:METHOD_KINDS);
# other kinds take OURS.
REFERENCE = {name: kind.colour for name, kind in METHOD_KINDS.items() if kind.colour}
TRUTH, PREDICTION = (46, 160, 67), (230, 72, 30)


class Palette:
    """A colour per method (its ``base``: the features, whatever the head or variant), the same wherever it
    appears; references keep their kind's fixed colour (pipeline/methods.py:METHOD_KINDS)."""

    def __init__(self):
        self.colours: dict[str, str] = {}

    def __call__(self, method: Method) -> str:
        key = method.base
        if key not in self.colours:
            ours = [c for c in self.colours.values() if c in OURS]
            self.colours[key] = REFERENCE.get(method.kind) or OURS[len(ours) % len(OURS)]
        return self.colours[key]


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _plt():
    import matplotlib  # lazy: matplotlib takes a second to import

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib takes a second to import

    plt.rcParams.update({"font.size": 8.5, "axes.titlesize": 9.5, "axes.titleweight": "bold",
                         "axes.spines.top": False, "axes.spines.right": False, "axes.grid": True,
                         "grid.alpha": 0.25, "axes.edgecolor": "#8c959f", "axes.labelcolor": "#24292f",
                         "xtick.color": "#57606a", "ytick.color": "#57606a", "legend.frameon": False,
                         "font.family": "DejaVu Sans"})
    return plt


def _png(fig, dpi: int = 110) -> bytes:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------------------ training
def training_curves(runs: list[tuple[str, str, list[dict]]]) -> bytes:
    """Four panels over epochs, one colour per Adaptor: loss (train solid, validation dashed),
    validation recall image→text (R@1/5/10), learning rate, seconds per epoch."""
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(13.5, 3.0))
    for name, colour, rows in runs:
        ep = [r["epoch"] for r in rows]

        def series(key):
            return [r.get(key, np.nan) for r in rows]

        axes[0].plot(ep, series("train_loss"), color=colour, lw=1.6)
        if any("val_loss" in r for r in rows):
            axes[0].plot(ep, series("val_loss"), color=colour, lw=1.4, ls="--")
        for k, ls, alpha in ((1, ":", 0.7), (5, "-", 1.0), (10, "--", 0.7)):
            if any(f"val_i2t_r@{k}" in r for r in rows):
                axes[1].plot(ep, [100 * v for v in series(f"val_i2t_r@{k}")], color=colour, ls=ls, alpha=alpha,
                             lw=1.4, marker="o" if len(ep) < 15 else None, ms=2.5)
        axes[2].plot(ep, series("lr"), color=colour, lw=1.6)
        axes[3].plot(ep, series("epoch_seconds"), color=colour, lw=1.4, marker="o", ms=3)
    titles = ("contrastive loss (train —, validation – –)", "validation recall image→text (%)\nR@1 ···  R@5 —  R@10 – –",
              "learning rate", "seconds per epoch")
    from matplotlib.ticker import MaxNLocator  # lazy: with matplotlib

    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=8.5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not axes[1].lines:
        axes[1].text(0.5, 0.5, "no validation split", ha="center", va="center", transform=axes[1].transAxes)
    axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes[3].set_ylim(bottom=0)
    fig.tight_layout(w_pad=2.0)
    return _png(fig)


# -------------------------------------------------------------------- ROC, calibration
def reliability(y: np.ndarray, p: np.ndarray, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted probability, observed frequency, count) of each non-empty equal-width bin."""
    known = ~np.isnan(y)
    y, p = y[known] > 0.5, np.clip(p[known], 0, 1)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    count = np.bincount(idx, minlength=bins)
    ok = count > 0
    conf = np.bincount(idx, weights=p, minlength=bins)[ok] / count[ok]
    freq = np.bincount(idx, weights=y.astype(float), minlength=bins)[ok] / count[ok]
    return conf, freq, count[ok]


def roc_panels(curves: list[tuple[str, str, np.ndarray, np.ndarray]], calibrated: bool) -> bytes:
    """One label: its ROC curve per method and, for probabilities, the reliability diagram."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2 if calibrated else 1, figsize=(6.2 if calibrated else 3.2, 3.0), squeeze=False)
    roc = axes[0, 0]
    for _, colour, y, s in curves:
        fpr, tpr = M.roc_curve(y, s)
        roc.plot(fpr, tpr, color=colour, lw=1.6)
    roc.plot([0, 1], [0, 1], ":", color="#8c959f", lw=1)
    roc.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate", title="ROC")
    roc.set_aspect("equal")
    if calibrated:
        cal = axes[0, 1]
        cal.plot([0, 1], [0, 1], ":", color="#8c959f", lw=1)
        for _, colour, y, p in curves:
            conf, freq, count = reliability(y, p)
            cal.plot(conf, freq, color=colour, lw=1.3)
            cal.scatter(conf, freq, s=8 + 60 * count / max(count.max(), 1), color=colour, zorder=3, alpha=0.85,
                        edgecolors="white", linewidths=0.5)
        cal.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="predicted probability", ylabel="observed frequency",
                title="reliability (dot size: items)")
        cal.set_aspect("equal")
    fig.tight_layout(w_pad=2.5)
    return _png(fig, dpi=100)


def ece(y: np.ndarray, p: np.ndarray) -> float:
    known = ~np.isnan(y)
    return float(M.calibration_error((y[known] > 0.5).astype(float), p[known]))


# ----------------------------------------------------------------------- image panels
def _png_image(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def grey_png(image: np.ndarray) -> bytes:
    return _png_image(Image.fromarray(np.asarray(image, np.uint8)))


def _mask(mask: np.ndarray, size: int) -> Image.Image:
    return Image.fromarray(np.asarray(mask, bool).astype(np.uint8) * 255).resize((size, size), Image.NEAREST)


def overlay_png(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], size: int = 176,
                outline: np.ndarray | None = None) -> bytes:
    """A grey image with a mask tinted over it and its outline drawn, scaled to ``size`` pixels;
    ``outline``: another mask (the truth) drawn as an outline only, in the truth's colour."""
    grey = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB").resize((size, size), Image.BILINEAR)
    m = _mask(mask, size)
    out = Image.composite(Image.blend(grey, Image.new("RGB", grey.size, colour), 0.45), grey, m)
    for shape, c in ((m, colour), *(((_mask(outline, size), TRUTH),) if outline is not None else ())):
        edge = shape.filter(ImageFilter.FIND_EDGES).point(lambda v: 255 if v > 0 else 0)
        out.paste(Image.new("RGB", grey.size, c), mask=edge)
    return _png_image(out)


def plain_png(image: np.ndarray, size: int = 176) -> bytes:
    return _png_image(Image.fromarray(np.asarray(image, np.uint8)).resize((size, size), Image.BILINEAR))
