"""What most of the suite imports, imported once before its processes start (``make test``).

The environment's bytecode is written where a module is first imported (the Makefile empties
``PYTHONDONTWRITEBYTECODE``), so only what runs is ever compiled. Imported here first, the
heavy libraries are compiled by one process instead of by each of the suite's processes side
by side. ``python -m tests.helpers.warm``
"""
from __future__ import annotations

import importlib
import time

from tests.helpers.forked import PRELOAD

MORE = ("dask.distributed", "optuna", "matplotlib.pyplot", "moto.server", "cli.app", "stages.sweep.stage",
        "stages.reproduce.stage", "stages.evaluate.stage", "stages.train.trainer", "stages.embed.stage")


def main() -> None:
    t0 = time.perf_counter()
    for name in (*PRELOAD, *MORE):
        importlib.import_module(name)
    print(f"warm: {len(PRELOAD) + len(MORE)} packages imported in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
