"""The `pipe` application object and its command groups.

Every command module under ``cli/`` registers its commands on these objects
with decorators at import time (``@app.command``, ``@cache_app.command``,
``@data_app.command``); ``cli/__init__.py`` imports them all. Command modules
import only typer, rich and the project's light modules at the top: the stages (and
torch) are imported inside each command, so `pipe --help` and tab completion start fast.
"""
from __future__ import annotations

import importlib.metadata
import os
from typing import Optional

import typer
import typer.core

app = typer.Typer(
    name="pipe", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
    help="Parameter-efficient vision-language pre-training on cached frozen-encoder embeddings.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check, repair and clean the embedding cache.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets; write and verify their split lists.")
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")


def version() -> str:
    try:
        return importlib.metadata.version("freeze-pipe")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install -e .)"


def _print_version(value: bool) -> None:
    if value:
        print(f"freeze-pipe {version()}")
        raise typer.Exit()


@app.callback()
def _main(show_version: bool = typer.Option(False, "--version", "-V", callback=_print_version, is_eager=True,
                                            help="Print the version and exit."),
          threads: Optional[int] = typer.Option(
              None, "--threads", min=1, envvar="PIPE_THREADS",
              help="Math threads per process \\[default: the CPUs this process may use (affinity, cgroup quota), "
                   "shared among the job's processes].")) -> None:
    """Parameter-efficient vision-language pre-training on cached frozen-encoder embeddings."""
    if threads:
        os.environ["PIPE_THREADS"] = str(threads)  # read where torch starts, here and in child processes


_display_type = typer.core.TyperOption.display_type_rich


def _no_metavar_for_flags(self, ctx):
    """A flag takes no value, so its help shows none (typer would print `<bool>`)."""
    if getattr(self, "is_flag", False) and self.metavar is None:
        return None
    return _display_type(self, ctx)


typer.core.TyperOption.display_type_rich = _no_metavar_for_flags
