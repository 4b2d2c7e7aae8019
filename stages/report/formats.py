"""The formats `pipe report` prints its tables in, one registry entry each (``--format``).

An entry renders the merged tables itself (:meth:`ReportFormat.render`), says which file
suffix picks it for ``--out``, and whether it is drawn as tables on a terminal rather than
written as text. The CLI's choices are read from here; it imports nothing heavy, so `pipe
--help` can list them (the renderers in :mod:`stages.report.text` load when used).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ReportFormat:
    name: str
    summary: str
    renderer: str              # its function in stages/report/text.py: (runs, tables) -> text
    suffix: str = ""           # `--out FILE` with this suffix (and no --format) is written in this format
    terminal: bool = False     # on stdout, drawn as tables for a terminal (its text, in a file, is the renderer's)
    always: bool = False       # printed even when the runs gave no table (json: the list of runs)

    def render(self, runs, tables) -> str:
        """The text of the merged ``tables`` of ``runs`` (stages.report.runs.Runs)."""
        from stages.report import text  # lazy: the renderers read the records (numpy); `pipe --help` must not

        return getattr(text, self.renderer)(runs, tables)


REPORT_FORMATS: dict[str, ReportFormat] = {f.name: f for f in (
    ReportFormat("table", "tables drawn for a terminal (Markdown in a file)", "to_markdown_report", terminal=True),
    ReportFormat("md", "Markdown: the runs, then every table with its note", "to_markdown_report", ".md"),
    ReportFormat("csv", "one line per table cell: the figures as numbers in [0, 1], and the cell as printed",
                 "to_csv", ".csv"),
    ReportFormat("json", "the runs and the tables as their records' data", "to_json", ".json", always=True),
)}
DEFAULT_FILE_FORMAT = "md"     # a file whose suffix names no format


def for_file(chosen: ReportFormat | None, path: Path) -> ReportFormat:
    """The format of ``--out PATH``: the one asked for (a terminal format writes its text), else the one its
    suffix names, else Markdown."""
    if chosen is not None and not chosen.terminal:
        return chosen
    return next((f for f in REPORT_FORMATS.values() if f.suffix and f.suffix == path.suffix),
                REPORT_FORMATS[DEFAULT_FILE_FORMAT])
