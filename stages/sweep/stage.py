"""`pipe sweep`: a grid of Adaptor trainings against the same caches.

    result = run(load_sweep("sweep_demo", ["epochs=5"], cache="cache"))

Like every stage, its entry point is ``run(cfg)``; here the config is a :class:`SweepSpec`
(a sweep file, with extra overrides for every run and the cache to read).

The cached pairs are loaded once and every run of the grid reads them; no encoder is
built. Each run keeps its own directory, so an interrupted sweep resumes where it stopped.
"""
from __future__ import annotations

import csv
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pipeline import resources
from pipeline.config import ConfigError, load_config
from core.errors import MissingFileError
from stages.train import trainer
from stages.train.trainer import TrainConfig, load_training_data

SWEEP_PREFIX = "sweep_"  # the packaged sweep files' names start so: `pipe sweep sweep_demo`
KEYS = {"dataset", "backbone", "text_encoder", "cache", "preset", "overrides", "grid", "out", "metric"}


@dataclass(frozen=True)
class SweepSpec:
    dataset: str
    backbone: str
    text_encoder: str
    grid: dict[str, list]
    preset: str | None = None
    overrides: tuple[str, ...] = ()
    cache: str | None = None
    out: str = "runs/sweep"
    metric: str = "val_i2t_r@10"

    def combos(self) -> list[dict]:
        keys = list(self.grid)
        return [dict(zip(keys, vals)) for vals in itertools.product(*(self.grid[k] for k in keys))]


@dataclass
class SweepResult:
    rows: list[dict] = field(default_factory=list)
    csv: Path | None = None
    items_read: int = 0


def load_sweep(path: Path, extra: list[str] = (), cache: str | None = None) -> SweepSpec:
    """A sweep file; ``extra`` overrides apply to every run, ``cache`` (when given) replaces the file's."""
    path = Path(path)
    if not path.is_file():  # a name of the installed package's sweep files (sweep_demo), or configs/sweep_demo.yaml
        found = resources.find(str(path)) if path.name.startswith(SWEEP_PREFIX) else None
        if found is None:
            raise MissingFileError(f"sweep file {path} does not exist; give a sweep file's path, or a sweep the installed "
                                   f"package holds: {', '.join(n for n in resources.names() if n.startswith(SWEEP_PREFIX))}"
                                   f" (see {resources.find('sweep_demo')} for the format)")
        path = found
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"not valid YAML: {e}"], f"sweep {path}") from None
    if not isinstance(raw, dict):
        raise ConfigError([f"expected a mapping of sweep keys at the top, got {type(raw).__name__}; see "
                           f"{resources.find('sweep_demo')} for the format"], f"sweep {path}")
    problems = [f"{k}: unknown sweep key (valid: {', '.join(sorted(KEYS))})" for k in raw if k not in KEYS]
    problems += [f"{k}: required" for k in ("dataset", "backbone", "text_encoder", "grid") if k not in raw]
    grid = raw.get("grid") or {}
    problems += [f"grid.{k}: expected a list of values" for k, v in grid.items() if not isinstance(v, list) or not v]
    if problems:
        raise ConfigError(problems, f"sweep {path}")
    preset = raw.get("preset")
    if preset and not Path(preset).is_absolute() and not Path(preset).exists():
        preset = str((path.parent / preset)) if (path.parent / preset).exists() else preset
    return SweepSpec(dataset=str(raw["dataset"]), backbone=raw["backbone"], text_encoder=raw["text_encoder"],
                     grid=grid, preset=preset, overrides=tuple(raw.get("overrides") or ()) + tuple(extra),
                     cache=cache or raw.get("cache"), out=raw.get("out", "runs/sweep"),
                     metric=raw.get("metric", "val_i2t_r@10"))


def _slug(combo: dict) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", ",".join(f"{k.split('.')[-1]}={v}" for k, v in combo.items()))


def _override(key: str, value) -> str:
    return f"{key}={json.dumps(value)}"


def run(spec: SweepSpec, on_row=None) -> SweepResult:
    """Train every combination of the grid, each into its own run directory, and tabulate them."""
    cache = spec.cache
    base = [_override("dataset", spec.dataset), _override("backbone", spec.backbone),
            _override("text_encoder", spec.text_encoder)] + ([_override("cache", cache)] if cache else [])
    combos = spec.combos()
    # Validate every combination before training any: a typo in run 7 should not wait an hour.
    cfgs = [load_config(TrainConfig, spec.preset, [*spec.overrides, *[_override(k, v) for k, v in c.items()],
                                                   *base, _override("out", str(Path(spec.out) / f"{i:03d}-{_slug(c)}"))])
            for i, c in enumerate(combos)]
    data = load_training_data(cfgs[0])
    result = SweepResult()
    for combo, cfg in zip(combos, cfgs):
        res = trainer.run(cfg, data=data)
        result.items_read += len(data.items)
        row = {**combo, **{k: v for k, v in res.final.items() if isinstance(v, (int, float))}, "out": str(res.out)}
        result.rows.append(row)
        if on_row:
            on_row(row)
    result.csv = _write_csv(Path(spec.out) / "sweep.csv", result.rows)
    return result


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(keys))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)
    return path
