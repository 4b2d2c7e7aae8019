"""`pipe report` as text: the merged tables as Markdown, CSV or JSON (stages/report/formats.py says which)."""
from __future__ import annotations

import csv
import io
import json

from core.jsondata import plain
from pipeline.tables import Table, merge_tables, to_markdown
from stages.report.runs import Runs


def merged_tables(runs: Runs) -> list[Table]:
    """One table per (dataset, metric) over every evaluation run (rows: methods; columns: fractions)."""
    return merge_tables([(r.dataset, r.record.tables) for r in runs.evals], [str(r.path) for r in runs.evals])


def to_markdown_report(runs: Runs, tables: list[Table]) -> str:
    sources = "\n".join(f"- `{r.path}`: {r.task} · {r.dataset} · "
                        f"{((r.checkpoint.hash if r.checkpoint else '') or 'no Adaptor')[:16]}" for r in runs.evals)
    return "Runs:\n\n" + sources + "\n\n" + "\n".join(to_markdown(t) for t in tables)


CSV_COLUMNS = ["table", "metric", "method", "column", "cell", "value", "std", "ci_low", "ci_high", "n_seeds", "run"]


def to_csv(runs: Runs, tables: list[Table]) -> str:
    """One line per table cell (long format): the figures as numbers in [0, 1], and the cell as printed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for t in tables:
        for r in t.rows:
            for c in t.column_names:
                cell = r.cell(c)
                f = cell.figure
                ci = (f.ci if f is not None else None) or (None, None)
                w.writerow([t.title, t.metric, r.method.name, c, cell.text, _num(f and f.value), _num(f and f.std),
                            _num(ci[0]), _num(ci[1]), (f.n_seeds if f is not None else None) or "", r.source])
    return buf.getvalue()


def to_json(runs: Runs, tables: list[Table]) -> str:
    return json.dumps(plain({"runs": [str(r.path) for r in runs.evals], "tables": [t.to_dict() for t in tables]})) + "\n"


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"
