"""The runs a report gathers: evaluation runs (``results.json``) and Adaptor trainings (``metrics.csv``).

A path given to `pipe report` is an evaluation run directory (or its ``results.json``), a
training run directory, or a folder holding such directories (``demo-out``). The Adaptor
trainings behind the evaluation runs are found through their checkpoints' paths, so the
training curves come with the tables without being named.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from core.errors import InputError
from pipeline.methods import Method, adaptor_method
from pipeline.records import CheckpointInfo, EvalRecord, Examples, Provenance, load_results


class ReportInputError(InputError):
    """A path that is no run directory; the message says what `pipe report` reads."""


@dataclass
class EvalRun:
    path: Path                 # the run directory
    record: EvalRecord         # its results.json (pipeline.records)
    label: str = ""            # a short name for the page (the directory's name, made unique)

    @property
    def task(self) -> str:
        return self.record.task

    @property
    def dataset(self) -> str:
        return self.record.dataset_label

    @property
    def checkpoint(self) -> CheckpointInfo | None:
        return self.record.checkpoint

    def file(self, role: str) -> Path | None:
        """The run's data file for ``role`` (predictions, overlays, examples, thumbnails), if present."""
        return self.record.file(self.path, role)

    def npz(self, role: str) -> dict[str, np.ndarray] | None:
        path = self.file(role)
        if path is None:
            return None
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def examples(self) -> Examples | None:
        """The retrieval examples it saved (examples.json), if any."""
        path = self.file("examples")
        return Examples.from_dict(json.loads(path.read_text())) if path is not None else None


@dataclass
class TrainRun:
    path: Path                 # the training run directory (metrics.csv, config.yaml, checkpoints)
    rows: list[dict]           # metrics.csv, one row per epoch
    config: dict = field(default_factory=dict)
    provenance: Provenance = field(default_factory=Provenance)   # its provenance.json (empty when it has none)
    label: str = ""

    @property
    def mode(self) -> str:
        return str((self.config.get("adaptor") or {}).get("mode", "pooled"))

    @property
    def method(self) -> Method:
        """The method its evaluation rows are of (``EvalContext.adaptor_method``)."""
        return adaptor_method(self.mode, self.config.get("backbone", "?"), self.config.get("text_encoder", "?"))


@dataclass
class Runs:
    evals: list[EvalRun]
    trainings: list[TrainRun]
    missing_trainings: list[str] = field(default_factory=list)   # checkpoints whose training run was not found


def _num(v: str):
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return f


def load_training(path: Path) -> TrainRun:
    with open(path / "metrics.csv", newline="") as f:
        rows = [{k: _num(v) for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)]
    config, prov = {}, Provenance()
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "provenance.json").is_file():
        prov = Provenance.from_dict(json.loads((path / "provenance.json").read_text()))
    return TrainRun(path, rows, config, prov)


def _kind(path: Path) -> str | None:
    if path.is_file() and path.name == "results.json":
        return "eval-file"
    if (path / "results.json").is_file():
        return "eval"
    if (path / "metrics.csv").is_file():
        return "train"
    return None


def expand(paths: list[Path]) -> list[tuple[str, Path]]:
    """(kind, run directory) of every run the paths name: a run directory, a results.json, or a
    folder whose subfolders are runs (e.g. the demo's output folder)."""
    found = []
    for p in paths:
        kind = _kind(p)
        if kind == "eval-file":
            found.append(("eval", p.parent))
        elif kind:
            found.append((kind, p))
        elif p.is_dir() and (inner := [(k, c) for c in sorted(p.iterdir()) if c.is_dir() and (k := _kind(c))]):
            found += inner
        elif p.suffix in (".md", ".html", ".png", ".csv", ".json") and p.is_file():
            continue  # `pipe report demo-out/*` names the demo's own files too
        else:
            raise ReportInputError(f"{p} is neither an evaluation run (a directory with results.json, written by "
                                   "`pipe evaluate`), an Adaptor training run (a directory with metrics.csv) nor a "
                                   "folder of such runs")
    seen, out = set(), []
    for kind, d in found:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            out.append((kind, d))
    if not out:
        raise ReportInputError("no runs given: name evaluation run directories (each with results.json)")
    return out


def _checkpoint_dir(run: EvalRun) -> Path | None:
    """The training run behind an evaluation's checkpoint: where it was, else beside the run."""
    ck = run.checkpoint
    if ck is None or not ck.path:
        return None
    recorded = Path(ck.path)
    folder = recorded if recorded.suffix == "" else recorded.parent
    candidates = [folder]
    cwd = run.record.provenance.cwd
    if cwd and not folder.is_absolute():
        candidates.append(Path(cwd) / folder)
    candidates += [run.path.parent / folder.name, run.path.parent.parent / folder.name]
    return next((c for c in candidates if (c / "metrics.csv").is_file()), None)


def _unique_labels(paths: list[Path]) -> list[str]:
    labels = [p.name or str(p) for p in paths]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels[i] = f"{paths[i].parent.name}/{lab}"
    return labels


def load_runs(paths: list[Path]) -> Runs:
    evals, trainings, missing = [], [], []
    seen_train: dict[Path, TrainRun] = {}
    for kind, d in expand(paths):
        if kind == "eval":
            evals.append(EvalRun(d, load_results(d)))
        else:
            seen_train.setdefault(d.resolve(), load_training(d))
    for run in evals:
        folder = _checkpoint_dir(run)
        if folder is not None:
            seen_train.setdefault(folder.resolve(), load_training(folder))
        elif run.checkpoint and run.checkpoint.path not in missing:
            missing.append(run.checkpoint.path)
    trainings = list(seen_train.values())
    for r, lab in zip(evals, _unique_labels([r.path for r in evals])):
        r.label = lab
    for t, lab in zip(trainings, _unique_labels([t.path for t in trainings])):
        t.label = lab
    return Runs(evals, trainings, missing)
