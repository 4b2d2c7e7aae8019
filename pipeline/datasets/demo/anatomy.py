"""Normal anatomy of the phantom: the patient's shape parameters and the layers drawn
from them (soft tissue, lungs, lung markings, heart and mediastinum, bones).

Coordinates are body-frame units: the image spans [-1, 1] in x and y, y pointing down;
``side`` -1 is the patient's right (image left), +1 the patient's left (image right).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from pipeline.datasets.demo.raster import _Frame, _ramp


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


# --------------------------------------------------------------------------- soft tissue


def soft_tissue(x, y, ax, px: float, P: PatientAnatomy, soft_gain: float) -> tuple[np.ndarray, np.ndarray]:
    """The body outline (neck, shoulders, chest wall) and its soft-tissue attenuation."""
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
    return body, body_A


def gastric_bubble(x, y, px: float, P: PatientAnatomy, insp: float) -> np.ndarray:
    """Air in the stomach under the left hemidiaphragm (zero when the patient has none)."""
    if P.gastric_bubble <= 0:
        return np.zeros_like(x)
    bx, by = 0.34, P.dome_left + insp + 0.12
    q = np.sqrt(((x - bx) / 0.10) ** 2 + ((y - by) / 0.05) ** 2)
    return _ramp((1 - q) * 0.05 / px) * P.gastric_bubble


def trachea(x, y, px: float, insp: float) -> np.ndarray:
    return _ramp((0.028 - np.abs(x + 0.005)) / px) * np.clip((-0.26 + 0.2 * insp - y) / 0.1, 0.0, 1.0)


# --------------------------------------------------------------------------- lungs

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


def lung_depth(lung: _Lung) -> np.ndarray:
    """The lung is thinner (less lucent) towards its edges."""
    return 0.78 + 0.22 * np.sqrt(np.clip(1.0 - lung.r * lung.r, 0.0, 1.0))


def hilum(lung: _Lung) -> np.ndarray:
    """The hilar shadow of one lung (vessels and bronchi at the root)."""
    hx = lung.side * (lung.m + 0.08 * lung.w)
    hy = lung.top + 0.56 * lung.h
    hil = np.exp(-(((lung.x - hx) / 0.08) ** 2 + ((lung.y - hy) / 0.11) ** 2))
    return 0.15 * hil * lung.inside


_VESSEL_SIGMA = 0.03


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


# --------------------------------------------------------------------------- heart, mediastinum


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


def aortic_knob(x, y, px: float, P: PatientAnatomy) -> np.ndarray:
    kq = np.sqrt(((x - (P.medial + 0.01)) / 0.05) ** 2 + ((y + 0.29) / 0.075) ** 2)
    return _ramp((1.0 - kq) * 0.05 / px)


# --------------------------------------------------------------------------- bones


def _ribs(y, ax, px: float, P: PatientAnatomy, envelope: np.ndarray) -> np.ndarray:
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
    return (post + 0.5 * ant) * cage * (0.35 + 0.65 * envelope)


def _clavicles(y, ax, px: float, P: PatientAnatomy) -> np.ndarray:
    d0, d1 = 0.05, P.lung_width - 0.04
    tt = np.clip((ax - d0) / (d1 - d0), 0.0, 1.0)
    yc = P.clavicle_y + P.clavicle_slope * (ax - d0) - 0.025 * np.sin(np.pi * 2 * tt)
    half = 0.024 + 0.014 * (1 - tt)
    return _ramp((half - np.abs(y - yc)) / px) * _ramp((ax - d0) / px) * _ramp((d1 - ax) / px)


def _spine(y, ax, px: float, P: PatientAnatomy) -> tuple[np.ndarray, np.ndarray]:
    """Vertebral bodies and their pedicles."""
    spine_w = 0.055
    vert = 0.8 + 0.2 * np.cos(2 * np.pi * (y / 0.115 + P.rib_offset))
    spine = _ramp((spine_w - ax) / px) * vert * np.clip((0.9 - y) / 0.3, 0.0, 1.0)
    ped = np.exp(-(((ax - spine_w * 0.75) / 0.013) ** 2)) * np.clip(np.cos(2 * np.pi * (y / 0.115 + P.rib_offset + 0.25)), 0, 1)
    return spine, ped


def bones(y, ax, px: float, P: PatientAnatomy, envelope: np.ndarray) -> np.ndarray:
    """Attenuation of ribs, clavicles and spine (before the soft-tissue weighting)."""
    ribs = _ribs(y, ax, px, P, envelope)
    clav = _clavicles(y, ax, px, P)
    spine, ped = _spine(y, ax, px, P)
    return P.bone_density * (0.10 * ribs + 0.20 * clav + 0.10 * spine + 0.05 * ped)
