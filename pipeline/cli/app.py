"""The `pipe` application object and its command groups.

Every command module under ``pipeline/cli/`` registers its commands on these objects
with decorators at import time (``@app.command``, ``@cache_app.command``,
``@data_app.command``); ``pipeline/cli/__init__.py`` imports them all. Command modules
import only typer, rich and the project's light modules at the top: the stages (and
torch) are imported inside each command, so `pipe --help` and tab completion start fast.
"""
from __future__ import annotations

import typer

app = typer.Typer(
    name="pipe", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
    help="Parameter-efficient vision-language pre-training on cached frozen-encoder embeddings.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect, check, repair and clean the embedding cache.")
data_app = typer.Typer(no_args_is_help=True, help="Inspect datasets; write and verify their split lists.")
app.add_typer(cache_app, name="cache")
app.add_typer(data_app, name="data")
