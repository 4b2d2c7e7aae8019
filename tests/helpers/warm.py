"""What most of the suite imports, imported once before its processes start (``make test``).

The environment's bytecode is written where a module is first imported (the Makefile empties
``PYTHONDONTWRITEBYTECODE``), so only what runs is ever compiled. Imported here first, the
heavy libraries are compiled by one process instead of by each of the suite's processes side
by side. Two processes share the work, one per core: torch and what is built on it (the larger
half), and the rest beside it, then the project's own modules, which need both (on a fresh
environment: 22 s, where one process took 28). ``python -m tests.helpers.warm``
"""
from __future__ import annotations

import subprocess
import sys
import time

from core import forking
from tests.helpers.forked import PRELOAD

MORE = ("dask.distributed", "optuna", "matplotlib.pyplot", "moto.server", "cli.app", "stages.sweep.stage",
        "stages.reproduce.stage", "stages.evaluate.stage", "stages.train.trainer", "stages.embed.stage")
TORCH = tuple(n for n in PRELOAD if n.split(".")[0] in ("torch", "transformers", "timm", "safetensors"))
BESIDE = tuple(n for n in dict.fromkeys((*PRELOAD, *MORE)) if n not in TORCH)  # the project's modules last


def main(argv: list[str]) -> int:
    if argv == ["--beside"]:
        forking.preload(BESIDE)
        return 0
    t0 = time.perf_counter()
    beside = subprocess.Popen([sys.executable, "-m", "tests.helpers.warm", "--beside"])
    try:
        forking.preload(TORCH)
    finally:
        code = beside.wait()
    print(f"warm: {len(TORCH) + len(BESIDE)} packages imported in {time.perf_counter() - t0:.1f} s")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
