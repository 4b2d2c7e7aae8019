"""Result tables: built from summaries, written as markdown, printed with rich, merged across runs.

A table is plain data (so it lives in results.json and ``pipe report`` can merge runs):
``{"title", "metric", "columns": [...], "note", "rows": [{"method", "cells": {column: text},
"values": {column: {...numbers...}}}]}`` (and ``"label"``, the first column's heading, where
the rows are not methods). ``note`` says what the cells and their intervals
are (:func:`interval_note`); it is printed under the table wherever the table goes.
"""
from __future__ import annotations

import numpy as np
from rich.table import Table

from core.console import plain


def fraction_label(f: float) -> str:
    return f"{f * 100:g}%"


def pct(x: float) -> str:
    return "–" if x is None or not np.isfinite(x) else f"{100 * x:.1f}"


def summary_cell(s: dict) -> str:
    """``mean ± std [lo, hi]`` in percent (no ± with one seed)."""
    if not s or not np.isfinite(s.get("mean", np.nan)):
        return "n/a"
    std = f" ± {pct(s['std'])}" if s.get("n_seeds", 1) > 1 else ""
    lo, hi = s.get("ci", (np.nan, np.nan))
    ci = f" [{pct(lo)}, {pct(hi)}]" if np.isfinite(lo) else ""
    return f"{pct(s['mean'])}{std}{ci}"


def value_cell(value: float, ci: tuple[float, float] | None = None) -> str:
    if value is None or not np.isfinite(value):
        return "n/a"
    if ci and np.isfinite(ci[0]):
        return f"{pct(value)} [{pct(ci[0])}, {pct(ci[1])}]"
    return pct(value)


def make_table(title: str, metric: str, columns: list[str], note: str = "") -> dict:
    return {"title": title, "metric": metric, "columns": list(columns), "note": note, "rows": []}


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


def add_row(table: dict, method: str, cells: dict[str, str], values: dict | None = None) -> None:
    table["rows"].append({"method": method, "cells": cells, "values": values or {}})


def add_estimates_row(table: dict, method: str, estimates: dict | None, cis: dict | None = None) -> None:
    """One method's point estimates (with CIs) in every column, or n/a throughout when it has none."""
    cols = table["columns"]
    if estimates is None:
        add_row(table, method, {c: "n/a" for c in cols})
        return
    cis = cis or {}
    add_row(table, method, {c: value_cell(estimates[c], cis.get(c)) for c in cols},
            {c: {"value": estimates[c], "ci": cis.get(c)} for c in cols})


def to_markdown(table: dict) -> str:
    cols = table["columns"]
    lines = [f"**{table['title']}**", "", f"| {table.get('label', 'method')} | " + " | ".join(cols) + " |",
             "|---|" + "---|" * len(cols)]
    for r in table["rows"]:
        lines.append(f"| {r['method']} | " + " | ".join(r["cells"].get(c, "") for c in cols) + " |")
    if table.get("note"):
        lines += ["", f"_{table['note']}_"]
    return "\n".join(lines) + "\n"


def to_rich(table: dict):
    t = Table(title=plain(table["title"]), title_justify="left", caption=plain(table.get("note", "")) or None,
              caption_justify="left")
    t.add_column(table.get("label", "method"), overflow="fold")
    for c in table["columns"]:
        t.add_column(plain(c), justify="right")
    for r in table["rows"]:
        t.add_row(plain(r["method"]), *(plain(r["cells"].get(c, "")) for c in table["columns"]))
    return t


def merge_tables(runs: list[dict], sources: list[str]) -> list[dict]:
    """The tables of several runs (their results.json), merged per (dataset, title).

    Rows are appended in run order; a row repeated verbatim by a later run (e.g. the same
    no-Adaptor reference) is kept once, and a method name that recurs with other figures
    gets its run directory appended. Columns are unioned, fraction columns sorted.
    """
    merged: dict[str, dict] = {}
    for run, source in zip(runs, sources):
        for t in run["tables"]:
            title = f"{t['title']} · {run.get('dataset_name', '?')}"
            m = merged.setdefault(title, make_table(title, t.get("metric", ""), [], t.get("note", "")))
            if t.get("note") and t["note"] not in m["note"]:  # runs with other seeds or test sets say so
                m["note"] = f"{m['note']} / {source}: {t['note']}" if m["note"] else t["note"]
            m["columns"] += [c for c in t["columns"] if c not in m["columns"]]
            for r in t["rows"]:
                same = [o for o in m["rows"] if o["method"] == r["method"]]
                if any(o["cells"] == r["cells"] for o in same):
                    continue
                method = f"{r['method']} · {source}" if same else r["method"]
                m["rows"].append({**r, "method": method, "source": source})
    for m in merged.values():
        if m["columns"] and all(c.endswith("%") for c in m["columns"]):
            m["columns"].sort(key=lambda c: float(c[:-1]))
    return list(merged.values())
