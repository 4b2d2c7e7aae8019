"""Where people read: logs and progress on stderr, results on stdout.

Imports only rich, so that `pipe --help` starts fast.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

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

__all__ = ["err", "out", "escape", "plain", "progress", "logs_to"]


@contextlib.contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """The block's logs and progress (everything printed to ``err``) go to the file ``path``
    (appended) instead of stderr: one sweep trial's log, while stderr carries one line per trial."""
    with open(path, "a", encoding="utf-8") as f:
        before = err._file  # None: whatever sys.stderr is at the time (not the stream of this moment)
        err.file = f
        try:
            yield
        finally:
            err.file = before


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
    """A progress display with items/s and ETA on stderr: a live bar on a terminal; elsewhere
    (a batch job's log, CI) a plain line every ``$PIPE_PROGRESS_SECONDS`` (30 s) and one at
    the end of each task, so a log shows the job is alive and how long it has left."""
    disable = bool(os.environ.get("PIPE_NO_PROGRESS"))
    if not err.is_terminal and not disable:
        return LogProgress(float(os.environ.get("PIPE_PROGRESS_SECONDS") or 30.0))
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, transient=transient, disable=disable,
    )


def _clock(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LogProgress:
    """Progress as log lines: ``task: done/total (pct) · rate/s · elapsed · eta``.

    The same calls as rich's :class:`~rich.progress.Progress` that the stages use
    (``add_task``, ``advance``, ``update``, a context manager). A line is printed when a
    task ends and, from a heartbeat thread, every ``every`` seconds for each running task,
    even while one long unit of work (a segmentation decoder) has not ticked yet.
    """

    def __init__(self, every: float = 30.0):
        import threading  # lazy: only off a terminal

        self.every, self._lock, self._tasks = every, threading.Lock(), []
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="progress-log", daemon=True)

    def __enter__(self) -> "LogProgress":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join()
        with self._lock:
            for t in range(len(self._tasks)):
                if not self._tasks[t]["ended"] and self._tasks[t]["done"]:
                    self._line(t)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every):
            with self._lock:
                for t in range(len(self._tasks)):
                    if not self._tasks[t]["ended"]:
                        self._line(t)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        import time  # lazy: only off a terminal

        with self._lock:
            self._tasks.append({"desc": description, "total": total, "done": 0.0, "start": time.monotonic(),
                                "ended": False})
            return len(self._tasks) - 1

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def update(self, task: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **_) -> None:
        with self._lock:
            t = self._tasks[task]
            t["total"] = t["total"] if total is None else total
            t["desc"] = description or t["desc"]
            t["done"] = completed if completed is not None else t["done"] + (advance or 0)
            if t["total"] is not None and t["done"] >= t["total"] and not t["ended"]:
                t["ended"] = True
                self._line(task)

    def _line(self, task: int) -> None:
        import time  # lazy: only off a terminal

        t = self._tasks[task]
        spent = time.monotonic() - t["start"]
        rate = t["done"] / spent if spent > 0 else 0.0
        total = t["total"]
        of = f"/{total:,.0f} ({100 * t['done'] / total:.0f}%)" if total else ""
        eta = f" · eta {_clock((total - t['done']) / rate)}" if total and rate > 0 and t["done"] < total else ""
        err.print(f"{t['desc']}: {t['done']:,.0f}{of} · {rate:,.2f}/s · {_clock(spent)}{eta}", markup=False)
