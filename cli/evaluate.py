"""`pipe evaluate` and `pipe report`: parsing only; the work is in stages/evaluate/."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from cli.common import (CACHE_OPT, COLUMNS_OPT, DEVICE_HELP, JSON_OPT, NO_PATIENTS_OPT, fail, flag_overrides,
                        print_json, results_to, user_errors, with_columns)
from core.console import err, escape
from core.console import out as out_console
from stages.evaluate.tasks import TASKS
from stages.report.formats import REPORT_FORMATS, for_file

Task = Enum("Task", {name: name for name in TASKS}, type=str)  # the choices of --task, from the registry
ReportFormat = Enum("ReportFormat", {name: name for name in REPORT_FORMATS}, type=str)  # --format's, from its registry


EVALUATE_EPILOG = """Examples:

  pipe evaluate --task classification -d demo --adaptor runs/adaptor-demo/last.safetensors --fraction 0.01 0.1 1.0

  pipe evaluate --task classification -d demo --adaptor none -b tiny-vit --head linear --seeds 5

  pipe evaluate --task classification -d demo -a runs/adaptor-demo heads.lrs=[1e-3,5e-4,1e-4] --baseline

  pipe evaluate --task segmentation -d demo -a runs/adaptor-demo seg.target=pneumothorax

  pipe evaluate --task retrieval -d demo -a runs/adaptor-demo

  pipe evaluate --task zero-shot -d demo -a runs/adaptor-demo zero_shot.prompts=chest_xray

  pipe evaluate --task retrieval -d pairs.csv --adaptor native -b biomedclip -t biomedclip

Bare numbers after the options are label fractions too, so `--fraction 0.01 0.1 1.0` works.

What it costs: every seed x fraction trains its heads again, for at least 500 and at most 3,000 optimiser steps (heads.min_steps/heads.max_steps, seg.min_steps/seg.max_steps; a validation round stops a head early). A classification head step takes milliseconds, and `--head probe` (a linear probe solved by L-BFGS) fits in a few dozen full-batch iterations per L2 strength. A segmentation decoder step at the defaults takes about 2.3 s on one CPU core (DINOv2-S geometry, bench/seg_steps.py), so segmentation's defaults (3 seeds x 1%, 10%, 100%: up to 10,900 steps for 1,400 training images, 17,300 for 12,000) are GPU work: hours on a CPU. On a CPU, try `--seeds 1 --fraction 1.0 seg.max_steps=300`. `make gpu-check` records a GPU's time per step beside the CPU's."""


def split_fractions(fraction: list[str], args: list[str]) -> tuple[list[float] | None, list[str]]:
    """Fractions from ``--fraction`` (repeated or comma-separated) and bare numbers among the
    arguments; the remaining arguments are key=value overrides."""
    values, overrides = [], []
    for token in [t for f in fraction for t in f.split(",") if t.strip()]:
        values.append(_fraction(token))
    for a in args:
        if "=" in a:
            overrides.append(a)
        else:
            values.append(_fraction(a, extra=True))
    return (values or None), overrides


def _fraction(token: str, extra: bool = False) -> float:
    try:
        return float(token)
    except ValueError:
        what = "argument" if extra else "--fraction value"
        raise typer.BadParameter(f"{what} {token!r} is neither a label fraction (e.g. 0.1) nor a key=value "
                                 "override (e.g. heads.lrs=[1e-3,5e-4])") from None


@app.command(epilog=EVALUATE_EPILOG)
def evaluate(
    args: list[str] = typer.Argument(None, help="Dotted key=value overrides (e.g. heads.lrs=[1e-3,5e-4] "
                                                "seg.epochs=10), and further label fractions."),
    task: Task = typer.Option(..., "--task", help="What to evaluate."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="The DATASET given to `pipe embed`."),
    adaptor: str = typer.Option(..., "--adaptor", "-a",
                                help="An Adaptor checkpoint (or its run directory), `none` for the "
                                     "frozen backbone's own features, or `native` for a CLIP-style pair's own "
                                     "joint space (biomedclip, medsiglip)."),
    fraction: list[str] = typer.Option([], "--fraction", "-f", help="Label fractions of the training split "
                                       "\\[default: 0.01 0.1 1.0]; nested 1% ⊂ 10% ⊂ 100%."),
    head: list[str] = typer.Option([], "--head", help="Classification head(s): mlp (the paper's), linear, "
                                        "and/or probe (a linear probe solved by L-BFGS) \\[default: mlp]."),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="Seeds per fraction: each trains every head "
                                  "again (the cost grows with it) \\[default: 3]."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Needed with --adaptor none or native."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", "-t",
                                               help="Needed with --adaptor none or native for retrieval/zero-shot."),
    baseline: bool = typer.Option(False, "--baseline", help="Also evaluate the raw backbone features (and, for a "
                                  "pair with a joint space, its native vectors)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML preset of evaluate settings: a file's "
                                          "path, or a recipe the installed package holds (paper/rsna_classification)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory "
                                       "\\[default: results/<task>-<dataset>-<method>-<time>]."),
    cache: Optional[Path] = CACHE_OPT,
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    as_json: bool = JSON_OPT,
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow a text encoder that runs code "
                                           "from its hub repository (cxr-bert) for the prompts; also "
                                           "$PIPE_TRUST_REMOTE_CODE=1."),
    columns: Optional[str] = COLUMNS_OPT,
    no_patients: bool = NO_PATIENTS_OPT,
) -> None:
    """Train and score downstream heads from the cache: classification, segmentation, retrieval, zero-shot."""
    if trust_remote_code:
        from pipeline.encoders.remote import allow_remote_code  # lazy: keeps `pipe --help` fast

        allow_remote_code()
    fractions, overrides = split_fractions(fraction, args or [])
    dataset = with_columns(dataset, columns, no_patients)
    flags = flag_overrides(task=task.value, dataset=dataset, adaptor=adaptor, backbone=backbone,
                            text_encoder=text_encoder, seeds=seeds, out=str(out) if out else None,
                            cache=str(cache) if cache else None, device=device)
    if fractions:
        flags.append(f"fractions={json.dumps(fractions)}")
    if head:
        flags.append(f"heads.kinds={json.dumps(head)}")
    if baseline:
        flags.append("baseline=true")
    _run(config, [*overrides, *flags], as_json)


