"""A sweep file, read and checked: :func:`load_sweep` returns a :class:`SweepSpec` or raises one
:class:`~pipeline.config.ConfigError` that lists every problem (an unknown key, an empty
space, a bad range, an unknown objective or metric, a key the training config does not
have) before any trial starts.

    dataset: demo
    pairs: [[dinov2-s-derived, minilm], [dinov2-s-derived, tiny-bert]]   # or backbone:/text_encoder: (lists)
    preset: demo.yaml                 # every trial: the preset, then `overrides`, then its own values
    overrides: [epochs=8]
    search: optuna                    # grid | random | optuna
    trials: 24
    space:
      optim.lr: {log: [1.0e-5, 1.0e-3]}
      adaptor.n_layers: [1, 2, 3]
    objective: classification@0.01/macro_auroc
    direction: maximize               # default: minimize for losses and ece, else maximize
    prune: median                     # none | median | halving
    repeats: 2                        # seeds per setting: the objective is their mean
    top: 3                            # the best trials, evaluated on the test split at the end
    evaluate: [seeds=1]               # settings of the evaluations (pipe evaluate's keys)
    out: runs/sweep-demo
    storage: sqlite:///runs/sweep-demo/study.db   # the default; any Optuna storage URL, or journal:PATH

Files in the earlier format (``grid:`` and ``metric:``) still work: ``grid:`` is a space
searched as a grid and ``metric:`` a training-figure objective.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from cache.pairs import load_pairs
from cache.paths import cache_root
from core.errors import MissingFileError, PipeError
from pipeline import resources
from pipeline.config import ConfigError, load_config
from pipeline.datasets import open_dataset
from pipeline.encoders import canonical_name
from stages.evaluate.classify import NoLabelsError, resolve_labels
from stages.evaluate.stage import EvalConfig
from stages.sweep.objective import Objective, parse_objective
from stages.sweep.space import PAIR, Param, grid_points, grid_problems, pair_name, parse_space, sample_point
from stages.train.trainer import TrainConfig

KEYS = {"dataset", "backbone", "text_encoder", "pairs", "cache", "preset", "overrides", "evaluate", "space", "grid",
        "search", "trials", "objective", "metric", "direction", "prune", "repeats", "top", "out", "storage",
        "study", "seed"}
DEFAULT_TRIALS = 20      # random and Optuna searches without `trials:`
SWEEP_PREFIX = "sweep_"  # the packaged sweep files' names start so: `pipe sweep sweep_demo`


@dataclass(frozen=True)
class Search:
    name: str
    summary: str
    grid: bool           # trials are the grid's points, in order (else a sampler draws them)


SEARCHES: dict[str, Search] = {s.name: s for s in (
    Search("grid", "every combination of the lists, in order", grid=True),
    Search("random", "values drawn uniformly (seeded by the trial's number)", grid=False),
    Search("optuna", "Optuna's TPE sampler, after a few random trials", grid=False),
)}


@dataclass(frozen=True)
class Pruning:
    name: str
    summary: str


PRUNERS: dict[str, Pruning] = {p.name: p for p in (
    Pruning("none", "every trial trains all its epochs"),
    Pruning("median", "stop a trial whose validation figure is below the median of earlier trials at the same epoch"),
    Pruning("halving", "successive halving: keep the best share of trials at each rung of epochs"),
)}


@dataclass(frozen=True)
class SweepSpec:
    dataset: str
    pairs: tuple[tuple[str, str], ...]
    space: tuple[Param, ...]
    objective: Objective
    search: str = "grid"
    trials: int = 1
    prune: str = "none"
    repeats: int = 1
    top: int = 1
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    evaluate: tuple[str, ...] = ()
    cache: str | None = None
    out: str = "runs/sweep"
    storage: str | None = None     # None: sqlite:///<out>/study.db
    study: str = "sweep"
    seed: int = 0
    source: str = ""               # the sweep file
    axes: tuple[str, ...] = field(default=())   # the searched keys as trials.csv names them (pairs: both encoders)

    @property
    def grid(self) -> list[dict]:
        """The grid's points (a grid search), pairs included."""
        return grid_points(list(self.space))

    @property
    def metric(self) -> str:
        return self.objective.text

    def settings(self, params: dict) -> dict:
        """A trial's parameters as training settings: dotted keys, with a pair spelt out as its two encoders."""
        out = {k: v for k, v in params.items() if k != PAIR}
        image, text = self.pair_of(params)
        return {"backbone": image, "text_encoder": text, **out}

    def pair_of(self, params: dict) -> tuple[str, str]:
        """A trial's (image, text) encoders: its ``pair`` parameter, else the one pair."""
        return dict((pair_name(*p), p) for p in self.pairs)[params[PAIR]] if PAIR in params else self.pairs[0]


