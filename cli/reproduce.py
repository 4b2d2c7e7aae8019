"""`pipe reproduce`: parsing and printing only; the work is in stages/reproduce/."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from cli.common import CACHE_OPT, DEVICE_HELP, JSON_OPT, fail, human_bytes, path_or_none, print_json, \
    results_to, user_errors
from core.console import err, plain
from core.console import out as stdout_console

EPILOG = """Examples:

  pipe reproduce classification --plan

  pipe reproduce classification --data mimic=/data/mimic-cxr-jpg/2.0.0,rsna=/data/rsna,covidx='/data/covidx?version=v9A'

  pipe reproduce segmentation --data siim=/data/siim-png,rsna=/data/rsna --splits benchx:/src/BenchX/preprocess/datasets

  pipe reproduce classification --only dinov2-b+bert/rsna --report

  pipe reproduce classification --fidelity          # every setting beside the authors', with its source

  pipe reproduce segmentation --fixed --data siim=/data/siim,rsna=/data/rsna   # our fixes of their flaws"""


def _pairs(values: list[str] | None, what: str, bare: str | None = None) -> dict[str, str]:
    """``a=x,b=y`` (repeatable) as a dict; with ``bare``, an item without ``key=`` is stored under it."""
    out = {}
    for item in (v for value in values or [] for v in value.split(",") if v.strip()):
        key, eq, val = item.partition("=")
        if not eq or ":" in key:
            if bare is None:
                fail(f"{what} {item!r}: expected NAME=VALUE, e.g. {what} rsna=/data/rsna")
            key, val = bare, item
        out[key.strip()] = val.strip()
    return out


@app.command(epilog=EPILOG)
def reproduce(
    table: str = typer.Argument(..., help="A table of the paper: classification or segmentation "
                                "(configs/paper/), or a table spec's path."),
    data: Optional[list[str]] = typer.Option(None, "--data", help="Where each dataset is, NAME=FOLDER, "
                                             "comma-separated or repeated: mimic, rsna, siim, covidx. A reader spec "
                                             "with options works too (covidx='/data/covidx?version=v9A')."),
    splits: Optional[list[str]] = typer.Option(None, "--splits", help="Split files others published: "
                                               "benchx:DIR (every dataset BenchX covers; DIR holds RSNA/, SIIM/, "
                                               "COVIDx/), or NAME=benchx:DIR, NAME=mgca[:DIR]. mgca is the "
                                               "authors' (the segmentation table then reads MGCA's detection "
                                               "split for RSNA, as theirs did)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Where the runs, cells and table go "
                                       "(runs/paper; runs/paper-fixed with --fixed)."),
    plan: bool = typer.Option(False, "--plan", help="List every step with its command, state, stores, disk and "
                              "time; run nothing."),
    report: bool = typer.Option(False, "--report", help="Print the table from the finished cells; run nothing."),
    fidelity: bool = typer.Option(False, "--fidelity", help="Every setting of every stage beside the authors' "
                                  "value and its source (file:line@commit), and why where they differ; run "
                                  "nothing. Exits 1 on a difference with no documented reason."),
    fixed: bool = typer.Option(False, "--fixed", help="Our fixes of the authors' flaws instead of their recipe "
                               "(the table's `fixed:` overrides); the runs go to runs/paper-fixed by default."),
    only: Optional[list[str]] = typer.Option(None, "--only", help="Only these cells (ids or prefixes such as "
                                             "dinov2-b+bert/rsna), with the steps they need."),
    substitute: Optional[list[str]] = typer.Option(None, "--substitute", help="ENC=OTHER: run OTHER where the "
                                                   "table names ENC (the tests: dinov2-s=tiny-vit,bert=tiny-bert)."),
    pretrain_set: Optional[list[str]] = typer.Option(None, "--pretrain-set", help="key=value for every "
                                                     "pre-training (e.g. epochs=1)."),
    eval_set: Optional[list[str]] = typer.Option(None, "--eval-set", help="key=value for every evaluation "
                                                 "(e.g. seeds=1)."),
    cache: Optional[Path] = CACHE_OPT,
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = JSON_OPT,
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow the encoders that run code from "
                                           "their hub repository (cxr-bert); also $PIPE_TRUST_REMOTE_CODE=1."),
) -> None:
    """Reproduce a table of the paper: embed, pre-train each row's Adaptor, evaluate each cell; resumable."""
    from pipeline.encoders.remote import allow_remote_code  # lazy: keeps `pipe --help` fast
    from stages.reproduce import stage  # lazy: keeps `pipe --help` fast

    if trust_remote_code:
        allow_remote_code()
    out = out or Path("runs/paper-fixed" if fixed else "runs/paper")
    cfg = stage.ReproduceConfig(table=table, data=_pairs(data, "--data"), splits=_pairs(splits, "--splits", "*"),
                                out=str(out), cache=path_or_none(cache), device=device, only=tuple(only or ()),
                                substitute=_pairs(substitute, "--substitute"),
                                pretrain_overrides=tuple(pretrain_set or ()), eval_overrides=tuple(eval_set or ()),
                                fixed=fixed)
    if fidelity:
        return _fidelity(stage, cfg, as_json)
    with user_errors():
        result = stage.plan(cfg) if plan or report else stage.run(cfg)
    _show(stage, result, plan, as_json)


