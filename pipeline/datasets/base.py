"""The one item type every dataset reader yields."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.errors import InputError


class DatasetError(InputError):
    """A dataset that cannot be read; the message names the file, the row and the fix."""


@dataclass(frozen=True, slots=True)
class Item:
    """One image (and, where the dataset has one, its report).

    ``labels`` maps a label name to a number: 0/1 for binary findings, a class index for
    multi-class labels, and NaN where the dataset leaves the label unknown.
    ``masks`` maps a target name (e.g. "pneumothorax") to a single-channel PNG mask
    (nonzero = positive); ``mask`` is the first of them, for single-target datasets.
    Slotted: a reader of MIMIC-CXR's size holds hundreds of thousands of them.
    """

    id: str
    image: Path
    report: str | None = None
    patient_id: str | None = None
    split: str | None = None
    labels: dict[str, float] = field(default_factory=dict)
    masks: dict[str, Path] = field(default_factory=dict)

    @property
    def mask(self) -> Path | None:
        return next(iter(self.masks.values()), None)


@dataclass(frozen=True)
class Dataset:
    """A named list of items. ``name`` keys the dataset's index in the cache."""

    name: str
    spec: str
    items: list[Item]
    description: str = ""
    # Rows or studies a reader left out, one dict each: id, source, reason, kind
    # ("no-report" for studies without usable text, "bad-row" for rows skipped under
    # allow_failures). Never silent: readers also log a count.
    skipped: list[dict] = field(default_factory=list)
    # The label that label fractions (1%, 10%) are stratified by, where the dataset has one.
    stratify_by: str | None = None
    # How the items got their splits, when the dataset did not say (e.g. a table without
    # a split column); recorded with the dataset index.
    split_rule: str | None = None
    # Which release of the dataset the folder holds ("COVIDx v5 (...)"), where the reader can
    # tell or was told; recorded with the index and in every results file.
    version: str | None = None
    # Split files another project published, read onto the items ("benchx:/path/RSNA"): they
    # gave the splits and, in ``fractions``, the training subsets of some label fractions
    # (``{0.01: [ids], 0.1: [ids]}``), the same for every seed.
    split_source: str | None = None
    fractions: dict[float, list[str]] = field(default_factory=dict)
    # How far the reports agree with the labels, where the dataset measured it (the demo's
    # ``report_agreement``: see pipeline.datasets.demo.measure_agreement); reports show it.
    report_agreement: dict | None = None

    def __iter__(self):
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __bool__(self) -> bool:
        # A dataset is a thing, not a container test: `ds or default` must not depend on
        # whether it happens to have items (readers with materialise=False have none).
        return True

    @property
    def label_names(self) -> list[str]:
        names: dict[str, None] = {}
        for it in self.items:
            names.update(dict.fromkeys(it.labels))
        return list(names)
