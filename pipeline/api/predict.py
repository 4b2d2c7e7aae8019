"""Everything a trained Adaptor says about new images, per image: what `pipe predict` prints."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pipeline.api.bank import ReportBank
from pipeline.api.encode import ImageInput, image_label


@dataclass
class Predictions:
    """One record per image, in input order: ``image``, ``error`` (None when it was read),
    ``zero_shot`` {finding: {score, probability}}, ``head`` {label: probability} and
    ``reports`` (the top-k of the bank: rank, id, report, similarity)."""

    records: list[dict]
    findings: list[str] = field(default_factory=list)
    head: str | None = None
    head_labels: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.records if r["error"]]


def predict(model, images: Sequence[ImageInput], *, prompts: str | None = None, zero_shot: bool = True,
            head: str | os.PathLike | None = None, bank: ReportBank | None = None, k: int = 3,
            batch_size: int = 32, progress: bool | None = None) -> Predictions:
    """Zero-shot findings, a head's output and the nearest reports for each image; an image that
    cannot be read gets its error, and the others are predicted."""
    images = list(images)
    emb, failures = model.image_embeddings(images, batch_size=batch_size, progress=progress)
    ok = np.array([i for i in range(len(images)) if i not in failures], np.int64)
    records = [{"image": image_label(x, i), "error": failures.get(i)} for i, x in enumerate(images)]
    out = Predictions(records)
    if not len(ok):
        return out
    if zero_shot:
        zs = model.zero_shot(emb[ok], prompts)
        out.findings = zs.findings
        for j, i in enumerate(ok):
            records[i]["zero_shot"] = {f: {"score": float(zs.scores[j, c]), "probability": float(zs.probabilities[j, c])}
                                       for c, f in enumerate(zs.findings)}
    if head is not None:
        h = model.classify(emb[ok], head)
        out.head, out.head_labels = h.name, h.labels
        for j, i in enumerate(ok):
            records[i]["head"] = {label: float(h.probabilities[j, c]) for c, label in enumerate(h.labels)}
    if bank is not None:
        for i, hits in zip(ok, bank.search(emb[ok], k)):
            records[i]["reports"] = [hit.__dict__ for hit in hits]
    return out
