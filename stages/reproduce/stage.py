"""`pipe reproduce TABLE`: a whole table of the paper, from the datasets on disk to the paper's layout.

    pipe reproduce classification --data mimic=/data/mimic-cxr-jpg/2.0.0,rsna=/data/rsna,covidx=/data/covidx \\
        --splits benchx:/src/BenchX/preprocess/datasets
    pipe reproduce classification --plan        # every command, the stores, the disk and the time it needs
    pipe reproduce classification --fidelity    # every setting beside the authors', with its source
    pipe reproduce classification --fixed       # with our fixes of the authors' flaws (runs/paper-fixed)

It orchestrates the other stages, as the sweep and the demo do: ``pipe embed`` once per
dataset and encoder, ``pipe train-adaptor`` once per row (the table's pre-training
recipe), ``pipe evaluate`` once per cell. Everything goes under ``--out``
(``pretrain/<row>/``, ``cells/<row>/<dataset>/<percent>/``, ``table.md``, ``table.json``),
and a re-run skips what is finished (see :mod:`stages.reproduce.steps`), so an
interrupted table resumes where it stopped. The table is written after every cell.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.atomic import atomic_write_text
from cache.paths import cache_root
from core.console import err, escape, section
from pipeline.datasets.shared_splits import parse_split_ref
from core.errors import InputError
from core.jsondata import plain
from pipeline.tables import Table, to_markdown
from stages.reproduce import render
from stages.reproduce.fidelity import Row
from stages.reproduce.fidelity import fidelity as fidelity_rows
from stages.reproduce.missing import Missing, missing
from stages.reproduce.spec import DATASETS, Substitutions, load_table
from stages.reproduce.steps import (EMBED_DINOV2S_PER_S, TRAIN_POOLED_PER_S, Context, Step, build_steps, embed_rate,
                                    cell_dir, dataset_specs)


@dataclass(frozen=True)
class ReproduceConfig:
    table: str                                          # a name in configs/paper/, or a table spec's path
    data: dict[str, str] = field(default_factory=dict)  # mimic / rsna / siim / covidx -> folder or reader spec
    splits: dict[str, str] = field(default_factory=dict)  # dataset (or "*") -> benchx:DIR, mgca[:DIR]
    out: str = "runs/paper"
    cache: str | None = None
    device: str = "auto"
    only: tuple[str, ...] = ()                          # cell ids or id prefixes (with what they need)
    substitute: dict[str, str] = field(default_factory=dict)   # encoder -> the encoder that runs instead
    pretrain_overrides: tuple[str, ...] = ()
    eval_overrides: tuple[str, ...] = ()
    fixed: bool = False                                 # our fixes of the authors' flaws (the table's `fixed:`)


@dataclass
class ReproduceResult:
    out: Path
    steps: list[Step]
    tables: list[Table]
    ran: list[str] = field(default_factory=list)        # ids of the steps run now
    seconds: float = 0.0
    missing: list[Missing] = field(default_factory=list)  # what the steps to run need and this machine lacks

    def summary(self) -> dict:
        return {"out": str(self.out), "ran": self.ran, "steps": [s.summary() for s in self.steps],
                "tables": [t.to_dict() for t in self.tables], "seconds": round(self.seconds, 1),
                "missing": [m.summary() for m in self.missing]}


def context(cfg: ReproduceConfig) -> Context:
    spec = load_table(cfg.table)
    if cfg.fixed:
        spec = spec.with_fixes()
    pre = (*spec.fixed.pretrain, *cfg.pretrain_overrides) if cfg.fixed else cfg.pretrain_overrides
    evals = (*spec.fixed.eval, *cfg.eval_overrides) if cfg.fixed else cfg.eval_overrides
    unknown = sorted(set(cfg.data) - set(DATASETS)) + sorted(set(cfg.splits) - set(DATASETS) - {"*"})
    if unknown:
        raise InputError(f"--data/--splits name {', '.join(unknown)}; the datasets are {', '.join(DATASETS)}")
    for value in cfg.splits.values():
        try:
            parse_split_ref(value)
        except ValueError as e:
            raise InputError(f"--splits {value}: {e}") from None
    return Context(spec=spec, root=cache_root(cfg.cache), out=Path(cfg.out),
                   data=dataset_specs(spec, cfg.data, cfg.splits), device=cfg.device, cache_arg=cfg.cache,
                   substitute=Substitutions(dict(cfg.substitute)), pretrain_overrides=list(pre),
                   eval_overrides=list(evals), only=list(cfg.only))


def plan(cfg: ReproduceConfig) -> ReproduceResult:
    """The steps, their state and cost; nothing is run."""
    ctx = context(cfg)
    steps = build_steps(ctx)
    return ReproduceResult(ctx.out, steps, report_tables(ctx), missing=missing(ctx, steps))


def fidelity(cfg: ReproduceConfig) -> list[Row]:
    """Every setting of the table as it would run beside the authors' (``--fidelity``); runs nothing."""
    return fidelity_rows(context(cfg), cfg.fixed)


