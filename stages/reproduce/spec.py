"""A table of the paper as data: ``configs/paper/<table>.yaml``, its rows, columns and cells.

A table spec names the pre-training recipe (one Adaptor per row), the rows (image encoder
x text encoder, or image encoders alone where the text encoder does not enter), the
columns (a dataset, its evaluation recipe and the metric the paper reports) and the label
fractions; ``published`` lists the paper's and its peers' figures with their protocol.
Every cell is addressable by its id, ``<row>/<column>/<percent>`` (e.g.
``dinov2-b+bert/rsna/10``); ``pipe reproduce TABLE --plan`` lists them.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from pipeline import resources
from pipeline.config import ConfigError

PAPER = "paper"  # the package folder of the paper's tables and their recipes


@dataclass(frozen=True)
class Data:
    """A dataset a table reads: its reader, and its size before it is embedded here (for ``--plan``)."""

    key: str                 # how tables and --data name it
    reader: str
    approx_items: int
    size_note: str


DATASETS = {d.key: d for d in (
    Data("mimic", "mimic-cxr", 217_000, "MIMIC-CXR-JPG frontal images with a usable report (README, ~217k)"),
    Data("rsna", "rsna-pneumonia", 26_684, "RSNA Pneumonia stage 2: 26,684 labelled images"),
    Data("siim", "siim-pneumothorax", 12_047, "SIIM-ACR stage 1 PNG release: 10,675 train + 1,372 test images"),
    Data("covidx", "covidx", 30_530, "COVIDx9A, the authors' release: about 30,130 train + 400 test images "
                                      "(CXR-4: 84,818)"),
)}


@dataclass(frozen=True)
class Row:
    image: str
    text: str | None = None          # None: the text encoder does not enter this table

    @property
    def id(self) -> str:
        return f"{self.image}+{self.text}" if self.text else self.image


@dataclass(frozen=True)
class Column:
    name: str                        # as the paper heads it: RSNA, COVIDx, SIIM
    data: str                        # a key of DATASETS
    preset: str                      # the evaluation recipe (an EvalConfig preset)
    metric: str                      # the summary key the paper reports (auroc, accuracy, dice_empty_is_one)

    @property
    def id(self) -> str:
        return self.data


@dataclass(frozen=True)
class Cell:
    row: Row
    column: Column
    fraction: float
    baseline: bool = False           # the frozen backbone without an Adaptor (a reference row)

    @property
    def id(self) -> str:
        row = f"{self.row.image}+none" if self.baseline else self.row.id
        return f"{row}/{self.column.id}/{100 * self.fraction:g}"


@dataclass(frozen=True)
class Published:
    method: str
    protocol: str                    # linear probe, fine-tune, frozen Adaptor + MLP head, ...
    source: str
    values: dict[str, list[float | None]]   # column name -> one figure per fraction (None: not reported)
    # column name -> which run each figure comes from (e.g. the text encoder of a "best" row's cell)
    encoders: dict[str, list[str]] = field(default_factory=dict)
    chosen: str = ""                 # how a row's figures were chosen, where they were (e.g. on the test set)


@dataclass(frozen=True)
class Fixed:
    """``pipe reproduce TABLE --fixed``: our fixes of the authors' flaws, as overrides of the recipe."""

    pretrain: tuple[str, ...] = ()   # key=value for every pre-training
    eval: tuple[str, ...] = ()       # key=value for every evaluation
    metric: dict[str, str] = field(default_factory=dict)   # column name -> the metric the fixed table reports


@dataclass(frozen=True)
class TableSpec:
    name: str
    path: Path
    title: str
    rows: tuple[Row, ...]
    columns: tuple[Column, ...]
    fractions: tuple[float, ...]
    pretrain_data: str | None        # None: no Adaptor is trained for this table
    pretrain_preset: str | None
    baseline: bool                   # also the no-Adaptor rows (one per image encoder)
    also: tuple[str, ...]            # further metrics, each a table of the same cells
    published: tuple[Published, ...] = ()
    notes: tuple[str, ...] = ()
    variant: str = ""                # image encoders run as <name>-<variant> (their input geometry: pad, pad224)
    views: int = 0                   # augmented views embedded per image (segmentation's -ssr views)
    split_sources: dict[str, dict[str, str]] = field(default_factory=dict)  # data -> {given source: the one read}
    releases: dict[str, str] = field(default_factory=dict)   # data -> the release the authors used
    authors: str = ""                # the authors' settings, with sources (a path under configs/paper/)
    fixed: Fixed = Fixed()
    raw: dict = field(default_factory=dict, compare=False, repr=False)   # the spec file as read

    @property
    def adaptor(self) -> bool:
        return self.pretrain_data is not None

    def with_fixes(self) -> "TableSpec":
        """The table under ``--fixed``: each column reports the fixed recipe's metric."""
        columns = tuple(replace(c, metric=self.fixed.metric.get(c.name, c.metric)) for c in self.columns)
        return replace(self, columns=columns)

    def cells(self) -> list[Cell]:
        """Every cell, rows first; the no-Adaptor cells (one row per image encoder) after them."""
        out = [Cell(r, c, f, baseline=not self.adaptor) for r in self.rows for c in self.columns
               for f in self.fractions]
        if self.adaptor and self.baseline:
            images = list(dict.fromkeys(r.image for r in self.rows))
            out += [Cell(Row(i), c, f, baseline=True) for i in images for c in self.columns for f in self.fractions]
        return out

    @property
    def datasets(self) -> list[str]:
        keys = ([self.pretrain_data] if self.pretrain_data else []) + [c.data for c in self.columns]
        return list(dict.fromkeys(keys))