def override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"


def load_sweep(path: Path, extra: list[str] = (), cache: str | None = None, trials: int | None = None) -> SweepSpec:
    """A sweep file; ``extra`` overrides apply to every trial, ``cache`` and ``trials`` (when given)
    replace the file's."""
    path = _sweep_file(Path(path))
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid YAML: {e}"], f"sweep {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of sweep keys at the top, got {type(raw).__name__}; see "
                           f"{resources.find('sweep_demo')} for the format"], f"sweep {path}")
    problems: list[str] = []
    spec = _build(raw, path, list(extra), cache, trials, problems)
    problems += check_settings(spec)
    problems += metric_problems(spec) if spec.dataset else []
    if problems:
        raise ConfigError(problems, f"sweep {path}")
    return spec


def _sweep_file(path: Path) -> Path:
    """A sweep file's path, or the name of a sweep the installed package holds (``sweep_demo``,
    also as ``configs/sweep_demo.yaml`` from a clone's root)."""
    if path.is_file():
        return path
    found = resources.find(str(path)) if path.name.startswith(SWEEP_PREFIX) else None
    if found is None:
        held = ", ".join(n for n in resources.names() if n.startswith(SWEEP_PREFIX))
        raise MissingFileError(f"sweep file {path} does not exist; give a sweep file's path, or a sweep the installed "
                               f"package holds: {held} (see {resources.find('sweep_demo')} for the format)")
    return found


def _build(raw: dict, path: Path, extra: list[str], cache: str | None, trials: int | None,
           problems: list[str]) -> SweepSpec:
    """The spec, as far as it can be read; every problem found goes to ``problems``."""
    problems += [f"{k}: unknown sweep key (valid: {', '.join(sorted(KEYS))})" for k in raw if k not in KEYS]
    problems += [f"{k}: required" for k in ("dataset",) if k not in raw]
    space, searched = _space(raw, problems)
    pairs, pair_axes = _pairs(raw, problems)
    if len(pairs) > 1:
        space = [Param(PAIR, "choice", [pair_name(*p) for p in pairs]), *space]
    search = _choice(raw, "search", SEARCHES, "grid" if "grid" in raw else "optuna", problems)
    if search in SEARCHES and SEARCHES[search].grid:
        problems += grid_problems(space)
    if not space and not problems:
        problems.append("space: empty; name at least one key to search (e.g. optim.lr: {log: [1.0e-5, 1.0e-3]}), "
                        "or several encoder pairs")
    objective = _objective(raw, problems) or parse_objective("val_loss", None)[0]   # checked: its problem is listed
    numbers = {k: _count(raw, k, default, low, problems) for k, default, low in
               (("repeats", 1, 1), ("top", 0 if "grid" in raw else 1, 0), ("seed", 0, 0))}
    return SweepSpec(
        dataset=str(raw.get("dataset", "")), pairs=tuple(pairs), space=tuple(space), objective=objective,
        search=search if search in SEARCHES else "optuna", trials=_trials(raw, trials, search, space, problems),
        prune=_choice(raw, "prune", PRUNERS, "none", problems), repeats=numbers["repeats"], top=numbers["top"],
        preset=_preset(raw.get("preset"), path), evaluate=tuple(_strings(raw, "evaluate", problems)),
        overrides=tuple(_strings(raw, "overrides", problems)) + tuple(extra), cache=cache or raw.get("cache"),
        out=str(raw.get("out", "runs/sweep")), storage=raw.get("storage"), study=str(raw.get("study", "sweep")),
        seed=numbers["seed"], source=str(path), axes=tuple(pair_axes + searched))


