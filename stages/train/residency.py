"""Where the training reader holds the cached arrays: the ``resident`` setting, one entry each.

An entry says where its arrays go (``where``): ``"gpu"`` (device memory), ``"ram"`` (host
memory) or ``"stream"`` (read from the shard files batch by batch); ``None`` leaves it to
the loader, which picks by the arrays' size (stages/train/loader.py,
``PairLoader._auto_residency``). The loader checks that the arrays fit and loads them. The
config, the CLI's ``--resident`` choices and the tests read this registry; it imports
nothing heavy, so `pipe --help` can list it.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Residency:
    name: str
    summary: str
    where: str | None      # gpu | ram | stream; None: chosen by the loader from the arrays' size


RESIDENCIES: dict[str, Residency] = {r.name: r for r in (
    Residency("auto", "the GPU when the arrays fit in 80% of its free memory, else RAM when they need at most "
                      "half the free RAM, else streamed", None),
    Residency("ram", "hold the arrays in RAM", "ram"),
    Residency("gpu", "hold the arrays in GPU memory (needs a CUDA device)", "gpu"),
    Residency("none", "stream the arrays from the shard files, batch by batch", "stream"),
)}
