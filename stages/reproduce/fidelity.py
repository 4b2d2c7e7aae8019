"""The authors' recipe beside ours, setting by setting: ``pipe reproduce TABLE --fidelity``.

A table names a file of the authors' settings (``authors:`` in ``configs/paper/<table>.yaml``,
e.g. ``configs/paper/authors/classification.yaml``): for each setting, the stage it belongs to,
the key it has here, the authors' value and where it is in their repository (``path:lines``,
at the commit the file names), and, where our value differs, why (``deliberate``: a fix, or a
difference we keep and say why). Our value is never written there: it is read from the configs
the table runs (the pre-training preset, each column's evaluation preset, the encoders' configs
and the table itself), so a changed preset shows up as a difference at once. The few settings
that no config holds (a property of the code) give ``ours`` beside the authors' value.

Each row says whether ours equals theirs; a difference with no reason is *undocumented*, and a
reason kept for a difference that no longer exists is *stale*: the tests fail on either, and
the command exits 1 on an undocumented one. With ``--fixed`` the table's fixes apply (their
overrides) and a setting a fix changes gives its ``fixed`` reason.

Keys: a dotted config key of the stage's config (``optim.lr``; stage ``pretrain`` reads the
pre-training preset, a stage named like a column, e.g. ``RSNA``, that column's evaluation
preset); ``encoder:<name>.<field>`` (the encoder the table runs for the paper's ``name``, in the
table's variant); ``table:<dotted>`` (the table spec); ``column.metric`` (the column's metric).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline import resources
from pipeline.config import ConfigError, to_dict
from pipeline.encoders import resolve_encoder_name
from stages.reproduce.spec import Cell, TableSpec
from stages.reproduce.steps import Context, eval_config, pretrain_config

FACT_KEYS = {"stage", "key", "authors", "source", "deliberate", "fixed", "note", "ours"}
_FILE_REF = re.compile(r"^[\w./-]+:\d+(-\d+)?(,\d+(-\d+)?)*$")
_UNSET = object()


@dataclass(frozen=True)
class Fact:
    """One setting of the authors', as their files give it."""

    stage: str
    key: str
    authors: Any
    source: str                      # where: path:lines (of their repository at the file's commit), or words
    deliberate: str = ""             # why ours differs, where it does
    fixed: str = ""                  # why ours differs under --fixed (the fix)
    note: str = ""                   # what the row means, where the two agree
    ours: Any = _UNSET               # a property of our code that no config holds (rare)


@dataclass(frozen=True)
class Row:
    stage: str
    key: str
    ours: Any
    authors: Any
    source: str
    deliberate: bool                 # the values differ and the difference has its reason
    why: str
    differs: bool
    stale: bool = False              # a reason is kept for a difference that no longer exists

    @property
    def undocumented(self) -> bool:
        return self.differs and not self.deliberate

    def summary(self) -> dict:
        """The JSON object of ``--fidelity --json``."""
        return {"stage": self.stage, "key": self.key, "ours": _plain(self.ours), "authors": _plain(self.authors),
                "source": self.source, "deliberate": self.deliberate, "why": self.why}


@dataclass(frozen=True)
class Facts:
    repository: str
    commit: str
    facts: tuple[Fact, ...]


