"""`pipe cache ...`: list, verify and repair, collect and remove stores; the work is in cache/."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from cli.app import cache_app
from cli.common import CACHE_OPT, JSON_OPT, fail, human_bytes, print_json, results_to, user_errors
from core.console import err, escape, out


@cache_app.command("ls", epilog="Examples:\n\n  pipe cache ls\n\n  pipe cache ls --cache /data/pipe-cache --json")
def cache_ls(cache: Optional[Path] = CACHE_OPT, as_json: bool = JSON_OPT) -> None:
    """List each store: modality, encoder, fingerprint, items, bytes, path."""
    from cache.inspect import list_stores  # lazy: zarr and pyarrow take a moment to import
    from cache.paths import cache_root  # lazy: keeps `pipe --help` fast

    with user_errors():
        root = cache_root(cache)
        rows = list_stores(root)
    if as_json:
        print_json(rows)
        return
    t = Table(title=f"stores in {escape(str(root))}", title_justify="left")
    for col in ("modality", "encoder", "fingerprint", "items", "failed", "bytes", "path"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(r["modality"], escape(r["encoder"]), r["fingerprint"][:16], f"{r['items']:,}", str(r["failed"]),
                  human_bytes(r["bytes"]), escape(r["path"]))
    if rows:
        out.print(t)
    else:
        _no_stores(root, cache)


def _no_stores(root: Path, given: Optional[Path]) -> None:
    """Why nothing was listed: an empty cache, no cache yet, or a folder that is no cache."""
    from cache.marker import CACHE_ENTRIES, has_marker  # lazy: keeps `pipe --help` fast
    from cache.paths import cache_source  # lazy: keeps `pipe --help` fast

    chosen = "--cache" if given else cache_source()
    if has_marker(root) or (root.is_dir() and all(p.name in CACHE_ENTRIES or p.name.startswith(".")
                                                  for p in root.iterdir())):
        err.print(f"no stores yet in the cache at {escape(str(root))}: run `pipe embed` first.", soft_wrap=True)
    elif not root.exists():
        message = (f"there is no cache at {root} ({chosen}): nothing was embedded there. Run `pipe embed`, or pass "
                   "--cache DIR (or set $PIPE_CACHE) to the cache you embedded into.")
        if given or chosen == "$PIPE_CACHE":
            fail(message)
        err.print(escape(message), soft_wrap=True)
    else:
        fail(f"{root} ({chosen}) is not a cache: it has no cache marker and no stores. Pass --cache DIR (or set "
             "$PIPE_CACHE) to the cache you embedded into.")


@cache_app.command("verify", epilog="Examples:\n\n  pipe cache verify --cache /data/cache\n\n"
                                    "  pipe cache verify --repair --dry-run\n\n  pipe cache verify --repair --json")
def cache_verify(cache: Optional[Path] = CACHE_OPT,
                 store: Optional[Path] = typer.Option(None, "--store", help="Verify only this store directory."),
                 repair: bool = typer.Option(False, "--repair", help="Turn every problem found into a clean state: "
                                             "damaged units are dropped (the next `pipe embed` re-embeds them), "
                                             "unreadable manifest parts moved aside, leftovers removed."),
                 dry_run: bool = typer.Option(False, "--dry-run", help="With --repair: say what it would do, change "
                                              "nothing."),
                 as_json: bool = JSON_OPT) -> None:
    """Check every committed chunk's checksum, the array metadata and the manifests (exit 1 on a problem)."""
    from cache.index import embed_commands  # lazy: keeps `pipe --help` fast
    from cache.paths import cache_root, root_of_store  # lazy: keeps `pipe --help` fast
    from cache.store import find_stores  # lazy: zarr and pyarrow take a moment to import
    from cache.verify import verify_derived, verify_store  # lazy: keeps `pipe --help` fast

    with user_errors():
        root = root_of_store(store.resolve()) if store else cache_root(cache)
    if dry_run and not repair:
        fail("--dry-run says what --repair would do: pass both (`pipe cache verify --repair --dry-run`).")
    if repair and not dry_run:  # repair deletes: only in a cache marked (or recognisably) one
        _require_cache(root, store)
    paths = [store.resolve()] if store else find_stores(root)
    if not paths:
        fail(f"no stores under {root}; run `pipe embed` first or pass --cache.")
    with user_errors():
        reports = [verify_store(p, repair, dry_run) for p in paths]
    if not store:
        reports.append(verify_derived(root, repair, dry_run))
    show = results_to(as_json)
    for rep in reports:
        _print_report(rep, show)
    touched = [r.store for r in reports if r.repairs and r.modality != "cache"]
    commands = embed_commands(root, touched) if root is not None and touched else []
    bad = [r for r in reports if not r.ok]
    _print_verdict(reports, bad, repair and not dry_run, commands)
    if dry_run:
        err.print("dry run: nothing was changed" + ("; `pipe cache verify --repair` does the above" if any(
            r.planned for r in reports) else "; there is nothing to repair"))
    if as_json:
        print_json({"cache": str(root), "ok": not bad, "repaired": repair and not dry_run, "dry_run": dry_run,
                    "stores": [r.to_json() for r in reports], "reembed": commands})
    if bad:
        raise typer.Exit(1)


