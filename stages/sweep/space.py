"""What a sweep searches: the ``space:`` of a sweep file, one :class:`Param` per key.

A value is a list (a grid axis, or a choice for the random and Optuna searches) or a
mapping with one of the kinds below::

    space:
      optim.lr: {log: [1.0e-5, 1.0e-3]}     # log-uniform between the bounds
      adaptor.dropout: {float: [0.0, 0.3]}  # uniform
      adaptor.n_layers: {int: [1, 4]}       # an integer, bounds included
      adaptor.mode: [pooled, tokens]        # a list: a grid axis, or a choice
      batch_size: {choice: [64, 128]}       # a choice, written out

Each kind is one entry of :data:`KINDS`: how it is checked, its Optuna distribution, and
whether a grid can enumerate it. Encoder pairs are one more parameter, ``pair``, whose
choices are the pairs' names (``image + text``); its value sets ``backbone`` and
``text_encoder``.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable

PAIR = "pair"            # the parameter that carries an encoder pair
PAIR_JOIN = " + "        # a pair's name: "<image encoder> + <text encoder>"


def pair_name(image: str, text: str) -> str:
    return f"{image}{PAIR_JOIN}{text}"


@dataclass(frozen=True)
class Kind:
    name: str
    summary: str
    check: Callable[[Any], str | None]          # the value's problem, or None
    distribution: Callable[[Any], Any]           # the value -> an optuna distribution
    grid: bool                                   # a grid can enumerate it (its values are a list)


def _bounds(v: Any, integer: bool = False) -> str | None:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        return f"expected [lo, hi], got {v!r}"
    lo, hi = v
    ok = (int,) if integer else (int, float)
    if not all(isinstance(x, ok) and not isinstance(x, bool) for x in (lo, hi)):
        return f"expected two {'integers' if integer else 'numbers'}, got {v!r}"
    if lo > hi:
        return f"lo > hi in {list(v)}"
    return None


def _check_log(v: Any) -> str | None:
    found = _bounds(v)
    if found is None and v[0] <= 0:
        return f"a log range needs lo > 0, got {list(v)}"
    return found


def _check_choice(v: Any) -> str | None:
    if not isinstance(v, (list, tuple)) or not v:
        return "expected a non-empty list of values"
    if not all(x is None or isinstance(x, (bool, int, float, str)) for x in v):
        return f"choices must be numbers, strings, booleans or null, got {v!r}"
    return None


def _float(v, log=False):
    from optuna.distributions import FloatDistribution  # lazy: optuna takes a second to import

    return FloatDistribution(float(v[0]), float(v[1]), log=log)


def _int(v):
    from optuna.distributions import IntDistribution  # lazy: optuna takes a second to import

    return IntDistribution(int(v[0]), int(v[1]))


def _categorical(v):
    from optuna.distributions import CategoricalDistribution  # lazy: optuna takes a second to import

    return CategoricalDistribution(list(v))


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("log", "log-uniform in [lo, hi], lo > 0", _check_log, lambda v: _float(v, log=True), grid=False),
    Kind("float", "uniform in [lo, hi]", _bounds, _float, grid=False),
    Kind("int", "an integer in [lo, hi], both included", lambda v: _bounds(v, integer=True), _int, grid=False),
    Kind("choice", "one of the values listed", _check_choice, _categorical, grid=True),
)}


@dataclass(frozen=True)
class Param:
    """One searched key: its kind (:data:`KINDS`) and the kind's value (bounds, or the choices)."""

    key: str
    kind: str
    value: Any

    @property
    def distribution(self):
        return KINDS[self.kind].distribution(self.value)

    @property
    def choices(self) -> list:
        return list(self.value) if KINDS[self.kind].grid else []


def parse_space(raw: Any, where: str = "space") -> tuple[list[Param], list[str]]:
    """The parameters of a ``space:`` mapping, and every problem found (each naming its key)."""
    if not isinstance(raw, dict):
        return [], [f"{where}: expected a mapping of dotted keys to lists or ranges, got {raw!r}"]
    params, problems = [], []
    for key, v in raw.items():
        kind, value = ("choice", v) if isinstance(v, list) else _one_kind(v)
        if kind not in KINDS:
            problems.append(f"{where}.{key}: expected a list or one of {', '.join('{' + k + ': ...}' for k in KINDS)}, "
                            f"got {v!r}")
            continue
        why = KINDS[kind].check(value)
        if why:
            problems.append(f"{where}.{key}: {why}")
        else:
            params.append(Param(str(key), kind, value))
    return params, problems


def _one_kind(v: Any) -> tuple[str, Any]:
    if isinstance(v, dict) and len(v) == 1:
        kind, value = next(iter(v.items()))
        return str(kind), value
    return "", v


def grid_problems(params: list[Param]) -> list[str]:
    """A grid enumerates lists only: a range cannot be a grid axis."""
    return [f"space.{p.key}: search: grid needs a list of values; {{{p.kind}: ...}} is a range "
            "(use search: random or optuna, or list the values)" for p in params if not KINDS[p.kind].grid]


def grid_points(params: list[Param]) -> list[dict]:
    """Every combination of the lists, in the order the file writes them (the last key varies fastest)."""
    keys = [p.key for p in params]
    return [dict(zip(keys, vals)) for vals in itertools.product(*(p.choices for p in params))]


def sample_point(params: list[Param]) -> dict:
    """One value per parameter (the first choice, the lower bound): to check the keys before any trial."""
    return {p.key: (p.choices[0] if p.choices else p.value[0]) for p in params}

