"""Datasets by name: a pairs table path, `demo[:opt=value,...]`, or `<reader>:<root>`."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.table import DatasetError, items_from_table, table_name

# reader name -> function(root or options string, cache_root, materialise) -> Dataset
READERS: dict[str, Callable[[str, Path, bool], Dataset]] = {}


def register_reader(name: str):
    def deco(fn):
        READERS[name] = fn
        return fn
    return deco


def open_dataset(spec: str, cache_root: Path | None = None, materialise: bool = True) -> Dataset:
    """Resolve a DATASET argument to its items.

    With ``materialise=False`` a reader may skip work that only the items need (the demo
    is not generated): enough to learn the dataset's name, as stage two does.
    """
    from pipeline.paths import cache_root as default_root

    root = Path(cache_root) if cache_root else default_root()
    name, _, arg = spec.partition(":")
    if name in READERS and (arg or name == "demo"):
        return READERS[name](arg, root, materialise)
    path = Path(spec).expanduser()
    if path.suffix.lower() in (".csv", ".parquet", ".pq", ".tsv") or path.exists():
        return Dataset(name=table_name(path), spec=str(path.resolve()), items=items_from_table(path),
                       description=f"pairs table {path}")
    known = ", ".join(sorted(READERS))
    raise DatasetError(f"unknown dataset {spec!r}. Give a CSV/Parquet pairs table path, "
                       f"or one of: {known} (as <reader>:<root>, or `demo`).")


@register_reader("demo")
def _demo(options: str, cache_root: Path, materialise: bool = True) -> Dataset:
    from pipeline.datasets import demo

    spec = demo.parse_spec(options)
    folder = cache_root / "demo" / spec.slug()
    items = items_from_table(demo.ensure_demo(folder, spec)) if materialise else []
    agreement = demo.read_agreement(folder)
    note = f"; {demo.agreement_line(agreement)}" if agreement else ""
    return Dataset(name=f"demo-{spec.slug()}", spec=f"demo:{options}", items=items,
                   description=f"built-in phantom chest X-rays ({spec.n} pairs, seed {spec.seed}{note})")


__all__ = ["Dataset", "DatasetError", "Item", "open_dataset", "register_reader", "READERS"]

from pipeline.datasets.masks import load_mask  # noqa: E402
from pipeline.datasets import readers as _readers  # noqa: F401,E402
