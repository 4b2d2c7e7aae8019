"""The `pipe` command line: parsing only; the work lives in stages/ and cache/."""
from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.console import err

app = typer.Typer(
    name="pipe", no_args_is_help=True, rich_markup_mode="rich", pretty_exceptions_enable=False,
    help="Parameter-efficient vision-language pre-training on cached frozen-encoder embeddings.",
)
cache_app = typer.Typer(no_args_is_help=True, help="Inspect and check the embedding cache.")
app.add_typer(cache_app, name="cache")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by input, printed as one clear message instead of a traceback."""
    from cache.store import StoreError
    from pipeline.config import ConfigError
    from pipeline.datasets import DatasetError
    from pipeline.encoders import UnknownEncoderError, WeightsNotFoundError
    from pipeline.models.checkpoint import CheckpointMismatchError
    from stages.train.loader import ResidencyError
    from cache.pairs import CacheMissError

    return (StoreError, ConfigError, DatasetError, UnknownEncoderError, WeightsNotFoundError,
            CacheMissError, CheckpointMismatchError, ResidencyError,
            FileNotFoundError, ValueError, PermissionError)


def fail(message: str, code: int = 2) -> None:
    err.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code)


CACHE_OPT = typer.Option(None, "--cache", help="Cache directory [default: $PIPE_CACHE, else ~/.cache/freeze-pipe].")


@app.command(epilog="Examples:\n\n  pipe embed --dataset demo --backbone tiny-vit --text-encoder minilm\n\n"
                    "  pipe embed --dataset pairs.csv --backbone dinov2-b --text-encoder cxr-bert --views 4 --json")
def embed(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Pairs table (CSV/Parquet), `demo`, or <reader>:<root>."),
    backbone: str = typer.Option(..., "--backbone", "-b", help="Image encoder name (`pipe encoders`), hub id, local dir, or none."),
    text_encoder: str = typer.Option(..., "--text-encoder", "-t", help="Text encoder name, hub id, local dir, or none."),
    cache: Optional[Path] = CACHE_OPT,
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    device: Device = typer.Option(Device.auto, "--device"),
    views: int = typer.Option(0, "--views", min=0, help="Extra seeded augmented views cached per image."),
    allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 even when some items failed."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout."),
    shard_mb: float = typer.Option(64.0, "--shard-mb", min=0.01, help="Target shard size: the unit of work and commit."),
    workers: int = typer.Option(0, "--workers", min=0, help="Start a Dask LocalCluster with N worker processes."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Use an existing Dask cluster (tcp://host:port)."),
) -> None:
    """Run each frozen encoder once per distinct image and report, into the cache."""
    from stages.embed.stage import EmbedConfig, run

    cfg = EmbedConfig(dataset=dataset, backbone=backbone, text_encoder=text_encoder,
                      cache=str(cache) if cache else None, batch_size=batch_size, device=device.value,
                      allow_failures=allow_failures, views=views, shard_mb=shard_mb,
                      workers=workers, scheduler=scheduler)
    try:
        result = run(cfg)
    except _user_errors() as e:
        fail(str(e))
    _print_embed_summary(result)
    if as_json:
        print(json.dumps(result.summary()))
    if result.failed and not allow_failures:
        err.print(f"[red]{result.failed} item(s) failed.[/] Fix them, or pass --allow-failures to accept the rest.")
        raise typer.Exit(1)


def _print_embed_summary(result) -> None:
    t = Table(title=f"pipe embed · {result.dataset}", title_justify="left")
    for col in ("modality", "encoder", "embedded", "reused", "failed", "store"):
        t.add_column(col, overflow="fold")
    for r in result.results:
        t.add_row(r.modality, r.encoder, str(r.embedded), str(r.reused), str(r.failed), r.store)
    err.print(t)
    if result.failures:
        ft = Table(title=f"{len(result.failures)} failed item(s)", title_justify="left", title_style="red")
        for col in ("modality", "item", "source", "reason"):
            ft.add_column(col, overflow="fold")
        for f in result.failures[:50]:
            ft.add_row(f.get("modality", ""), f.get("item") or "", f.get("source") or "", f.get("reason", ""))
        err.print(ft)
        if len(result.failures) > 50:
            err.print(f"... and {len(result.failures) - 50} more; all are in each store's failures/ table.")
    mem = ", ".join(f"{k} {v:,.0f} MiB" for k, v in result.memory.items())
    err.print(f"wall-clock {result.seconds:.1f} s · peak memory {mem}")


class Resident(str, Enum):
    auto = "auto"
    ram = "ram"
    gpu = "gpu"
    none = "none"


def _flag_overrides(**flags) -> list[str]:
    """Explicit flags become overrides, so they win over the preset (quoted as YAML strings)."""
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items() if v is not None]


@app.command("train-adaptor", epilog="Examples:\n\n"
             "  pipe train-adaptor -d demo -b tiny-vit -t minilm epochs=20 adaptor.mode=tokens\n\n"
             "  pipe train-adaptor -d mimic-cxr:/data/mimic -b dinov2-b -t bert --config configs/adaptor_paper.yaml\n\n"
             "A step runs as step=eager (default), step=compile (torch.compile) or step=cuda-graph (one GPU: the "
             "whole step captured and replayed).")
def train_adaptor(
    overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. optim.lr=1e-4 adaptor.mode=tokens."),
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d", help="The DATASET given to `pipe embed`."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b"),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", "-t"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="A YAML preset (configs/*.yaml)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run directory [default: runs/adaptor-...]."),
    cache: Optional[Path] = CACHE_OPT,
    device: Optional[Device] = typer.Option(None, "--device"),
    resident: Optional[Resident] = typer.Option(None, "--resident", help="Hold the needed arrays in RAM/GPU, or stream (none)."),
    as_json: bool = typer.Option(False, "--json", help="Print the final metrics as JSON on stdout."),
) -> None:
    """Train the Adaptor from the cache: no backbone forward passes, no image decoding."""
    from pipeline.config import load_config
    from stages.train.trainer import TrainConfig, run

    flags = _flag_overrides(dataset=dataset, backbone=backbone, text_encoder=text_encoder,
                            out=str(out) if out else None, cache=str(cache) if cache else None,
                            device=device.value if device else None, resident=resident.value if resident else None)
    try:
        cfg = load_config(TrainConfig, config, [*(overrides or []), *flags])
        result = run(cfg)
    except _user_errors() as e:
        fail(str(e))
    if not result.is_main:  # under torchrun, rank 0 reports for all
        return
    err.print(f"checkpoint: {result.checkpoint} · metrics: {result.out / 'metrics.csv'} · "
              f"curves: {result.out / 'curves.png'}")
    if as_json:
        print(json.dumps({"out": str(result.out), "checkpoint": str(result.checkpoint), **result.final}))


@app.command(epilog="Example:\n\n  pipe demo --out demo-out")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where results and plots go."),
    cache: Optional[Path] = CACHE_OPT,
    device: Device = typer.Option(Device.auto, "--device"),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per label fraction."),
    segmentation: bool = typer.Option(True, "--segmentation/--no-segmentation"),
) -> None:
    """The whole pipeline on the built-in phantom data: embed, train the Adaptor, evaluate."""
    from stages.demo.stage import DemoConfig, run

    try:
        run(DemoConfig(out=str(out), cache=str(cache) if cache else None, device=device.value, seeds=seeds,
                       segmentation=segmentation))
    except _user_errors() as e:
        fail(str(e))


@app.command()
def encoders(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the registered frozen encoders, their dims, weight source and availability here."""
    from pipeline.encoders import describe_encoders

    rows = describe_encoders()
    if as_json:
        print(json.dumps(rows))
        return
    t = Table(title="frozen encoders", title_justify="left")
    for col in ("name", "modality", "dim", "source", "weights", "available here"):
        t.add_column(col, overflow="fold")
    for r in rows:
        name = r["name"] + ("" if r["trained"] else " [yellow](untrained)")
        avail = "[green]yes[/]" if r["available"] else "[red]no[/]"
        t.add_row(name, r["modality"], str(r["dim"]), r["source"], r.get("hub_id") or "-", f"{avail} {r['where']}")
    err.print(t)


