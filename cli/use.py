"""`pipe predict` and `pipe export`: a trained Adaptor on new images, and as a package to share.

Parsing and printing only; the work is in :mod:`pipeline.api`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cli.app import app
from cli.common import CACHE_OPT, DEVICE_HELP, JSON_OPT, print_json, results_to, user_errors
from core.console import err, escape, out, plain

PREDICT_EPILOG = """Examples:

  pipe predict chest1.png chest2.dcm --adaptor demo-out/adaptor-pooled

  pipe predict scans/*.png -a exported/ --head adaptor-mlp --bank demo --bank-split train -k 3

  pipe predict new.png -a runs/mine --head results/classification-mine --json

Per image: the zero-shot probability of each finding in the prompts file, a classification head's
output (--head: a head file, an evaluation run's folder, or a head shipped in a package) and the
nearest reports of a bank (--bank: a dataset in the cache, a CSV/Parquet table with a `report`
column, or a text file with one report per line). An image that cannot be read is listed with
the reason, the others are predicted, and the exit code is 1 (0 with --allow-failures)."""


@app.command(epilog=PREDICT_EPILOG)
def predict(
    images: list[Path] = typer.Argument(..., help="Image files: PNG, JPEG, TIFF, DICOM (.dcm, with or without preamble)."),
    adaptor: str = typer.Option(..., "--adaptor", "-a", help="A `pipe train-adaptor` run folder (its best.safetensors), "
                                "a checkpoint, or a package written by `pipe export`."),
    prompts: Optional[str] = typer.Option(None, "--prompts", help="Zero-shot prompts: a name in configs/prompts/ or a "
                                          "YAML path \\[default: the package's own, else chest_xray]."),
    zero_shot: bool = typer.Option(True, "--zero-shot/--no-zero-shot", help="Score the prompts' findings."),
    head: Optional[str] = typer.Option(None, "--head", help="A classification head: a file, an evaluation run's folder "
                                       "(its heads/), or the name of a head in the package."),
    bank: Optional[str] = typer.Option(None, "--bank", help="Reports to retrieve from: a dataset in the cache (as given "
                                       "to `pipe embed`), a table with a `report` column, or a text file."),
    bank_split: Optional[str] = typer.Option(None, "--bank-split", help="Only this split of the bank (e.g. train)."),
    top_k: int = typer.Option(3, "--top-k", "-k", min=1, help="Reports per image from the bank."),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per encoder forward."),
    image_encoder: Optional[str] = typer.Option(None, "--image-encoder", help="Another name or a local directory "
                                                "for the image encoder's weights (they must be the same weights)."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder", help="The same for the text encoder."),
    allow_failures: bool = typer.Option(False, "--allow-failures", help="Exit 0 even when some images cannot be read."),
    cache: Optional[Path] = CACHE_OPT,
    device: str = typer.Option("auto", "--device", help=DEVICE_HELP),
    as_json: bool = JSON_OPT,
) -> None:
    """Predict new images with a trained Adaptor: zero-shot findings, a head's output, the nearest reports."""
    from pipeline.api import load_adaptor, predict as run_predict  # lazy: keeps `pipe --help` fast

    with user_errors():
        model = load_adaptor(adaptor, device, image_encoder=image_encoder, text_encoder=text_encoder)
        reports = model.report_bank(bank, split=bank_split, cache=cache) if bank else None
        result = run_predict(model, [str(p) for p in images], prompts=prompts, zero_shot=zero_shot, head=head,
                             bank=reports, k=top_k, batch_size=batch_size)
    if not as_json:  # with --json, the object on stdout is the whole result: no tables anywhere
        _show_predictions(result, out)
    for r in result.failed:
        err.print(f"[bold red]error:[/] {escape(r['error'])}", soft_wrap=True)
    if as_json:
        print_json({"adaptor": str(model.source.path), "mode": model.mode.name, "findings": result.findings,
                    "head": result.head, "images": result.records, "failed": len(result.failed)})
    if result.failed and not allow_failures:
        err.print(f"{len(result.failed)} of {len(result.records)} images could not be read; the others were "
                  "predicted (--allow-failures exits 0)")
        raise typer.Exit(1)


def _show_predictions(result, show) -> None:
    from rich.table import Table  # lazy: keeps `pipe --help` fast

    cols = [f"{f} (zero-shot)" for f in result.findings] + [f"{lab} ({result.head})" for lab in result.head_labels]
    t = Table(title=plain("per image: probability, %"), title_justify="left")
    for c in ["image", *cols]:
        t.add_column(plain(c), justify="left" if c == "image" else "right", overflow="fold")
    for r in result.records:
        if r["error"]:
            t.add_row(plain(r["image"]), *([plain("error")] + [plain("")] * (len(cols) - 1) if cols else []))
            continue
        values = [r["zero_shot"][f]["probability"] for f in result.findings] + \
                 [r["head"][lab] for lab in result.head_labels]
        t.add_row(plain(r["image"]), *(plain(f"{100 * v:.1f}") for v in values))
    if cols:
        show.print(t)
    if any(r.get("reports") for r in result.records):
        show.print(_reports_table(result))


def _reports_table(result):
    from rich.table import Table  # lazy: keeps `pipe --help` fast

    t = Table(title=plain("nearest reports (cosine similarity)"), title_justify="left")
    for c in ("image", "rank", "id", "similarity", "report"):
        t.add_column(plain(c), overflow="fold")
    for r in result.records:
        for hit in r.get("reports") or []:
            t.add_row(plain(r["image"]), str(hit["rank"]), plain(hit["id"]), f"{hit['similarity']:.3f}",
                      plain(hit["report"]))
    return t


EXPORT_EPILOG = """Examples:

  pipe export demo-out/adaptor-pooled --out exported/adaptor-pooled

  pipe export runs/mine --out exported/mine --heads results/classification-mine --license cc-by-nc-4.0

The folder (config.json, model.safetensors, README.md model card, prompts.yaml, heads/) loads with
`load_adaptor` and `pipe predict --adaptor DIR` without the cache. Publish it with
`hf upload ORG/NAME DIR .` (nothing is uploaded by this command)."""


@app.command(epilog=EXPORT_EPILOG)
def export(
    run: Path = typer.Argument(..., help="A `pipe train-adaptor` run folder (its best.safetensors) or a checkpoint."),
    out: Path = typer.Option(..., "--out", "-o", help="The package folder: new, empty, or an earlier export."),
    heads: list[Path] = typer.Option([], "--heads", help="Classification heads to ship: head files or evaluation "
                                     "runs' folders (their heads/). Repeatable."),
    results: list[Path] = typer.Option([], "--results", help="Evaluation runs whose tables go into the model card "
                                       "\\[default: those of this checkpoint beside the run folder and in results/]."),
    prompts: str = typer.Option("chest_xray", "--prompts", help="The zero-shot prompts to ship (a name or a YAML path)."),
    license: str = typer.Option("other", "--license", help="The licence id in the model card (e.g. cc-by-nc-4.0) "
                                "\\[default: other, research only]."),
    cache: Optional[Path] = CACHE_OPT,
    as_json: bool = JSON_OPT,
) -> None:
    """Export a trained Adaptor as a self-contained package in the Hugging Face layout, with a model card."""
    from pipeline.api import export_adaptor  # lazy: keeps `pipe --help` fast

    with user_errors():
        res = export_adaptor(run, out, heads=heads, results=results, prompts=prompts, license=license, cache=cache)
    show = results_to(as_json)
    show.print(f"exported {run} to {res.out}: {', '.join(res.files)}", markup=False, soft_wrap=True)
    show.print(f"model card results from: {', '.join(res.results) or 'none found'}", markup=False, soft_wrap=True)
    err.print(f"publish with: hf upload ORG/NAME {res.out} .", markup=False, soft_wrap=True)
    if as_json:
        print_json({"out": str(res.out), "files": res.files, "results": res.results, "heads": res.heads,
                    "config": json.loads((res.out / "config.json").read_text())["training"]})
