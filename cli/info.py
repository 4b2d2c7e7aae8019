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
    for col in ("name", "modality", "input", "tokens", "dim", "GFLOPs", "licence", "weights", "available here"):
        t.add_column(col, overflow="fold")
    for r in rows:
        t.add_row(_encoder_label(r), r["modality"], escape(r["input"] or "-"), str(r["tokens"] or "-"),
                  str(r["dim"]) + (f" → {r['native_dim']}" if r["native_dim"] else ""), _gflops(r["gflops"]),
                  escape(r["licence"] or "-") + (" [red](gated)[/]" if r["gated"] else ""),
                  escape(r.get("hub_id") or r["source"]), f"{'[green]yes[/]' if r['available'] else '[red]no[/]'} "
                  f"{escape(r['where'])}")
    out.print(t)
    out.print("dim → n: the pooled width, and the width of the joint space its towers share (`pipe evaluate "
              "--adaptor native`). gated: the hub asks you to accept the model's terms before it downloads.",
              soft_wrap=True)
    remote = [r["name"] for r in rows if r.get("runs_remote_code")]
    if remote:
        from pipeline.encoders.remote import ENV, FLAG  # lazy: keeps `pipe --help` fast

        out.print(f"[red]runs remote code:[/] {escape(', '.join(remote))} run(s) Python code from the hub repository "
                  f"(trust_remote_code) at an unpinned revision; they are used only with {FLAG} (pipe embed, "
                  f"pipe evaluate) or {ENV}=1.", soft_wrap=True)


def _encoder_label(r: dict) -> str:
    name = escape(r["name"]) + ("" if r["trained"] else " [yellow](untrained)")
    return name + (" [red](runs remote code)" if r.get("runs_remote_code") else "")


def _gflops(x: float | None) -> str:
    return "-" if x is None else (f"{x:,.0f}" if x >= 10 else f"{x:.3g}")


@app.command(epilog="Examples:\n\n  pipe doctor\n\n  pipe doctor --cache /data/pipe-cache --json")
def doctor(cache: Optional[Path] = CACHE_OPT, as_json: bool = JSON_OPT) -> None:
    """Report versions, the device, which encoder weights are present, and the cache location."""
    from cli.doctor_report import doctor_report, print_doctor  # lazy: imports torch

    with user_errors():
        report = doctor_report(path_or_none(cache))
    print_doctor(report, results_to(as_json))
    if as_json:
        print_json(report)
