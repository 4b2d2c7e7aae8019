"""Which device a command runs on, and how much memory it used."""
from __future__ import annotations

import resource

import torch

from pipeline.errors import InputError


def resolve_device(device: str) -> torch.device:
    """``auto`` (CUDA when visible, else CPU), ``cpu``, ``cuda`` or ``cuda:N``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {device} was asked for, but no CUDA device is visible. "
                             "Use --device cpu or auto.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0; use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise InputError(f"--device {device!r}: only cpu and cuda devices are supported")
    return dev


def peak_memory_mb(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU when one was used."""
    out = {"cpu_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out
