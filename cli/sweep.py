"""`pipe sweep`: parsing and printing only; the work is in stages/sweep/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app
from cli.common import CACHE_OPT, JSON_OPT, print_json, results_to, user_errors
from core.console import err, escape, plain

EPILOG = """Examples:

  pipe sweep sweep_demo                                    # a local Dask cluster sized from the CPUs/GPUs

  pipe sweep sweep_demo --trials 40                        # run again: only the missing trials run

  pipe sweep sweep_demo --scheduler tcp://head:8786 epochs=5

  pipe report runs/sweep-demo --html sweep.html            # the leaderboard page"""


@app.command(epilog=EPILOG)
def sweep(
    spec: Path = typer.Argument(..., help="A sweep YAML: a path, or a sweep the installed "
                               "package holds (sweep_demo)."),
    overrides: list[str] = typer.Argument(None, help="key=value applied to every trial's training config."),
    cache: Optional[Path] = CACHE_OPT,
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Trials in the study (replaces the file's "
                                         "`trials:`); a larger number on a finished sweep runs only the new ones."),
    workers: Optional[int] = typer.Option(None, "--workers", min=0, help="Local Dask workers (one trial each at a "
                                          "time); 0 runs the trials in this process, one after another "
                                          "\\[default: one per GPU, else one per CPU this process may use]."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", envvar="PIPE_DASK_SCHEDULER",
                                            help="Run the trials on a Dask cluster that is already up "
                                                 "(tcp://host:port; also $PIPE_DASK_SCHEDULER)."),
    embed: bool = typer.Option(False, "--embed", help="Embed encoder pairs that are not in the cache yet, "
                                                      "before the first trial (else they are refused)."),
    lease_s: Optional[float] = typer.Option(None, "--lease-s", min=1.0, help="Lease of a running trial, renewed "
                                            "every quarter of it; a trial whose process died elsewhere is re-run "
                                            "once it lapses \\[default: $PIPE_CLAIM_LEASE_S, else 120]."),
    as_json: bool = JSON_OPT,
) -> None:
    """Search Adaptor settings (and encoder pairs) on the cache: grid, random or Optuna, trials in parallel
    on Dask, ranked by a downstream figure on the validation split, the best evaluated on the test split."""
    from stages.sweep import load_sweep, run  # lazy: keeps `pipe --help` fast
    from stages.sweep.board import as_json as rows_json  # lazy: as above

    with user_errors():
        s = load_sweep(spec, overrides or [], cache=str(cache) if cache else None, trials=trials)
        result = run(s, workers=workers, scheduler=scheduler, embed=embed, lease_s=lease_s)
    results_to(as_json).print(_table(s, result.rows, spec))
    for t in result.top:
        what = t.get("error") or f"{escape(t['out'])}"
        err.print(f"trial {t['trial']} on the test split ({t['task']}): {what}")
    for name, w in result.workers.items():
        first = ", ".join(f"{k} {n:,}" for k, n in sorted(w.first_reads.items())) or "none"
        err.print(f"{escape(name)}: {w.trials} trial(s) · rows read from the cache at its first trial: {escape(first)}; "
                  f"after it: {w.later_reads:,} · peak memory {w.peak_rss_mb:,.0f} MiB (held arrays "
                  f"{w.held_mb:,.1f} MiB)")
    err.print(f"backbone forwards: 0 · rows read from the cache: {result.rows_read:,} · trials: "
              f"{escape(str(result.csv))} · page: pipe report {escape(s.out)} --html {escape(s.out)}/sweep.html")
    if as_json:
        print_json({**rows_json(s, result.rows), **result.summary()})
    if result.interrupted:
        raise typer.Exit(130)


def _table(s, rows: list[dict], spec: Path) -> Table:
    t = Table(title=plain(f"sweep {spec} · {s.objective.label} on the validation split"), title_justify="left")
    cols = ["trial", "state", "objective", *(["objective_std"] if s.repeats > 1 else []), *s.axes, "seconds", "run"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[plain(f"{r[c]:.4g}" if isinstance(r.get(c), float) else "" if r.get(c) is None else r[c])
                    for c in cols])
    return t