@app.command()
def doctor(cache: Optional[Path] = CACHE_OPT) -> None:
    """Report versions, the device, which encoder weights are present, and the cache location."""
    from pipeline.cli.doctor import run_doctor

    run_doctor(str(cache) if cache else None)


@cache_app.command("ls")
def cache_ls(cache: Optional[Path] = CACHE_OPT, as_json: bool = typer.Option(False, "--json")) -> None:
    """List each store: modality, encoder, fingerprint, items, bytes, path."""
    from cache.inspect import list_stores
    from cache.paths import cache_root

    rows = list_stores(cache_root(cache))
    if as_json:
        print(json.dumps(rows))
        return
    t = Table(title=f"stores in {cache_root(cache)}", title_justify="left")
    for col in ("modality", "encoder", "fingerprint", "items", "failed", "bytes", "path"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["modality"], r["encoder"], r["fingerprint"][:16], f"{r['items']:,}", str(r["failed"]),
                  _human(r["bytes"]), r["path"])
    err.print(t if rows else "no stores yet: run `pipe embed` first.")


@cache_app.command("verify")
def cache_verify(cache: Optional[Path] = CACHE_OPT,
                 store: Optional[Path] = typer.Option(None, "--store", help="Verify only this store directory.")) -> None:
    """Check every committed chunk's checksum and the manifest's consistency."""
    from cache.store import find_stores
    from cache.verify import verify_store
    from cache.paths import cache_root

    stores = [store] if store else find_stores(cache_root(cache))
    if not stores:
        fail(f"no stores under {cache_root(cache)}; run `pipe embed` first or pass --cache.")
    bad = 0
    for path in stores:
        rep = verify_store(path)
        status = "[green]ok[/]" if rep.ok else "[bold red]CORRUPT[/]"
        err.print(f"{status} {path}: {rep.rows:,} rows in {rep.shards} shards")
        for p in rep.problems:
            err.print(f"  [red]✗[/] {p}")
        for w in rep.warnings:
            err.print(f"  [yellow]![/] {w}")
        bad += not rep.ok
    if bad:
        err.print(f"[red]{bad} store(s) failed verification.[/] Remove the damaged store (or the named shard's "
                  "manifest part) and re-run `pipe embed` to rebuild what is missing.")
        raise typer.Exit(1)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


def _register_command_modules() -> None:
    """Commands that live in their own modules add themselves here."""
    import importlib

    for name in ("evaluate", "data", "sweep"):
        module = f"pipeline.cli.{name}"
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


_register_command_modules()


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