def _show(stage, result, plan: bool, as_json: bool) -> None:
    """The plan (steps, totals, what is missing) or the tables; the summary as JSON with --json."""
    from stages.evaluate.tables import to_rich  # lazy: keeps `pipe --help` fast

    show = results_to(as_json)
    if plan:
        _print_plan(show, result.steps, stage.throughput_note(), result.missing)
    else:
        for t in result.tables:
            show.print(to_rich(t))
    if as_json:
        print_json(result.summary())


def _fidelity(stage, cfg, as_json: bool) -> None:
    """The fidelity table: a Markdown table off a terminal, a rich one on it; JSON with --json."""
    from rich.table import Table  # lazy: keeps `pipe --help` fast
    from stages.reproduce.fidelity import as_text  # lazy: keeps `pipe --help` fast

    with user_errors():
        rows = stage.fidelity(cfg)
    undocumented = [r for r in rows if r.undocumented]
    if as_json:
        print_json([r.summary() for r in rows])
    else:
        variant = "with our fixes (--fixed)" if cfg.fixed else "the authors' recipe"
        title = f"{cfg.table}: ours ({variant}) beside the authors', setting by setting"
        note = (f"{len(rows)} settings; {sum(r.differs for r in rows)} differ, each with its reason; "
                f"{len(undocumented)} without one.")
        header = ["stage", "key", "ours", "authors", "source", "deliberate", "why"]
        lines = [[r.stage, r.key, as_text(r.ours), as_text(r.authors), r.source,
                  ("yes" if r.deliberate else "NO") if r.differs else "", r.why] for r in rows]
        if sys.stdout.isatty():
            t = Table(title=plain(title), title_justify="left", caption=plain(note), caption_justify="left")
            for h in header:
                t.add_column(h, overflow="fold")
            for line in lines:
                t.add_row(*(plain(x) for x in line))
            stdout_console.print(t)
        else:
            md = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|---|" + "---|" * (len(header) - 1)]
            md += ["| " + " | ".join(line) + " |" for line in lines]
            print("\n".join(md + ["", f"_{note}_"]) + "\n")
    if undocumented:
        fail(f"{len(undocumented)} setting(s) differ from the authors' with no documented reason: "
             + ", ".join(f"{r.stage} {r.key}" for r in undocumented[:5])
             + ". Set them as theirs, or say why in the table's authors file", code=1)


def _print_plan(show, steps, throughput: str, missing) -> None:
    """Every step in run order: its id (what --only takes), state, disk and time, then its command and
    the stores or folder it writes; then the totals and what this machine lacks."""
    show.print("plan, in order (an id, or a prefix such as dinov2-b+bert/rsna, is what --only takes):",
               markup=False)
    for s in steps:
        cost = " · ".join(x for x in (human_bytes(s.disk) if s.disk else "", _duration(s.seconds)
                                      if s.seconds is not None else "") if x)
        show.print(f"\n{s.id}  [{s.status}]" + (f"  {cost}" if cost else ""), markup=False, soft_wrap=True)
        show.print(f"  {s.command}", markup=False, soft_wrap=True)
        where = "; ".join(s.stores) if s.stores else (f"-> {s.out}" if s.out else "")
        if where:
            show.print(f"  {where}", markup=False, soft_wrap=True)
    _totals(steps, throughput)
    _print_missing(missing)


def _totals(steps, note: str) -> None:
    todo = [s for s in steps if not s.done]
    seconds = sum(s.seconds or 0 for s in todo)
    unknown = sum(s.seconds is None for s in todo)
    err.print(f"{len(todo)} of {len(steps)} steps to run · disk to add {human_bytes(sum(s.disk for s in todo))} · "
              f"time about {_duration(seconds)}" + (f" plus {unknown} step(s) not estimated" if unknown else ""),
              markup=False, soft_wrap=True)
    err.print(note, markup=False, soft_wrap=True)


def _print_missing(missing) -> None:
    """What the plan needs and this machine lacks (weights, data, disk, flags): before anything runs."""
    if not missing:
        err.print("nothing is missing here: every encoder's weights, dataset folder and flag the steps need is "
                  "present, and the disk has room.", markup=False, soft_wrap=True)
        return
    err.print(f"\nmissing here ({len(missing)}), to fix before running:", markup=False)
    for m in missing:
        err.print(f"  - {m.message}", markup=False, soft_wrap=True)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
