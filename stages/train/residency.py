"""Where the training reader holds the cached arrays: the ``resident`` setting, one entry each.

An entry says where its arrays go on a device (``place``): ``"gpu"`` (device memory),
``"ram"`` (host memory) or ``"stream"`` (read from the shard files batch by batch). The
loader (stages/train/loader.py) does the rest: it checks that the arrays fit, and loads
them. The config, the CLI's ``--resident`` choices and the tests read this registry; it
imports nothing heavy, so `pipe --help` can list it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Residency:
    name: str
    summary: str
    # (device type "cuda"/"cpu", "are the token arrays over half the free RAM?") -> gpu | ram | stream
    place: Callable[[str, Callable[[], bool]], str]
    chosen_for_you: bool = False   # a choice made on the user's behalf is explained when it streams


def _auto(device_type: str, too_big_for_ram: Callable[[], bool]) -> str:
    if too_big_for_ram():
        return "stream"
    return "gpu" if device_type == "cuda" else "ram"


RESIDENCIES: dict[str, Residency] = {r.name: r for r in (
    Residency("auto", "device memory on a CUDA device, else RAM; token arrays over half the free RAM stream",
              _auto, chosen_for_you=True),
    Residency("ram", "hold the arrays in RAM", lambda device_type, too_big: "ram"),
    Residency("gpu", "hold the arrays in GPU memory (needs a CUDA device)", lambda device_type, too_big: "gpu"),
    Residency("none", "stream the arrays from the shard files, batch by batch", lambda device_type, too_big: "stream"),
)}
