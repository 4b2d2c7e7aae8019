"""Result tables as typed records: built from summaries, written as Markdown, printed with rich, merged across runs.

A :class:`Table` holds one metric of one task: its :class:`Column`\\ s (label fractions,
or the figures a task reports) and one :class:`Row` per :class:`~pipeline.methods.Method`,
whose :class:`Cell`\\ s keep the figure itself (:class:`Figure`: a fraction in [0, 1], its
spread over seeds, its interval, the seeds) beside the text printed for it. ``note`` says
what the cells and their intervals are (:func:`interval_note`); it is printed under the
table wherever the table goes. In ``results.json`` a table is :meth:`Table.to_dict`
(docs/reference/results-format.md); :mod:`pipeline.records` reads it back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
from rich.table import Table as RichTable

from core.console import plain
from pipeline.methods import Method


def fraction_label(f: float) -> str:
    return f"{f * 100:g}%"


def pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def finite(x) -> bool:
    return x is not None and math.isfinite(x)


# ------------------------------------------------------------------------------ records
@dataclass(frozen=True)
class Figure:
    """A cell's numbers: the mean over seeds (with their std) or one estimate, and its interval."""

    value: float | None                          # a fraction in [0, 1]; None: not defined here
    std: float | None = None                     # over the seeds
    ci: tuple[float | None, float | None] | None = None   # the bootstrap interval
    n_seeds: int | None = None                   # a mean over this many seeds; None: one estimate
    seeds: tuple[int, ...] = ()                  # those seeds (files before format 2 do not say)

    def to_dict(self) -> dict:
        if self.n_seeds is not None:
            d = {"mean": self.value, "std": self.std, "n_seeds": self.n_seeds}
            d.update({"ci": list(self.ci)} if self.ci is not None else {})
            return {**d, "seeds": list(self.seeds)} if self.seeds else d
        return {"value": self.value, "ci": list(self.ci) if self.ci is not None else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Figure | None":
        """A summary (``mean``, ``std``, ``n_seeds``, ``ci``) or an estimate (``value``, ``ci``); None for ``{}``."""
        if not d:
            return None
        ci = tuple(d["ci"]) if d.get("ci") is not None else None
        if "mean" in d:
            return cls(d["mean"], d.get("std"), ci, int(d.get("n_seeds", 1)), tuple(d.get("seeds") or ()))
        return cls(d.get("value"), None, ci)


def summary_text(s: Figure | None) -> str:
    """``mean ± std [lo, hi]`` in percent (no ± with one seed), or ``value [lo, hi]``; n/a without a figure."""
    if s is None or not finite(s.value):
        return "n/a"
    std = f" ± {pct(s.std)}" if (s.n_seeds or 1) > 1 else ""
    ci = s.ci if s.ci is not None and finite(s.ci[0]) else None
    return f"{pct(s.value)}{std}" + (f" [{pct(ci[0])}, {pct(ci[1])}]" if ci else "")


@dataclass(frozen=True)
class Cell:
    text: str                       # as printed
    figure: Figure | None = None    # its numbers (none for a text cell: a protocol, a published figure)

    @property
    def value(self) -> float | None:
        return self.figure.value if self.figure is not None and finite(self.figure.value) else None


NO_CELL = Cell("")


@dataclass(frozen=True)
class Column:
    name: str                       # as printed; the key of every row's cells
    fraction: float | None = None   # a label fraction's column (its name is fraction_label(fraction))


@dataclass(frozen=True)
class Row:
    method: Method
    cells: dict[str, Cell]
    source: str = ""                # in a merged table: the run it comes from

    def cell(self, column: str) -> Cell:
        return self.cells.get(column, NO_CELL)

    def texts(self) -> dict[str, str]:
        return {c: cell.text for c, cell in self.cells.items()}

    def to_dict(self) -> dict:
        d = {"method": self.method.name, "identity": self.method.to_dict(), "cells": self.texts(),
             "values": {c: cell.figure.to_dict() for c, cell in self.cells.items() if cell.figure is not None}}
        return {**d, "source": self.source} if self.source else d


@dataclass
class Table:
    """One metric of one task over methods (rows) and columns; rows are added as it is built."""

    task: str                       # the evaluation task (stages/evaluate/tasks.py:TASKS); "" for other tables
    name: str                       # what it measures, e.g. "macro AUROC", "recall@K on the test split"
    metric: str                     # the metric's key in the results, e.g. "macro_auroc", "recall"
    columns: list[Column]
    note: str = ""
    unit: str = "%"
    dataset: str = ""               # set when runs are merged: the dataset the rows were scored on
    rows: list[Row] = field(default_factory=list)

    @property
    def heading(self) -> str:
        """What it measures, with its unit: "macro AUROC (%)"."""
        return f"{self.name} ({self.unit})" if self.unit else self.name

    @property
    def title(self) -> str:
        """As printed: "<task> · <heading>", then " · <dataset>" in a merged table."""
        return " · ".join(p for p in (self.task, self.heading, self.dataset) if p)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def to_dict(self) -> dict:
        return {"title": self.title, "metric": self.metric, "columns": self.column_names, "note": self.note,
                "rows": [r.to_dict() for r in self.rows], "task": self.task, "name": self.name, "unit": self.unit,
                "fractions": {c.name: c.fraction for c in self.columns if c.fraction is not None},
                **({"dataset": self.dataset} if self.dataset else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Table":
        """A table as :meth:`to_dict` writes it (pipeline.records upgrades older files to this first)."""
        fractions = d.get("fractions") or {}
        columns = [Column(c, fractions.get(c)) for c in d["columns"]]
        rows = [Row(Method.from_dict(r["method"], r.get("identity") or {}),
                    {c: Cell(text, Figure.from_dict((r.get("values") or {}).get(c) or {}))
                     for c, text in r["cells"].items()}, r.get("source", "")) for r in d["rows"]]
        return cls(d.get("task", ""), d.get("name", d["title"]), d.get("metric", ""), columns, d.get("note", ""),
                   d.get("unit", ""), d.get("dataset", ""), rows)


# ----------------------------------------------------------------------------- building
def fraction_columns(fractions: Sequence[float]) -> list[Column]:
    return [Column(fraction_label(f), f) for f in fractions]


def make_table(task: str, name: str, metric: str, columns: Sequence[Column | str], note: str = "",
               unit: str = "%") -> Table:
    return Table(task, name, metric, [c if isinstance(c, Column) else Column(c) for c in columns], note, unit)


def add_row(table: Table, method: Method, cells: dict[str, Cell]) -> None:
    table.rows.append(Row(method, cells))


def summary_cell(s: Figure | None) -> Cell:
    """A summary's cell: ``mean ± std [lo, hi]`` in percent (no ± with one seed)."""
    return Cell(summary_text(s), s)


def value_cell(value: float | None, ci: Sequence | None = None) -> Cell:
    """One estimate's cell: ``value [lo, hi]`` in percent, or n/a."""
    figure = Figure(value, ci=tuple(ci) if ci is not None else None)
    return Cell(summary_text(figure) if finite(value) else "n/a", figure)


def text_cell(text: str) -> Cell:
    return Cell(text)


def add_estimates_row(table: Table, method: Method, estimates: dict | None, cis: dict | None = None) -> None:
    """One method's point estimates (with CIs) in every column, or n/a throughout when it has none."""
    cols = table.column_names
    if estimates is None:
        add_row(table, method, {c: Cell("n/a") for c in cols})
        return
    cis = cis or {}
    add_row(table, method, {c: value_cell(estimates[c], cis.get(c)) for c in cols})


def interval_note(level: float, n_test: int, resamples: int, seeds: int | None = None,
                  subsets: str = "each seed draws its own labelled subset", centred: bool = False) -> str:
    """What a table's cells and their brackets are: the spread over seeds, and which resampling
    the interval covers (the test items, with the trained heads held fixed: not the seeds)."""
    if resamples <= 0 or n_test <= 0:
        ci = "no interval (bootstrap=0)"
    else:
        ci = (f"[lo, hi]: {100 * level:g}% bootstrap interval over the {n_test:,} test items ({resamples:,} "
              "resamples)")
    if seeds is None:
        text = f"Cells: value {ci}."
    elif seeds == 1:
        text = f"Cells: one seed's figure; {ci}, the trained head held fixed."
    else:
        text = (f"Cells: mean ± std over {seeds} seeds (the std is the spread across training runs: head "
                f"initialisation and order; {subsets}); {ci} of the mean over the seeds, the trained heads "
                "held fixed, so it covers test-set sampling only, not the spread across seeds.")
    if centred and resamples > 0:
        text += (" ECE is biased upward on resamples (a resample repeats items, which only widens each bin's "
                 "gap), so its interval is the percentile interval moved by the resamples' median bias: "
                 "centred on the estimate, which it contains.")
    return text


# ---------------------------------------------------------------------------- rendering
def to_markdown(table: Table) -> str:
    cols = table.column_names
    lines = [f"**{table.title}**", "", "| method | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in table.rows:
        lines.append(f"| {r.method.name} | " + " | ".join(r.cell(c).text for c in cols) + " |")
    if table.note:
        lines += ["", f"_{table.note}_"]
    return "\n".join(lines) + "\n"


def to_rich(table: Table):
    t = RichTable(title=plain(table.title), title_justify="left", caption=plain(table.note) or None,
                  caption_justify="left")
    t.add_column("method", overflow="fold")
    for c in table.column_names:
        t.add_column(plain(c), justify="right")
    for r in table.rows:
        t.add_row(plain(r.method.name), *(plain(r.cell(c).text) for c in table.column_names))
    return t


def merge_tables(runs: Sequence[tuple[str, Sequence[Table]]], sources: Sequence[str]) -> list[Table]:
    """The tables of several runs (each its dataset's name and its tables), merged per (dataset, task, heading).

    Rows are appended in run order; a row repeated verbatim by a later run (e.g. the same
    no-Adaptor reference) is kept once, and a method name that recurs with other figures
    gets its run directory appended. Columns are unioned, fraction columns sorted.
    """
    merged: dict[tuple[str, str, str], Table] = {}
    for (dataset, tables), source in zip(runs, sources):
        for t in tables:
            m = merged.setdefault((dataset, t.task, t.heading),
                                  replace(t, columns=[], rows=[], dataset=dataset or "?"))
            if t.note and t.note not in m.note:  # runs with other seeds or test sets say so
                m.note = f"{m.note} / {source}: {t.note}" if m.note else t.note
            m.columns += [c for c in t.columns if c.name not in m.column_names]
            for r in t.rows:
                same = [o for o in m.rows if o.method.name == r.method.name]
                if any(o.texts() == r.texts() for o in same):
                    continue
                method = r.method.renamed(f"{r.method.name} · {source}") if same else r.method
                m.rows.append(Row(method, r.cells, source))
    for m in merged.values():
        if m.columns and all(c.fraction is not None for c in m.columns):
            m.columns.sort(key=lambda c: c.fraction)
    return list(merged.values())
