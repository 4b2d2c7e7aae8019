"""Which device a command runs on, how host tensors get there, and how much memory it used."""
from __future__ import annotations

import re
import resource
from collections.abc import Iterator, Mapping

import torch

from core.errors import InputError


class _DeviceNames(Mapping):
    """The device names a config accepts, each with what it means: ``auto``, ``cpu``, ``cuda``
    and ``cuda:N`` for any device number N (whether it exists is checked when the run starts,
    by :func:`resolve_device`)."""

    _NAMED = {"auto": "CUDA when visible, else the CPU", "cpu": "the CPU", "cuda": "the current CUDA device",
              "cuda:N": "CUDA device number N (cuda:0, cuda:1, ...)"}

    def __getitem__(self, name: str) -> str:
        if isinstance(name, str) and re.fullmatch(r"cuda:[0-9]+", name):
            return f"CUDA device number {name.split(':')[1]}"
        return self._NAMED[name]

    def __contains__(self, name: object) -> bool:  # "cuda:N" itself is the pattern, not a name
        return isinstance(name, str) and (name in ("auto", "cpu", "cuda") or bool(re.fullmatch(r"cuda:[0-9]+", name)))

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMED)

    def __len__(self) -> int:
        return len(self._NAMED)


DEVICES: Mapping[str, str] = _DeviceNames()  # for ``Annotated[str, OneOf(DEVICES)]``


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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without making the host wait for the GPU.

    A blocking copy (``.to(device)``) synchronises with the whole stream, so the host could
    not queue the next step while this one runs; a non-blocking copy from pageable memory
    may wait too. Host tensors therefore go through pinned memory, whose caching allocator
    keeps each block until its copy has finished.
    """
    if device.type == "cuda" and t.device.type == "cpu":
        if not t.is_pinned():
            t = t.pin_memory()
        return t.to(device, non_blocking=True)
    return t.to(device)


def peak_memory_mb(device: torch.device | str | None = None) -> dict[str, float]:
    """Peak resident memory of this process, and of the GPU when one was used."""
    out = {"cpu_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated(torch.device(device)) / 2**20
    return out