def _run(config: Optional[Path], overrides: list[str], as_json: bool) -> None:
    from pipeline.config import load_config  # lazy: keeps `pipe --help` fast
    from stages.evaluate import EvalConfig, run  # lazy: keeps `pipe --help` fast
    from stages.evaluate.tables import to_rich  # lazy: keeps `pipe --help` fast

    with user_errors():
        result = run(load_config(EvalConfig, config, overrides))
    show = results_to(as_json)
    for t in result.tables:
        show.print(to_rich(t))
    err.print(f"results: {result.out / 'results.json'} · table: {result.out / 'results.md'} · "
              f"plots: {', '.join(result.record.plots)}", markup=False, soft_wrap=True)
    if as_json:
        print_json({"out": str(result.out), "tables": [t.to_dict() for t in result.tables]})


REPORT_EPILOG = """Examples:

  pipe report results/classification-*

  pipe report demo-out --html report.html          (one page: tables, curves, ROC, overlays, examples)

  pipe report results/run-a results/run-b > table.md

  pipe report results/run-a results/run-b --format csv --out table.csv"""


@app.command(epilog=REPORT_EPILOG)
def report(
    runs: list[Path] = typer.Argument(..., help="Run directories of `pipe evaluate` (each has results.json), "
                                                "Adaptor training runs (metrics.csv), folders of runs "
                                                "(e.g. demo-out), or a sweep's folder (`pipe sweep`'s out)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write one self-contained HTML page of the runs here: "
                                        "tables, training curves, ROC and calibration, segmentation overlays, "
                                        "retrieval examples, the data card and provenance."),
    fmt: Optional[ReportFormat] = typer.Option(None, "--format", help="How the tables are printed on stdout "
                                               "\\[default: table on a terminal, md otherwise]."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Also write the tables to this file, as --format "
                                       "says, else as its suffix says (.csv, .json; markdown otherwise)."),
    as_json: bool = JSON_OPT,
) -> None:
    """Gather runs into one table per metric (rows: methods; columns: fractions), or into one HTML page."""
    from core.atomic import atomic_write_text  # lazy: keeps `pipe --help` fast
    from stages.evaluate.tables import to_rich  # lazy: keeps `pipe --help` fast
    from stages.report import load_runs, merged_tables, write_page  # lazy: as above
    from stages.report.sweep_page import is_sweep_folder, top_runs, write_sweep_page  # lazy: as above

    sweeps = [p for p in runs if is_sweep_folder(p)]
    if sweeps and html:  # a sweep's folder: its own page (the trials ranked, the parameters' effects, its best)
        if len(runs) > 1:
            fail("a sweep's page draws one sweep folder: name it alone (pipe report OUT --html page.html)")
        with user_errors():
            page = write_sweep_page(sweeps[0], html)
        err.print(f"wrote {escape(str(page))} (open it in a browser)")
        return
    runs = [q for p in runs for q in (top_runs(p) or [p] if p in sweeps else [p])]  # a sweep's tables: its best trials
    with user_errors():
        loaded = load_runs(runs)
    if not loaded.evals and not html:
        fail("no evaluation runs among the paths (only Adaptor trainings): name run directories of "
             "`pipe evaluate`, or pass --html to draw the training curves")
    tables = merged_tables(loaded)
    chosen = REPORT_FORMATS[fmt.value] if fmt else None
    if out:
        with user_errors():
            out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out, for_file(chosen, out).render(loaded, tables))
        err.print(f"wrote {escape(str(out))}")
    if html:
        with user_errors():
            page = write_page(loaded, html)
        err.print(f"wrote {escape(str(page))} (open it in a browser)")
    shown = REPORT_FORMATS["json"] if as_json else chosen or REPORT_FORMATS["table" if sys.stdout.isatty() else "md"]
    if shown.terminal:
        for t in tables:
            out_console.print(to_rich(t))
    elif tables or shown.always:
        sys.stdout.write(shown.render(loaded, tables))
