"""Dataset readers by name: ``<name>:<root>`` specs resolve through this registry."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.datasets.base import Dataset
from pipeline.datasets.spec import DatasetSpec

# reader name -> function(parsed spec, cache_root, materialise) -> Dataset
READERS: dict[str, Callable[[DatasetSpec, Path, bool], Dataset]] = {}


def register_reader(name: str):
    """Register ``fn(spec: DatasetSpec, cache_root, materialise) -> Dataset`` as the reader ``name``."""
    def deco(fn):
        READERS[name] = fn
        return fn
    return deco
