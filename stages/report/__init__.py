"""`pipe report`: several runs gathered into tables (Markdown, CSV, JSON, the terminal) or into
one self-contained HTML page. See :mod:`stages.report.page` and :mod:`stages.report.text`.

The page and the runs are imported on first use of what this package exports, so the light
registry of output formats (:mod:`stages.report.formats`) can be read by `pipe --help`.
"""
from __future__ import annotations

_EXPORTS = {"build_page": "page", "write_page": "page", "ReportInputError": "runs", "Runs": "runs",
            "load_runs": "runs", "merged_tables": "text", "to_csv": "text", "to_json": "text",
            "to_markdown_report": "text"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib  # lazy: the page and the runs import numpy and the records; the format registry must not

        return getattr(importlib.import_module(f"stages.report.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'stages.report' has no attribute {name!r}")