def _space(raw: dict, problems: list[str]) -> tuple[list[Param], list[str]]:
    if "grid" in raw and "space" in raw:
        problems.append("grid: and space: both given; write one (grid: is the earlier name of a space searched as "
                        "a grid)")
    which = "space" if "space" in raw else "grid" if "grid" in raw else None
    if which is None:
        return [], []
    if which == "grid":  # the earlier format: every value must be a list
        bad = [k for k, v in (raw["grid"] or {}).items() if not isinstance(v, list) or not v] \
            if isinstance(raw["grid"], dict) else []
        problems += [f"grid.{k}: expected a list of values" for k in bad]
        if bad:
            return [], []
    params, found = parse_space(raw[which] or {}, which)
    problems += found
    clash = [p.key for p in params if p.key in ("backbone", "text_encoder", "pair", "dataset", "out", "cache")]
    problems += [f"{which}.{k}: the encoders are searched with pairs: or backbone:/text_encoder: lists; "
                 "dataset, out and cache are the sweep's own" for k in clash]
    return [p for p in params if p.key not in clash], [p.key for p in params if p.key not in clash]


def _pairs(raw: dict, problems: list[str]) -> tuple[list[tuple[str, str]], list[str]]:
    """The encoder pairs, and the names trials.csv gives them (none when there is one pair)."""
    if "pairs" in raw:
        if "backbone" in raw or "text_encoder" in raw:
            problems.append("pairs: given with backbone:/text_encoder:; write the encoders in one place")
        pairs = raw["pairs"]
        if not isinstance(pairs, list) or not pairs or not all(
                isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) and x for x in p) for p in pairs):
            problems.append("pairs: expected a list of [image encoder, text encoder] pairs, e.g. "
                            "[[dinov2-s-derived, minilm]]")
            return [("?", "?")], []
        out = list(dict.fromkeys((a, b) for a, b in pairs))
        return out, (["backbone", "text_encoder"] if len(out) > 1 else [])
    lists = {k: raw.get(k) if isinstance(raw.get(k), list) else [raw.get(k)] for k in ("backbone", "text_encoder")}
    for k, v in lists.items():
        if not v or not all(isinstance(x, str) and x for x in v):
            problems.append(f"{k}: required: an encoder name, or a list of them to search over")
            return [("?", "?")], []
    out = [(a, b) for a in dict.fromkeys(lists["backbone"]) for b in dict.fromkeys(lists["text_encoder"])]
    return out, [k for k in ("backbone", "text_encoder") if len(set(lists[k])) > 1]


def _objective(raw: dict, problems: list[str]) -> Objective | None:
    if "objective" in raw and "metric" in raw:
        problems.append("metric: and objective: both given; write objective: (metric: is its earlier name)")
        return None
    objective, found = parse_objective(raw.get("objective", raw.get("metric", "val_i2t_r@10")), raw.get("direction"))
    problems += found
    return objective


def _choice(raw: dict, key: str, registry: dict, default: str, problems: list[str]) -> str:
    value = str(raw.get(key, default))
    if value not in registry:
        problems.append(f"{key}: must be one of {', '.join(registry)}, got {value!r}")
        return default
    return value


def _count(raw: dict, key: str, default: int, low: int, problems: list[str]) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        problems.append(f"{key}: must be an integer >= {low}, got {value!r}")
        return default
    return value


def _trials(raw: dict, given: int | None, search: str, space: list[Param], problems: list[str]) -> int:
    grid = SEARCHES.get(search, SEARCHES["optuna"]).grid
    size = len(grid_points(space)) if grid and not grid_problems(space) else 0
    n = given if given is not None else raw.get("trials", size if grid else DEFAULT_TRIALS)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        problems.append(f"trials: must be an integer >= 1, got {n!r}")
        return 1
    if grid and size and n > size:
        problems.append(f"trials: {n} is more than the grid's {size} points; a grid runs each point once "
                        "(use repeats: K for more seeds per point)")
    return n


