"""Datasets by name: a pairs table path, `demo[?key=value&...]`, or `<reader>:<root>[?key=value&...]`."""
from __future__ import annotations

from pathlib import Path

from cache.paths import cache_root as default_root
from core.console import err
from pipeline.datasets.base import Dataset, Item
from pipeline.datasets.registry import READER_OPTIONS, READERS, OptionInfo, register_reader
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


DEMO_OPTIONS = {"n": OptionInfo("2000", "phantom image/report pairs"), "size": OptionInfo("224", "image side, px"),
                "seed": OptionInfo("0", "the generator's seed"),
                "reports": OptionInfo("synthetic", "synthetic, or iu: sentences of the Indiana University reports"),
                "noise": OptionInfo("1", "1: reports disagree with the labels as real ones do; 0: exactly"),
                "omit": OptionInfo("0.15", "chance a present finding is left out of the report"),
                "uncertain": OptionInfo("0.1", "chance a present finding is only hedged"),
                "spurious": OptionInfo("0.05", "chance an absent finding gets a hedged mention")}


@register_reader("demo", DEMO_OPTIONS, "built-in phantom chest X-rays, generated into the cache")
def _demo(parsed: DatasetSpec, cache_root: Path, materialise: bool = True) -> Dataset:
    from pipeline.datasets import demo  # lazy: the demo generator is loaded when the demo is asked for

    spec = demo.parse_spec("&".join(f"{k}={v}" for k, v in parsed.options.items()))
    folder = cache_root / "demo" / spec.slug()
    say = (lambda message: err.print(message, markup=False, soft_wrap=True))  # never silently: 100s of MB
    items = items_from_table(demo.ensure_demo(folder, spec, say)) if materialise else []
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
