"""The few test images an evaluation shows: decoded from their files as the encoder saw them.

Evaluation reads embeddings from the cache; only the pictures of a run (segmentation
overlays, retrieval examples) decode image files, a handful each. A file that cannot be
read is noted and left out of the picture: the figures do not depend on it.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.imaging import Preprocess, read_and_decode
from stages.evaluate.context import EvalContext


def input_view(ctx: EvalContext, position: int) -> np.ndarray | None:
    """Item ``position``'s plain (un-augmented) encoder input as ``[S, S]`` float in [0, 1], the
    grid its masks are on; None (with a note) when its file cannot be read."""
    p = Preprocess.from_dict(ctx.data.image.attrs["spec"]["preprocess"])
    item = ctx.data.items.iloc[int(position)]
    try:
        _, img = read_and_decode(item.image)
    except Exception as e:  # a picture is optional; the figures are not affected
        ctx.note(f"picture skipped for item {item.id!r}: {e}")
        return None
    return (p(img)[0] * p.std[0] + p.mean[0]).clamp(0, 1).numpy()


def to_uint8(image: np.ndarray, size: int | None = None) -> np.ndarray:
    """``[H, W]`` floats in [0, 1] as 8-bit grey, resized so the longer side is ``size``."""
    out = Image.fromarray(np.round(np.clip(image, 0, 1) * 255).astype(np.uint8))
    if size and max(out.size) != size:
        scale = size / max(out.size)
        out = out.resize((max(1, round(out.width * scale)), max(1, round(out.height * scale))), Image.BILINEAR)
    return np.asarray(out)


def thumbnails(ctx: EvalContext, positions, size: int = 128) -> dict[str, np.ndarray]:
    """8-bit grey thumbnails of the items at ``positions``, by item id (unreadable files left out)."""
    out = {}
    for pos in dict.fromkeys(int(p) for p in positions):
        view = input_view(ctx, pos)
        if view is not None:
            out[str(ctx.data.items.id.iloc[pos])] = to_uint8(view, size)
    return out