def table_names() -> list[str]:
    return [n for n in resources.names(PAPER) if _is_table(resources.folder(PAPER) / f"{n}.yaml")]


def _is_table(path: Path) -> bool:
    try:
        return "columns" in (yaml.safe_load(path.read_text()) or {})
    except yaml.YAMLError:
        return False


def load_table(name: str) -> TableSpec:
    """A table by name (``configs/paper/<name>.yaml``) or path; every problem in one message."""
    path = Path(name).expanduser()
    if not path.is_file():
        path = resources.find(name, PAPER)
    if path is None or not _is_table(path):
        raise ConfigError([f"table {name!r}: no such table; the paper's are: {', '.join(table_names())} "
                           "(configs/paper/), or give a table spec's path"], "pipe reproduce")
    raw = yaml.safe_load(path.read_text()) or {}
    problems: list[str] = []
    spec = _build(path, raw, problems)
    if problems:
        raise ConfigError(problems, f"table {path}")
    return spec


KEYS = {"title", "pretrain", "rows", "columns", "fractions", "baseline", "also", "published", "notes", "variant",
        "views", "split_sources", "releases", "authors", "fixed"}


def _build(path: Path, raw: dict, problems: list[str]) -> TableSpec | None:
    problems += [f"{k}: unknown key (valid: {', '.join(sorted(KEYS))})" for k in raw if k not in KEYS]
    pre = raw.get("pretrain") or {}
    if pre and pre.get("data") not in DATASETS:
        problems.append(f"pretrain.data: expected one of {', '.join(DATASETS)}, got {pre.get('data')!r}")
    rows_raw = raw.get("rows") or {}
    texts = rows_raw.get("text") or [None]
    rows = tuple(Row(i, t) for i in rows_raw.get("image") or [] for t in texts)
    if not rows:
        problems.append("rows.image: at least one image encoder")
    if pre and texts == [None]:
        problems.append("rows.text: a table that pre-trains an Adaptor needs its text encoders")
    columns = []
    for i, c in enumerate(raw.get("columns") or []):
        missing = [k for k in ("name", "data", "preset", "metric") if k not in c]
        if missing or c.get("data") not in DATASETS:
            problems.append(f"columns[{i}]: needs name, data (one of {', '.join(DATASETS)}), preset and metric")
            continue
        columns.append(Column(str(c["name"]), c["data"], str(c["preset"]), str(c["metric"])))
    fractions = tuple(float(f) for f in raw.get("fractions") or (0.01, 0.1, 1.0))
    published = tuple(_published(p, [c.name for c in columns], len(fractions), i, problems)
                      for i, p in enumerate(raw.get("published") or []))
    fixed = raw.get("fixed") or {}
    views = raw.get("views", 0)
    if not isinstance(views, int) or isinstance(views, bool) or views < 0:
        problems.append(f"views: augmented views per image, a whole number >= 0, got {views!r}")
        views = 0
    return TableSpec(name=path.stem, path=path, title=str(raw.get("title", path.stem)), rows=rows,
                     columns=tuple(columns), fractions=fractions, pretrain_data=pre.get("data"),
                     pretrain_preset=pre.get("preset"), baseline=bool(raw.get("baseline", False)),
                     also=tuple(raw.get("also") or ()), published=published, notes=tuple(raw.get("notes") or ()),
                     variant=str(raw.get("variant") or ""), views=views, split_sources=dict(raw.get("split_sources") or {}),
                     releases=dict(raw.get("releases") or {}), authors=str(raw.get("authors") or ""),
                     fixed=Fixed(tuple(fixed.get("pretrain") or ()), tuple(fixed.get("eval") or ()),
                                 dict(fixed.get("metric") or {})), raw=raw)


def _published(p: dict, columns: list[str], n: int, i: int, problems: list[str]) -> Published:
    values = {c: list(p[c]) for c in columns if c in p}
    bad = [c for c, v in values.items() if len(v) != n]
    missing = [k for k in ("method", "protocol", "source") if k not in p]
    if bad or missing:
        problems.append(f"published[{i}]: needs method, protocol, source and {n} figures per column "
                        f"(wrong: {', '.join(missing + bad)})")
    encoders = {c: [str(e) for e in p["encoders"][c]] for c in columns if c in (p.get("encoders") or {})}
    if any(len(v) != n for v in encoders.values()):
        problems.append(f"published[{i}].encoders: one per fraction for each column it names")
    return Published(str(p.get("method", "?")), str(p.get("protocol", "?")), str(p.get("source", "?")), values,
                     encoders, str(p.get("chosen", "")))


@dataclass
class Substitutions:
    """Encoders used in place of the paper's (``--substitute dinov2-s=tiny-vit``): the rows keep
    the paper's names and say what ran."""

    names: dict[str, str] = field(default_factory=dict)

    def __call__(self, encoder: str) -> str:
        return self.names.get(encoder, encoder)

    def image(self, encoder: str, variant: str) -> str:
        """The image encoder that runs for the paper's ``encoder``: substituted, then its ``variant``
        (``<name>-pad``: the authors' input geometry, ``pipeline/encoders/image.py``)."""
        used = self(encoder)
        return f"{used}-{variant}" if variant else used

    def label(self, encoder: str) -> str:
        used = self(encoder)
        return encoder if used == encoder else f"{encoder} (ran as {used})"