def run(cfg: ReproduceConfig) -> ReproduceResult:
    t0 = time.perf_counter()
    ctx = context(cfg)
    steps = build_steps(ctx)
    blocked = [s for s in steps if not s.done and s.run is None]
    if blocked:
        raise InputError(f"{len(blocked)} step(s) cannot run, e.g. {blocked[0].id}: {blocked[0].status}. Give "
                         "--data for every dataset they read, or --only the cells you have data for "
                         "(`--plan` lists each step's state)")
    lacking = missing(ctx, steps)
    if any(m.blocks for m in lacking):
        raise InputError("before this table can run, these are missing here (nothing was run):\n"
                         + "\n".join(f"  - {m.message}" for m in lacking) + "\n`--plan` lists every step.")
    for m in lacking:
        err.print(f"[yellow]warning:[/] {escape(m.message)}", soft_wrap=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in steps if not s.done]
    err.print(f"reproduce {escape(ctx.spec.name)}: {len(steps)} steps, {len(steps) - len(todo)} done already, "
              f"{len(todo)} to run · out {escape(str(ctx.out))}")
    ran = []
    for i, step in enumerate(todo, 1):
        section(f"{i}/{len(todo)} {step.id} ({step.status})")
        step.run()
        ran.append(step.id)
        if step.kind == "evaluate":
            write_table(ctx)
    tables = write_table(ctx)
    return ReproduceResult(ctx.out, steps, tables, ran, time.perf_counter() - t0)


def report_tables(ctx: Context) -> list[Table]:
    dirs = {c.id: cell_dir(ctx, c) for c in ctx.spec.cells()}
    return render.tables(ctx.spec, render.load_cells(ctx.spec, dirs), ctx.substitute.label)


def write_table(ctx: Context) -> list[Table]:
    """table.md and table.json from the cells finished so far."""
    tables = report_tables(ctx)
    ctx.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(ctx.out / "table.md", f"# {ctx.spec.title}\n\n" + "\n".join(to_markdown(t) for t in tables))
    atomic_write_text(ctx.out / "table.json", json.dumps(plain({"table": ctx.spec.name,
                                                                 "tables": [t.to_dict() for t in tables]}), indent=1))
    return tables


def throughput_note() -> str:
    """Where --plan's times come from (README, Benchmarks), said with the plan."""
    rates = ", ".join(f"{k} {embed_rate(k):.1f}/s" for k in ("dinov2-s", "dinov2-b", "resnet-ae", "bert"))
    return (f"Times: from the figures measured here on a 2-core CPU (README, Benchmarks): `pipe embed` of a "
            f"DINOv2-S-sized ViT {EMBED_DINOV2S_PER_S} img/s, other encoders scaled by the forward cost per item "
            "their configs carry (`pipe encoders`, GFLOPs) "
            f"({rates}; BERT's holds for every BERT-base); pooled Adaptor training {TRAIN_POOLED_PER_S:.0f} "
            "samples/s per epoch. No GPU figure has been measured yet, so on a GPU these are upper bounds. "
            "Evaluation cells are not estimated (no benchmark of head training).")
