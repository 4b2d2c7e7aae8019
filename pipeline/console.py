"""Where people read: logs and progress on stderr, machine-readable output on stdout."""
from __future__ import annotations

import resource
import os

import torch
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

err = Console(stderr=True, highlight=False)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} it/s" if speed else "– it/s", style="cyan")


def progress(transient: bool = False) -> Progress:
    """A progress display with items/s and ETA, drawn on stderr."""
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        RateColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
        console=err, transient=transient, disable=bool(os.environ.get("PIPE_NO_PROGRESS")),
    )


def peak_memory_mb(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU when one was used."""
    out = {"cpu_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is visible. Use --device cpu or auto.")
    return torch.device(device)
