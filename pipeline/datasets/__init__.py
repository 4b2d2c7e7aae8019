"""Datasets by name: a pairs table path, `demo[?key=value&...]`, or `<reader>:<root>[?key=value&...]`."""
from __future__ import annotations

from pathlib import Path

from cache.paths import cache_root as default_root
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.registry import READERS, register_reader
from pipeline.datasets.spec import DatasetSpec, parse_dataset_spec, warn_legacy, with_option
from pipeline.datasets.table import (DatasetError, items_from_table, looks_like_table, parse_table_spec,
                                     table_dataset)


def open_dataset(spec: str, cache_root: Path | None = None, materialise: bool = True,
                 skip_bad_rows: bool = False) -> Dataset:
    """Resolve a DATASET argument to its items.

    With ``materialise=False`` a reader may skip work that only the items need (the demo
    is not generated): enough to learn the dataset's name, as stage two does. With
    ``skip_bad_rows`` a reader's bad rows are skipped and listed in ``Dataset.skipped``
    (kind ``bad-row``) instead of stopping at the first: `pipe embed` reports them as
    failures, and the later stages read what was embedded.
    """
    root = Path(cache_root) if cache_root else default_root()
    if skip_bad_rows:
        spec = with_option(spec, "allow_failures", "1", READERS)
    parsed = parse_dataset_spec(spec, READERS)
    if parsed is not None:
        warn_legacy(parsed, spec)
        return READERS[parsed.reader](parsed, root, materialise)
    if looks_like_table(spec) or Path(spec).expanduser().exists():
        return table_dataset(parse_table_spec(spec), materialise)
    known = ", ".join(sorted(READERS))
    raise DatasetError(f"unknown dataset {spec!r}. Give a CSV/Parquet pairs table path, "
                       f"or one of: {known} (as <reader>:<root>, or `demo`).")


@register_reader("demo")
def _demo(parsed: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    from pipeline.datasets import demo  # lazy: the demo generator is loaded when the demo is asked for

    spec = demo.parse_spec("&".join(f"{k}={v}" for k, v in parsed.options.items()))
    folder = cache_root / "demo" / spec.slug()
    items = items_from_table(demo.ensure_demo(folder, spec)) if materialise else []
    agreement = demo.read_agreement(folder)
    note = f"; {demo.agreement_line(agreement)}" if agreement else ""
    return Dataset(name=f"demo-{spec.slug()}", spec=parsed.text(), items=items,
                   description=f"built-in phantom chest X-rays ({spec.n} pairs, seed {spec.seed}{note})",
                   report_agreement=agreement)


__all__ = ["Dataset", "DatasetError", "Item", "load_mask", "open_dataset", "register_reader", "READERS"]

# isort: off
from pipeline.datasets.masks import load_mask  # noqa: E402
from pipeline.datasets import readers as _readers  # noqa: F401,E402  (registers the readers)
# isort: on
