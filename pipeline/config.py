"""Configs for every stage: frozen dataclasses, YAML presets and dotted overrides.

    cfg = load_config(TrainConfig, "demo",
                      ["optim.lr=1e-4", "adaptor.mode=tokens", "fractions=[0.01,0.1]"])

Later sources win: dataclass defaults < ``base`` < preset < overrides. Mappings merge
key by key, so an override changes one leaf and keeps its siblings; a nested
dataclass starts from its field's default instance. Override values are parsed with
``yaml.safe_load`` (``lr=1e-4`` arrives as the string "1e-4", which a float field
accepts). Every problem found is collected and raised as one :class:`ConfigError`.
"""
from __future__ import annotations

import dataclasses
import difflib
import enum
import hashlib
import json
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path, PurePath
from typing import Annotated, Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from core.atomic import atomic_write_text
from core.errors import InputError
from pipeline import resources

T = TypeVar("T")
_BAD = object()  # marks a value that failed validation


@dataclasses.dataclass(frozen=True)
class OneOf:
    """``Annotated[str, OneOf(REGISTRY)]``: a name that must be a key of a registry.

    Like ``Literal``, but the choices live in the registry (the Adaptor's modes, the
    evaluation tasks), so adding an entry there is all it takes.
    """

    choices: Mapping[str, Any]


