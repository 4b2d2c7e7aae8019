"""Results files written before the records (format 1), read as the current format.

A format-1 ``results.json`` names its methods but does not say what they are, its tables
do not say their task or which columns are label fractions, and its fixed rows (chance)
carry only their text. :func:`upgrade` recovers all of that, here and only here: from the
run's task, its config's fractions, and the names evaluation gave its methods then (the
same rules the report applied to every name before format 2). Nothing else in the project
reads a name or a cell's text back.
"""
from __future__ import annotations

import re

from pipeline.records.keys import DATA_FILES
from pipeline.tables import fraction_label

# What a method's name began with, by kind (pipeline/methods.py:METHOD_KINDS), in the order tried.
KIND_PREFIXES = (("Adaptor", "adaptor"), ("no Adaptor", "backbone"), ("native joint space", "native"),
                 ("linear map", "linear-map"), ("all-empty", "all-empty"), ("chance", "chance"))
# A variant's mark in the name of an Adaptor's row (pipeline/methods.py:VARIANTS).
VARIANT_MARKS = (("raw patch tokens", "raw-tokens"), ("ITM re-rank", "itm-rerank"))
_MODE = re.compile(r"Adaptor \((\w+)\)")
_SUFFIX = re.compile(r"( \((mlp|linear|probe|decoder)\))?( · .*)?$")   # a head kind, then a merged run's name


def identity(name: str, method_names: list[str]) -> dict:
    """What a format-1 name says of its method (``method_names``: the run's methods, whose head rows
    are ``<method> (<head>)``)."""
    kind = next((k for prefix, k in KIND_PREFIXES if name.startswith(prefix)), "other")
    mode = _MODE.match(name)
    variant = next((v for mark, v in VARIANT_MARKS if mark in name), None) if mode else None
    head = next((name[len(m) + 2:-1] for m in method_names if name.startswith(m + " (") and name.endswith(")")), None)
    base = _SUFFIX.sub("", name).split(" [")[0].split(" + ITM re-rank")[0]
    return {"kind": kind, "base": base, "mode": mode[1] if mode else None, "head": head, "variant": variant}


def _text_figure(text: str) -> dict:
    """A fixed row's cell (chance) held only its text, in percent."""
    try:
        return {"value": float(text) / 100, "ci": None}
    except ValueError:
        return {}


def _table(t: dict, task: str, fractions: dict[str, float], names: list[str]) -> dict:
    title = str(t["title"])
    prefix = f"{task} · "
    body = title[len(prefix):] if task and title.startswith(prefix) else title
    unit = "%" if body.endswith(" (%)") else ""
    rows = [{**r, "identity": identity(r["method"], names),
             "values": r.get("values") or {c: f for c, text in r["cells"].items() if (f := _text_figure(text))}}
            for r in t["rows"]]
    return {**t, "rows": rows, "task": task if body != title else "", "name": body.removesuffix(" (%)"),
            "unit": unit, "fractions": {c: fractions[c] for c in t["columns"] if c in fractions}}


def _method(m: dict, fractions: dict[str, float], names: list[str]) -> dict:
    heads = {}
    for kind, by_f in (m.get("heads") or {}).items():
        heads[kind] = {}
        for label, cell in by_f.items():
            seeds = [r["seed"] for r in cell.get("runs") or [] if "seed" in r]
            summary = {k: {**s, "seeds": seeds} if s and "mean" in s else s for k, s in cell["summary"].items()}
            heads[kind][label] = {**cell, "fraction": cell.get("fraction", fractions.get(label)), "summary": summary}
    return {**m, "identity": identity(m["name"], names), **({"heads": heads} if heads else {})}


def upgrade(d: dict) -> dict:
    """A format-1 results dict as format 2."""
    task = str(d.get("task") or "")
    fractions = {fraction_label(f): f for f in (d.get("config") or {}).get("fractions") or []}
    names = [m["name"] for m in d.get("methods") or []]
    return {**d, "format": 2, "tables": [_table(t, task, fractions, names) for t in d.get("tables") or []],
            "methods": [_method(m, fractions, names) for m in d.get("methods") or []],
            "files": d.get("files") or dict(DATA_FILES)}