def load_facts(spec: TableSpec) -> Facts:
    """The table's file of the authors' settings; every problem in it in one message."""
    if not spec.authors:
        raise ConfigError([f"table {spec.name}: no `authors:` file of the authors' settings"], "pipe reproduce")
    path = Path(spec.authors)
    if not path.is_file():  # a path from a clone's root (configs/paper/authors/...) is found in the package
        path = resources.find(spec.authors) or path
    if not path.is_file():
        raise ConfigError([f"authors: {spec.authors} does not exist"], f"table {spec.path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    problems = [f"{k}: a value is required" for k in ("repository", "commit", "settings") if not raw.get(k)]
    facts = []
    for i, f in enumerate(raw.get("settings") or []):
        unknown = sorted(set(f) - FACT_KEYS)
        missing = [k for k in ("stage", "key", "authors", "source") if k not in f]
        if unknown or missing:
            problems.append(f"settings[{i}] ({f.get('key', '?')}): " + "; ".join(
                ([f"unknown keys {', '.join(unknown)}"] if unknown else []) +
                ([f"needs {', '.join(missing)}"] if missing else [])))
            continue
        facts.append(Fact(str(f["stage"]), str(f["key"]), f["authors"], _source(f["source"]),
                          str(f.get("deliberate", "")), str(f.get("fixed", "")), str(f.get("note", "")),
                          f.get("ours", _UNSET)))
    if problems:
        raise ConfigError(problems, f"the authors' settings {path}")
    return Facts(str(raw["repository"]), str(raw["commit"]), tuple(facts))


def _source(value) -> str:
    refs = value if isinstance(value, list) else [value]
    return "; ".join(str(r) for r in refs)


def cite(source: str, commit: str) -> str:
    """``path:lines`` references as ``path:lines@commit`` (12 hex digits); words stay as they are."""
    return "; ".join(f"{part}@{commit[:12]}" if _FILE_REF.match(part) else part
                     for part in (p.strip() for p in source.split(";")) if part)


def fidelity(ctx: Context, fixed: bool = False) -> list[Row]:
    """Every setting of the table's stages: ours (from the configs it runs), theirs, the source and,
    where they differ, why. ``ctx`` is the table as it would run (``--fixed`` applied to it)."""
    facts = load_facts(ctx.spec)
    return [_row(ctx, f, facts.commit, fixed) for f in facts.facts]


def _row(ctx: Context, fact: Fact, commit: str, fixed: bool) -> Row:
    ours = fact.ours if fact.ours is not _UNSET else our_value(ctx, fact.stage, fact.key)
    differs = not same(ours, fact.authors)
    reason = (fact.fixed if fixed and fact.fixed else fact.deliberate)
    why = reason if differs else fact.note
    stale = not differs and bool(fact.deliberate or (fixed and fact.fixed))
    return Row(fact.stage, fact.key, ours, fact.authors, cite(fact.source, commit), differs and bool(reason), why,
               differs, stale)


def our_value(ctx: Context, stage: str, key: str) -> Any:
    """Our value of a setting (see the module doc for the keys)."""
    if key.startswith("encoder:"):
        name, _, attr = key.removeprefix("encoder:").partition(".")
        enc = resolve_encoder_name(name)
        return _plain(getattr(resolve_encoder_name(ctx.image(name)) if enc.modality == "image" else enc, attr))
    if key.startswith("table:"):
        return _dotted(ctx.spec.raw, key.removeprefix("table:"), key)
    column = next((c for c in ctx.spec.columns if c.name == stage), None)
    if key == "column.metric" and column is not None:
        return column.metric
    if stage == "pretrain" and ctx.spec.adaptor:
        return _dotted(to_dict(pretrain_config(ctx, ctx.spec.rows[0])), key, key)
    if column is not None:
        cell = Cell(ctx.spec.rows[0], column, max(ctx.spec.fractions), baseline=not ctx.spec.adaptor)
        return _dotted(to_dict(eval_config(ctx, cell, {})), key, key)
    raise ConfigError([f"stage {stage!r}, key {key!r}: no config of table {ctx.spec.name} holds it (stages: "
                       f"pretrain, {', '.join(c.name for c in ctx.spec.columns)}; or encoder:, table: keys)"],
                      "the authors' settings")


def _dotted(d: dict, dotted: str, key: str) -> Any:
    node: Any = d
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError([f"{key}: no such setting"], "the authors' settings")
        node = node[part]
    return _plain(node)


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def same(a: Any, b: Any) -> bool:
    """Equal values: numbers to a relative 1e-9 (``inf`` as written in YAML, ``.inf``, or "inf"),
    lists item by item, anything else as text."""
    a, b = _plain(a), _plain(b)
    if isinstance(a, list) or isinstance(b, list):
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return str(a) == str(b)


def as_text(value: Any) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(_plain(value))
    return str(_plain(value))
