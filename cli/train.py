"""`pipe train-adaptor`: parsing and printing only; the work is in stages/train/."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from stages.train.residency import RESIDENCIES
from cli.common import (CACHE_OPT, COLUMNS_OPT, DEVICE_HELP, JSON_OPT, NO_PATIENTS_OPT, flag_overrides, path_or_none,
                        print_json, results_to, user_errors, with_columns)


Resident = Enum("Resident", {name: name for name in RESIDENCIES}, type=str)  # --resident's choices, from the registry


@app.command("train-adaptor", epilog="Examples:\n\n"
             "  pipe train-adaptor -d demo -b tiny-vit -t minilm epochs=20 adaptor.mode=tokens\n\n"
             "  pipe train-adaptor -d mimic-cxr:/data/mimic -b dinov2-b -t bert --config paper\n\n"
             "A step runs as step=eager (default), step=compile (torch.compile) or step=cuda-graph (one GPU: the "
             "whole step captured and replayed).")
def train_adaptor(
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=1e-4 adaptor.mode=tokens."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="The DATASET given to `pipe embed`. "
                                          "\\[required, unless the --config preset names it]"),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="The image encoder given to `pipe embed`. "
                                           "\\[required, unless the --config preset names it]"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", "-t", help="The text encoder given to `pipe "
                                               "embed`. \\[required, unless the --config preset names it]"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML preset: a file's path, or a preset's name "
                                          "(demo, demo_tokens, paper, adaptor_tokens; .yaml optional)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory \\[default: runs/adaptor-...]."),
    cache: Optional[Path] = CACHE_OPT,
    device: Optional[str] = typer.Option(None, "--device", help=DEVICE_HELP),
    resident: Optional[Resident] = typer.Option(None, "--resident", help="Hold the needed arrays in RAM/GPU, or stream (none)."),
    as_json: bool = JSON_OPT,
    columns: Optional[str] = COLUMNS_OPT,
    no_patients: bool = NO_PATIENTS_OPT,
) -> None:
    """Train the Adaptor from the cache: no backbone forward passes, no image decoding."""
    from pipeline.config import load_config  # lazy: keeps `pipe --help` fast
    from stages.train import TrainConfig, run  # lazy: keeps `pipe --help` fast

    dataset = with_columns(dataset, columns, no_patients)
    flags = flag_overrides(dataset=dataset, backbone=backbone, text_encoder=text_encoder, out=path_or_none(out),
                           cache=path_or_none(cache), device=device, resident=resident.value if resident else None)
    with user_errors():
        cfg = load_config(TrainConfig, config, [*(overrides or []), *flags])
        result = run(cfg)
    if not result.is_main:  # under torchrun, rank 0 reports for all
        return
    best = f" · best (validation loss): {result.best}" if result.best else ""
    results_to(as_json).print(f"checkpoint: {result.checkpoint}{best} · metrics: {result.out / 'metrics.csv'} · "
                              f"curves: {result.out / 'curves.png'}", soft_wrap=True, markup=False)
    if as_json:
        print_json({"out": str(result.out), "checkpoint": str(result.checkpoint),
                    "best": str(result.best) if result.best else None, **result.final})
