"""Built-in demo dataset: phantom chest X-rays paired with radiology-style reports.

No real image-report pairs can ship with the project, so this module draws *phantom*
posteroanterior (PA) chest radiographs from a seed: lungs, heart, mediastinum, ribs,
clavicles, spine, diaphragm and soft tissue, with per-patient anatomy and per-study
positioning, exposure and noise. Five findings are painted on top, each with its own
visual signature and a ground-truth mask, and a report is written from the same labels,
so the image, the labels and the text always agree.

Orientation follows a PA film read in the usual way: the patient's *left* is on the
viewer's *right* (image columns to the right of centre), so the heart bulges to the
image right and a "left pleural effusion" sits at the image's lower right.

Layout written by :func:`generate`::

    root/
      images/000000.png            8-bit grayscale, bright = dense
      masks/pneumothorax/000000.png  uint8 0/255, one per image (all zero when absent)
      masks/effusion/000000.png
      pairs.csv                    id, image, report, patient_id, split, <findings>, normal,
                                   mask_pneumothorax, mask_effusion
      demo.json                    spec + format version (written last)

Ids are zero-padded strings ("000123"): read pairs.csv with ``dtype={"id": str}``.

``reports="iu"`` draws the report sentences from the Indiana University chest X-ray
reports that ship inside the optional ``torchxrayvision`` package. They are licensed
CC BY-NC-ND 4.0 and are read from the installed package at run time; nothing of them is
copied into this repository.
"""
from __future__ import annotations

import argparse
import importlib.util
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

FORMAT_VERSION = 1

FINDINGS = ("cardiomegaly", "effusion", "consolidation", "pneumothorax", "nodule")
MASKED_FINDINGS = ("pneumothorax", "effusion")  # segmentation targets saved as mask files

# Per-image prevalence of each finding (drawn independently, so they co-occur sometimes).
# prod(1 - p) ~= 0.36, i.e. roughly a third of the studies are normal.
PREVALENCE = {
    "cardiomegaly": 0.17,
    "effusion": 0.21,
    "consolidation": 0.20,
    "pneumothorax": 0.15,
    "nodule": 0.16,
}
# Chronic findings are drawn once per patient and carried into every study of that patient.
CHRONIC = ("cardiomegaly", "nodule")

SPLITS = (("train", 0.7), ("valid", 0.1), ("test", 0.2))
STUDIES_PER_PATIENT = ((1, 0.5), (2, 0.3), (3, 0.2))

IU_MISSING = (
    "demo:reports=iu needs the IU reports from the torchxrayvision package: "
    "pip install 'freeze-pipe[xrv]'"
)

# Nodule sizes: the body frame spans 2 units across the image; one unit ~ this many mm.
MM_PER_UNIT = 150.0


# --------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class DemoSpec:
    n: int = 2000
    size: int = 224
    seed: int = 0
    reports: str = "synthetic"  # or "iu": sentences from the Indiana University reports

    def __post_init__(self) -> None:
        if int(self.n) < 1:
            raise ValueError(f"demo: n must be >= 1, got {self.n}")
        if int(self.size) < 32:
            raise ValueError(f"demo: size must be >= 32 px, got {self.size}")
        if self.reports not in ("synthetic", "iu"):
            raise ValueError(f"demo: reports must be 'synthetic' or 'iu', got {self.reports!r}")

    def to_dict(self) -> dict:
        return {"n": int(self.n), "size": int(self.size), "seed": int(self.seed), "reports": self.reports}

    def slug(self) -> str:
        """A folder/dataset name that differs whenever the generated data would."""
        return f"n{int(self.n)}-s{int(self.size)}-seed{int(self.seed)}-{self.reports}"


def parse_spec(options: str) -> DemoSpec:
    """``demo`` options: ``n=200,seed=1,size=224,reports=iu`` (``&`` works as a separator too)."""
    fields = {"n": int, "size": int, "seed": int, "reports": str}
    values = {}
    for part in filter(None, re.split(r"[,&]", options.lstrip("?"))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"demo option {part!r} not understood; use demo:key=value,... with keys "
                             f"{', '.join(fields)} (e.g. demo:n=200,reports=iu)")
        try:
            values[key] = fields[key](value.strip())
        except ValueError:
            raise ValueError(f"demo option {key}={value!r}: expected {fields[key].__name__}") from None
    return DemoSpec(**values)


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class PatientAnatomy:
    """Shape parameters shared by all studies of one patient (body-frame units:
    the image spans [-1, 1] in x and y, y pointing down)."""

    scale: float = 1.0  # overall thorax size on the film
    lung_width: float = 0.78  # |x| of the lateral lung border (right lung; left is a bit narrower)
    medial: float = 0.11  # |x| of the medial (mediastinal) lung border
    lung_top: float = -0.74  # y of the lung apices
    cp_y: float = 0.52  # y of the lateral costophrenic angles
    dome_right: float = 0.27  # y of the top of the right hemidiaphragm (image left)
    dome_left: float = 0.33  # left hemidiaphragm sits lower
    ctr: float = 0.44  # cardiothoracic ratio when the heart is normal
    heart_tilt: float = 0.55  # radians; long axis points down towards the image right
    heart_aspect: float = 0.78
    heart_right_frac: float = 0.30  # share of the heart width right of the midline
    body_width: float = 0.97
    neck_width: float = 0.24
    shoulder_y: float = -0.86
    rib_spacing: float = 0.15
    rib_offset: float = 0.0
    rib_curve: float = 0.75
    rib_thickness: float = 0.42
    clavicle_y: float = -0.66
    clavicle_slope: float = -0.22
    bone_density: float = 1.0
    soft_density: float = 1.0
    marking_density: float = 1.0
    gastric_bubble: float = 0.0  # 0 = not visible
    breast: float = 0.0  # breast / pectoral soft-tissue shadow strength (0 = none)
    texture_seed: int = 0  # vessel pattern of this patient's lungs


