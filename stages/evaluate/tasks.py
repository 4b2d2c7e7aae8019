"""The evaluation tasks, one registry entry each.

An entry names the task, the module that runs it (``run(ctx) -> TaskResult``), whether it
needs the text side of the cache, and its own section of ``EvalConfig`` (its settings).
Adding a task is one new module, one entry here and (if it has settings) one section:
the config, the CLI's choices, the stage and the report all read this registry. It is kept free of heavy imports, so `pipe --help` can list the
tasks; a task's module is imported when the task runs (by a plain import inside
:func:`_runner`, so the layout's test sees it).
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

    def run(self, ctx):
        return _runner(self.module)(ctx)


def _runner(module: str) -> Callable:
    """The ``run`` of a task's module, imported on first use (torch and friends load only then)."""
    from stages.evaluate import classify, retrieve, segment, zeroshot  # lazy: they pull in torch; --help needs names
    return {"classify": classify.run, "segment": segment.run, "retrieve": retrieve.run, "zeroshot": zeroshot.run}[module]


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("classification", "classify", needs_text=False,
         summary="heads on frozen image features, at label fractions", settings="classification"),
    Task("segmentation", "segment", needs_text=False,
         summary="a convolutional decoder on cached patch tokens, Dice three ways", settings="seg"),
    Task("retrieval", "retrieve", needs_text=True,
         summary="image→text and text→image recall@1/5/10 on the test split", settings="retrieval"),
    Task("zero-shot", "zeroshot", needs_text=True,
         summary="prompt pairs per finding scored through the Adaptor, AUROC", settings="zero_shot"),
)}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {name!r}") from None