def _require_cache(root, store) -> None:
    from cache.marker import MARKER, adopt_or_require  # lazy: keeps `pipe --help` fast

    if root is None:
        fail(f"--repair: {store} is not a store inside a cache (<cache>/stores/<modality>/<name>); nothing was "
             "changed. Pass the store's path inside its cache, or --cache.")
    with user_errors():
        if adopt_or_require(root, "pipe cache verify --repair"):
            err.print(f"marked {escape(str(root))} as a cache ({MARKER}): it was written by an older version "
                      "and holds only a cache's folders", soft_wrap=True)


def _print_report(rep, show) -> None:
    final = rep.after or rep
    status = "[green]ok[/]" if rep.ok else "[bold red]CORRUPT[/]"
    if rep.after is not None and rep.problems and rep.ok:
        status = "[green]repaired[/]"
    what = "cache files" if rep.modality == "cache" else f"{final.rows:,} rows in {final.shards} shards"
    show.print(f"{status} {escape(str(rep.store))}: {what}", soft_wrap=True)
    for p in rep.problems:
        show.print(f"  [red]✗[/] {escape(p)}", soft_wrap=True)
    for w in rep.warnings:
        show.print(f"  [yellow]![/] {escape(w)}", soft_wrap=True)
    for r in rep.repairs:
        show.print(f"  [green]✓[/] {escape(r)}", soft_wrap=True)
    for r in rep.planned:
        show.print(f"  [cyan]would[/] {escape(r)}", soft_wrap=True)
    if rep.after is not None:
        for p in rep.after.problems:
            show.print(f"  [red]✗ still:[/] {escape(p)}", soft_wrap=True)


def _print_verdict(reports, bad, repair: bool, commands: list[str]) -> None:
    if bad:
        err.print(f"[red]{len(bad)} store(s) failed verification.[/] "
                  + ("Some problems could not be repaired (see above)." if repair else
                     "Run `pipe cache verify --repair` to drop what is damaged (and move unreadable parts aside), "
                     "then `pipe embed` to re-embed it."))
    elif repair and any(r.repairs for r in reports):
        dropped = sum(r.dropped for r in reports)
        err.print(f"[green]repaired.[/] {dropped} unit(s) dropped." if dropped else "[green]repaired.[/]")
    if commands:
        err.print("Re-embed what the repair removed with:\n" + "\n".join(f"  {escape(c)}" for c in commands),
                  soft_wrap=True)


@cache_app.command("gc", epilog="Examples:\n\n  pipe cache gc --dry-run\n\n  pipe cache gc --cache /data/cache --json")
def cache_gc(cache: Optional[Path] = CACHE_OPT,
             dry_run: bool = typer.Option(False, "--dry-run", help="List what would be removed, and its size."),
             as_json: bool = JSON_OPT) -> None:
    """Remove stores no dataset index references, their Adaptor outputs, and leftover temporary files."""
    from cache.gc import gc  # lazy: keeps `pipe --help` fast
    from cache.paths import cache_root  # lazy: keeps `pipe --help` fast

    with user_errors():
        rep = gc(cache_root(cache), dry_run)
    _print_removals(rep)
    if as_json:
        print_json(rep.to_json())


@cache_app.command("rm", epilog="Examples:\n\n  pipe cache rm stores/image/tiny-vit-0123456789abcdef\n\n"
                                "  pipe cache rm 0123456789ab --force")
def cache_rm(store: str = typer.Argument(..., help="A store: its path, folder name or fingerprint prefix."),
             cache: Optional[Path] = CACHE_OPT,
             force: bool = typer.Option(False, "--force", help="Remove it even though datasets use it (their "
                                        "index forgets it; `pipe embed` rebuilds it)."),
             dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be removed."),
             as_json: bool = JSON_OPT) -> None:
    """Remove one store (refused while a dataset uses it, unless --force)."""
    from cache.gc import remove  # lazy: keeps `pipe --help` fast
    from cache.paths import cache_root  # lazy: keeps `pipe --help` fast

    with user_errors():
        rep = remove(cache_root(cache), store, force, dry_run)
    _print_removals(rep)
    if as_json:
        print_json(rep.to_json())


def _print_removals(rep) -> None:
    verb = "would remove" if rep.dry_run else "removed"
    for r in rep.removed:
        err.print(f"{verb} {escape(str(r.path))} ({human_bytes(r.bytes)}): {escape(r.why)}", soft_wrap=True)
    for r in rep.skipped:
        err.print(f"[yellow]skipped[/] {escape(str(r.path))} ({human_bytes(r.bytes)}): {escape(r.why)}",
                  soft_wrap=True)
    err.print(f"{verb} {len(rep.removed)} item(s), {human_bytes(rep.bytes)}" if rep.removed else "nothing to remove")