def sample_patient(rng: np.random.Generator) -> PatientAnatomy:
    """Draw one patient's anatomy (all values inside normal limits)."""
    u = rng.uniform
    lung_width = u(0.72, 0.82)
    return PatientAnatomy(
        scale=u(0.92, 1.04),
        lung_width=lung_width,
        medial=u(0.10, 0.13),
        lung_top=u(-0.80, -0.68),
        cp_y=u(0.46, 0.58),
        dome_right=u(0.20, 0.30),
        dome_left=u(0.26, 0.36),
        ctr=u(0.38, 0.47),
        heart_tilt=u(0.45, 0.70),
        heart_aspect=u(0.72, 0.85),
        heart_right_frac=u(0.26, 0.34),
        body_width=min(0.995, lung_width + u(0.14, 0.22)),
        neck_width=u(0.20, 0.28),
        shoulder_y=u(-1.05, -0.92),
        rib_spacing=u(0.135, 0.165),
        rib_offset=u(0.0, 1.0),
        rib_curve=u(0.85, 1.15),
        rib_thickness=u(0.36, 0.46),
        clavicle_y=u(-0.60, -0.50),
        clavicle_slope=u(-0.36, -0.22),
        bone_density=u(0.8, 1.2),
        soft_density=u(0.9, 1.1),
        marking_density=u(0.75, 1.25),
        gastric_bubble=float(u(0.5, 1.0)) if rng.random() < 0.6 else 0.0,
        breast=float(u(0.4, 1.0)) if rng.random() < 0.45 else 0.0,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- findings


def _choice(rng: np.random.Generator, options, p=None):
    i = int(rng.choice(len(options), p=p))
    return options[i]


def _zone_of(v: float) -> str:
    return "upper" if v < 0.42 else ("mid" if v < 0.68 else "lower")


def sample_finding(rng: np.random.Generator, name: str) -> dict:
    """Draw the parameters of one present finding. ``side`` is the patient's side.

    - cardiomegaly: ``severity`` (mild/moderate/marked), ``ctr`` (cardiothoracic ratio > 0.5)
    - effusion: ``side`` (left/right/bilateral), ``size`` (small/moderate/large)
    - consolidation: ``side``, ``lobe`` (upper/middle/lower; left middle = lingula),
      ``density``, ``extent``
    - pneumothorax: ``side`` (left/right), ``size`` (small/moderate/large)
    - nodule: ``nodules``: list of {side, u, v, diameter_mm} (u, v: lung-relative position)

    Every finding also has ``subtle``: faint in the image, hedged in the report.
    """
    if name == "cardiomegaly":
        severity = _choice(rng, ("mild", "moderate", "marked"), (0.45, 0.4, 0.15))
        lo, hi = {"mild": (0.53, 0.57), "moderate": (0.57, 0.62), "marked": (0.62, 0.68)}[severity]
        return {"severity": severity, "ctr": round(float(rng.uniform(lo, hi)), 3),
                "subtle": bool(severity == "mild" and rng.random() < 0.4)}
    if name == "effusion":
        side = _choice(rng, ("left", "right", "bilateral"), (0.36, 0.36, 0.28))
        size = _choice(rng, ("small", "moderate", "large"), (0.38, 0.42, 0.20))
        return {"side": side, "size": size, "subtle": bool(size == "small" and rng.random() < 0.35)}
    if name == "consolidation":
        side = _choice(rng, ("right", "left"), (0.55, 0.45))
        lobes = ("upper", "middle", "lower")
        lobe = _choice(rng, lobes, (0.3, 0.2, 0.5) if side == "right" else (0.35, 0.15, 0.5))
        subtle = bool(rng.random() < 0.2)
        density = float(rng.uniform(0.42, 0.52) if subtle else rng.uniform(0.6, 0.9))
        return {"side": side, "lobe": lobe, "density": round(density, 3),
                "extent": round(float(rng.uniform(0.9, 1.35)), 3), "subtle": subtle}
    if name == "pneumothorax":
        side = _choice(rng, ("right", "left"))
        size = _choice(rng, ("small", "moderate", "large"), (0.4, 0.4, 0.2))
        return {"side": side, "size": size, "subtle": bool(size == "small" and rng.random() < 0.35)}
    if name == "nodule":
        count = int(_choice(rng, (1, 2, 3, 4), (0.25, 0.35, 0.25, 0.15)))
        nodules = []
        for _ in range(count):
            side = _choice(rng, ("right", "left"))
            while True:
                u, v = float(rng.uniform(0.3, 0.85)), float(rng.uniform(0.2, 0.75))
                # keep clear of the diaphragm, the heart shadow (left lung, medial base)
                # and the hilum
                if side == "left" and v > 0.55 and u < 0.6:
                    continue
                if u < 0.4 and 0.45 < v < 0.7:
                    continue
                break
            nodules.append({"side": side, "u": round(u, 3), "v": round(v, 3),
                            "diameter_mm": int(rng.integers(12, 29))})
        subtle = bool(max(n["diameter_mm"] for n in nodules) <= 15 and rng.random() < 0.5)
        return {"nodules": nodules, "subtle": subtle}
    raise KeyError(f"unknown finding {name!r}")


def sample_findings(rng: np.random.Generator, names=FINDINGS) -> dict[str, dict]:
    """Draw which of ``names`` are present (independently, at ``PREVALENCE``) and their
    parameters. Returns {finding: params} for the present ones only."""
    out: dict[str, dict] = {}
    for name in names:
        if rng.random() < PREVALENCE[name]:
            out[name] = sample_finding(rng, name)
    return out


# --------------------------------------------------------------------------- rendering


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


_UC = 0.40  # u of the lung ellipse centre (the apex sits here)
_RU = 1.0 - _UC
_UD = 0.36  # u of the top of the diaphragm dome
_PEXP = 2.4  # superellipse exponent of the lung outline


@dataclass
class _Lung:
    side: int  # -1 = patient's right (image left), +1 = patient's left (image right)
    sl: tuple[slice, slice]
    x: np.ndarray
    y: np.ndarray
    u: np.ndarray  # 0 at the mediastinal border, 1 at the lateral chest wall
    v: np.ndarray  # 0 at the apex, 1 at the costophrenic angle
    r: np.ndarray  # superelliptic radius, 1 on the lateral/apical border
    grad: np.ndarray  # |grad r| in body units
    inside: np.ndarray  # soft lung mask
    m: float
    w: float
    top: float
    h: float


def _lung(frame: _Frame, side: int, P: PatientAnatomy, insp: float) -> _Lung:
    m = P.medial
    L = P.lung_width * (0.95 if side > 0 else 1.0)
    top = P.lung_top + 0.3 * insp
    cp = P.cp_y + insp
    dome = (P.dome_left if side > 0 else P.dome_right) + insp
    w, h = L - m, cp - top
    lo, hi = sorted((side * (m - 0.02), side * (L + 0.02)))
    sl = frame.crop(lo, hi, top - 0.02, cp + 0.02)
    x, y = frame.grid(*sl)
    px = frame.px
    u = (side * x - m) / w
    v = (y - top) / h
    a = np.abs((u - _UC) / _RU)
    b = np.abs(v - 1.0)
    ap, bp = a**_PEXP, b**_PEXP
    s = ap + bp + 1e-9
    r = s ** (1.0 / _PEXP)
    # gradient of r = s^(1/p): (1/p) s^(1/p - 1) * p |a|^(p-1) da/dx ...
    k = r / s
    grad = np.sqrt((k * ap / np.maximum(a, 1e-6) / (_RU * w)) ** 2 + (k * bp / np.maximum(b, 1e-6) / h) ** 2) + 1e-4
    d_outer = (1.0 - r) / grad
    d_med = u * w
    ud = np.clip((u - _UD) / (1.0 - _UD), 0.0, None)
    um = np.clip((_UD - u) / _UD, 0.0, None)
    dome_y = dome + (cp - dome) * ud * ud + 0.3 * (cp - dome) * um * um
    slope = 2.0 * (cp - dome) * ud / ((1.0 - _UD) * w)
    d_dome = (dome_y - y) / np.sqrt(1.0 + slope * slope)
    inside = _ramp(d_outer / px) * _ramp(d_med / px) * _ramp(d_dome / px)
    return _Lung(side, sl, x, y, u, v, r, grad, inside, m, w, top, h)


def _vessel_profiles(rng: np.random.Generator):
    """Angular profiles of the lung markings of one lung (a patient-level texture):
    trunks radiating from the hilum, and branches that split off them further out."""
    grid = np.linspace(-np.pi, np.pi, 721)
    k = int(rng.integers(11, 15))
    trunks = np.sort(rng.uniform(-2.3, 2.0, k))
    branches = np.repeat(trunks, 2) + rng.normal(0.0, 0.09, 2 * k)
    levels = []
    for centres in (trunks, branches):
        n = len(centres)
        widths = _VESSEL_SIGMA * rng.uniform(0.8, 1.2, n)
        amps = rng.uniform(0.55, 1.0, n)
        d = (grid[None, :] - centres[:, None] + np.pi) % (2 * np.pi) - np.pi
        g = np.clip((amps[:, None] * np.exp(-0.5 * (d / widths[:, None]) ** 2)).sum(0), 0.0, 1.0)
        wig = (rng.uniform(0.03, 0.08), rng.uniform(4, 9), rng.uniform(0, 2 * np.pi))
        levels.append((g.astype(np.float32), wig))
    return grid.astype(np.float32), levels


_VESSEL_SIGMA = 0.03


@lru_cache(maxsize=256)
def _patient_profiles(texture_seed: int) -> dict:
    tex = np.random.default_rng(texture_seed)
    return {-1: _vessel_profiles(tex), +1: _vessel_profiles(tex)}


def _vessels(lung: _Lung, profiles, density: float) -> np.ndarray:
    """Lung markings: tapering, branching streaks radiating from the hilum."""
    grid, levels = profiles
    hx = lung.side * (lung.m + 0.08 * lung.w)
    hy = lung.top + 0.56 * lung.h
    dx = (lung.x - hx) * lung.side
    dy = lung.y - hy
    rad = np.sqrt(dx * dx + dy * dy)
    theta = np.arctan2(dy, dx)
    # raise the profile to a power so that a vessel's width in body units,
    # ~ rad * sigma / sqrt(power), tapers from ~0.012 near the hilum to ~0.004
    width = np.maximum(0.016 - 0.024 * rad, 0.0042)
    power = np.clip((rad * _VESSEL_SIGMA / width) ** 2, 1.0, 40.0)
    out = np.zeros_like(rad)
    for level, (g, (wa, wf, wp)) in enumerate(levels):
        th = theta + wa * np.sin(wf * rad + wp) * np.minimum(rad * 4.0, 1.0)
        th = (th + np.pi) % (2 * np.pi) - np.pi
        val = np.interp(th, grid, g).astype(np.float32)
        val = np.exp(power * np.log(val + 1e-4))
        decay, start = (0.30, 0.0) if level == 0 else (0.45, 0.15)
        fade = np.exp(-rad / decay) * np.clip((rad - start) / 0.05, 0.0, 1.0)
        if level == 0:
            fade = fade * np.clip((0.42 - rad) / 0.15, 0.0, 1.0)  # trunks end where they branch
        out += val * fade
    return np.clip(out * density, 0.0, 1.2)


def _heart(x, y, P: PatientAnatomy, insp: float, ctr: float, px: float) -> np.ndarray:
    """Cardiac silhouette: a tilted ellipse whose widest extent is ctr x thoracic width,
    about a third of it right of the midline, resting on the diaphragm."""
    T = P.lung_width * 1.95
    W = ctr * T
    th, asp = P.heart_tilt, P.heart_aspect
    c, s = math.cos(th), math.sin(th)
    a = (W / 2.0) / math.sqrt(c * c + asp * asp * s * s)
    b = asp * a
    ey = math.sqrt(a * a * s * s + b * b * c * c)
    hx = W / 2.0 - P.heart_right_frac * W
    dome_mean = 0.5 * (P.dome_left + P.dome_right) + insp
    hy = dome_mean + 0.08 - 0.62 * ey
    dx, dy = x - hx, y - hy
    xr = c * dx + s * dy
    yr = -s * dx + c * dy
    q = np.sqrt((xr / a) ** 2 + (yr / b) ** 2)
    main = _ramp((1.0 - q) * math.sqrt(a * b) / px)
    # right atrial convexity and the great vessels above the heart
    ra = np.sqrt(((x - (hx - 0.55 * a * c)) / (0.42 * b)) ** 2 + ((y - (hy + 0.02)) / (0.55 * b)) ** 2)
    return np.maximum(main, _ramp((1.0 - ra) * 0.4 * b / px))


def render_case(
    rng: np.random.Generator, size: int, patient: PatientAnatomy, findings: dict
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Render one study.

    Returns the image (uint8, [size, size], bright = dense) and a bool mask for every
    name in ``FINDINGS`` (all False when the finding is absent). ``findings`` maps each
    present finding to its parameters (see :func:`sample_finding`).

    The study's positioning, exposure and noise come from streams drawn first from
    ``rng``, independent of ``findings``: the same ``rng`` state with ``findings={}``
    renders the same study without its findings.
    """
    P = patient
    S = int(size)
    seeds = rng.integers(0, 2**63 - 1, size=3)
    acq = np.random.default_rng(int(seeds[0]))
    frng = np.random.default_rng(int(seeds[1]))
    nrng = np.random.default_rng(int(seeds[2]))
    profiles = _patient_profiles(P.texture_seed)

    # --- acquisition: positioning, inspiration, exposure
    frame = _Frame(S, sx=float(acq.normal(0.0, 0.03)), sy=float(acq.normal(0.02, 0.03)),
                   zoom=float(P.scale * acq.uniform(0.97, 1.03)), rot=float(acq.normal(0.0, 0.035)))
    insp = float(np.clip(acq.normal(0.0, 0.035), -0.08, 0.08))
    gamma = acq.uniform(0.88, 1.15)
    lo, hi = acq.uniform(-0.04, 0.04), acq.uniform(0.94, 1.04)
    kexp = acq.uniform(1.1, 1.4)
    noise_sd = acq.uniform(0.008, 0.02)
    mottle_sd = acq.uniform(0.01, 0.025)
    soft_gain = acq.uniform(0.92, 1.08)
    blur = acq.uniform(0.4, 0.9)
    px = frame.px

    full = (slice(0, S), slice(0, S))
    x, y = frame.grid(*full)
    ax = np.abs(x)

    # --- body / soft tissue
    sh = np.clip((y - P.shoulder_y) / 0.40, 0.0, 1.0) ** 0.55  # trapezius slope to the shoulders
    bw = P.neck_width + (P.body_width - P.neck_width) * sh
    bw = bw - 0.05 * np.clip(y - 0.5, 0.0, None)
    body = _ramp((bw - ax) / px)
    thick = np.sqrt(np.clip(1.0 - (x / bw) ** 2, 0.0, 1.0))
    body_A = body * (0.10 + 0.90 * thick**0.8) * P.soft_density * soft_gain
    if P.breast > 0:  # breast / pectoral soft tissue over the lower lateral lung zones
        for s in (-1, 1):
            q = ((x - s * 0.50) / 0.34) ** 2 + ((y - 0.28) / 0.26) ** 2
            body_A = body_A + 0.10 * P.breast * np.exp(-q) * _ramp((0.52 - y) / (3 * px)) * body

    # --- heart, mediastinum
    ctr = findings["cardiomegaly"]["ctr"] if "cardiomegaly" in findings else P.ctr
    heart = _heart(x, y, P, insp, ctr, px)
    kq = np.sqrt(((x - (P.medial + 0.01)) / 0.05) ** 2 + ((y + 0.29) / 0.075) ** 2)
    knob = _ramp((1.0 - kq) * 0.05 / px)
    dome_mean = 0.5 * (P.dome_left + P.dome_right) + insp
    nonlung = np.maximum(heart, knob)

    air = np.zeros_like(x)
    envelope = np.zeros_like(x)  # where the lungs are, whatever fills them
    mark = np.zeros_like(x)
    ptx_dark = np.zeros_like(x)
    line = np.zeros_like(x)
    extra = np.zeros_like(x)
    masks = {f: np.zeros((S, S), dtype=bool) for f in FINDINGS}

    side_name = {-1: "right", +1: "left"}
    lungs = {s: _lung(frame, s, P, insp) for s in (-1, +1)}
    for s, lung in lungs.items():
        name = side_name[s]
        sl = lung.sl
        # the lung is thinner (less lucent) towards its edges
        depth = 0.78 + 0.22 * np.sqrt(np.clip(1.0 - lung.r * lung.r, 0.0, 1.0))
        a_s = lung.inside * (1.0 - nonlung[sl]) * depth
        ves = _vessels(lung, profiles[s], P.marking_density)
        ptx = np.zeros_like(a_s)
        inner = lung.inside > 0.5

        eff = findings.get("effusion")
        if eff and eff["side"] in (name, "bilateral"):
            v_med, v_lat = {"small": (1.04, 0.78), "moderate": (0.76, 0.54), "large": (0.52, 0.24)}[eff["size"]]
            jitter = frng.uniform(-0.03, 0.03)
            uu = np.clip(lung.u, 0.0, 1.0)
            v_surf = v_med + jitter - (v_med - v_lat) * uu**1.6
            dist = (lung.v - v_surf) * lung.h
            fluid = _ramp(dist / (2.0 * px))
            dens = 0.78 + 0.22 * np.clip(dist / 0.10, 0.0, 1.0)
            dens = dens * (0.85 if eff["subtle"] else 1.0)
            masks["effusion"][sl] |= (fluid > 0.5) & inner
            a_s = a_s * (1.0 - fluid * dens)

        pt = findings.get("pneumothorax")
        if pt and pt["side"] == name:
            depth, v_lim = {"small": (0.10, 0.48), "moderate": (0.18, 0.78), "large": (0.30, 1.02)}[pt["size"]]
            depth *= frng.uniform(0.9, 1.15)
            taper = np.clip((v_lim - lung.v) / 0.28, 0.0, 1.0)
            d_eff = depth * np.sqrt(taper)
            edge_dist = (lung.r - (1.0 - d_eff)) / lung.grad  # body units, > 0 inside the rim
            visible = (d_eff / lung.grad) > 1.5 * px
            ptx = _ramp(edge_dist / px) * lung.inside * visible
            masks["pneumothorax"][sl] |= (ptx > 0.5) & inner
            strength = 0.75 if pt["subtle"] else 1.0
            ptx_dark[sl] += ptx * strength
            pl = np.exp(-0.5 * (edge_dist / (0.8 * px)) ** 2) * visible * inner
            line[sl] += pl * strength * (1.0 - nonlung[sl])
            collapsed = lung.inside * (1.0 - ptx) * (d_eff > 0.12)
            extra[sl] += 0.05 * collapsed * np.clip(d_eff / 0.26, 0.0, 1.0)

        con = findings.get("consolidation")
        if con and con["side"] == name:
            cu, cv, ru, rv = {
                ("right", "upper"): (0.50, 0.30, 0.34, 0.20),
                ("right", "middle"): (0.30, 0.70, 0.30, 0.15),
                ("right", "lower"): (0.58, 0.86, 0.34, 0.18),
                ("left", "upper"): (0.50, 0.32, 0.34, 0.20),
                ("left", "middle"): (0.42, 0.64, 0.28, 0.14),  # lingula
                ("left", "lower"): (0.68, 0.86, 0.30, 0.17),
            }[(name, con["lobe"])]
            ext = con["extent"]
            cu += frng.uniform(-0.05, 0.05)
            cv += frng.uniform(-0.04, 0.04)
            rho2 = ((lung.u - cu) / (ru * ext)) ** 2 + ((lung.v - cv) / (rv * ext)) ** 2
            cells = max(6, int(16 * lung.u.shape[0] / S))
            patch = 0.9 * (1.0 - rho2) + 0.45 * _smooth_noise(frng, lung.u.shape, cells)
            opac = np.clip((patch + 0.2) / 0.9, 0.0, 1.0)
            opac = opac * opac * (3.0 - 2.0 * opac) * lung.inside
            opac = opac * (0.88 + 0.12 * np.clip(_smooth_noise(frng, lung.u.shape, cells * 2), -1.0, 1.0))
            masks["consolidation"][sl] |= (opac > 0.3) & inner
            a_s = a_s * (1.0 - con["density"] * opac)

        air[sl] += a_s
        envelope[sl] += lung.inside
        mark[sl] += ves * a_s * (1.0 - ptx)
        hx = s * (lung.m + 0.08 * lung.w)
        hy = lung.top + 0.56 * lung.h
        hil = np.exp(-(((lung.x - hx) / 0.08) ** 2 + ((lung.y - hy) / 0.11) ** 2))
        extra[sl] += 0.15 * hil * lung.inside

    if "cardiomegaly" in findings:
        masks["cardiomegaly"] = (heart > 0.5) & (y < dome_mean + 0.02)

    nod = np.zeros_like(x)
    if "nodule" in findings:
        dens = 0.28 if findings["nodule"]["subtle"] else 0.40
        for n in findings["nodule"]["nodules"]:
            lung = lungs[+1 if n["side"] == "left" else -1]
            nx = lung.side * (lung.m + n["u"] * lung.w)
            ny = lung.top + n["v"] * lung.h
            rad = max(n["diameter_mm"] / 2.0 / MM_PER_UNIT, 1.0 * px)
            win = frame.crop(nx - rad - 2 * px, nx + rad + 2 * px, ny - rad - 2 * px, ny + rad + 2 * px)
            d = np.sqrt((x[win] - nx) ** 2 + (y[win] - ny) ** 2)
            prof = _ramp((rad - d) / px) * (0.6 + 0.4 * np.sqrt(np.clip(1.0 - (d / rad) ** 2, 0.0, 1.0)))
            nod[win] = np.maximum(nod[win], prof)
            masks["nodule"][win] |= d <= rad
        nod *= dens

    # --- bones
    rib_c = P.rib_curve * ((ax - 0.2) ** 2 - 0.04)
    t = (y - rib_c) / P.rib_spacing + P.rib_offset
    frac = t - np.floor(t)
    sp_px = P.rib_spacing / px
    post = _ramp(frac * sp_px) * _ramp((P.rib_thickness - frac) * sp_px)
    post = post * (0.7 + 0.3 * np.abs(frac / P.rib_thickness * 2 - 1))  # brighter cortex
    ant_c = -0.55 * ax + 0.25 * ax * ax
    t2 = (y - ant_c) / (P.rib_spacing * 1.15) + P.rib_offset * 0.7
    frac2 = t2 - np.floor(t2)
    ant = _ramp(frac2 * sp_px * 1.15) * _ramp((0.30 - frac2) * sp_px * 1.15) * np.clip((ax - 0.3) / 0.15, 0.0, 1.0)
    cage = _ramp((P.lung_width + 0.07 - ax) / (2 * px)) * np.clip((y - (P.lung_top - 0.14)) / 0.08, 0.0, 1.0)
    cage = cage * np.clip((P.cp_y + 0.22 - y) / 0.15, 0.0, 1.0) * np.clip((ax - 0.05) / 0.06, 0.0, 1.0)
    # ribs show best against aerated lung; over soft tissue they are faint
    ribs = (post + 0.5 * ant) * cage * (0.35 + 0.65 * envelope)

    d0, d1 = 0.05, P.lung_width - 0.04
    tt = np.clip((ax - d0) / (d1 - d0), 0.0, 1.0)
    yc = P.clavicle_y + P.clavicle_slope * (ax - d0) - 0.025 * np.sin(np.pi * 2 * tt)
    half = 0.024 + 0.014 * (1 - tt)
    clav = _ramp((half - np.abs(y - yc)) / px) * _ramp((ax - d0) / px) * _ramp((d1 - ax) / px)

    spine_w = 0.055
    vert = 0.8 + 0.2 * np.cos(2 * np.pi * (y / 0.115 + P.rib_offset))
    spine = _ramp((spine_w - ax) / px) * vert * np.clip((0.9 - y) / 0.3, 0.0, 1.0)
    ped = np.exp(-(((ax - spine_w * 0.75) / 0.013) ** 2)) * np.clip(np.cos(2 * np.pi * (y / 0.115 + P.rib_offset + 0.25)), 0, 1)

    trachea = _ramp((0.028 - np.abs(x + 0.005)) / px) * np.clip((-0.26 + 0.2 * insp - y) / 0.1, 0.0, 1.0)

    bubble = np.zeros_like(x)
    if P.gastric_bubble > 0:
        bx, by = 0.34, P.dome_left + insp + 0.12
        q = np.sqrt(((x - bx) / 0.10) ** 2 + ((y - by) / 0.05) ** 2)
        bubble = _ramp((1 - q) * 0.05 / px) * P.gastric_bubble

    bone = P.bone_density * (0.10 * ribs + 0.20 * clav + 0.10 * spine + 0.05 * ped)

    A = body_A * (1.0 - 0.78 * air - 0.15 * ptx_dark - 0.2 * trachea - 0.3 * bubble)
    A += 0.18 * mark + extra + 0.16 * line + nod + bone * body
    A += mottle_sd * _smooth_noise(nrng, (S, S), max(8, S // 10)) * body

    img = (1.0 - np.exp(-kexp * A)) / (1.0 - math.exp(-kexp * 2.0))
    img = np.clip((img - lo) / (hi - lo), 0.0, 1.0) ** gamma
    img = _blur(img, blur * S / 224.0)
    img = img + noise_sd * nrng.standard_normal((S, S), dtype=np.float32)
    out = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    for f in FINDINGS:
        if f in findings and not masks[f].any():  # never a positive with an empty mask
            raise RuntimeError(f"demo: {f} rendered with an empty mask ({findings[f]})")
    return out, masks


# --------------------------------------------------------------------------- reports

_SCOPE_BREAK = re.compile(r"[;:.]|\bbut\b|however|although|though|\bthere (?:is|are)\b|\bwith\b|\bwhich\b|"
                          r"\bis (?:seen|present|noted)\b|\bare (?:seen|present|noted)\b", re.I)
_NEG_CUE = re.compile(r"\b(no|not|without|negative for|free of|clear of|absence of|resolved)\b", re.I)


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


_LOBE_PHRASES = {
    ("right", "upper"): ("right upper lobe", "right upper zone", "right upper lung"),
    ("right", "middle"): ("right middle lobe",),
    ("right", "lower"): ("right lower lobe", "right lung base", "right base"),
    ("left", "upper"): ("left upper lobe", "left upper zone", "left upper lung"),
    ("left", "middle"): ("lingula", "lingular segment"),
    ("left", "lower"): ("left lower lobe", "left lung base", "left base"),
}
_ZONE_PHRASES = {
    "upper": ("{side} upper lung zone", "{side} upper lobe", "{side} upper lung"),
    "mid": ("{side} mid lung zone", "{side} midlung", "{side} mid lung"),
    "lower": ("{side} lung base", "{side} lower lobe", "{side} lower lung zone"),
}
_COUNT_WORDS = {2: "two", 3: "three", 4: "four"}


def _effusion_sentence(rng, p: dict, impression: bool) -> str:
    side, size = p["side"], p["size"]
    bil = side == "bilateral"
    eff = "pleural effusions" if bil else "pleural effusion"
    angle = "costophrenic angles" if bil else f"{side} costophrenic angle"
    if p["subtle"]:
        opts = [
            f"Possible small {side} {eff}.",
            f"Blunting of the {angle} may represent a small {eff}.",
            f"Trace {side} {eff} is suspected.",
            f"Minimal blunting of the {angle}, possibly a small {eff}.",
        ]
        if impression:
            opts = [f"Possible small {side} {eff}.", f"Probable trace {side} {eff}."]
        return _pick(rng, opts)
    article = "" if bil else "a "
    be = "are" if bil else "is"
    opts = [
        f"{_cap(size)} {side} {eff}.",
        f"There {be} {article}{size} {side} {eff}.",
        f"{_cap(size)} {side} {eff} with blunting of the {angle}.",
        f"Fluid layering at {'both bases' if bil else 'the ' + side + ' base'} consistent with {article}{size} {side} {eff}.",
    ]
    if size == "moderate":
        opts.append(f"{_cap(size)} {side} {eff} obscuring the {'hemidiaphragms' if bil else side + ' hemidiaphragm'}.")
    if size == "large":
        opts.append(f"Large {side} {eff} occupying the lower {'hemithoraces' if bil else side + ' hemithorax'}.")
    if impression:
        opts = [f"{_cap(size)} {side} {eff}.", f"{_cap(size)} {side} {eff}, layering at the {'bases' if bil else 'base'}."]
    return _pick(rng, opts)


def _pneumothorax_sentence(rng, p: dict, impression: bool) -> str:
    side, size = p["side"], p["size"]
    if p["subtle"]:
        opts = [
            f"Possible small {side} apical pneumothorax.",
            f"A tiny {side} apical pneumothorax cannot be excluded.",
            f"Questionable thin pleural line at the {side} apex, which may represent a small pneumothorax.",
        ]
        if impression:
            opts = [f"Possible small {side} apical pneumothorax.", f"Small {side} apical pneumothorax cannot be excluded."]
        return _pick(rng, opts)
    where = {"small": "apex", "moderate": "upper hemithorax", "large": "hemithorax"}[size]
    opts = [
        f"{_cap(size)} {side} pneumothorax.",
        f"There is a {size} {side} pneumothorax with a visible pleural line.",
        f"A visceral pleural line is seen in the {side} {where}, consistent with a {size} pneumothorax.",
    ]
    if size == "small":
        opts.append(f"Small {side} apical pneumothorax.")
    if size == "large":
        opts.append(f"Large {side} pneumothorax with partial collapse of the {side} lung.")
    if impression:
        opts = [f"{_cap(size)} {side} pneumothorax.", f"{_cap(size)} {side} pneumothorax; clinical correlation recommended."]
    return _pick(rng, opts)


def _consolidation_sentence(rng, p: dict, impression: bool) -> str:
    loc = _pick(rng, _LOBE_PHRASES[(p["side"], p["lobe"])])
    if p["subtle"]:
        opts = [
            f"Cannot exclude early consolidation in the {loc}.",
            f"Subtle patchy airspace opacity in the {loc}, possibly early pneumonia.",
            f"Questionable faint consolidation in the {loc}.",
        ]
        if impression:
            opts = [f"Cannot exclude early pneumonia in the {loc}.", f"Possible early consolidation in the {loc}."]
        return _pick(rng, opts)
    opts = [
        f"Patchy airspace consolidation in the {loc}.",
        f"Focal consolidation in the {loc}, consistent with pneumonia.",
        f"There is patchy airspace disease within the {loc}.",
        f"Airspace opacity in the {loc} concerning for pneumonia.",
        f"{_cap(loc)} consolidation.",
    ]
    if impression:
        opts = [f"{_cap(loc)} pneumonia.", f"{_cap(loc)} consolidation, likely pneumonia.",
                f"Consolidation in the {loc} compatible with pneumonia."]
    return _pick(rng, opts)


def _nodule_sentence(rng, p: dict, impression: bool) -> str:
    nods = p["nodules"]
    d = max(n["diameter_mm"] for n in nods)
    size = f"{d} mm" if d < 10 or rng.random() < 0.6 else f"{d / 10:.1f} cm"
    if len(nods) == 1:
        n = nods[0]
        loc = _pick(rng, _ZONE_PHRASES[_zone_of(n["v"])]).format(side=n["side"])
        if p["subtle"]:
            opts = [f"Possible small nodule in the {loc}.", f"Questionable {size} nodular density in the {loc}."]
            if impression:
                opts = [f"Possible {loc} nodule; consider CT for further evaluation."]
            return _pick(rng, opts)
        opts = [
            f"A {size} nodule in the {loc}.",
            f"There is a {size} pulmonary nodule projecting over the {loc}.",
            f"Rounded {size} nodular density in the {loc}.",
            f"{_cap(size)} well-circumscribed nodule in the {loc}.",
        ]
        if impression:
            opts = [f"{_cap(loc)} pulmonary nodule; CT recommended for further characterization.",
                    f"{size} {loc} nodule; recommend follow-up CT."]
        return _cap(_pick(rng, opts))
    sides = {n["side"] for n in nods}
    cw = _COUNT_WORDS[len(nods)]
    where = f"the {next(iter(sides))} lung" if len(sides) == 1 else "both lungs"
    if p["subtle"]:
        opts = [f"Possible {cw} small nodules in {where}.", f"Questionable small nodular densities in {where}."]
        if impression:
            opts = [f"Possible small pulmonary nodules in {where}; consider CT."]
        return _pick(rng, opts)
    opts = [
        f"{_cap(cw)} pulmonary nodules in {where}, the largest measuring {size}.",
        f"There are {cw} nodules in {where}, up to {size}.",
        f"Multiple ({cw}) rounded nodules in {where}, the largest {size}.",
    ]
    if impression:
        opts = [f"Pulmonary nodules in {where}, largest {size}; recommend follow-up CT.",
                f"{_cap(cw)} pulmonary nodules; CT recommended."]
    return _pick(rng, opts)


def _cardiomegaly_sentence(rng, p: dict, impression: bool) -> str:
    sev = p["severity"]
    if p["subtle"]:
        opts = ["Possible mild cardiomegaly.", "The cardiac silhouette appears mildly enlarged."]
        if impression:
            opts = ["Possible mild cardiomegaly."]
        return _pick(rng, opts)
    adv = {"mild": "mildly", "moderate": "moderately", "marked": "markedly"}[sev]
    adj = {"mild": "Mild", "moderate": "Moderate", "marked": _pick(rng, ("Marked", "Severe"))}[sev]
    opts = [
        f"{adj} cardiomegaly.",
        f"The heart is {adv} enlarged.",
        f"{adj} enlargement of the cardiac silhouette.",
        f"The cardiac silhouette is {adv} enlarged.",
        f"The heart is enlarged, with a cardiothoracic ratio of about {p['ctr']:.2f}.",
    ]
    if impression:
        opts = [f"{adj} cardiomegaly.", "Cardiomegaly.", f"{adj} cardiomegaly without pulmonary edema."]
    return _pick(rng, opts)


_POSITIVE = {
    "cardiomegaly": _cardiomegaly_sentence,
    "effusion": _effusion_sentence,
    "consolidation": _consolidation_sentence,
    "pneumothorax": _pneumothorax_sentence,
    "nodule": _nodule_sentence,
}
_NEGATIVE = {
    "cardiomegaly": ("Heart size is normal.", "The heart is normal in size.", "Normal heart size.",
                     "The cardiac silhouette is within normal limits.", "No cardiomegaly.",
                     "The cardiomediastinal silhouette is within normal limits."),
    "effusion": ("No pleural effusion.", "No effusion.", "There is no pleural effusion.",
                 "No pleural effusions are seen.", "The costophrenic angles are sharp."),
    "consolidation": ("No focal consolidation.", "No focal airspace consolidation.",
                      "There is no focal airspace disease.", "No consolidation."),
    "pneumothorax": ("No pneumothorax.", "There is no pneumothorax.", "No evidence of pneumothorax."),
    "nodule": ("No suspicious pulmonary nodules.", "No pulmonary nodules or masses.", "No focal nodule."),
}
_NEG_PROB = {"cardiomegaly": 0.75, "effusion": 0.85, "consolidation": 0.7, "pneumothorax": 0.85, "nodule": 0.3}
_NEG_PAIR = ("No pleural effusion or pneumothorax.", "No pneumothorax or pleural effusion.",
             "There is no pneumothorax or effusion.")
_BACKGROUND = ("The mediastinal contours are unremarkable.", "No acute osseous abnormality.",
               "The visualized osseous structures are intact.", "The trachea is midline.",
               "Pulmonary vascularity is within normal limits.")
_LUNGS_CLEAR = ("The lungs are clear.", "Lungs are clear bilaterally.", "The lungs are well expanded and clear.")
_OTHERWISE = "The lungs are otherwise clear."
_IMPRESSION_NORMAL = ("No acute cardiopulmonary abnormality.", "Normal chest radiograph.",
                      "No acute cardiopulmonary process.", "No active disease in the chest.")
_LUNG_FINDINGS = ("effusion", "consolidation", "pneumothorax", "nodule")


def _synthetic_sections(rng, findings: dict) -> tuple[list[str], list[str]]:
    present = [f for f in FINDINGS if f in findings]
    absent = [f for f in FINDINGS if f not in findings]
    positives = [_POSITIVE[f](rng, findings[f], False) for f in present]
    body: list[str] = list(positives)
    negs = set(absent)
    if "effusion" in negs and "pneumothorax" in negs and rng.random() < 0.4:
        body.append(_pick(rng, _NEG_PAIR))
        negs -= {"effusion", "pneumothorax"}
    for f in sorted(negs, key=FINDINGS.index):
        if rng.random() < _NEG_PROB[f]:
            body.append(_pick(rng, _NEGATIVE[f]))
    if not any(f in findings for f in _LUNG_FINDINGS) and rng.random() < 0.8:
        body.append(_pick(rng, _LUNGS_CLEAR))
    elif any(f in findings for f in ("consolidation", "nodule")) and "effusion" not in findings \
            and "pneumothorax" not in findings and rng.random() < 0.3:
        body.append(_OTHERWISE)
    for i in rng.permutation(len(_BACKGROUND))[: int(rng.integers(0, 3))]:
        body.append(_BACKGROUND[int(i)])
    order = rng.permutation(len(body))
    body = [body[int(i)] for i in order]
    if _OTHERWISE in body:  # "otherwise clear" reads only after the positive findings
        body.remove(_OTHERWISE)
        last = max(i for i, s in enumerate(body) if s in positives)
        body.insert(last + 1, _OTHERWISE)
    if not present:
        impression = [_pick(rng, _IMPRESSION_NORMAL)]
    else:
        order = [present[int(i)] for i in rng.permutation(len(present))]
        impression = [_POSITIVE[f](rng, findings[f], True) for f in order]
    return body, impression


def _join(body: list[str], impression: list[str], rng) -> str:
    if len(impression) > 1 and rng.random() < 0.5:
        imp = " ".join(f"{i + 1}. {s}" for i, s in enumerate(impression))
    else:
        imp = " ".join(impression)
    return f"FINDINGS: {' '.join(body)} IMPRESSION: {imp}"


def write_report(rng: np.random.Generator, findings: dict, bank: "SentenceBank | None" = None) -> str:
    """Write a 'FINDINGS: ... IMPRESSION: ...' report that agrees with ``findings``.

    With a :class:`SentenceBank` (see :func:`load_iu_bank`), real report sentences are used
    wherever one fits the case; otherwise the synthetic templates are used.
    """
    if bank is not None:
        return bank.report(rng, findings)
    body, impression = _synthetic_sections(rng, findings)
    return _join(body, impression, rng)


# --------------------------------------------------------------------------- IU reports

_MENTION = {
    "cardiomegaly": re.compile(r"cardiomegaly|\b(?:heart|cardiac)\b[^.;]*\benlarge|\benlarge\w*[^.;]*\b(?:heart|cardiac)\b", re.I),
    "effusion": re.compile(r"effusion|pleural fluid|costophrenic[^.;]*blunt|blunt\w*[^.;]*costophrenic", re.I),
    "consolidation": re.compile(r"consolidat|pneumonia|air ?space (?:disease|opacit)|infiltrat", re.I),
    "pneumothorax": re.compile(r"pneumothora", re.I),
    "nodule": re.compile(r"nodul|\bmass(?:es)?\b|granuloma", re.I),
}
_HEART_NORMAL = re.compile(
    r"\b(?:heart|cardiac|cardiomediastinal)\b[^.;]*\b(?:normal|within normal limits|unremarkable)\b", re.I
)
_EXTRA = re.compile(
    r"xxxx|atelecta|degenerat|scolio|emphysem|hyperinfla|hyperexpan|edema|fractur|sternotomy|surgical|"
    r"\bclips?\b|catheter|\btubes?\b|pacemaker|\bwires?\b|hernia|kyphos|osteophyt|spondyl|tortuous|ectatic|"
    r"aort|scar|fibros|interstitial|copd|chronic|post ?-?operative|prior|previous|compar|unchanged|stable|"
    r"\bagain\b|interval|resol|improv|wors|increas|decreas|\bnew\b|redemonstrat|\bport\b|lobectomy|"
    r"thoracotomy|cabg|valve|stent|device|adenopath|lymph|bronch|cyst|cavit|tubercul|sarcoid|metasta|"
    r"cancer|malignan|thicken|eventration|elevat|volume loss|deformit|osteopen|arthrit|shoulder|"
    r"vertebra|\bribs?\b|congest|hilar|since|previously|follow|"
    r"recommend|correlat|ct\b|lateral view|\bpa\b|\bap\b|portable|limited|rotated|rotation|"
    r"overlying|artifact|nipple|breast|soft tissue|mediastin(?:al|um) (?:widen|shift)|shift|"
    r"hemidiaphragm|flatten|\bdr\.|telephone|discussed|notified|\d{1,2}:\d{2}|borderline|upper limits? of normal|"
    r"top normal|top-normal|low lung volume|low volume|hypoinflat|hypoexpan|poor inspiration|shallow|"
    r"\btb\b|hilum|\bhila\b|develop|history|above|below|\d+(?:\.\d+)?\s*(?:mm|cm)\b|^(?:this|these|findings|which)\b|"
    r"change|knee|joint|pericardi|pneumomediastin|hydropneumo|recur|residual|remain|otherwise|differential|"
    r"diagnosis|vascular (?:prominence|congestion|engorgement)|venous|hypertension|prominen|globular|"
    r"\bold\b|healed|sequela|granulomatous disease|versus|lordosis|spasm|\bother\b|atheroscl|superimpos|difficult|continu|lateral exam|\bhips?\b|^(?:may|however|also|and|but)\b|\bmay\b(?! represent)",
    re.I,
)
_NORMALISH = re.compile(
    r"\bnormal|\bclear\b|unremarkable|\bno acute|intact|negative|midline|well[- ]expanded|"
    r"\bno active|\bno evidence", re.I
)
_GLOBAL_NORMAL = re.compile(r"\bacute|normal chest|\bno active|negative|no evidence of (?:active )?disease", re.I)
_LUNGISH = re.compile(r"\blungs?\b|pulmonary|parenchym|air ?space|pleura|costophrenic", re.I)
_SIDE_WORDS = {
    "left": re.compile(r"\bleft\b|lingula", re.I),
    "right": re.compile(r"\bright\b", re.I),
    "bilateral": re.compile(r"bilateral|\bboth\b|bibasilar|bibasal", re.I),
}
_SIZE_WORDS = {
    "small": re.compile(r"\b(?:small|trace|tiny|minimal|mild|minimally|mildly|slight|slightly)\b", re.I),
    "moderate": re.compile(r"\bmoderate(?:ly)?\b", re.I),
    "large": re.compile(r"\b(?:large|massive|marked|markedly|severe|severely|complete|substantial|near 100)", re.I),
}
_ZONE_WORDS = {
    "upper": re.compile(r"upper|apex|apical", re.I),
    "mid": re.compile(r"middle|\bmid|lingula|perihilar", re.I),
    "lower": re.compile(r"lower|\bbases?\b|basilar|basal|retrocardiac|infrahilar", re.I),
}
_PLURAL_NODULE = re.compile(r"nodules|masses|granulomas|nodular densities|nodular opacities", re.I)


@dataclass
class _Sentence:
    text: str
    pos: frozenset
    neg: frozenset
    sides: frozenset
    sizes: frozenset
    zones: frozenset
    plural: bool
    kind: str  # "finding", "global", "lungs", "other"
    says_clear: bool = False  # "the lungs are clear ...": only for cases without lung findings


def _classify(text: str) -> _Sentence | None:
    """Which findings a real report sentence mentions, and whether positively or negated.
    Returns None for sentences that are ambiguous or mention things the phantom lacks."""
    t = " ".join(text.split())
    if len(t) < 8 or len(t) > 220 or not t[0].isalpha():
        return None
    low = t.lower()
    if _EXTRA.search(low):
        return None
    hits = {f: rx.search(low) for f, rx in _MENTION.items()}
    hits = {f: m for f, m in hits.items() if m}
    heart_normal = bool(_HEART_NORMAL.search(low)) and "cardiomegaly" not in hits
    cue = _NEG_CUE.search(low)
    pos: set[str] = set()
    neg: set[str] = set()
    if heart_normal:
        neg.add("cardiomegaly")
    if hits:
        first = min(m.start() for m in hits.values())
        last = max(m.start() for m in hits.values())
        if cue and cue.start() < first:
            # "No effusion; there is cardiomegaly": the negation does not reach that far
            if _SCOPE_BREAK.search(low, cue.end(), last):
                return None
            neg |= set(hits)
        elif cue:
            return None  # mixes a positive mention with a negation: too easy to misread
        else:
            pos |= set(hits)
            if len(hits) > 1 and re.search(r"\bor\b", low):
                return None  # "consolidation or effusion": a differential, not a finding
            if re.search(r"\bclear\b", low):
                return None  # "lungs are clear ..." next to a positive: garbled in the source
    if "calcif" in low and not ("nodule" in pos and len(pos) == 1):
        return None  # calcified granulomas are only usable as the nodule finding
    if pos & neg:
        return None
    sides = frozenset(k for k, rx in _SIDE_WORDS.items() if rx.search(low))
    if not sides and "effusion" in pos and re.search(r"effusions", low):
        sides = frozenset({"bilateral"})
    sizes = frozenset(k for k, rx in _SIZE_WORDS.items() if rx.search(low))
    zones = frozenset(k for k, rx in _ZONE_WORDS.items() if rx.search(low))
    if pos or neg:
        kind = "finding"
    elif not _NORMALISH.search(low):
        return None
    elif re.search(r"abnormal|acute|disease|process|finding", low) and not cue:
        return None  # "Acute osseous abnormality." is not a normal sentence
    elif _GLOBAL_NORMAL.search(low):
        kind = "global"
    elif _LUNGISH.search(low):
        kind = "lungs"
    elif re.search(r"heart|cardi", low):
        return None
    else:
        kind = "other"
    t = t[0].upper() + t[1:]
    if not t.endswith("."):
        t += "."
    says_clear = bool(re.search(r"\b(?:lungs?|pleural spaces?)\b[^.]*\bclear\b|\bclear lungs?\b", low))
    return _Sentence(t, frozenset(pos), frozenset(neg), sides, sizes, zones,
                     bool(_PLURAL_NODULE.search(low)), kind, says_clear)


def _split_sentences(text: str) -> list[str]:
    text = " ".join(text.split())
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Za-z0-9])", text)
    out = []
    for p in parts:
        p = re.sub(r"^\d+\s*[.)]\s*", "", p)
        p = re.sub(r"^[A-Za-z ]{2,24}:\s*", "", p)  # "Chest: ..."
        p = re.sub(r"\s+\d+\s*[.)]?$", ".", p)  # enumeration left at the end
        p = re.sub(r"\s*\.(?:\s*\.)+", ".", p).strip()
        if p:
            out.append(p)
    return out


def _side_ok(s: _Sentence, side: str) -> bool:
    if not s.sides:
        return True
    return s.sides == {side}


def _fits_positive(s: _Sentence, f: str, p: dict) -> bool:
    """Does a sentence that positively mentions ``f`` describe the drawn ``p``?"""
    if f == "effusion":
        return _side_ok(s, p["side"]) and (not s.sizes or s.sizes == {p["size"]})
    if f == "pneumothorax":
        if s.zones - {"upper"}:
            return False
        return _side_ok(s, p["side"]) and (not s.sizes or s.sizes == {p["size"]})
    if f == "consolidation":
        zone = {"upper": "upper", "middle": "mid", "lower": "lower"}[p["lobe"]]
        return _side_ok(s, p["side"]) and (not s.zones or s.zones == {zone}) and \
            not (s.sizes - {"small"} if p["subtle"] else set())
    if f == "cardiomegaly":
        want = {"mild": "small", "moderate": "moderate", "marked": "large"}[p["severity"]]
        return not s.sizes or s.sizes == {want}
    if f == "nodule":
        nods = p["nodules"]
        if s.plural != (len(nods) > 1):
            return False
        sides = {n["side"] for n in nods}
        want_side = next(iter(sides)) if len(sides) == 1 else "bilateral"
        zones = {_zone_of(n["v"]) for n in nods}
        big = max(n["diameter_mm"] for n in nods) >= 12
        return _side_ok(s, want_side) and (not s.zones or s.zones <= zones) and not s.sizes - {"small"} \
            and not (big and s.sizes)
    return False


class SentenceBank:
    """Real report sentences, indexed by what they say about the five findings."""

    def __init__(self, reports: list[tuple[str, str]]):
        seen: set[tuple[str, str]] = set()
        self.sentences: dict[str, list[_Sentence]] = {"findings": [], "impression": []}
        for findings_text, impression_text in reports:
            for section, text in (("findings", findings_text), ("impression", impression_text)):
                for raw in _split_sentences(text or ""):
                    s = _classify(raw)
                    if s is None or (section, s.text.lower()) in seen:
                        continue
                    seen.add((section, s.text.lower()))
                    self.sentences[section].append(s)
        self.n_reports = len(reports)
        # pools by what a sentence says: ("pos", finding), ("neg", finding), ("kind", kind)
        self.index: dict[str, dict[tuple[str, str], list[_Sentence]]] = {}
        for section, items in self.sentences.items():
            idx: dict[tuple[str, str], list[_Sentence]] = {}
            for s in items:
                keys = [("pos", f) for f in s.pos] + [("neg", f) for f in s.neg] + [("kind", s.kind)]
                for k in keys:
                    idx.setdefault(k, []).append(s)
            self.index[section] = idx

    def __len__(self) -> int:
        return sum(len(v) for v in self.sentences.values())

    def _candidates(self, section: str, key: tuple[str, str], ok) -> list[_Sentence]:
        pool = [s for s in self.index[section].get(key, ()) if ok(s)]
        if not pool:
            other = "impression" if section == "findings" else "findings"
            pool = [s for s in self.index[other].get(key, ()) if ok(s)]
        return pool

    def _consistent(self, s: _Sentence, findings: dict) -> bool:
        present = set(findings)
        if not s.pos <= present or s.neg & present:
            return False
        if len(s.pos) > 1 and s.sides:
            return False
        return all(_fits_positive(s, f, findings[f]) for f in s.pos)

    def report(self, rng: np.random.Generator, findings: dict) -> str:
        """A report for ``findings`` from real sentences; a synthetic sentence stands in
        wherever no real one fits the case."""
        present = [f for f in FINDINGS if f in findings]
        absent = set(FINDINGS) - set(present)
        lung_free = not any(f in findings for f in _LUNG_FINDINGS)
        used: set[str] = set()

        def take(section: str, key: tuple[str, str], ok=lambda s: True) -> _Sentence | None:
            pool = [s for s in self._candidates(section, key, ok) if s.text not in used]
            if not pool:
                return None
            s = pool[int(rng.integers(len(pool)))]
            used.add(s.text)
            return s

        body: list[str] = []
        covered: set[str] = set()
        for f in present:
            if f in covered:
                continue
            s = take("findings", ("pos", f), lambda s: self._consistent(s, findings))
            body.append(s.text if s else _POSITIVE[f](rng, findings[f], False))
            covered |= s.pos if s else {f}
        negated: set[str] = set()
        for f in sorted(absent, key=FINDINGS.index):
            if f in negated or rng.random() >= _NEG_PROB[f]:
                continue
            s = take("findings", ("neg", f), lambda s: s.neg <= absent and not s.pos
                     and (lung_free or not s.says_clear))
            body.append(s.text if s else _pick(rng, _NEGATIVE[f]))
            negated |= s.neg if s else {f}
        if lung_free and rng.random() < 0.7:
            s = take("findings", ("kind", "lungs"))
            if s:
                body.append(s.text)
        for _ in range(int(rng.integers(0, 3))):
            s = take("findings", ("kind", "other"))
            if s:
                body.append(s.text)
        if not body:
            body.append(_pick(rng, _LUNGS_CLEAR) if lung_free else "No acute osseous abnormality.")
        body = [body[int(i)] for i in rng.permutation(len(body))]

        impression: list[str] = []
        if not present:
            s = take("impression", ("kind", "global"))
            impression.append(s.text if s else _pick(rng, _IMPRESSION_NORMAL))
        else:
            covered = set()
            for i in rng.permutation(len(present)):
                f = present[int(i)]
                if f in covered:
                    continue
                s = take("impression", ("pos", f), lambda s: self._consistent(s, findings))
                impression.append(s.text if s else _POSITIVE[f](rng, findings[f], True))
                covered |= s.pos if s else {f}
        return _join(body, impression, rng)


def _iu_archive() -> Path:
    """Path of NLMCXR_reports.tgz inside the installed torchxrayvision package (found
    without importing the package, which pulls in heavy dependencies)."""
    try:
        spec = importlib.util.find_spec("torchxrayvision")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(IU_MISSING)
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "NLMCXR_reports.tgz"
        if p.is_file():
            return p
    raise ImportError(IU_MISSING + " (the installed package has no data/NLMCXR_reports.tgz)")


def read_iu_reports(archive: Path) -> list[tuple[str, str]]:
    """(findings, impression) text of every report in an NLMCXR-style archive of XML files."""
    out: list[tuple[str, str]] = []
    with tarfile.open(archive, "r:*") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".xml")),
                         key=lambda m: m.name)
        for m in members:
            fh = tar.extractfile(m)
            if fh is None:
                continue
            try:
                root = ET.parse(io.BytesIO(fh.read())).getroot()
            except ET.ParseError:
                continue
            texts = {"FINDINGS": "", "IMPRESSION": ""}
            for node in root.iter("AbstractText"):
                label = (node.get("Label") or "").upper()
                if label in texts and node.text:
                    texts[label] = node.text.strip()
            if texts["FINDINGS"] or texts["IMPRESSION"]:
                out.append((texts["FINDINGS"], texts["IMPRESSION"]))
    return out


@lru_cache(maxsize=4)
def _bank_for(archive: str, mtime: float) -> SentenceBank:
    return SentenceBank(read_iu_reports(Path(archive)))


def load_iu_bank(archive: Path | None = None) -> SentenceBank:
    """Sentence bank built from the IU reports (from torchxrayvision unless ``archive``)."""
    path = Path(archive) if archive is not None else _iu_archive()
    bank = _bank_for(str(path), path.stat().st_mtime)
    if len(bank) == 0:
        raise ValueError(f"demo: no usable report sentences in {path}")
    return bank


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Case:
    index: int
    id: str
    patient: int
    patient_id: str
    split: str
    findings: dict = field(hash=False, compare=False)


def _study_counts(rng: np.random.Generator, n: int) -> list[int]:
    counts, total = [], 0
    values = [c for c, _ in STUDIES_PER_PATIENT]
    probs = [p for _, p in STUDIES_PER_PATIENT]
    while total < n:
        c = min(int(values[int(rng.choice(len(values), p=probs))]), n - total)
        counts.append(c)
        total += c
    return counts


def _assign_splits(rng: np.random.Generator, n_patients: int) -> list[str]:
    order = rng.permutation(n_patients)
    if n_patients >= 3:
        n_valid = max(1, int(round(SPLITS[1][1] * n_patients)))
        n_test = max(1, int(round(SPLITS[2][1] * n_patients)))
        n_train = n_patients - n_valid - n_test
    else:
        n_train, n_valid, n_test = 1, 0, n_patients - 1
    labels = ["train"] * n_train + ["valid"] * n_valid + ["test"] * n_test
    out = [""] * n_patients
    for rank, p in enumerate(order):
        out[int(p)] = labels[rank]
    return out


def plan(spec: DemoSpec) -> tuple[list[Case], list[PatientAnatomy]]:
    """All random choices of a dataset except the pixels and the report wording:
    patients, their anatomy, splits and each study's findings. Independent of ``size``."""
    master = np.random.default_rng([spec.seed, 0])
    counts = _study_counts(master, spec.n)
    splits = _assign_splits(master, len(counts))
    cases: list[Case] = []
    patients: list[PatientAnatomy] = []
    i = 0
    for p, k in enumerate(counts):
        prng = np.random.default_rng([spec.seed, 1, p])
        patients.append(sample_patient(prng))
        chronic = sample_findings(prng, CHRONIC)
        for _ in range(k):
            frng = np.random.default_rng([spec.seed, 4, i])
            acute = sample_findings(frng, tuple(f for f in FINDINGS if f not in CHRONIC))
            found = {f: (chronic.get(f) or acute.get(f)) for f in FINDINGS if f in chronic or f in acute}
            cases.append(Case(i, f"{i:06d}", p, f"P{p:05d}", splits[p], found))
            i += 1
    return cases, patients


# --------------------------------------------------------------------------- writing


def _expected_meta(spec: DemoSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": spec.to_dict()}


def _is_complete(root: Path, spec: DemoSpec) -> bool:
    meta_path = root / "demo.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    want = _expected_meta(spec)
    if any(meta.get(k) != v for k, v in want.items()):
        return False
    if not (root / "pairs.csv").is_file():
        return False
    for i in range(spec.n):
        name = f"{i:06d}.png"
        if not (root / "images" / name).is_file():
            return False
        for f in MASKED_FINDINGS:
            if not (root / "masks" / f / name).is_file():
                return False
    return True


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(root: Path) -> None:
    """Remove partial outputs left by generations that were killed."""
    prefix = f".{root.name}.partial-"
    for p in root.parent.glob(prefix + "*"):
        try:
            pid = int(p.name[len(prefix):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def _install(tmp: Path, root: Path, spec: DemoSpec) -> None:
    """Move a finished dataset from ``tmp`` to ``root``."""
    if root.exists():
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        elif (root / "demo.json").is_file():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{os.getpid()}-", dir=root.parent))
            os.rename(root, old / "data")
            try:
                os.rename(tmp, root)
            finally:
                shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise FileExistsError(f"demo: {root} exists and is not a demo dataset; refusing to replace it")
    try:
        os.rename(tmp, root)
    except OSError:
        if _is_complete(root, spec):  # another process finished the same dataset first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _write_case(tmp: Path, spec: DemoSpec, patients: list[PatientAnatomy], bank, case: Case) -> dict:
    rng = np.random.default_rng([spec.seed, 2, case.index])
    img, masks = render_case(rng, spec.size, patients[case.patient], case.findings)
    report = write_report(np.random.default_rng([spec.seed, 3, case.index]), case.findings, bank)
    name = f"{case.id}.png"
    _save_png(img, tmp / "images" / name)
    for f in MASKED_FINDINGS:
        _save_png(masks[f].astype(np.uint8) * 255, tmp / "masks" / f / name)
    row = {"id": case.id, "image": f"images/{name}", "report": report,
           "patient_id": case.patient_id, "split": case.split}
    for f in FINDINGS:
        row[f] = int(f in case.findings)
    row["normal"] = int(not case.findings)
    for f in MASKED_FINDINGS:
        row[f"mask_{f}"] = f"masks/{f}/{name}"
    return row


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate(
    root: Path,
    spec: DemoSpec = DemoSpec(),
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Write the demo dataset to ``root`` and return the path of ``pairs.csv``.

    Returns at once when ``root`` already holds a complete dataset of the same spec.
    Files are written to a temporary folder beside ``root`` and moved into place at the
    end, so an interrupted run never leaves a complete-looking dataset. ``progress`` is
    called with the number of studies written so far. ``workers`` threads render in
    parallel (default: the usable CPUs, at most 8); the output does not depend on it.
    """
    import pandas as pd  # lazy: only for writing the table

    root = Path(root)
    if _is_complete(root, spec):
        return root / "pairs.csv"
    if root.exists() and (not root.is_dir() or (any(root.iterdir()) and not (root / "demo.json").is_file())):
        raise FileExistsError(f"demo: {root} exists and is not a demo dataset; refusing to replace it")
    bank = load_iu_bank() if spec.reports == "iu" else None
    cases, patients = plan(spec)
    workers = _default_workers() if workers is None else max(1, int(workers))

    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-{os.getpid()}-", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        for f in MASKED_FINDINGS:
            (tmp / "masks" / f).mkdir(parents=True)
        work = partial(_write_case, tmp, spec, patients, bank)
        rows = []
        if workers <= 1 or len(cases) < 32:
            for case in cases:
                rows.append(work(case))
                if progress is not None:
                    progress(len(rows))
        else:
            # numpy and zlib release the GIL for most of the work, so threads give a real
            # speed-up without the hazards of forking a process that may hold torch.
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo")
            try:
                for row in pool.map(work, cases):
                    rows.append(row)
                    if progress is not None:
                        progress(len(rows))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        df = pd.DataFrame(rows)
        df.to_csv(tmp / "pairs.csv", index=False)
        meta = _expected_meta(spec) | {
            "generator": "pipeline.datasets.demo",
            "findings": list(FINDINGS),
            "masked_findings": list(MASKED_FINDINGS),
            "n_patients": len(patients),
            "prevalence": {f: round(float(df[f].mean()), 4) for f in FINDINGS + ("normal",)},
            "orientation": "PA view: the patient's left is on the image right",
            "reports_license": "CC BY-NC-ND 4.0 (Indiana University chest X-ray reports)"
            if spec.reports == "iu" else "synthetic",
        }
        (tmp / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        _install(tmp, root, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "pairs.csv"


def ensure_demo(root: Path, spec: DemoSpec = DemoSpec()) -> Path:
    """Generate the demo dataset at ``root`` unless it is already there; return pairs.csv."""
    return generate(Path(root), spec)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the phantom chest X-ray demo dataset.")
    ap.add_argument("root", type=Path)
    ap.add_argument("--n", type=int, default=DemoSpec.n)
    ap.add_argument("--size", type=int, default=DemoSpec.size)
    ap.add_argument("--seed", type=int, default=DemoSpec.seed)
    ap.add_argument("--reports", choices=("synthetic", "iu"), default=DemoSpec.reports)
    a = ap.parse_args(argv)
    print(generate(a.root, DemoSpec(a.n, a.size, a.seed, a.reports)))


if __name__ == "__main__":
    main()
