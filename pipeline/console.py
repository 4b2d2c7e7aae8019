"""Where people read: logs and progress on stderr, results on stdout.

Imports only rich, so that `pipe --help` starts fast.
"""
from __future__ import annotations

import os

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text


def _console(stderr: bool) -> Console:
    """Not a terminal (a log file, a pipe, CI): no wrapping and an unbounded page, so paths,
    log lines, table cells and headers stay whole (a terminal wraps at its own width)."""
    tty = os.isatty(2 if stderr else 1)
    return Console(stderr=stderr, highlight=False, soft_wrap=not tty, width=None if tty else 10_000)


err = _console(stderr=True)   # progress, logs, warnings, errors
out = _console(stderr=False)  # results: tables, listings (or JSON, printed plainly)

__all__ = ["err", "out", "escape", "plain", "progress"]


def plain(value) -> Text:
    """A table cell or title shown as written: square brackets are text, not markup."""
    return Text(str(value))


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} it/s" if speed else "– it/s", style="cyan")


def section(title: str) -> None:
    """A heading in the log: a rule across a terminal, a plain line elsewhere."""
    if err.is_terminal:
        err.rule(f"[bold]{escape(title)}")
    else:
        err.print(f"── {title} ──", markup=False)


def progress(transient: bool = False) -> Progress:
    """A progress display with items/s and ETA, drawn on stderr."""
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, transient=transient, disable=bool(os.environ.get("PIPE_NO_PROGRESS")),
    )
