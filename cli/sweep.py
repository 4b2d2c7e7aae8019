"""`pipe sweep`: parsing and printing only; the work is in stages/sweep/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app
from cli.common import CACHE_OPT, JSON_OPT, print_json, results_to, user_errors
from core.console import err, escape, plain


@app.command(epilog="Example:\n\n  pipe sweep sweep_demo epochs=5")
def sweep(
    spec: Path = typer.Argument(..., help="A sweep YAML: a path, or a sweep the installed package holds "
                               "(sweep_demo)."),
    overrides: list[str] = typer.Argument(None, help="key=value applied to every run of the grid."),
    cache: Optional[Path] = CACHE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Train a grid of Adaptors (e.g. lr x layers x mode x batch) against the same caches."""
    from stages.sweep import load_sweep, run  # lazy: keeps `pipe --help` fast

    with user_errors():
        s = load_sweep(spec, overrides or [], cache=str(cache) if cache else None)
        err.print(f"sweep {escape(str(spec))}: {len(s.combos())} runs over {escape(', '.join(s.grid))}; backbone forwards: 0 "
                  "(every run reads the cache)")
        result = run(s)
    t = Table(title=plain(f"sweep {spec} · sorted by {s.metric}"), title_justify="left")
    cols = [*s.grid, "train_loss", "val_loss", s.metric, "epoch_seconds", "out"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in sorted(result.rows, key=lambda r: -float(r.get(s.metric, float("-inf")))):
        t.add_row(*[plain(f"{r[c]:.4g}" if isinstance(r.get(c), float) else r.get(c, "")) for c in cols])
    results_to(as_json).print(t)
    if as_json:
        print_json({"spec": str(spec), "metric": s.metric, "csv": str(result.csv), "items_read": result.items_read,
                    "rows": result.rows})
    err.print(f"backbone forwards: 0 · items read from cache: {result.items_read:,} · results: {escape(str(result.csv))}")
