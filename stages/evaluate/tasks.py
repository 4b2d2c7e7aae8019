"""The evaluation tasks, one registry entry each.

An entry names the task, the module that runs it (``run(ctx) -> TaskResult``), whether it
needs the text side of the cache, its own section of ``EvalConfig`` (its settings), and
what a report shows of it: the tables it shows first (the others are folded away) and the
figure of its tile in the page's glance. The registry's order is the order in which
reports show the tasks. Adding a task is one new module, one entry here and (if it has
settings) one section: the config, the CLI's choices, the stage and the report all read
this registry. It is kept free of heavy imports, so `pipe --help` can list the tasks; a
task's module is imported when the task runs (by a plain import inside :func:`_runner`,
so the layout's test sees it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Task:
    name: str
    module: str           # the module under stages/evaluate/ whose run(ctx) evaluates it
    needs_text: bool      # reads the text store (retrieval, zero-shot) or the image store alone
    summary: str
    settings: str         # its section of EvalConfig (e.g. classification.labels); heads are shared
    main_tables: tuple[str, ...] = ()   # the metrics whose tables a report shows first; () all of them
    glance: tuple[str, ...] = ()        # the metrics the glance looks for, the first one the run has
    glance_column: str = ""             # the glance's column ("": by label fraction, see glance_fewest_labels)
    glance_fewest_labels: bool = False  # the glance shows the smallest label fraction (else the largest)

    def run(self, ctx):
        return _runner(self.module)(ctx)


def _runner(module: str) -> Callable:
    """The ``run`` of a task's module, imported on first use (torch and friends load only then)."""
    from stages.evaluate import classify, retrieve, segment, zeroshot  # lazy: they pull in torch; --help needs names
    return {"classify": classify.run, "segment": segment.run, "retrieve": retrieve.run, "zeroshot": zeroshot.run}[module]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("classification", "classify", needs_text=False,
         summary="heads on frozen image features, at label fractions", settings="classification",
         main_tables=("auroc", "macro_auroc", "accuracy", "macro_f1", "ece"),   # the per-label AUROCs fold away
         glance=("macro_auroc", "auroc", "accuracy"), glance_fewest_labels=True),  # 1%: where an Adaptor helps
    Task("segmentation", "segment", needs_text=False,
         summary="a convolutional decoder on cached patch tokens, Dice three ways", settings="seg",
         main_tables=("dice_positive", "dice_empty_is_one"), glance=("dice_positive",)),
    Task("retrieval", "retrieve", needs_text=True,
         summary="image→text and text→image recall@1/5/10 on the test split", settings="retrieval",
         glance=("recall",), glance_column="image→text R@5"),
    Task("zero-shot", "zeroshot", needs_text=True,
         summary="prompt pairs per finding scored through the Adaptor, AUROC", settings="zero_shot",
         glance=("auroc",), glance_column="macro"),
)}


def task_rank(name: str) -> int:
    """Where a task's sections go in a report: the registry's order (a task it does not know last)."""
    return list(TASKS).index(name) if name in TASKS else len(TASKS)


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None
