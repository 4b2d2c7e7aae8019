"""What a sweep maximises (or minimises): the ``objective:`` of a sweep file.

    objective: classification@0.01/macro_auroc     # a head on 1% of the labels, macro AUROC
    objective: segmentation@0.1/dice                # Dice of a decoder on 10% of the masks
    objective: retrieval/i2t_r@10                   # image→text recall@10
    objective: zero-shot/macro_auroc
    objective: val_i2t_r@10                         # a training figure (the last epoch's)

A downstream objective is scored by ``pipe evaluate``'s own task on the **validation**
split (``score_split=valid``): its heads are trained as `pipe evaluate` trains them, and
the test split is never read while trials are chosen. A training figure is the last
epoch's value in the run's ``metrics.csv``.

Each kind of objective is one entry of :data:`KINDS`; :func:`read_figure` is the one place
that reads a figure out of an evaluation's results.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.records import EvalRecord, MethodResult
from stages.evaluate.tables import fraction_label
from stages.evaluate.tasks import TASKS

DIRECTIONS = {"maximize": "higher is better", "minimize": "lower is better"}
_DIRS = {"i2t": "image→text", "t2i": "text→image"}
RECALL = re.compile(r"^(i2t|t2i)_r@(\d+)$")
TRAINING_FIGURES = ({"train_loss", "val_loss", "val_loss_batch"}
                    | {f"val_{d}_r@{k}" for d in _DIRS for k in (1, 5, 10)}
                    | {f"val_itm_{d}_r@{k}" for d in _DIRS for k in (1, 5, 10)})
SEG_ALIASES = {"dice": "dice_positive", "iou": "iou_positive"}
SEG_METRICS = {"dice_positive", "dice_empty_is_one", "dice_global", "iou_positive", "iou_empty_is_one"}
CLASS_METRICS = {"auroc", "macro_auroc", "accuracy", "macro_f1", "ece"}   # and auroc/<label>


@dataclass(frozen=True)
class Objective:
    text: str                  # as written
    task: str | None           # the evaluation task (stages.evaluate.tasks.TASKS), None for a training figure
    metric: str                # the figure's key in the task's results
    fraction: float | None     # head tasks: the label fraction the heads train on
    direction: str             # maximize | minimize

    @property
    def downstream(self) -> bool:
        return self.task is not None

    @property
    def label(self) -> str:
        return f"{self.text} ({DIRECTIONS[self.direction]})"

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


@dataclass(frozen=True)
class Kind:
    name: str
    pattern: re.Pattern
    task: str | None
    parse: Callable[[re.Match], tuple[str, float | None, str | None]]   # -> (metric, fraction, problem)
    read: Callable[[Any, "Objective"], float]      # (an EvalRecord, or a metrics row for training; objective) -> figure


def _fraction(text: str) -> tuple[float | None, str | None]:
    try:
        f = float(text)
    except ValueError:
        return None, f"the label fraction {text!r} is not a number"
    return (f, None) if 0 < f <= 1 else (None, f"the label fraction {text} must lie in (0, 1]")


def _parse_classification(m: re.Match):
    f, why = _fraction(m["fraction"])
    metric = m["metric"]
    if metric not in CLASS_METRICS and not metric.startswith("auroc/"):
        why = why or f"unknown classification metric {metric!r} (known: {', '.join(sorted(CLASS_METRICS))}, auroc/LABEL)"
    return metric, f, why


def _parse_segmentation(m: re.Match):
    f, why = _fraction(m["fraction"])
    metric = SEG_ALIASES.get(m["metric"], m["metric"])
    if metric not in SEG_METRICS:
        why = why or (f"unknown segmentation metric {m['metric']!r} (known: dice, iou, "
                      f"{', '.join(sorted(SEG_METRICS))})")
    return metric, f, why


def _parse_retrieval(m: re.Match):
    hit = RECALL.match(m["metric"])
    if not hit or int(hit[2]) not in (1, 5, 10):
        return m["metric"], None, (f"unknown retrieval metric {m['metric']!r} (known: i2t_r@1, i2t_r@5, i2t_r@10, "
                                   "t2i_r@1, t2i_r@5, t2i_r@10)")
    return m["metric"], None, None


def _parse_zero_shot(m: re.Match):
    metric = m["metric"]
    if metric != "macro_auroc" and not metric.startswith("auroc/"):
        return metric, None, f"unknown zero-shot metric {metric!r} (known: macro_auroc, auroc/FINDING)"
    return metric, None, None


def _parse_training(m: re.Match):
    metric = m["metric"]
    if metric not in TRAINING_FIGURES:
        return metric, None, (f"unknown objective {metric!r}: write TASK@FRACTION/METRIC (classification, "
                              f"segmentation), retrieval/METRIC, zero-shot/METRIC, or a training figure "
                              f"({', '.join(sorted(TRAINING_FIGURES))})")
    return metric, None, None


# ------------------------------------------------------------------ reading results
# An evaluation's figures come from its typed record (pipeline.records.EvalRecord, as
# load_results reads results.json of any format); a training figure from its last metrics row.
def _adaptor_row(record: EvalRecord) -> MethodResult:
    """The Adaptor's row of an evaluation (the first method: the checkpoint's own features)."""
    return record.methods[0]


def _head_figure(record: EvalRecord, o: Objective) -> float:
    heads = _adaptor_row(record).heads
    kind = next(iter(heads))                 # the first head kind of heads.kinds
    return heads[kind][fraction_label(o.fraction)].summary[o.metric].value


def _recall_figure(record: EvalRecord, o: Objective) -> float:
    hit = RECALL.match(o.metric)
    return _adaptor_row(record).figures["recall"][f"{_DIRS[hit[1]]} R@{hit[2]}"]


def _zero_shot_figure(record: EvalRecord, o: Objective) -> float:
    key = "macro" if o.metric == "macro_auroc" else o.metric.split("/", 1)[1]
    return _adaptor_row(record).figures["auroc"][key]


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("classification", re.compile(r"^classification@(?P<fraction>[^/]+)/(?P<metric>.+)$"), "classification",
         _parse_classification, _head_figure),
    Kind("segmentation", re.compile(r"^segmentation@(?P<fraction>[^/]+)/(?P<metric>.+)$"), "segmentation",
         _parse_segmentation, _head_figure),
    Kind("retrieval", re.compile(r"^retrieval/(?P<metric>.+)$"), "retrieval", _parse_retrieval, _recall_figure),
    Kind("zero-shot", re.compile(r"^zero-shot/(?P<metric>.+)$"), "zero-shot", _parse_zero_shot, _zero_shot_figure),
    Kind("training", re.compile(r"^(?P<metric>[^/]+)$"), None, _parse_training,
         lambda results, o: results[o.metric]),
)}
assert all(k.task is None or k.task in TASKS for k in KINDS.values())


def default_direction(metric: str) -> str:
    return "minimize" if metric.endswith("loss") or metric == "ece" else "maximize"


def parse_objective(text: str, direction: str | None) -> tuple[Objective | None, list[str]]:
    """The objective, or the problems with it (each one line of the sweep's error message)."""
    text = str(text).strip()
    kind = next((k for k in KINDS.values() if k.pattern.match(text)), None)
    if kind is None:
        return None, [f"objective: {text!r} is not TASK@FRACTION/METRIC, TASK/METRIC or a training figure "
                      f"(e.g. classification@0.01/macro_auroc, retrieval/i2t_r@10, val_i2t_r@10)"]
    metric, fraction, why = kind.parse(kind.pattern.match(text))
    problems = [f"objective: {why}"] if why else []
    if direction is not None and direction not in DIRECTIONS:
        problems.append(f"direction: must be one of {', '.join(DIRECTIONS)}, got {direction!r}")
    if problems:
        return None, problems
    return Objective(text, kind.task, metric, fraction, direction or default_direction(metric)), []


def kind_of(o: Objective) -> Kind:
    return next(k for k in KINDS.values() if k.task == o.task)


def read_figure(results: EvalRecord | dict, o: Objective) -> float:
    """The objective's figure in an evaluation's record (or, for a training figure, in the last
    epoch's metrics row). Every reading of results by the sweep goes through here."""
    try:
        value = float(kind_of(o).read(results, o))
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise LookupError(f"the results have no figure {o.text!r} ({type(e).__name__}: {e})") from None
    if math.isnan(value):
        raise LookupError(f"{o.text} is undefined (NaN) on this split")
    return value
