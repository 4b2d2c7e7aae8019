"""`pipe cache ...`: list and verify the stores; the work is in cache/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.app import cache_app
from pipeline.cli.common import CACHE_OPT, JSON_OPT, fail, human_bytes, print_json
from pipeline.console import err, escape, out


@cache_app.command("ls", epilog="Examples:\n\n  pipe cache ls\n\n  pipe cache ls --cache /data/pipe-cache --json")
def cache_ls(cache: Optional[Path] = CACHE_OPT, as_json: bool = JSON_OPT) -> None:
    """List each store: modality, encoder, fingerprint, items, bytes, path."""
    from cache.inspect import list_stores  # lazy: zarr and pyarrow take a moment to import
    from cache.paths import cache_root  # lazy: keeps `pipe --help` fast

    rows = list_stores(cache_root(cache))
    if as_json:
        print_json(rows)
        return
    t = Table(title=f"stores in {escape(str(cache_root(cache)))}", title_justify="left")
    for col in ("modality", "encoder", "fingerprint", "items", "failed", "bytes", "path"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["modality"], escape(r["encoder"]), r["fingerprint"][:16], f"{r['items']:,}", str(r["failed"]),
                  human_bytes(r["bytes"]), escape(r["path"]))
    if rows:
        out.print(t)
    else:
        err.print("no stores yet: run `pipe embed` first.")


@cache_app.command("verify", epilog="Examples:\n\n  pipe cache verify\n\n  pipe cache verify --store ~/.cache/freeze-pipe/stores/image/dinov2-s-0123456789abcdef")
def cache_verify(cache: Optional[Path] = CACHE_OPT,
                 store: Optional[Path] = typer.Option(None, "--store", help="Verify only this store directory.")) -> None:
    """Check every committed chunk's checksum and the manifest's consistency."""
    from cache.paths import cache_root  # lazy: zarr and pyarrow take a moment to import
    from cache.store import find_stores  # lazy: keeps `pipe --help` fast
    from cache.verify import verify_store  # lazy: keeps `pipe --help` fast

    stores = [store] if store else find_stores(cache_root(cache))
    if not stores:
        fail(f"no stores under {cache_root(cache)}; run `pipe embed` first or pass --cache.")
    bad = 0
    for path in stores:
        rep = verify_store(path)
        status = "[green]ok[/]" if rep.ok else "[bold red]CORRUPT[/]"
        err.print(f"{escape(str(status))} {escape(str(path))}: {rep.rows:,} rows in {escape(str(rep.shards))} shards", soft_wrap=True)
        for p in rep.problems:
            err.print(f"  [red]✗[/] {escape(p)}", soft_wrap=True)
        for w in rep.warnings:
            err.print(f"  [yellow]![/] {escape(w)}", soft_wrap=True)
        bad += not rep.ok
    if bad:
        err.print(f"[red]{bad} store(s) failed verification.[/] Remove the damaged store (or the named shard's "
                  "manifest part) and re-run `pipe embed` to rebuild what is missing.")
        raise typer.Exit(1)
