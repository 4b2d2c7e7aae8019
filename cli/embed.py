"""`pipe embed`: parsing and printing only; the work is in stages/embed/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import app
from cli.common import (CACHE_OPT, COLUMNS_OPT, DEVICE_HELP, JSON_OPT, NO_PATIENTS_OPT, path_or_none, print_json,
                        results_to, user_errors, with_columns)
from core.console import err, escape


@app.command(epilog="Examples:\n\n  pipe embed --dataset demo --backbone tiny-vit --text-encoder minilm\n\n"
                    "  pipe embed --dataset pairs.csv --backbone dinov2-b --text-encoder cxr-bert --views 4 --json")
def embed(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Pairs table (CSV/Parquet), `demo`, or <reader>:<root>."),
    backbone: str = typer.Option(..., "--backbone", "-b", help="Image encoder name (`pipe encoders`), hub id, local dir, or none."),
    text_encoder: str = typer.Option(..., "--text-encoder", "-t", help="Text encoder name, hub id, local dir, or none."),
    cache: Optional[Path] = CACHE_OPT,
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    views: int = typer.Option(0, "--views", min=0, help="Extra seeded augmented views cached per image (with an image encoder's -ssr variant: views a segmentation mask can follow, for seg.augment)."),
    allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 even when some items failed."),
    as_json: bool = JSON_OPT,
    shard_mb: float = typer.Option(64.0, "--shard-mb", min=0.01, help="Target shard size: the unit of work and commit."),
    workers: int = typer.Option(0, "--workers", min=0, help="Start a Dask LocalCluster with N worker processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Use an existing Dask cluster (tcp://host:port)."),
    image_memory_mb: float = typer.Option(2048, "--image-memory-mb", min=1, help="Memory one image may take to decode "
                                          "and resize; larger images (by pixel count or aspect ratio) fail, with the reason."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow an encoder that runs code from its "
                                           "hub repository (cxr-bert); also $PIPE_TRUST_REMOTE_CODE=1."),
    lease_s: Optional[float] = typer.Option(
        None, "--lease-s", min=1.0, help="Lease of a shard claim, renewed every quarter of it while the shard is "
        "written; a crashed writer's shards are taken over once it lapses \\[default: $PIPE_CLAIM_LEASE_S, else 120]."),
    columns: Optional[str] = COLUMNS_OPT,
    no_patients: bool = NO_PATIENTS_OPT,
) -> None:
    """Run each frozen encoder once per distinct image and report, into the cache."""
    from pipeline.encoders.remote import allow_remote_code  # lazy: keeps `pipe --help` fast
    from stages.embed import EmbedConfig, run  # lazy: keeps `pipe --help` fast

    dataset = with_columns(dataset, columns, no_patients)
    cfg = EmbedConfig(dataset=dataset, backbone=backbone, text_encoder=text_encoder, cache=path_or_none(cache),
                      batch_size=batch_size, device=device, allow_failures=allow_failures, views=views,
                      shard_mb=shard_mb, workers=workers, scheduler=scheduler, image_memory_mb=image_memory_mb,
                      lease_s=lease_s)
    if trust_remote_code:
        allow_remote_code()
    with user_errors():
        result = run(cfg)
    print_summary(result, results_to(as_json))
    if as_json:
        print_json(result.summary())
    if result.failed and not allow_failures:
        err.print(f"[red]{escape(str(result.failed))} item(s) failed.[/] Fix them, or pass --allow-failures to accept the rest.")
        raise typer.Exit(1)


# the figures of pipeline/devices.py's peak_memory_mb(), in words (the keys stay in --json)
PEAK_LABELS = {"cpu_peak_mb": "CPU (max resident set)", "gpu_peak_mb": "GPU (max allocated)"}


def print_summary(result, show) -> None:
    t = Table(title=f"pipe embed · {escape(result.dataset)}", title_justify="left")
    for col in ("modality", "encoder", "embedded", "reused", "failed", "store"):
        t.add_column(col, overflow="fold")
    for r in result.results:
        t.add_row(r.modality, escape(r.encoder), str(r.embedded), str(r.reused), str(r.failed), escape(r.store))
    show.print(t)
    if result.failures:
        ft = Table(title=f"{len(result.failures)} failed item(s)", title_justify="left", title_style="red")
        for col in ("modality", "item", "source", "reason"):
            ft.add_column(col, overflow="fold")
        for f in result.failures[:50]:
            ft.add_row(f.get("modality", ""), escape(f.get("item") or ""), escape(f.get("source") or ""),
                       escape(f.get("reason", "")))
        show.print(ft)
        if len(result.failures) > 50:
            err.print(f"... and {len(result.failures) - 50} more; all are in each store's failures/ table.")
    mem = ", ".join(f"{PEAK_LABELS.get(k, k)} {v:,.0f} MiB" for k, v in result.memory.items())
    err.print(f"wall-clock {result.seconds:.1f} s · peak memory {escape(str(mem))}")
