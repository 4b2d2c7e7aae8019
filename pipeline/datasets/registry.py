"""Dataset readers by name: ``<name>:<root>`` specs resolve through this registry."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.datasets.base import Dataset
from pipeline.datasets.spec import DatasetSpec

# reader name -> function(parsed spec, cache_root, materialise) -> Dataset
READERS: dict[str, Callable[[DatasetSpec, Path, bool], Dataset]] = {}
# reader name -> (its own options by key, each with .default and .help; what it reads), for `pipe data readers`
READER_OPTIONS: dict[str, tuple[dict, str]] = {}


@dataclass(frozen=True)
class OptionInfo:
    """An option described for the listing (readers with their own parser, as the demo)."""

    default: str
    help: str = ""


def register_reader(name: str, options: dict | None = None, description: str = ""):
    """Register ``fn(spec: DatasetSpec, cache_root, materialise) -> Dataset`` as the reader ``name``,
    with the options it takes after ``?`` (listed by `pipe data readers`, not only in an error)."""
    def deco(fn):
        READERS[name] = fn
        READER_OPTIONS[name] = (dict(options or {}), description)
        return fn
    return deco
