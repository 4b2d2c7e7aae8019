"""`pipe report` as text: the merged tables as Markdown, CSV or JSON."""
from __future__ import annotations

import csv
import io

from stages.evaluate.tables import merge_tables, to_markdown
from stages.report.runs import Runs


def merged_tables(runs: Runs) -> list[dict]:
    """One table per (dataset, metric) over every evaluation run (rows: methods; columns: fractions)."""
    return merge_tables([r.results for r in runs.evals], [str(r.path) for r in runs.evals])


def to_markdown_report(runs: Runs, tables: list[dict]) -> str:
    sources = "\n".join(f"- `{r.path}`: {r.task} · {r.dataset} · "
                        f"{((r.checkpoint or {}).get('hash') or 'no Adaptor')[:16]}" for r in runs.evals)
    return "Runs:\n\n" + sources + "\n\n" + "\n".join(to_markdown(t) for t in tables)


CSV_COLUMNS = ["table", "metric", "method", "column", "cell", "value", "std", "ci_low", "ci_high", "n_seeds", "run"]


def to_csv(tables: list[dict]) -> str:
    """One line per table cell (long format): the figures as numbers in [0, 1], and the cell as printed."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for t in tables:
        for r in t["rows"]:
            for c in t["columns"]:
                v = (r.get("values") or {}).get(c) or {}
                ci = v.get("ci") or [None, None]
                w.writerow([t["title"], t.get("metric", ""), r["method"], c, r["cells"].get(c, ""),
                            _num(v.get("mean", v.get("value"))), _num(v.get("std")), _num(ci[0]), _num(ci[1]),
                            v.get("n_seeds", ""), r.get("source", "")])
    return buf.getvalue()


def _num(x) -> str:
    return "" if x is None else f"{x:.6g}"
