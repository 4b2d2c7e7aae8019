"""The configuration keys of a config dataclass, as the reference documentation lists them.

Each key's help is the comment that ends its field's line in the source (read with
:mod:`ast` and :mod:`tokenize`, so nothing is written twice); a nested config dataclass
is a section whose help is its docstring's first line, and whose keys follow it, dotted.
A field without a comment gets the help of the command option of the same name, when
the caller passes those (``options``: ``{"batch_size": "Items per batch."}``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import json
import textwrap
import tokenize
from dataclasses import dataclass
from typing import Any, Mapping, get_type_hints

from pipeline.config import describe_type, field_default, to_dict


@dataclass(frozen=True)
class Key:
    """One configuration key: its dotted name, type, default (as YAML would write it) and help."""

    key: str
    type: str
    default: str
    help: str
    section: bool = False          # a nested config: its keys follow, dotted


def keys(cls: type, options: Mapping[str, str] | None = None, prefix: str = "") -> list[Key]:
    """Every key of ``cls``, sections first in their field order, each followed by its keys."""
    hints = get_type_hints(cls, include_extras=True)
    comments = field_comments(cls)
    out: list[Key] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, default = f"{prefix}{f.name}", field_default(f)
        help_ = comments.get(f.name) or (options or {}).get(f.name, "")
        if dataclasses.is_dataclass(default):
            out.append(Key(key, describe_type(hints[f.name]), "", help_ or first_line(type(default)), section=True))
            out += keys(type(default), None, f"{key}.")
        else:
            out.append(Key(key, describe_type(hints[f.name]), _yaml(default), help_))
    return out


def first_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.strip().split("\n\n")[0].replace("\n", " ") if doc and not doc.startswith(cls.__name__ + "(") else ""


@functools.cache
def field_comments(cls: type) -> dict[str, str]:
    """{field: the comment on its line(s)} for a dataclass's annotated fields, read from its source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # no source (a class made at run time)
        return {}
    by_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
    body = ast.parse(source).body[0].body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            text = [by_line[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in by_line]
            if text:
                out[node.target.id] = " ".join(text)
    return out


def _yaml(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    return json.dumps(to_dict(value), ensure_ascii=False)
