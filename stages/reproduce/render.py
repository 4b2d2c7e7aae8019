"""A reproduced table in the paper's layout: our rows (mean ± std over seeds [interval]) beside the
paper's published figures and its strongest peers', each with its protocol, and under it what
the intervals cover, the datasets' releases and where their splits came from."""
from __future__ import annotations

from pathlib import Path

from pipeline.methods import Method
from pipeline.records import EvalRecord, load_results
from pipeline.tables import Figure, Table, add_row, make_table, summary_cell, text_cell
from stages.reproduce.spec import Cell, TableSpec

PENDING = "…"
TITLES = {"auroc": "AUROC", "accuracy": "accuracy", "ece": "expected calibration error (lower is better)",
          "dice_empty_is_one": "Dice, empty prediction on empty mask = 1 (the authors' convention)",
          "dice_positive": "Dice on images with a non-empty mask",
          "dice_all_empty_baseline": "Dice of an all-empty predictor under the authors' convention (reference)"}


def load_cells(spec: TableSpec, dirs: dict[str, Path]) -> dict[str, EvalRecord]:
    """The records of every finished cell (its results.json), by cell id."""
    return {cell.id: load_results(dirs[cell.id]) for cell in spec.cells() if (dirs[cell.id] / "results.json").is_file()}


def _summary(results: EvalRecord | None, fraction: float, metric: str) -> Figure | None:
    """A cell's figure: its run's first method (the one the cell evaluates), first head kind, at its fraction."""
    cell = results.methods[0].at(fraction) if results is not None and results.methods else None
    return cell.summary.get(metric) if cell is not None else None


def _method(spec: TableSpec, cell: Cell, label) -> tuple[Method, str]:
    if spec.adaptor and not cell.baseline:
        return (Method(f"Adaptor, {label(cell.row.image)} + {label(cell.row.text)} (ours)", "adaptor"),
                "frozen backbone + Adaptor, MLP head")
    head = "decoder on patch tokens" if not spec.adaptor else "MLP head"
    return Method(f"no Adaptor, {label(cell.row.image)} (ours)", "backbone"), f"frozen backbone, {head}"


def tables(spec: TableSpec, results: dict[str, EvalRecord], label) -> list[Table]:
    """One table per metric: the columns' own metrics first (what the paper reports), then ``also``."""
    cols = [f"{c.name} {100 * f:g}%" for c in spec.columns for f in spec.fractions]
    out = []
    for metric in [None, *spec.also]:
        name = "the paper's metrics: " + ", ".join(f"{c.name} {TITLES.get(c.metric, c.metric)}" for c in spec.columns) \
            if metric is None else TITLES.get(metric, metric)
        t = make_table("", f"{spec.title} · {name}", metric or "paper", ["protocol", *cols],
                       _note(spec, results, metric), unit="")
        rows: dict[tuple[Method, str], dict] = {}
        for cell in spec.cells():
            key = _method(spec, cell, label)
            s = _summary(results.get(cell.id), cell.fraction, metric or cell.column.metric)
            rows.setdefault(key, {})[f"{cell.column.name} {100 * cell.fraction:g}%"] = \
                summary_cell(s) if s else text_cell(PENDING if cell.id not in results else "n/a")
        for (method, protocol), cells in rows.items():
            add_row(t, method, {"protocol": text_cell(protocol), **cells})
        if metric is None:
            for p in spec.published:
                add_row(t, Method(f"{p.method} (published)", "published"), {"protocol": text_cell(p.protocol), **{
                    f"{c} {100 * f:g}%": text_cell("—" if v is None else f"{v:.1f}")
                    for c, vals in p.values.items() for f, v in zip(spec.fractions, vals)}})
        out.append(t)
    return out


def _note(spec: TableSpec, results: dict[str, EvalRecord], metric: str | None) -> str:
    """What the cells are, whose intervals, which releases and splits: from the cells' own results files."""
    parts = []
    any_table = next((t for r in results.values() for t in r.tables if metric is None or t.metric == metric), None)
    if any_table is not None and any_table.note:
        parts.append(f"Our cells, each one evaluation run: {any_table.note}")
    for c in spec.columns:
        r = next((results[cell.id] for cell in spec.cells() if cell.column == c and cell.id in results), None)
        if r is not None:
            parts.append(f"{c.name}: {r.dataset_version or 'release not known'}; splits: "
                         f"{r.split_source or 'not recorded'}.")
    parts.append(f"{PENDING}: not run yet. Published figures are as reported, one run each, with their protocol.")
    parts += [_provenance(spec, p) for p in spec.published if p.encoders or p.chosen] if metric is None else []
    return " ".join([*parts, *spec.notes])


def _provenance(spec: TableSpec, p) -> str:
    """Which run each published cell of a row comes from, and how the row's figures were chosen."""
    cells = "; ".join(f"{col} " + ", ".join(f"{100 * f:g}% {e}" for f, e in zip(spec.fractions, encs))
                      for col, encs in p.encoders.items())
    return f"{p.method} (published): {p.chosen}" + (f"; cells from {cells}." if cells else ".")
