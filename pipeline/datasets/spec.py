"""The one grammar of a DATASET argument.

    <reader>:<root>?key=value&key=value     e.g.  chexpert:/data/chexpert?uncertain=ones
    demo?key=value&key=value                e.g.  demo?n=500&seed=1   (the built-in demo has no root)
    path/to/pairs.csv                       a pairs table (CSV or Parquet)

A key given without ``=value`` means ``key=1``. The older demo spelling
``demo:n=500,seed=1`` still works and prints a deprecation note.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from core.console import err, escape


@dataclass(frozen=True)
class DatasetSpec:
    reader: str                 # a registered reader name
    root: str                   # the dataset folder ("" for the demo)
    options: dict[str, str] = field(default_factory=dict)
    legacy: bool = False        # written in a deprecated spelling

    def text(self) -> str:
        """The spec in the current grammar."""
        query = "&".join(f"{k}={v}" for k, v in self.options.items())
        head = f"{self.reader}:{self.root}" if self.root else self.reader
        return f"{head}?{query}" if query else head


def parse_query(query: str) -> dict[str, str]:
    """``a=1&b=2&flag`` -> ``{"a": "1", "b": "2", "flag": "1"}`` (order kept)."""
    out: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, eq, value = pair.partition("=")
        out[key.strip()] = value.strip() if eq else "1"
    return out


def parse_dataset_spec(text: str, readers) -> DatasetSpec | None:
    """The reader spec ``text`` names, or None when it is not one (then it is a table path)."""
    head, q, query = text.partition("?")
    name, colon, root = head.partition(":")
    if name not in readers:
        return None
    if not colon and not q and name != "demo":
        return None  # a file or folder that happens to share a reader's name
    if not q and root and "=" in root and "/" not in root:  # demo:n=500,seed=1
        return DatasetSpec(name, "", parse_query(root.replace(",", "&")), legacy=True)
    return DatasetSpec(name, root, parse_query(query))


_warned: set[str] = set()


def warn_legacy(spec: DatasetSpec, given: str) -> None:
    if spec.legacy and given not in _warned:
        _warned.add(given)
        err.print(f"[yellow]note:[/] the spelling {escape(repr(given))} is deprecated; write {escape(repr(spec.text()))} "
                  "(options follow a `?`, separated by `&`).", soft_wrap=True)


def with_option(text: str, key: str, value: str, readers) -> str:
    """``text`` with ``key=value`` added to a reader spec's options (a table path is returned unchanged)."""
    spec = parse_dataset_spec(text, readers)
    if spec is None or spec.reader == "demo":
        return text
    return DatasetSpec(spec.reader, spec.root, {**spec.options, key: value}).text()
