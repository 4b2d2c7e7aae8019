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

# Not a terminal (a log file, CI): no wrapping, so paths and table rows stay whole.
err = Console(stderr=True, highlight=False, soft_wrap=not os.isatty(2))
out = Console(highlight=False, soft_wrap=True)

__all__ = ["err", "out", "escape", "progress"]


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} it/s" if speed else "– it/s", style="cyan")


def progress(transient: bool = False) -> Progress:
    """A progress display with items/s and ETA, drawn on stderr."""
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, transient=transient, disable=bool(os.environ.get("PIPE_NO_PROGRESS")),
    )
