"""The `pipe` command line: parsing and printing only; the work lives in stages/ and cache/.

One module per command group, each registering its commands on the objects of
:mod:`cli.app` when imported here (in the order `pipe --help` lists them).
"""
from __future__ import annotations

import os as _os

# Before any command imports torch: idle OpenMP threads sleep instead of spinning (see
# pipeline/__init__.py, which does the same for library users, and bench/threads.py).
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# isort: off
from cli import embed, train, evaluate, use, sweep, reproduce, demo, info, cache, data  # noqa: F401  (registers)
# isort: on
from cli.app import app


def main() -> None:
    app()


__all__ = ["app", "main"]
