"""What every evaluation task gets (the resolved inputs) and gives back (figures, tables, plots)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cache.pairs import PairData
from core.console import err, escape
from pipeline.methods import Method, adaptor_method, native_method
from pipeline.records import MethodResult
from pipeline.tables import Table
from stages.evaluate.features import FrozenAdaptor, raw_features


@dataclass(frozen=True)
class ScoreSplit:
    """Which split a run scores (``score_split``): the test split, or the validation split for a
    sweep's selection, so that the test split never chooses a setting. Heads are trained and
    chosen as always; only the items they are scored on change."""

    name: str
    config_key: str      # the EvalConfig field that names the split
    phrase: str          # how titles and notes name it


SCORE_SPLITS: dict[str, ScoreSplit] = {s.name: s for s in (
    ScoreSplit("test", "test_split", "the test split"),
    ScoreSplit("valid", "val_split", "the validation split"),
)}


@dataclass
class EvalContext:
    cfg: Any                      # stages.evaluate.EvalConfig
    root: Path                    # the cache
    device: torch.device
    data: PairData
    dataset_name: str
    adaptor: FrozenAdaptor | None
    backbone: str
    text_encoder: str | None
    out: Path
    notes: list[str] = field(default_factory=list)
    dataset_version: str | None = None                         # the release the reader found (Dataset.version)
    split_source: str | None = None                            # published split files the splits came from
    published: dict[float, list[str]] = field(default_factory=dict)   # their fixed training subsets, by fraction
    description: str = ""                 # the dataset's one-line description
    report_agreement: dict | None = None  # label-report agreement, where the dataset measured it
    native: bool = False                  # --adaptor native: the encoders' own joint space, no Adaptor

    def note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)
            err.print(f"[yellow]note:[/] {escape(str(message))}")

    @property
    def seeds(self) -> list[int]:
        return list(range(self.cfg.seed, self.cfg.seed + self.cfg.seeds))

    @property
    def subsets_note(self) -> str:
        """How the labelled subsets of the label fractions vary over the seeds (for the tables' notes)."""
        fixed = [f"{100 * f:g}%" for f in sorted(self.published) if f in self.cfg.fractions]
        if not fixed:
            return "each seed draws its own labelled subset"
        return (f"the {' and '.join(fixed)} subsets are the published ones of {self.split_source}, the same "
                "for every seed; other fractions are drawn per seed")

    def fixed_subsets(self, train_positions: np.ndarray) -> dict[float, np.ndarray]:
        """The published training subsets as indices into ``train_positions`` (items without a usable
        label or mask for this task are not among them), by fraction."""
        local = {i: k for k, i in enumerate(self.data.items.id.astype(str).to_numpy()[train_positions])}
        return {f: np.array(sorted(local[i] for i in ids if i in local), dtype=np.int64)
                for f, ids in self.published.items() if f in self.cfg.fractions}

    @property
    def image_rows(self) -> np.ndarray:
        """Store rows of each item's plain (un-augmented) view."""
        return self.data.image_rows[:, 0]

    @property
    def scored(self) -> str:
        """The split the figures are scored on, as titles name it ("the test split")."""
        return SCORE_SPLITS[self.cfg.score_split].phrase

    def positions(self, keep: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Item positions of the train / valid / test splits (only where ``keep``). The ``test``
        positions are those of the scored split (``score_split``): the validation split's when a
        sweep selects, and then no position of the test split is returned at all."""
        split = self.data.items["split"].to_numpy()
        scored = getattr(self.cfg, SCORE_SPLITS[self.cfg.score_split].config_key)
        names = {"train": self.cfg.train_split, "valid": self.cfg.val_split, "test": scored}
        ok = np.ones(len(split), bool) if keep is None else keep
        return {k: np.flatnonzero((split == v) & ok) for k, v in names.items()}

    def save_subsets(self, plan: dict[int, dict[float, np.ndarray]], train_positions: np.ndarray,
                     whole: bool = False) -> None:
        """The item ids of every training subset below 100% (and of 100% too with ``whole``, when the
        training items are themselves a choice), so a run can be re-created or audited."""
        ids = self.data.items.id.astype(str).to_numpy()[train_positions]
        subsets = {str(seed): {f"{f:g}": ids[sub].tolist() for f, sub in by_f.items() if f < 1.0 or whole}
                   for seed, by_f in plan.items()}
        (self.out / "subsets.json").write_text(json.dumps(subsets))

    def adaptor_method(self) -> Method:
        """The Adaptor's rows: ``Adaptor (<mode>) <backbone> + <text encoder>``."""
        return adaptor_method(self.adaptor.mode.name, self.backbone, self.text_encoder)

    def baseline_method(self, with_text: bool = False) -> Method:
        """The frozen features' rows: ``no Adaptor <backbone>`` (``+ <text encoder>`` where both are compared)."""
        return Method(f"no Adaptor {self.backbone}" + (f" + {self.text_encoder}" if with_text else ""), "backbone")

    def native_method(self, with_text: bool = False) -> Method:
        """A CLIP-style pair's own joint space: ``native joint space <backbone>`` (``+ <text encoder>``
        where both towers are compared)."""
        return native_method(self.backbone, self.text_encoder if with_text else None)

    def feature_sets(self) -> list[tuple[Method, str]]:
        """(method, feature source) of the image-feature methods this run evaluates."""
        sets = []
        if self.adaptor is not None:
            sets.append((self.adaptor_method(), "adaptor"))
        if self.native or (self.adaptor is not None and self.cfg.baseline and "native" in self.data.image.array_names):
            sets.append((self.native_method(), "native"))
        if self.adaptor is None or self.cfg.baseline:
            sets.append((self.baseline_method(), "backbone"))
        return sets

    def pooled_features(self, kind: str, positions: np.ndarray) -> np.ndarray:
        """``[n, d]`` image features from the source ``kind`` (:data:`FEATURE_SOURCES`)."""
        return FEATURE_SOURCES[kind].pooled(self, self.image_rows[positions])


@dataclass(frozen=True)
class FeatureSource:
    """Where a method's image features come from; results record its name (``"features"``)."""

    name: str
    summary: str
    pooled: Callable[[EvalContext, np.ndarray], np.ndarray]   # store rows -> [n, d] float32
    # store rows -> ([n, T, d] tokens, (h, w) patch grid or None, number of prefix tokens); None: no tokens
    tokens: Callable[[EvalContext, np.ndarray], tuple[np.ndarray, tuple[int, int] | None, int]] | None
    from_adaptor: bool   # the frozen Adaptor's outputs: its heads are the ones `pipe predict` applies


def _adaptor_tokens(ctx: EvalContext, rows: np.ndarray):
    a = ctx.adaptor
    return a.image_tokens(ctx.data.image, rows), a.token_grid(), a.grid[1]


def _backbone_tokens(ctx: EvalContext, rows: np.ndarray):
    grid, n_prefix = ctx.data.image_grid
    return raw_features(ctx.data.image, rows, "tokens"), grid, n_prefix


FEATURE_SOURCES: dict[str, FeatureSource] = {s.name: s for s in (
    FeatureSource("adaptor", "the frozen Adaptor's outputs (cached per checkpoint)",
                  lambda ctx, rows: ctx.adaptor.image_embeddings(ctx.data.image, rows), _adaptor_tokens,
                  from_adaptor=True),
    FeatureSource("backbone", "the backbone's own cached outputs (no Adaptor)",
                  lambda ctx, rows: raw_features(ctx.data.image, rows, "pooled").astype(np.float32),
                  _backbone_tokens, from_adaptor=False),
    # the encoder's pooled output through its own projection (stages/evaluate/native.py); no tokens
    FeatureSource("native", "the image tower's pooled output in its joint space (no Adaptor)",
                  lambda ctx, rows: raw_features(ctx.data.image, rows, "native").astype(np.float32),
                  None, from_adaptor=False),
)}


@dataclass
class TaskResult:
    methods: list[MethodResult] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)
    data: dict = field(default_factory=dict)
    # Data files beside results.json that reports read, by role: "predictions" (per-item test
    # scores), "overlays" (segmentation cases), "examples" and "thumbnails" (retrieval examples).
    files: dict[str, Path] = field(default_factory=dict)
