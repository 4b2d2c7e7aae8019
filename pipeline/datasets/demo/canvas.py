"""The layers of one study while it is being painted, shared by the renderer and the
finding painters."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.datasets.demo.anatomy import PatientAnatomy, _Lung
from pipeline.datasets.demo.raster import _Frame


@dataclass
class Study:
    """Full-image layers (all [S, S]) of one study, in body-frame coordinates ``x``, ``y``.

    Attenuation layers that the painters add to: ``air`` (aerated lung), ``envelope``
    (where the lungs are, whatever fills them), ``mark`` (lung markings), ``ptx_dark``
    (pleural air), ``line`` (visceral pleural line), ``extra`` (added density) and ``nod``
    (nodules). ``masks`` holds one bool mask per finding.
    """

    S: int
    frame: _Frame
    P: PatientAnatomy
    insp: float
    frng: np.random.Generator  # the study's stream for finding details
    x: np.ndarray
    y: np.ndarray
    ax: np.ndarray
    px: float
    heart: np.ndarray
    nonlung: np.ndarray
    dome_mean: float
    lungs: dict[int, _Lung]
    masks: dict[str, np.ndarray]
    air: np.ndarray
    envelope: np.ndarray
    mark: np.ndarray
    ptx_dark: np.ndarray
    line: np.ndarray
    extra: np.ndarray
    nod: np.ndarray


@dataclass
class LungLayer:
    """One lung while its findings are painted (arrays cover ``lung.sl``)."""

    lung: _Lung
    name: str  # "right" or "left": the patient's side
    a: np.ndarray  # aeration: 1 = fully aerated lung, reduced by fluid and consolidation
    ptx: np.ndarray  # pleural air (pneumothorax), 0..1
    inner: np.ndarray  # bool: well inside the lung
