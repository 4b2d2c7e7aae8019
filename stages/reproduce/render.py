"""A reproduced table in the paper's layout: our rows (mean ± std over seeds [interval]) beside the
paper's published figures and its strongest peers', each with its protocol, and under it what
the intervals cover, the datasets' releases and where their splits came from."""
from __future__ import annotations

import json
from pathlib import Path

from stages.evaluate.tables import add_row, make_table, summary_cell
from stages.reproduce.spec import Cell, TableSpec

PENDING = "…"
TITLES = {"auroc": "AUROC", "accuracy": "accuracy", "ece": "expected calibration error (lower is better)",
          "dice_empty_is_one": "Dice, empty prediction on empty mask = 1 (the authors' convention)",
          "dice_positive": "Dice on images with a non-empty mask",
          "dice_all_empty_baseline": "Dice of an all-empty predictor under the authors' convention (reference)"}


def load_results(spec: TableSpec, dirs: dict[str, Path]) -> dict[str, dict]:
    """results.json of every finished cell, by cell id."""
    out = {}
    for cell in spec.cells():
        path = dirs[cell.id] / "results.json"
        if path.is_file():
            out[cell.id] = json.loads(path.read_text())
    return out


def _summary(results: dict | None, fraction: float, metric: str) -> dict | None:
    if results is None:
        return None
    method = results["methods"][0]
    cell = next(iter(method["heads"].values())).get(f"{100 * fraction:g}%", {})
    return cell.get("summary", {}).get(metric)


def _method(spec: TableSpec, cell: Cell, label) -> tuple[str, str]:
    if spec.adaptor and not cell.baseline:
        return f"Adaptor, {label(cell.row.image)} + {label(cell.row.text)} (ours)", "frozen backbone + Adaptor, MLP head"
    head = "decoder on patch tokens" if not spec.adaptor else "MLP head"
    return f"no Adaptor, {label(cell.row.image)} (ours)", f"frozen backbone, {head}"


def tables(spec: TableSpec, results: dict[str, dict], label) -> list[dict]:
    """One table per metric: the columns' own metrics first (what the paper reports), then ``also``."""
    cols = [f"{c.name} {100 * f:g}%" for c in spec.columns for f in spec.fractions]
    out = []
    for metric in [None, *spec.also]:
        name = "the paper's metrics: " + ", ".join(f"{c.name} {TITLES.get(c.metric, c.metric)}" for c in spec.columns) \
            if metric is None else TITLES.get(metric, metric)
        t = make_table(f"{spec.title} · {name}", metric or "paper", ["protocol", *cols], _note(spec, results, metric))
        rows: dict[tuple[str, str], dict[str, str]] = {}
        for cell in spec.cells():
            key = _method(spec, cell, label)
            s = _summary(results.get(cell.id), cell.fraction, metric or cell.column.metric)
            rows.setdefault(key, {})[f"{cell.column.name} {100 * cell.fraction:g}%"] = \
                summary_cell(s) if s else (PENDING if cell.id not in results else "n/a")
        for (method, protocol), cells in rows.items():
            add_row(t, method, {"protocol": protocol, **cells})
        if metric is None:
            for p in spec.published:
                add_row(t, f"{p.method} (published)", {"protocol": p.protocol, **{
                    f"{c} {100 * f:g}%": ("—" if v is None else f"{v:.1f}")
                    for c, vals in p.values.items() for f, v in zip(spec.fractions, vals)}})
        out.append(t)
    return out


def _note(spec: TableSpec, results: dict[str, dict], metric: str | None) -> str:
    """What the cells are, whose intervals, which releases and splits: from the cells' own results files."""
    parts = []
    any_table = next((t for r in results.values() for t in r.get("tables", [])
                      if metric is None or t.get("metric") == metric), None)
    if any_table and any_table.get("note"):
        parts.append(f"Our cells, each one evaluation run: {any_table['note']}")
    for c in spec.columns:
        r = next((results[cell.id] for cell in spec.cells() if cell.column == c and cell.id in results), None)
        if r is not None:
            parts.append(f"{c.name}: {r.get('dataset_version') or 'release not known'}; splits: "
                         f"{r.get('split_source') or 'not recorded'}.")
    parts.append(f"{PENDING}: not run yet. Published figures are as reported, one run each, with their protocol.")
    parts += [_provenance(spec, p) for p in spec.published if p.encoders or p.chosen] if metric is None else []
    return " ".join([*parts, *spec.notes])


def _provenance(spec: TableSpec, p) -> str:
    """Which run each published cell of a row comes from, and how the row's figures were chosen."""
    cells = "; ".join(f"{col} " + ", ".join(f"{100 * f:g}% {e}" for f, e in zip(spec.fractions, encs))
                      for col, encs in p.encoders.items())
    return f"{p.method} (published): {p.chosen}" + (f"; cells from {cells}." if cells else ".")
