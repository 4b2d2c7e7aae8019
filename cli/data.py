"""`pipe data`: look at a dataset, and write or check its split and fraction lists."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import data_app
from cli.common import COLUMNS_OPT, NO_PATIENTS_OPT, fail, results_to, user_errors, with_columns
from core.console import err, escape, out, plain

DATASET_OPT = typer.Option(None, "--dataset", "-d", help="A pairs table, `demo`, or <reader>:<root>[?key=value&...], "
                           "e.g. 'siim-pneumothorax:/data/siim' or 'chexpert:/data/chexpert?uncertain=ones'. "
                           "\\[required]")
# The dataset as a bare argument, as these commands took it before -d/--dataset: still accepted.
DATASET_ARG = typer.Argument(None, hidden=True)
import time

from cli.common import CACHE_OPT as CACHE  # noqa: E402

ALLOW = typer.Option(False, "--allow-failures", help="Skip and count bad rows instead of stopping at the first.")


def _fail(message: str, code: int = 2) -> None:
    fail(message, code)


def _dataset(option: Optional[str], positional: Optional[str], columns: Optional[str] = None,
             no_patients: bool = False) -> str:
    if option and positional and option != positional:
        fail(f"two datasets given ({option!r} and {positional!r}); give one, with -d/--dataset")
    if not (option or positional):
        fail("no dataset: give one with -d/--dataset, e.g. `-d demo`, `-d pairs.csv` or `-d 'chexpert:/data/chexpert'`")
    return with_columns(option or positional, columns, no_patients)


def _open(dataset: str, cache: Optional[Path], allow_failures: bool):
    from cache.paths import cache_root  # lazy: keeps `pipe --help` fast
    from pipeline.datasets import READERS, open_dataset  # lazy: keeps `pipe --help` fast (pandas)
    from pipeline.datasets.spec import with_option  # lazy: keeps `pipe --help` fast

    spec = with_option(dataset, "allow_failures", "1", READERS) if allow_failures else dataset
    with user_errors():
        root = cache_root(cache)
        return open_dataset(spec, root), root


@data_app.command("readers", epilog="Examples:\n\n  pipe data readers\n\n  pipe data readers mimic-cxr\n\n"
                                    "Options follow the folder after a `?`, joined by `&` (quote it in a shell): "
                                    "'mimic-cxr:/data/mimic-cxr-jpg/2.0.0?frontal=1&sections=impression&uncertain=ones'.")
def readers(name: Optional[str] = typer.Argument(None, help="Only this reader."),
            as_json: bool = typer.Option(False, "--json", help="Print the readers and their options as JSON.")) -> None:
    """The dataset readers (<reader>:<folder>?key=value&...) and every option each takes."""
    from pipeline.datasets.readers import describe_readers  # lazy: keeps `pipe --help` fast (pandas)

    rows = [r for r in describe_readers() if name in (None, r["reader"])]
    if not rows:
        fail(f"no reader {name!r}; `pipe data readers` lists them all")
    if as_json:
        print(json.dumps(rows))
        return
    for r in rows:
        t = Table(title=plain(f"{r['reader']} · {r['description']}"), title_justify="left")
        for col in ("option", "default", "what it does"):
            t.add_column(col, overflow="fold")
        for o in r["options"]:
            t.add_row(plain(o["name"]), plain(o["default"] or "-"), plain(o["help"]))
        out.print(t)


@data_app.command("info", epilog="Examples:\n\n  pipe data info -d 'rsna-pneumonia:/data/rsna'\n\n"
                                 "  pipe data info -d 'mimic-cxr:/data/mimic-cxr-jpg/2.0.0?sections=impression' --json"
                                 "\n\nA reader's options (mimic-cxr: frontal, sections, labels, uncertain, blank, "
                                 "reports, ...): `pipe data readers`. A pairs table's columns named otherwise: "
                                 "--columns report=text,patient_id=subject_id.")
def info(dataset_opt: Optional[str] = DATASET_OPT, dataset: Optional[str] = DATASET_ARG, cache: Optional[Path] = CACHE, allow_failures: bool = ALLOW,
         as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
         columns: Optional[str] = COLUMNS_OPT, no_patients: bool = NO_PATIENTS_OPT) -> None:
    """Items per split, patients, label prevalence and skipped rows of a dataset."""
    summary, description = _summary(_dataset(dataset_opt, dataset, columns, no_patients), cache, allow_failures)
    if as_json:
        print(json.dumps(summary))
        return
    t = Table(title=plain(f"{summary['name']} · {description}"), title_justify="left")
    for col in ("split", "items", "patients", "with report", "with masks"):
        t.add_column(col, overflow="fold")
    for split, row in summary["splits"].items():
        t.add_row(plain(split), f"{row['items']:,}", f"{row['patients']:,}", f"{row['reports']:,}", f"{row['masks']:,}")
    out.print(t)
    if summary["labels"]:
        lt = Table(title="labels (positives / known)", title_justify="left")
        for col in ("label", "positive", "known", "values"):
            lt.add_column(col, overflow="fold")
        for name, row in summary["labels"].items():
            lt.add_row(plain(name), f"{row['positive']:,}", f"{row['known']:,}", plain(row["values"]))
        out.print(lt)
    for kind, n in summary["skipped"].items():
        err.print(f"[yellow]skipped {n:,} ({escape(str(kind))})[/]")


def _summary(dataset: str, cache: Optional[Path], allow_failures: bool) -> tuple[dict, str]:
    """A table is counted from its columns (no items built); a reader's dataset from its items."""
    from pipeline.datasets.summary import summarise_spec  # lazy: keeps `pipe --help` fast (pandas)

    with user_errors():
        return summarise_spec(dataset, lambda spec: _open(spec, cache, allow_failures)[0])


