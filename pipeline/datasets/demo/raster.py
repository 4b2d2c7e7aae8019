"""Pixel-level helpers of the phantom renderer: anti-aliased edges, smooth noise, blur,
and the mapping between the pixel grid and the patient's body frame."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


def _ramp(t):
    """Anti-aliased step: 0 outside, 1 inside; ``t`` is a signed distance in pixels."""
    return np.clip(t + 0.5, 0.0, 1.0)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Smooth noise of roughly unit variance (a lattice of ~cells x cells, bicubically
    upsampled to ``shape``)."""
    h, w = shape
    ch = max(2, int(round(cells * h / max(h, w))) + 1)
    cw = max(2, int(round(cells * w / max(h, w))) + 1)
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return out / (float(out.std()) + 1e-6)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edges replicated)."""
    r = max(1, int(math.ceil(2.0 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / max(sigma, 1e-3)) ** 2).astype(np.float32)
    k /= k.sum()
    p = np.pad(img, r, mode="edge")
    h, w = img.shape
    tmp = sum(k[i] * p[:, i:i + w] for i in range(2 * r + 1))
    return sum(k[i] * tmp[i:i + h, :] for i in range(2 * r + 1))


@dataclass
class _Frame:
    """Maps between pixel grid and the patient's body frame (rotation, shift, zoom)."""

    S: int
    sx: float
    sy: float
    zoom: float
    rot: float

    @property
    def px(self) -> float:  # one pixel in body units
        return 2.0 / (self.S * self.zoom)

    def grid(self, rows: slice, cols: slice) -> tuple[np.ndarray, np.ndarray]:
        S = self.S
        c = ((np.arange(cols.start, cols.stop, dtype=np.float32) + 0.5) / S) * 2.0 - 1.0
        r = ((np.arange(rows.start, rows.stop, dtype=np.float32) + 0.5) / S) * 2.0 - 1.0
        X, Y = np.meshgrid(c - self.sx, r - self.sy)
        cr, sr = math.cos(self.rot), math.sin(self.rot)
        return (cr * X + sr * Y) / self.zoom, (-sr * X + cr * Y) / self.zoom

    def crop(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice]:
        """Pixel slices covering the body-frame box [x0, x1] x [y0, y1]."""
        cr, sr = math.cos(self.rot), math.sin(self.rot)
        cols, rows = [], []
        for xb in (x0, x1):
            for yb in (y0, y1):
                X = self.sx + self.zoom * (cr * xb - sr * yb)
                Y = self.sy + self.zoom * (sr * xb + cr * yb)
                cols.append((X + 1) / 2 * self.S - 0.5)
                rows.append((Y + 1) / 2 * self.S - 0.5)
        S = self.S
        r0 = int(np.clip(math.floor(min(rows)) - 2, 0, S))
        r1 = int(np.clip(math.ceil(max(rows)) + 3, 0, S))
        c0 = int(np.clip(math.floor(min(cols)) - 2, 0, S))
        c1 = int(np.clip(math.ceil(max(cols)) + 3, 0, S))
        return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))
