"""What every command shares: the common options, error handling and output helpers."""
from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path
from typing import Iterator, Optional

import typer

from core.console import err, escape, out
from core.errors import PipeError

CACHE_OPT = typer.Option(None, "--cache", help="Cache directory \\[default: $PIPE_CACHE, else ~/.cache/freeze-pipe].")
DEVICE_HELP = "auto, cpu, cuda or cuda:N."
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object on stdout.")


def fail(message: str, code: int = 2) -> None:
    """Print one error message (not a traceback) and exit."""
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


_SPACE = "Free some space, or choose another location (--cache DIR, --out DIR)."
_PATH = "Check the path, or choose another (--cache DIR, --out DIR)."
# errno -> what it means here, and what to do: the machine's state (space, permissions) or a path that
# is not what a command needs (a file where a folder is expected, or the other way round)
_ENVIRONMENT = {errno.ENOSPC: ("the disk is full", _SPACE), errno.EDQUOT: ("the disk quota is exhausted", _SPACE),
                errno.EROFS: ("the file system is read-only", _PATH), errno.EACCES: ("permission denied", _PATH),
                errno.EPERM: ("permission denied", _PATH),
                errno.ENOTDIR: ("a file is where a folder is expected", _PATH),
                errno.EISDIR: ("a folder is where a file is expected", _PATH),
                errno.EEXIST: ("something that is not a folder is in the way", _PATH),
                errno.ENOENT: ("no such file or folder", _PATH),
                errno.ENAMETOOLONG: ("the file name is too long", _PATH)}


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors the user can fix into one message and exit code 2.

    A :class:`PipeError` is caused by input and says what to do. An OS error about the
    machine (disk full, permission denied) or about a path given (a file where a folder is
    expected, a missing one) names the path. Anything else is a bug and keeps its traceback.
    """
    try:
        yield
    except PipeError as e:
        fail(str(e), e.exit_code)
    except OSError as e:
        if e.errno not in _ENVIRONMENT:
            raise
        what, hint = _ENVIRONMENT[e.errno]
        fail(f"{what}: {e.filename or e}. {hint}")


COLUMNS_OPT = typer.Option(None, "--columns", help="How a pairs table's columns map onto the known ones: "
                           "KNOWN=COLUMN,... e.g. report=text,patient_id=subject_id (KNOWN=none: the table has none).")
NO_PATIENTS_OPT = typer.Option(False, "--no-patients", help="The pairs table has no patient column: each row is "
                               "its own patient, so splits are drawn per item.")


def with_columns(dataset: Optional[str], columns: Optional[str], no_patients: bool) -> Optional[str]:
    """The dataset spec with --columns and --no-patients written into it (``pairs.csv?report=text``),
    so every stage that reads the table reads it the same way."""
    if not columns and not no_patients:
        return dataset
    from pipeline.datasets.table import looks_like_table, parse_table_spec  # lazy: pandas loads only when needed

    if not dataset or not looks_like_table(dataset):
        fail(f"--columns and --no-patients map the columns of a pairs table (CSV or Parquet); {dataset!r} is not one "
             "(a reader knows its own columns). Give the table with -d/--dataset.")
    pairs = [p.strip() for p in (columns or "").split(",") if p.strip()]
    bad = [p for p in pairs if p.count("=") != 1 or not all(x.strip() for x in p.split("="))]
    if bad:
        fail(f"--columns {columns!r}: write KNOWN=COLUMN pairs separated by commas, e.g. "
             "--columns report=text,patient_id=subject_id")
    mapping = dict(tuple(x.strip() for x in p.split("=")) for p in pairs)
    if no_patients:
        mapping["patient_id"] = "none"
    with user_errors():
        spec = parse_table_spec(dataset)
    query = "&".join(f"{k}={v}" for k, v in {**spec.columns, **mapping}.items())
    return f"{dataset.partition('?')[0]}?{query}"


def flag_overrides(**flags) -> list[str]:
    """Explicit flags become config overrides, so they win over a preset (strings as JSON)."""
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items() if v is not None]


def path_or_none(p: Optional[Path]) -> Optional[str]:
    return str(p) if p else None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def results_to(as_json: bool):
    """Where a command's human-readable results go: stdout, or stderr when stdout carries the JSON."""
    return err if as_json else out


def print_json(obj) -> None:
    """Results on stdout, as one line of JSON."""
    print(json.dumps(obj, default=str))
