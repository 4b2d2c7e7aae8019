"""The kinds of classification target, one registry entry each (the ``label_type`` setting).

An entry says what the rest of the code asks of a target: whether its classes exclude each
other (one class per item: softmax scores and cross-entropy; otherwise every label is its
own 0/1 question: sigmoid scores and a binary cross-entropy over the known labels), which
metric picks heads and leads the tables, and which metrics the tables show. Evaluation
(stages/evaluate/classify.py) trains and scores heads by it; `pipe predict` and the API
apply a saved head by the ``label_type`` its metadata records.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class LabelType:
    name: str
    summary: str
    primary: str                        # the metric that selects heads on validation and leads the tables
    exclusive: bool                     # one class per item (softmax, cross-entropy), else one 0/1 per label
    extra_tables: tuple[str, ...] = ()  # metrics shown after the primary one (before the calibration error)
    per_label_tables: bool = False      # also one AUROC table per label

    @property
    def need_negatives(self) -> bool:
        """Does every label need a negative example (a 0/1 label), not only a positive?"""
        return not self.exclusive

    def scores(self, logits: Tensor) -> Tensor:
        """Probabilities from a head's logits ``[n, L]``."""
        return torch.softmax(logits, 1) if self.exclusive else torch.sigmoid(logits)

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """The training loss; ``y`` holds one-hot rows (exclusive) or 0/1 with NaN where unknown."""
        if self.exclusive:
            return F.cross_entropy(logits, y.argmax(1))
        known = ~torch.isnan(y)
        return F.binary_cross_entropy_with_logits(logits[known], y[known])

    def table_keys(self, names: list[str]) -> list[str]:
        """The metrics a results table shows, one table each, in order."""
        return [self.primary, *self.extra_tables, "ece"] + ([f"auroc/{n}" for n in names] if self.per_label_tables
                                                            else [])


LABEL_TYPES: dict[str, LabelType] = {t.name: t for t in (
    LabelType("binary", "one 0/1 label", "auroc", exclusive=False),
    LabelType("multilabel", "several 0/1 labels, each its own question", "macro_auroc", exclusive=False,
              per_label_tables=True),
    LabelType("multiclass", "one label of class indices 0..K-1, one class per item", "accuracy", exclusive=True,
              extra_tables=("macro_f1",)),
)}

# What ``label_type`` accepts: a type, or auto (multi-label over every 0/1 label, else a lone multi-class label).
LABEL_TYPE_CHOICES: dict[str, LabelType | None] = {"auto": None, **LABEL_TYPES}
