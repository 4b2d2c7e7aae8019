"""`pipe encoders` and `pipe doctor`: what is registered, and what this machine has."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.table import Table

from cli.app import app
from cli.common import CACHE_OPT, JSON_OPT, path_or_none, print_json, results_to, user_errors
from core.console import escape, out


@app.command(epilog="Examples:\n\n  pipe encoders\n\n  pipe encoders | grep dinov2\n\n  pipe encoders --json")
def encoders(as_json: bool = JSON_OPT) -> None:
    """List the registered frozen encoders, their dims, weight source and availability here."""
    from pipeline.encoders import describe_encoders  # lazy: imports torch

    rows = describe_encoders()
    if as_json:
        print_json(rows)
        return
    t = Table(title="frozen encoders", title_justify="left")
    for col in ("name", "modality", "dim", "source", "weights", "available here"):
        t.add_column(col, overflow="fold")
    for r in rows:
        name = escape(r["name"]) + ("" if r["trained"] else " [yellow](untrained)")
        if r.get("runs_remote_code"):
            name += " [red](runs remote code)"
        avail = "[green]yes[/]" if r["available"] else "[red]no[/]"
        t.add_row(name, r["modality"], str(r["dim"]), escape(r["source"]), escape(r.get("hub_id") or "-"),
                  f"{avail} {escape(r['where'])}")
    out.print(t)
    remote = [r["name"] for r in rows if r.get("runs_remote_code")]
    if remote:
        from pipeline.encoders.remote import ENV, FLAG  # lazy: keeps `pipe --help` fast

        out.print(f"[red]runs remote code:[/] {escape(', '.join(remote))} run(s) Python code from the hub repository "
                  f"(trust_remote_code) at an unpinned revision; they are used only with {FLAG} (pipe embed, "
                  f"pipe evaluate) or {ENV}=1.", soft_wrap=True)


@app.command(epilog="Examples:\n\n  pipe doctor\n\n  pipe doctor --cache /data/pipe-cache --json")
def doctor(cache: Optional[Path] = CACHE_OPT, as_json: bool = JSON_OPT) -> None:
    """Report versions, the device, which encoder weights are present, and the cache location."""
    from cli.doctor_report import doctor_report, print_doctor  # lazy: imports torch

    with user_errors():
        report = doctor_report(path_or_none(cache))
    print_doctor(report, results_to(as_json))
    if as_json:
        print_json(report)
