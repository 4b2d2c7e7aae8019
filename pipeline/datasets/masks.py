"""Segmentation masks: decoding the published encodings, and PNG files in the cache.

Masks on disk are single-channel 8-bit PNGs, 0 = background and 255 = target, at the
image's own resolution.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image

from core.atomic import atomic_write_with
from cache.files import UnreadableFile, read_regular_file
from pipeline.datasets.table import DatasetError


MAX_MASK_PIXELS = 2**28  # 268M pixels (16k x 16k): far beyond any X-ray, far below a decompression bomb


def decode_mask(data: bytes, check: Callable[[int, int], None]) -> np.ndarray:
    """A mask file's bytes as a bool ``[H, W]`` array: pixels whose grey level is nonzero are
    True. ``check(height, width)`` sees the size from the header before any pixel is decoded,
    and raises to refuse it. The one reading of a mask: previews and segmentation both use it."""
    with Image.open(io.BytesIO(data)) as img:
        check(img.size[1], img.size[0])
        return np.asarray(img.convert("L")) > 0


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A mask file as a bool ``[H, W]`` array (see :func:`decode_mask`)."""
    def check(h: int, w: int) -> None:
        if h * w > MAX_MASK_PIXELS:
            raise DatasetError(f"mask {path} is {w:,}x{h:,} pixels, more than a mask may have "
                               f"({MAX_MASK_PIXELS:,}); check the file")
    try:
        return decode_mask(read_regular_file(path), check)  # a FIFO or a device is refused, not read
    except UnreadableFile as e:
        if e.reason == "file not found":
            raise DatasetError(f"mask {path} does not exist; re-open the dataset to regenerate its masks") from None
        raise DatasetError(f"cannot read mask {path}: {e.reason}") from None
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"mask {path} does not exist; re-open the dataset to regenerate its masks") from None
    except Exception as e:
        raise DatasetError(f"cannot read mask {path}: {type(e).__name__}: {e}") from e


def save_mask(path: Path, mask: np.ndarray) -> None:
    """Write a bool mask as a 0/255 PNG, atomically (a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L")
    atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG"))


def parse_relative_rle(rle: str) -> np.ndarray:
    """The integers of a SIIM-ACR run-length code as an [N, 2] (offset, length) array.

    Raises ValueError for anything but an even number of non-negative integers.
    """
    try:
        values = np.array([int(v) for v in rle.split()], dtype=np.int64)
    except ValueError:
        raise ValueError(f"run-length code has a non-integer value: {rle[:60]!r}") from None
    if len(values) == 0 or len(values) % 2:
        raise ValueError(f"run-length code needs (offset, length) pairs, got {len(values)} number(s)")
    if (values < 0).any():
        raise ValueError("run-length code has a negative offset or length")
    return values.reshape(-1, 2)


def decode_relative_rle(rle: str, height: int, width: int) -> np.ndarray:
    """Decode the SIIM-ACR pneumothorax run-length code into a bool ``[height, width]`` mask.

    The code is pairs ``offset length``. Pixels are numbered column by column (index =
    column * height + row). Each run starts ``offset`` pixels after the end of the
    previous run (the first after pixel 0) and covers ``length`` pixels. ``-1`` (or an
    empty string) is the empty mask.
    """
    flat = np.zeros(height * width, dtype=bool)
    if rle.strip() in ("", "-1"):
        return flat.reshape(width, height).T
    pairs = parse_relative_rle(rle)
    ends = np.cumsum(pairs[:, 0] + pairs[:, 1])
    starts = ends - pairs[:, 1]
    if ends[-1] > flat.size:
        raise ValueError(f"run-length code runs to pixel {int(ends[-1])}, past the {height}x{width} image")
    for s, e in zip(starts, ends):
        flat[s:e] = True
    return flat.reshape(width, height).T


def boxes_to_mask(boxes: Iterable[tuple[float, float, float, float]], height: int, width: int) -> np.ndarray:
    """Rasterise (x, y, width, height) pixel boxes into a bool ``[height, width]`` mask.

    A box covers columns ``x .. x+width`` and rows ``y .. y+height`` (end-exclusive), with
    fractional edges rounded to the nearest pixel boundary and clipped to the image.
    """
    mask = np.zeros((height, width), dtype=bool)
    for x, y, w, h in boxes:
        c0, c1 = int(round(x)), int(round(x + w))
        r0, r1 = int(round(y)), int(round(y + h))
        c0, r0 = max(c0, 0), max(r0, 0)
        c1, r1 = min(c1, width), min(r1, height)
        if c1 > c0 and r1 > r0:
            mask[r0:r1, c0:c1] = True
    return mask
