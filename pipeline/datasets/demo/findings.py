"""The five findings: how each is drawn (its parameters) and painted into a study.

:data:`KINDS` is the registry: one :class:`Finding` entry per finding, in label-column
order. An entry gives the prevalence, whether the finding is chronic (drawn once per
patient), the sampler of its parameters and its painter hooks:

- ``heart_ctr(params)``: the cardiothoracic ratio to draw the heart with;
- ``paint_lung(study, layer, params)``: called for each lung, in ``layer`` order, before
  the lung's aeration is added to the image;
- ``paint_chest(study, params)``: called once after both lungs.

Adding a finding is one entry here, plus its wording (``phrases.WRITERS``: the synthetic
report writer) and its sentence check (``iu.FITS``: the real-sentence bank).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline.datasets.demo.canvas import LungLayer, Study
from pipeline.datasets.demo.raster import _ramp, _smooth_noise

# Nodule sizes: the body frame spans 2 units across the image; one unit ~ this many mm.
MM_PER_UNIT = 150.0


def _choice(rng: np.random.Generator, options, p=None):
    i = int(rng.choice(len(options), p=p))
    return options[i]


def _zone_of(v: float) -> str:
    return "upper" if v < 0.42 else ("mid" if v < 0.68 else "lower")


# --------------------------------------------------------------------------- samplers


def _sample_cardiomegaly(rng: np.random.Generator) -> dict:
    severity = _choice(rng, ("mild", "moderate", "marked"), (0.45, 0.4, 0.15))
    lo, hi = {"mild": (0.53, 0.57), "moderate": (0.57, 0.62), "marked": (0.62, 0.68)}[severity]
    return {"severity": severity, "ctr": round(float(rng.uniform(lo, hi)), 3),
            "subtle": bool(severity == "mild" and rng.random() < 0.4)}


def _sample_effusion(rng: np.random.Generator) -> dict:
    side = _choice(rng, ("left", "right", "bilateral"), (0.36, 0.36, 0.28))
    size = _choice(rng, ("small", "moderate", "large"), (0.38, 0.42, 0.20))
    return {"side": side, "size": size, "subtle": bool(size == "small" and rng.random() < 0.35)}


def _sample_consolidation(rng: np.random.Generator) -> dict:
    side = _choice(rng, ("right", "left"), (0.55, 0.45))
    lobes = ("upper", "middle", "lower")
    lobe = _choice(rng, lobes, (0.3, 0.2, 0.5) if side == "right" else (0.35, 0.15, 0.5))
    subtle = bool(rng.random() < 0.2)
    density = float(rng.uniform(0.42, 0.52) if subtle else rng.uniform(0.6, 0.9))
    return {"side": side, "lobe": lobe, "density": round(density, 3),
            "extent": round(float(rng.uniform(0.9, 1.35)), 3), "subtle": subtle}


def _sample_pneumothorax(rng: np.random.Generator) -> dict:
    side = _choice(rng, ("right", "left"))
    size = _choice(rng, ("small", "moderate", "large"), (0.4, 0.4, 0.2))
    return {"side": side, "size": size, "subtle": bool(size == "small" and rng.random() < 0.35)}


def _nodule_position(rng: np.random.Generator, side: str) -> tuple[float, float]:
    while True:
        u, v = float(rng.uniform(0.3, 0.85)), float(rng.uniform(0.2, 0.75))
        # keep clear of the diaphragm, the heart shadow (left lung, medial base)
        # and the hilum
        if side == "left" and v > 0.55 and u < 0.6:
            continue
        if u < 0.4 and 0.45 < v < 0.7:
            continue
        return u, v


def _sample_nodule(rng: np.random.Generator) -> dict:
    count = int(_choice(rng, (1, 2, 3, 4), (0.25, 0.35, 0.25, 0.15)))
    nodules = []
    for _ in range(count):
        side = _choice(rng, ("right", "left"))
        u, v = _nodule_position(rng, side)
        nodules.append({"side": side, "u": round(u, 3), "v": round(v, 3),
                        "diameter_mm": int(rng.integers(12, 29))})
    subtle = bool(max(n["diameter_mm"] for n in nodules) <= 15 and rng.random() < 0.5)
    return {"nodules": nodules, "subtle": subtle}


# --------------------------------------------------------------------------- painters


def _paint_cardiomegaly(st: Study, p: dict) -> None:
    st.masks["cardiomegaly"] = (st.heart > 0.5) & (st.y < st.dome_mean + 0.02)


def _paint_effusion(st: Study, ly: LungLayer, p: dict) -> None:
    """Fluid layering at the base: a meniscus rising towards the chest wall."""
    if p["side"] not in (ly.name, "bilateral"):
        return
    lung = ly.lung
    v_med, v_lat = {"small": (1.04, 0.78), "moderate": (0.76, 0.54), "large": (0.52, 0.24)}[p["size"]]
    jitter = st.frng.uniform(-0.03, 0.03)
    uu = np.clip(lung.u, 0.0, 1.0)
    v_surf = v_med + jitter - (v_med - v_lat) * uu**1.6
    dist = (lung.v - v_surf) * lung.h
    fluid = _ramp(dist / (2.0 * st.px))
    dens = 0.78 + 0.22 * np.clip(dist / 0.10, 0.0, 1.0)
    dens = dens * (0.85 if p["subtle"] else 1.0)
    st.masks["effusion"][lung.sl] |= (fluid > 0.5) & ly.inner
    ly.a = ly.a * (1.0 - fluid * dens)


def _paint_pneumothorax(st: Study, ly: LungLayer, p: dict) -> None:
    """Pleural air along the apex and lateral wall, with a visible visceral pleural line."""
    if p["side"] != ly.name:
        return
    lung, sl, px = ly.lung, ly.lung.sl, st.px
    depth, v_lim = {"small": (0.10, 0.48), "moderate": (0.18, 0.78), "large": (0.30, 1.02)}[p["size"]]
    depth *= st.frng.uniform(0.9, 1.15)
    taper = np.clip((v_lim - lung.v) / 0.28, 0.0, 1.0)
    d_eff = depth * np.sqrt(taper)
    edge_dist = (lung.r - (1.0 - d_eff)) / lung.grad  # body units, > 0 inside the rim
    visible = (d_eff / lung.grad) > 1.5 * px
    ptx = _ramp(edge_dist / px) * lung.inside * visible
    st.masks["pneumothorax"][sl] |= (ptx > 0.5) & ly.inner
    strength = 0.75 if p["subtle"] else 1.0
    st.ptx_dark[sl] += ptx * strength
    pl = np.exp(-0.5 * (edge_dist / (0.8 * px)) ** 2) * visible * ly.inner
    st.line[sl] += pl * strength * (1.0 - st.nonlung[sl])
    collapsed = lung.inside * (1.0 - ptx) * (d_eff > 0.12)
    st.extra[sl] += 0.05 * collapsed * np.clip(d_eff / 0.26, 0.0, 1.0)
    ly.ptx = ptx


# (side, lobe) -> centre u, v and radii of the consolidated region, lung-relative
_LOBE_BOXES = {
    ("right", "upper"): (0.50, 0.30, 0.34, 0.20),
    ("right", "middle"): (0.30, 0.70, 0.30, 0.15),
    ("right", "lower"): (0.58, 0.86, 0.34, 0.18),
    ("left", "upper"): (0.50, 0.32, 0.34, 0.20),
    ("left", "middle"): (0.42, 0.64, 0.28, 0.14),  # lingula
    ("left", "lower"): (0.68, 0.86, 0.30, 0.17),
}


def _paint_consolidation(st: Study, ly: LungLayer, p: dict) -> None:
    """A patchy, irregular airspace opacity in one lobe."""
    if p["side"] != ly.name:
        return
    lung = ly.lung
    cu, cv, ru, rv = _LOBE_BOXES[(ly.name, p["lobe"])]
    ext = p["extent"]
    cu += st.frng.uniform(-0.05, 0.05)
    cv += st.frng.uniform(-0.04, 0.04)
    rho2 = ((lung.u - cu) / (ru * ext)) ** 2 + ((lung.v - cv) / (rv * ext)) ** 2
    cells = max(6, int(16 * lung.u.shape[0] / st.S))
    patch = 0.9 * (1.0 - rho2) + 0.45 * _smooth_noise(st.frng, lung.u.shape, cells)
    opac = np.clip((patch + 0.2) / 0.9, 0.0, 1.0)
    opac = opac * opac * (3.0 - 2.0 * opac) * lung.inside
    opac = opac * (0.88 + 0.12 * np.clip(_smooth_noise(st.frng, lung.u.shape, cells * 2), -1.0, 1.0))
    st.masks["consolidation"][lung.sl] |= (opac > 0.3) & ly.inner
    ly.a = ly.a * (1.0 - p["density"] * opac)


def _paint_nodule(st: Study, p: dict) -> None:
    """Round soft-tissue densities, slightly brighter at the centre."""
    dens = 0.28 if p["subtle"] else 0.40
    x, y, px = st.x, st.y, st.px
    for n in p["nodules"]:
        lung = st.lungs[+1 if n["side"] == "left" else -1]
        nx = lung.side * (lung.m + n["u"] * lung.w)
        ny = lung.top + n["v"] * lung.h
        rad = max(n["diameter_mm"] / 2.0 / MM_PER_UNIT, 1.0 * px)
        win = st.frame.crop(nx - rad - 2 * px, nx + rad + 2 * px, ny - rad - 2 * px, ny + rad + 2 * px)
        d = np.sqrt((x[win] - nx) ** 2 + (y[win] - ny) ** 2)
        prof = _ramp((rad - d) / px) * (0.6 + 0.4 * np.sqrt(np.clip(1.0 - (d / rad) ** 2, 0.0, 1.0)))
        st.nod[win] = np.maximum(st.nod[win], prof)
        st.masks["nodule"][win] |= d <= rad
    st.nod *= dens


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Finding:
    name: str
    prevalence: float  # per image, drawn independently of the other findings
    sample: Callable[[np.random.Generator], dict]
    chronic: bool = False  # drawn once per patient and carried into every study
    heart_ctr: Callable[[dict], float] | None = None
    paint_lung: Callable[[Study, LungLayer, dict], None] | None = None
    paint_chest: Callable[[Study, dict], None] | None = None
    layer: int = 0  # order of the lung painters (lower first)


KINDS: tuple[Finding, ...] = (
    Finding("cardiomegaly", 0.17, _sample_cardiomegaly, chronic=True, heart_ctr=lambda p: p["ctr"],
            paint_chest=_paint_cardiomegaly),
    Finding("effusion", 0.21, _sample_effusion, paint_lung=_paint_effusion, layer=0),
    Finding("consolidation", 0.20, _sample_consolidation, paint_lung=_paint_consolidation, layer=2),
    Finding("pneumothorax", 0.15, _sample_pneumothorax, paint_lung=_paint_pneumothorax, layer=1),
    Finding("nodule", 0.16, _sample_nodule, chronic=True, paint_chest=_paint_nodule),
)
REGISTRY = {k.name: k for k in KINDS}

FINDINGS = tuple(REGISTRY)
MASKED_FINDINGS = ("pneumothorax", "effusion")  # segmentation targets saved as mask files
# Per-image prevalence of each finding (drawn independently, so they co-occur sometimes).
# prod(1 - p) ~= 0.36, i.e. roughly a third of the studies are normal.
PREVALENCE = {k.name: k.prevalence for k in KINDS}
CHRONIC = tuple(k.name for k in KINDS if k.chronic)
LUNG_PAINTERS = tuple(sorted((k for k in KINDS if k.paint_lung), key=lambda k: k.layer))
CHEST_PAINTERS = tuple(k for k in KINDS if k.paint_chest)


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
    if name not in REGISTRY:
        raise KeyError(f"unknown finding {name!r}")
    return REGISTRY[name].sample(rng)


def sample_findings(rng: np.random.Generator, names=FINDINGS) -> dict[str, dict]:
    """Draw which of ``names`` are present (independently, at ``PREVALENCE``) and their
    parameters. Returns {finding: params} for the present ones only."""
    out: dict[str, dict] = {}
    for name in names:
        if rng.random() < PREVALENCE[name]:
            out[name] = sample_finding(rng, name)
    return out