def _strings(raw: dict, key: str, problems: list[str]) -> list[str]:
    value = raw.get(key) or []
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        problems.append(f"{key}: expected a list of key=value strings, got {value!r}")
        return []
    return value


def _preset(preset: str | None, path: Path) -> str | None:
    """A preset is found as written, else beside the sweep file (else as a name in configs/)."""
    if preset and not Path(preset).is_absolute() and not Path(preset).exists() and (path.parent / preset).exists():
        return str(path.parent / preset)
    return preset


# ------------------------------------------------------------------ the settings, checked
def train_config(spec: SweepSpec, params: dict, out: str, seed_offset: int = 0) -> TrainConfig:
    """The training config of one trial (``seed_offset``: its repeat)."""
    settings = spec.settings(params)
    base = [override("dataset", spec.dataset), *([override("cache", spec.cache)] if spec.cache else [])]
    cfg = load_config(TrainConfig, spec.preset, [*spec.overrides, *[override(k, v) for k, v in settings.items()],
                                                  *base, override("out", out)])
    if seed_offset:
        cfg = load_config(TrainConfig, base=cfg, overrides=[f"seed={cfg.seed + seed_offset}"])
    return cfg


def eval_config(spec: SweepSpec, task: str, **fields) -> EvalConfig:
    """An evaluation of the sweep: ``task`` with the file's ``evaluate:`` settings, then ``fields``."""
    base = [override("task", task), override("dataset", spec.dataset),
            *([override("cache", spec.cache)] if spec.cache else [])]
    return load_config(EvalConfig, None, [*spec.evaluate, *base, *[override(k, v) for k, v in fields.items()]])


def check_settings(spec: SweepSpec) -> list[str]:
    """Every value a trial may take, set on the training config: a key it lacks or a value it refuses
    is found now. Grids check every point; ranges both ends; choices each value."""
    problems: list[str] = []
    points = spec.grid if SEARCHES[spec.search].grid else _edges(list(spec.space))
    seen: set[str] = set()
    for point in points:
        _collect(lambda: train_config(spec, point, "trial"), problems, seen)
    if spec.objective.downstream:
        _collect(lambda: eval_config(spec, spec.objective.task, adaptor="none"), problems, seen, "evaluate")
    return problems


def metric_problems(spec: SweepSpec) -> list[str]:
    """A classification metric must be a figure of the dataset's label type (binary: auroc, ece, ...).
    Read from the cache's index: a pair not cached yet is refused later, with its `pipe embed` command."""
    o = spec.objective
    if o.task != "classification":
        return []
    cfg = eval_config(spec, "classification", adaptor="none")
    root = cache_root(spec.cache)
    try:
        name = open_dataset(spec.dataset, root, materialise=False, skip_bad_rows=True).name
        items = load_pairs(root, name, spec.dataset, *spec.pairs[0], need_text=False, canonical=canonical_name).items
        labels = resolve_labels(items, cfg.classification.labels, cfg.classification.label_type, spec.dataset)
    except NoLabelsError as e:
        return [f"objective: {e}"]
    except PipeError:
        return []  # not in the cache (yet): the pairs' check says so, with the commands
    keys = labels.kind.table_keys(labels.names)
    if o.metric in keys:
        return []
    return [f"objective: {o.metric!r} is not a figure of {spec.dataset!r}'s classification ({labels.type} over "
            f"{', '.join(labels.names)}); use one of: {', '.join(f'classification@{o.fraction:g}/{k}' for k in keys)}"]


def _edges(params: list[Param]) -> list[dict]:
    base = sample_point(params)
    points = [base]
    for p in params:
        for v in (p.choices or [p.value[1]]):
            points.append({**base, p.key: v})
    return points


def _collect(build: Callable[[], Any], problems: list[str], seen: set[str], prefix: str = "") -> None:
    try:
        build()
    except ConfigError as e:
        for p in e.problems:
            line = f"{prefix}: {p}" if prefix else p
            if line not in seen:
                seen.add(line)
                problems.append(line)
