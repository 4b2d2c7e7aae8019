"""`pipe demo`: the whole pipeline on the built-in phantom data; the work is in stages/demo/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from cli.common import CACHE_OPT, DEVICE_HELP, JSON_OPT, path_or_none, print_json, results_to, user_errors


@app.command(epilog="Examples:\n\n  pipe demo --out demo-out\n\n"
                    "  pipe demo --n 500 --backbone tiny-vit --no-segmentation --json")
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out", "-o", help="Where results and plots go."),
    n: Optional[int] = typer.Option(None, "--n", "-n", min=10, help="Phantom image/report pairs to generate "
                                    "\\[default: the demo's own, 2,000]."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Image encoder \\[default: the demo's]."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", "-t", help="Text encoder \\[default: the demo's]."),
    cache: Optional[Path] = CACHE_OPT,
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    seeds: int = typer.Option(3, "--seeds", min=1, help="Seeds per label fraction."),
    segmentation: bool = typer.Option(True, "--segmentation/--no-segmentation"),
    as_json: bool = JSON_OPT,
) -> None:
    """The whole pipeline on the built-in phantom data: embed, train the Adaptor, evaluate."""
    from stages.demo import DemoConfig, run  # lazy: keeps `pipe --help` fast
    from stages.evaluate.tables import to_rich  # lazy: keeps `pipe --help` fast

    chosen = {k: v for k, v in {"backbone": backbone, "text_encoder": text_encoder}.items() if v}
    if n is not None:
        chosen["dataset"] = f"demo?n={n}"
    with user_errors():
        result = run(DemoConfig(out=str(out), cache=path_or_none(cache), device=device, seeds=seeds,
                                segmentation=segmentation, **chosen))
    show = results_to(as_json)
    for t in result.tables:
        show.print(to_rich(t))
    if as_json:
        print_json(result.summary())