@data_app.command("preview", epilog="Examples:\n\n  pipe data preview -d 'siim-pneumothorax:/data/siim' --out siim.png\n\n"
                                    "  pipe data preview -d demo --out demo.png --n 9 --seed 3")
def preview(dataset_opt: Optional[str] = DATASET_OPT, dataset: Optional[str] = DATASET_ARG,
            out: Path = typer.Option(..., "--out", "-o", help="The PNG to write."),
            n: int = typer.Option(16, "--n", min=1, help="How many items to show."),
            seed: int = typer.Option(0, "--seed", help="Seed of the random choice of items."),
            cache: Optional[Path] = CACHE, allow_failures: bool = ALLOW,
            columns: Optional[str] = COLUMNS_OPT, no_patients: bool = NO_PATIENTS_OPT) -> None:
    """Render a grid of images with masks overlaid, labels and report snippets."""
    from pipeline.datasets.preview import render_preview  # lazy: keeps `pipe --help` fast

    ds, _ = _open(_dataset(dataset_opt, dataset, columns, no_patients), cache, allow_failures)
    if not ds.items:
        _fail(f"{ds.name} has no items to preview; check the dataset folder with `pipe data info`.")
    with user_errors():
        width, height = render_preview(ds, out, n=n, seed=seed)
    err.print(f"wrote {escape(str(out))} ({width}x{height} px, {min(n, len(ds.items))} of {len(ds.items):,} items)")


@data_app.command("splits", epilog="Examples:\n\n  pipe data splits -d 'rsna-pneumonia:/data/rsna' --write\n\n"
                                   "  pipe data splits -d 'rsna-pneumonia:/data/rsna' --verify\n\n"
                                   "  pipe data splits -d 'covidx:/data/covidx' --verify --lists shared/covidx-lists")
def splits(dataset_opt: Optional[str] = DATASET_OPT, dataset: Optional[str] = DATASET_ARG,
           write: bool = typer.Option(False, "--write", help="Write the lists and manifest.json."),
           verify: bool = typer.Option(False, "--verify", help="Check the dataset against written lists."),
           lists: Optional[Path] = typer.Option(None, "--lists", help="Folder of lists to write to or verify "
                                                "against \\[default: <cache>/splits/<dataset name>]."),
           seed: int = typer.Option(0, "--seed", help="Seed of the 1%/10% training-fraction draw."),
           cache: Optional[Path] = CACHE, allow_failures: bool = ALLOW,
           as_json: bool = typer.Option(False, "--json", help="Print counts and problems as JSON on stdout."),
           columns: Optional[str] = COLUMNS_OPT, no_patients: bool = NO_PATIENTS_OPT) -> None:
    """Show the split and label-fraction lists; --write them (ids, counts, SHA-256) or --verify them."""

    if write and verify:
        _fail("give --write or --verify, not both: verify what was written in a second call.")
    from pipeline.datasets.splits import (lists_folder, manifest_of,  # lazy: keeps `pipe --help` fast
                                          patients_in_several_splits, split_lists, verify_lists, write_lists)

    ds, root = _open(_dataset(dataset_opt, dataset, columns, no_patients), cache, allow_failures)
    folder = lists or lists_folder(root, ds.name)
    current = split_lists(ds, seed=seed)
    manifest = manifest_of(current)
    shared = patients_in_several_splits(ds)
    _print_lists(ds.name, manifest, folder, results_to(as_json))
    if shared:
        example = next(iter(shared.items()))
        err.print(f"[bold red]{len(shared):,} patient(s) are in more than one split[/] "
                  f"(e.g. {escape(str(example[0]))}: {escape(', '.join(sorted(example[1])))}).")
    problems = []
    if write:
        with user_errors():
            write_lists(folder, current)
            _write_about(folder, ds, seed)
        err.print(f"[green]wrote {len(current)} list(s) and manifest.json to {escape(str(folder))}[/]")
    if verify:
        problems = verify_lists(folder, current)
        if shared:
            problems.append(f"{len(shared):,} patient(s) are in more than one split")
        for p in problems:
            err.print(f"  [red]✗[/] {escape(str(p))}")
        if not problems:
            err.print(f"[green]ok[/]: every list in {escape(str(folder))} matches {escape(str(ds.name))}")
    if as_json:
        print(json.dumps({"name": ds.name, "folder": str(folder), "lists": manifest, "problems": problems}))
    if problems:
        err.print(f"[red]{len(problems)} difference(s).[/] If the dataset changed on purpose, rewrite the lists "
                  "with --write; otherwise restore the missing or changed files.")
        raise typer.Exit(1)


def _print_lists(name: str, manifest: dict, folder: Path, show) -> None:
    t = Table(title=plain(f"{name} · lists in {folder}"), title_justify="left")
    for col in ("list", "ids", "sha256"):
        t.add_column(col, overflow="fold")
    for file, row in manifest.items():
        t.add_row(plain(file), f"{row['count']:,}", row["sha256"][:16])
    if manifest:
        show.print(t)
    else:
        err.print(f"{escape(str(name))}: no item has a split, so there are no lists.")


def _write_about(folder: Path, ds, seed: int) -> None:
    """Record what made the lists, beside them (the manifest itself stays {file: {count, sha256}})."""


    from pipeline.datasets.splits import FRACTIONS, stratify_label  # lazy: keeps `pipe --help` fast

    about = {"dataset": ds.name, "spec": ds.spec, "fraction_seed": seed, "fractions": list(FRACTIONS),
             "stratified_by": stratify_label(ds), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    (folder / "about.json").write_text(json.dumps(about, indent=1) + "\n")
