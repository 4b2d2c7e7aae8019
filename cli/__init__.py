"""The `pipe` command line: parsing and printing only; the work lives in stages/ and cache/.

One module per command group, each registering its commands on the objects of
:mod:`cli.app` when imported here (in the order `pipe --help` lists them).
"""
from __future__ import annotations

# isort: off
from cli import embed, train, evaluate, use, sweep, reproduce, demo, info, cache, data  # noqa: F401  (registers)
# isort: on
from cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
