"""Rendering one study: acquisition, normal anatomy, the findings' painters, exposure."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.datasets.demo.anatomy import (PatientAnatomy, _heart, _lung, _patient_profiles, _vessels,
                                            aortic_knob, bones, gastric_bubble, hilum, lung_depth, soft_tissue,
                                            trachea)
from pipeline.datasets.demo.canvas import LungLayer, Study
from pipeline.datasets.demo.findings import CHEST_PAINTERS, FINDINGS, KINDS, LUNG_PAINTERS
from pipeline.datasets.demo.raster import _blur, _Frame, _smooth_noise


@dataclass(frozen=True)
class _Exposure:
    """Per-study acquisition: inspiration, film response, noise and blur."""

    insp: float
    gamma: float
    lo: float
    hi: float
    kexp: float
    noise_sd: float
    mottle_sd: float
    soft_gain: float
    blur: float


def _acquisition(acq: np.random.Generator, P: PatientAnatomy, S: int) -> tuple[_Frame, _Exposure]:
    """Positioning, inspiration and exposure of one study."""
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
    return frame, _Exposure(insp, gamma, lo, hi, kexp, noise_sd, mottle_sd, soft_gain, blur)


def _start_study(frame: _Frame, P: PatientAnatomy, insp: float, frng: np.random.Generator,
                 findings: dict) -> Study:
    """The empty layers of a study, with the heart and the lung outlines in place."""
    S = frame.S
    x, y = frame.grid(slice(0, S), slice(0, S))
    px = frame.px
    ctr = P.ctr
    for kind in KINDS:
        if kind.heart_ctr is not None and kind.name in findings:
            ctr = kind.heart_ctr(findings[kind.name])
    heart = _heart(x, y, P, insp, ctr, px)
    nonlung = np.maximum(heart, aortic_knob(x, y, px, P))
    dome_mean = 0.5 * (P.dome_left + P.dome_right) + insp
    lungs = {s: _lung(frame, s, P, insp) for s in (-1, +1)}
    masks = {f: np.zeros((S, S), dtype=bool) for f in FINDINGS}
    z = [np.zeros_like(x) for _ in range(7)]
    return Study(S, frame, P, insp, frng, x, y, np.abs(x), px, heart, nonlung, dome_mean, lungs, masks, *z)


_SIDE_NAME = {-1: "right", +1: "left"}


def _paint_lungs(st: Study, findings: dict) -> None:
    """Aerate each lung, let the lung painters act on it, and add it to the image."""
    profiles = _patient_profiles(st.P.texture_seed)
    for s, lung in st.lungs.items():
        sl = lung.sl
        a = lung.inside * (1.0 - st.nonlung[sl]) * lung_depth(lung)
        ves = _vessels(lung, profiles[s], st.P.marking_density)
        ly = LungLayer(lung, _SIDE_NAME[s], a, np.zeros_like(a), lung.inside > 0.5)
        for kind in LUNG_PAINTERS:
            p = findings.get(kind.name)
            if p:
                kind.paint_lung(st, ly, p)
        st.air[sl] += ly.a
        st.envelope[sl] += lung.inside
        st.mark[sl] += ves * ly.a * (1.0 - ly.ptx)
        st.extra[sl] += hilum(lung)


def _expose(st: Study, body: np.ndarray, body_A: np.ndarray, ex: _Exposure, nrng: np.random.Generator) -> np.ndarray:
    """Sum the attenuation layers and turn them into an 8-bit film with blur and noise."""
    P, x, y, px, S = st.P, st.x, st.y, st.px, st.S
    tr = trachea(x, y, px, ex.insp)
    bubble = gastric_bubble(x, y, px, P, ex.insp)
    bone = bones(y, st.ax, px, P, st.envelope)
    A = body_A * (1.0 - 0.78 * st.air - 0.15 * st.ptx_dark - 0.2 * tr - 0.3 * bubble)
    A += 0.18 * st.mark + st.extra + 0.16 * st.line + st.nod + bone * body
    A += ex.mottle_sd * _smooth_noise(nrng, (S, S), max(8, S // 10)) * body
    img = (1.0 - np.exp(-ex.kexp * A)) / (1.0 - math.exp(-ex.kexp * 2.0))
    img = np.clip((img - ex.lo) / (ex.hi - ex.lo), 0.0, 1.0) ** ex.gamma
    img = _blur(img, ex.blur * S / 224.0)
    img = img + ex.noise_sd * nrng.standard_normal((S, S), dtype=np.float32)
    return (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


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
    S = int(size)
    seeds = rng.integers(0, 2**63 - 1, size=3)
    acq, frng, nrng = (np.random.default_rng(int(s)) for s in seeds)
    frame, ex = _acquisition(acq, patient, S)
    st = _start_study(frame, patient, ex.insp, frng, findings)
    body, body_A = soft_tissue(st.x, st.y, st.ax, st.px, patient, ex.soft_gain)
    _paint_lungs(st, findings)
    for kind in CHEST_PAINTERS:
        if kind.name in findings:
            kind.paint_chest(st, findings[kind.name])
    out = _expose(st, body, body_A, ex, nrng)
    for f in FINDINGS:
        if f in findings and not st.masks[f].any():  # never a positive with an empty mask
            raise RuntimeError(f"demo: {f} rendered with an empty mask ({findings[f]})")
    return out, st.masks
