"""The one item type every dataset reader yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Item:
    """One image (and, where the dataset has one, its report).

    ``labels`` maps a label name to a number: 0/1 for binary findings, a class index for
    multi-class labels, and NaN where the dataset leaves the label unknown.
    ``mask`` is the path of a single-channel PNG mask (nonzero = positive) or None.
    """

    id: str
    image: Path
    report: str | None = None
    patient_id: str | None = None
    split: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    mask: Path | None = None
