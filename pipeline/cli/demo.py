"""`pipe demo`: the whole pipeline on the built-in phantom data; the work is in stages/demo/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.app import app
from pipeline.cli.common import CACHE_OPT, DEVICE_HELP, path_or_none, user_errors


@app.command(epilog="Example:\n\n  pipe demo --out demo-out")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where results and plots go."),
    cache: Optional[Path] = CACHE_OPT,
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per label fraction."),
    segmentation: bool = typer.Option(True, "--segmentation/--no-segmentation"),
) -> None:
    """The whole pipeline on the built-in phantom data: embed, train the Adaptor, evaluate."""
    from stages.demo import DemoConfig, run  # lazy: keeps `pipe --help` fast

    with user_errors():
        run(DemoConfig(out=str(out), cache=path_or_none(cache), device=device, seeds=seeds,
                       segmentation=segmentation))
