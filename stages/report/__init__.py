"""`pipe report`: several runs gathered into tables (Markdown, CSV, JSON, the terminal) or into
one self-contained HTML page. See :mod:`stages.report.page` and :mod:`stages.report.text`."""
from __future__ import annotations

from stages.report.page import build_page, write_page
from stages.report.runs import ReportInputError, Runs, load_runs
from stages.report.text import merged_tables, to_csv, to_markdown_report

__all__ = ["ReportInputError", "Runs", "build_page", "load_runs", "merged_tables", "to_csv", "to_markdown_report",
           "write_page"]