class Validated:
    """A config dataclass whose values are checked, not only their types.

    ``checks(values)`` returns ``[(field, problem), ...]`` for a mapping of the fields'
    values. :func:`load_config` runs it together with every other check, so a bad value
    is reported beside the rest of the config's problems, under its dotted key; direct
    construction runs it too (``__post_init__``) and raises ``ValueError``.

    ``RENAMED`` maps a key that no longer exists to ``fn(value) -> message``: a config
    that still uses it is refused with that message (what the key is called now, and how
    to write the old value), never read under another meaning.

    ``MOVED`` maps a key that moved, with its meaning, into a section to its new dotted
    key (``{"labels": "classification.labels"}``): a config that still writes the old key
    is read as if it wrote the new one (an override of either beats a preset of either),
    and one source that writes both, differently, is refused with a message naming the
    new key. :func:`config_hash` hashes a moved setting at its
    old place, so a setting's move does not make every earlier run look changed.

    ``ADDED`` maps a dotted key added after runs were recorded to its default: while a config
    keeps that default, :func:`config_hash` leaves the key out, so a new setting does not make
    every earlier run look changed either.
    """

    RENAMED: ClassVar[Mapping[str, Callable[[Any], str]]] = {}
    MOVED: ClassVar[Mapping[str, str]] = {}
    ADDED: ClassVar[Mapping[str, Any]] = {}

    @staticmethod
    def checks(v: Mapping[str, Any]) -> list[tuple[str, str]]:
        return []

    def __post_init__(self) -> None:
        found = self.checks({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if found:
            raise ValueError("; ".join(f"{k}: {m}" for k, m in found))


class ConfigError(InputError):
    """Every problem with a config, one per line, each naming its dotted key."""

    def __init__(self, problems: Sequence[str], what: str = "config") -> None:
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{n} problem{'s' if n != 1 else ''} in {what}:"]
        lines += [f"  - {p}" for p in self.problems]
        super().__init__("\n".join(lines))


# ----------------------------------------------------------------------------- API
def load_config(
    cls: type[T],
    preset: str | Path | None = None,
    overrides: Sequence[str] = (),
    base: Mapping[str, Any] | Any | None = None,
) -> T:
    """Build ``cls`` from defaults, ``base`` (a mapping or a ``cls`` instance), a YAML
    ``preset`` (a path, or a preset's name: ``demo``, ``demo.yaml``, ``paper``) and ``key.sub=value`` overrides."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    problems: list[str] = []
    merged: dict[str, Any] = {}
    moved, fields = getattr(cls, "MOVED", {}), {f.name for f in dataclasses.fields(cls)}
    if base is not None:  # a moved key is moved within its source, so later sources still win over it
        _merge(merged, _move(to_dict(base) if dataclasses.is_dataclass(base) else dict(base), moved, fields, "",
                             problems))
    if preset is not None:
        _merge(merged, _move(_read_preset(preset, problems), moved, fields, "", problems))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if sep and key.strip() in moved and key.strip() not in fields:
            item = f"{moved[key.strip()]}={raw}"
        _apply_override(merged, item, problems)
    cfg = _build(cls, merged, "", problems)
    if problems:
        raise ConfigError(problems, f"{cls.__name__} config" + (f" (from {_preset_path(preset) or preset} and the command "
                                                                 "line)" if preset is not None else ""))
    return cfg


def to_dict(cfg: Any) -> Any:
    """Nested plain data (dicts, lists, str/int/float/bool/None), YAML- and JSON-able."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.init}
    if isinstance(cfg, Mapping):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, enum.Enum):
        return cfg.value
    if isinstance(cfg, PurePath):
        return str(cfg)
    return cfg


def save_config(cfg: Any, path: str | Path) -> Path:
    """Write ``cfg`` as YAML, all or nothing (see :mod:`core.atomic`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True))
    return path


def config_hash(cfg: Any, length: int = 16) -> str:
    """Short sha256 of the canonical JSON (sorted keys, no spaces) of ``to_dict(cfg)``, with
    every ``MOVED`` setting at its old key and every ``ADDED`` one at its default left out (see
    :class:`Validated`)."""
    canonical = json.dumps(_unadded(cfg, _unmoved(cfg, to_dict(cfg))), sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:length]


def _unmoved(cfg: Any, d: Any) -> Any:
    """``d`` (``to_dict(cfg)``) with the moved settings of ``cfg``'s class back at their old keys;
    a section left empty is dropped (before the move it did not exist)."""
    for old, new in getattr(type(cfg), "MOVED", {}).items():
        section, _, key = new.rpartition(".")
        node = d.get(section) if section else None
        if isinstance(node, dict) and key in node:
            d[old] = node.pop(key)
            if not node:
                del d[section]
    return d


def _unadded(cfg: Any, d: dict) -> dict:
    """``d`` without the ``ADDED`` settings of ``cfg``'s class that keep their defaults."""
    for key, default in getattr(type(cfg), "ADDED", {}).items():
        section, _, name = key.rpartition(".")
        node = d.get(section) if section else d
        if isinstance(node, dict) and name in node and node[name] == default:
            del node[name]
    return d


def describe_type(tp: Any) -> str:
    """A field's type as the messages and the configuration reference write it (``one of 'auto', 'cpu'``)."""
    return _describe(tp)


def field_default(field: dataclasses.Field) -> Any:
    """A field's default value (its factory called), or ``dataclasses.MISSING``."""
    return _default(field)


def list_presets() -> list[str]:
    """The presets the installed package holds (an alias beside its preset's name)."""
    return [n for n in resources.listing() if not n.startswith("sweep_")]


# ------------------------------------------------------------------- the sources
def _merge(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in new.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = dict(value) if isinstance(value, Mapping) else value
    return into


def _preset_path(preset: str | Path) -> Path | None:
    """The YAML file a preset names: a path (which wins when it exists), or a preset's name in the
    installed package (demo, demo.yaml, paper), or configs/... as written from a clone; None if none."""
    path = Path(preset).expanduser()
    return path if path.exists() else resources.find(str(preset))


def _read_preset(preset: str | Path, problems: list[str]) -> dict[str, Any]:
    path = _preset_path(preset)
    if path is not None and path.is_dir():
        problems.append(f"preset {str(preset)!r} is a folder; give a YAML file")
        return {}
    if path is None or not path.is_file():
        problems.append(f"preset {str(preset)!r}: no such file, and no such preset in the installed package; "
                        f"give a YAML path or one of: {', '.join(list_presets())}")
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        problems.append(f"preset {str(path)!r}: not valid YAML: {e}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        problems.append(f"preset {str(path)!r}: expected a mapping at the top, got {_kind(data)}")
        return {}
    return dict(data)


def _apply_override(merged: dict[str, Any], item: str, problems: list[str]) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not all(p.strip() for p in parts):
        problems.append(f"override {item!r}: expected key=value, e.g. optim.lr=1e-4")
        return
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        problems.append(f"{key}: override value {raw!r} is not valid YAML ({e.__class__.__name__})")
        return
    node = merged
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: i + 1])
            problems.append(f"{key}: cannot set it, {where} is {_kind(child)}, not a mapping")
            return
        node = child
    if isinstance(value, Mapping) and isinstance(node.get(parts[-1]), dict):
        _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value


# -------------------------------------------------------------------- validation
def _build(cls: type, data: Mapping[str, Any], prefix: str, problems: list[str]) -> Any:
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    start = len(problems)
    data = _move(data, getattr(cls, "MOVED", {}), fields, prefix, problems)
    renamed = getattr(cls, "RENAMED", {})
    for key in data:
        if key in renamed and key not in fields:
            problems.append(f"{prefix + '.' if prefix else ''}{key}: {renamed[key](data[key])}")
        elif key not in fields:
            problems.append(_unknown_key(str(key), prefix, sorted(fields)))
    kwargs: dict[str, Any] = {}
    for name, field in fields.items():
        key = f"{prefix}.{name}" if prefix else name
        if name not in data:
            if _default(field) is dataclasses.MISSING:
                problems.append(f"{key}: missing required value (expected {_describe(hints[name])})")
            continue
        value = data[name]
        if isinstance(value, Mapping):  # a nested dataclass starts from its field default
            default = _default(field)
            if dataclasses.is_dataclass(default):
                value = _merge(to_dict(default), value)
        converted = _convert(hints[name], value, key, problems)
        if converted is not _BAD:
            kwargs[name] = converted
    if issubclass(cls, Validated):
        values = {n: kwargs.get(n, _default(f)) for n, f in fields.items()}
        if all(v is not dataclasses.MISSING for v in values.values()):
            problems += [f"{prefix + '.' if prefix else ''}{k}: {m}" for k, m in cls.checks(values)]
    if len(problems) > start:
        return _BAD
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks across fields
        problems.append(f"{prefix or cls.__name__}: {e}")
        return _BAD


def _move(data: Mapping[str, Any], moved: Mapping[str, str], fields: Collection[str], prefix: str,
          problems: list[str]) -> Mapping[str, Any]:
    """``data`` with every old key of ``moved`` written at its new dotted key (one section deep)."""
    old_keys = [k for k in moved if k in data and k not in fields]
    if not old_keys:
        return data
    out = dict(data)
    dotted = prefix + "." if prefix else ""
    for old in old_keys:
        section, _, key = moved[old].rpartition(".")
        node = out.get(section)
        if node is None:
            node = {}
        elif not isinstance(node, Mapping):
            problems.append(f"{dotted}{old}: moved to {dotted}{moved[old]}, but {dotted}{section} is {_kind(node)}, "
                            "not a mapping")
            continue
        node = out[section] = dict(node)
        value = out.pop(old)
        if key in node and node[key] != value:
            problems.append(f"{dotted}{old}: moved to {dotted}{moved[old]}, which is also given ({node[key]!r}, "
                            f"here {value!r}); write only {dotted}{moved[old]}")
            continue
        node[key] = value
    return out


def _convert(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    origin, args = get_origin(tp), get_args(tp)
    if tp is Any or tp is object:
        return value
    if origin is Annotated:
        converted = _convert(args[0], value, key, problems)
        for rule in args[1:]:
            if isinstance(rule, OneOf) and converted is not _BAD and converted not in rule.choices:
                return _fail(problems, key, tp, value)
        return converted
    if origin in (Union, types.UnionType):
        return _convert_union(tp, args, value, key, problems)
    if origin is Literal:
        if any(value == c and type(value) is type(c) for c in args):
            return value
        return _fail(problems, key, tp, value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, Mapping):
            return _build(tp, value, key, problems)
        return _fail(problems, key, tp, value)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        return _convert_sequence(tp, origin or tp, args, value, key, problems)
    if origin in (dict, Mapping, typing.Mapping) or tp is dict:
        return _convert_mapping(args, value, key, problems)
    return _convert_scalar(tp, value, key, problems)


def _convert_union(tp: Any, args: tuple, value: Any, key: str, problems: list[str]) -> Any:
    if value is None and type(None) in args:
        return None
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:  # Optional[X]: report X's own, more precise, problem
        return _convert(options[0], value, key, problems)
    for option in options:
        trial: list[str] = []
        converted = _convert(option, value, key, trial)
        if not trial:
            return converted
    return _fail(problems, key, tp, value)


def _convert_sequence(tp, origin, args, value, key, problems) -> Any:
    if not isinstance(value, (list, tuple)):
        return _fail(problems, key, tp, value)
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            problems.append(f"{key}: expected {_describe(tp)} ({len(args)} items), got {len(value)} items")
            return _BAD
        item_types = list(args)
    else:
        item_types = [args[0] if args else Any] * len(value)
    items = [_convert(t, v, f"{key}[{i}]", problems) for i, (t, v) in enumerate(zip(item_types, value))]
    if any(v is _BAD for v in items):
        return _BAD
    return tuple(items) if origin is tuple else list(items)


def _convert_mapping(args: tuple, value: Any, key: str, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        return _fail(problems, key, dict[args] if args else dict, value)
    key_type, value_type = args if args else (Any, Any)
    out = {}
    for k, v in value.items():
        ck = _convert(key_type, k, f"{key} (key {k!r})", problems)
        cv = _convert(value_type, v, f"{key}.{k}", problems)
        out[ck] = cv
    return _BAD if any(v is _BAD for v in (*out, *out.values())) else out


def _convert_scalar(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    if tp is type(None):
        return None if value is None else _fail(problems, key, tp, value)
    if tp is bool:
        return value if isinstance(value, bool) else _fail(problems, key, tp, value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return value if ok else _fail(problems, key, tp, value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        return _fail(problems, key, tp, value)
    if tp is str:
        if isinstance(value, str):
            return value
        hint = f' (quote it: {key.rsplit(".", 1)[-1]}="{value}")' if value is not None else ""
        problems.append(f"{key}: expected str, got {_kind(value)}{hint}")
        return _BAD
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value == member.name or value is member:
                return member
        return _fail(problems, key, tp, value)
    if isinstance(tp, type) and issubclass(tp, PurePath):
        return tp(value) if isinstance(value, (str, PurePath)) else _fail(problems, key, tp, value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    return _fail(problems, key, tp, value)


# ----------------------------------------------------------------------- messages
def _fail(problems: list[str], key: str, tp: Any, value: Any) -> Any:
    problems.append(f"{key}: expected {_describe(tp)}, got {_kind(value)}")
    return _BAD


def _unknown_key(name: str, prefix: str, valid: list[str]) -> str:
    dotted = (prefix + ".") if prefix else ""
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    guess = f"; did you mean {dotted + close[0]!r}?" if close else "."
    where = f"under {prefix!r}" if prefix else "at the top level"
    return f"{dotted}{name}: unknown key{guess} Valid keys {where}: {', '.join(valid)}"


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)}"
    return f"{type(value).__name__} {value!r}"


def _describe(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Annotated:
        rules = [r for r in args[1:] if isinstance(r, OneOf)]
        return "one of " + ", ".join(repr(c) for c in rules[0].choices) if rules else _describe(args[0])
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _describe(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING
