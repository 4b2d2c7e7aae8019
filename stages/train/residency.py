"""Where the training reader holds the cached arrays: the ``resident`` setting, one entry each.

An entry says where its arrays go (``where``, a :data:`PLACEMENTS` entry): ``"gpu"``
(device memory), ``"ram"`` (host memory) or ``"stream"`` (read from the shard files batch
by batch); ``None`` (``auto``) tries the placements of ``tries`` in order, each with the
share of the free memory it may take. :meth:`Residency.choose` picks the placement for the
arrays' size and the machine's free memory (:class:`Room`), or refuses with what to use
instead; the placement then says how the loader holds each array (:meth:`Placement.hold`)
and whether it streams. The config, the CLI's ``--resident`` choices, the loader
(stages/train/loader.py) and the tests read these registries; they import nothing heavy,
so `pipe --help` can list them.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.errors import PipeError

GIB = 2**30


class ResidencyError(PipeError):
    pass


@dataclass(frozen=True)
class Room:
    """What the machine offers a loader: a CUDA training device or not, and the free bytes there and in RAM."""

    cuda: bool
    gpu_free: int
    ram_free: int


@dataclass(frozen=True)
class Placement:
    """Where a loader's arrays are during training."""

    name: str           # what the loader reports (PairLoader.residency)
    summary: str
    held: bool          # read once and held in memory (else read from the shard files, batch by batch)
    on_device: bool     # held in the training device's memory

    def fits(self, need: int, ram_need: int, room: Room, share: float) -> bool:
        """Do the arrays (``need`` bytes once; ``ram_need`` for every process on this machine) fit in
        ``share`` of the free memory this placement uses?"""
        if not self.held:
            return True
        if self.on_device:  # the budget is the cached arrays' share of the GPU already
            return room.cuda and need <= room.gpu_free
        return ram_need <= share * room.ram_free

    def refusal(self, need: int, ram_need: int, room: Room, copies: int) -> str:
        """Why the arrays cannot be held here, and what to use instead."""
        if self.on_device and not room.cuda:
            return f"--resident {self.name} needs a CUDA device; use --resident ram or --device cuda"
        if self.on_device:
            return (f"--resident {self.name} needs {need / GIB:.2f} GiB but the cached arrays may take only "
                    f"{room.gpu_free / GIB:.2f} GiB more of the GPU (the run's share of its free memory; the rest "
                    "stays for training); use --resident ram or none")
        return (f"--resident {self.name} needs {ram_need / GIB:.2f} GiB ({copies} process(es) on this machine) but "
                f"only {room.ram_free / GIB:.2f} GiB is available; use --resident none to stream")

    def hold(self, array, device):
        """A resident array (a CPU tensor) where this placement keeps it."""
        return array.to(device) if self.on_device else array


PLACEMENTS: dict[str, Placement] = {p.name: p for p in (
    Placement("gpu", "held in GPU memory", held=True, on_device=True),
    Placement("ram", "held in RAM", held=True, on_device=False),
    Placement("stream", "read from the shard files batch by batch, one batch ahead", held=False, on_device=False),
)}
EXPLICIT_SHARE = 0.8   # of the free memory, when a placement is asked for by name


@dataclass(frozen=True)
class Residency:
    name: str
    summary: str
    where: str | None                          # a PLACEMENTS name; None: the first of ``tries`` that fits
    tries: tuple[tuple[str, float], ...] = ()  # auto: (placement, share of the free memory it may take), in order

    def choose(self, need: int, ram_need: int, room: Room, copies: int = 1) -> Placement:
        """Where arrays of this size go (a placement asked for by name is refused when they do not fit)."""
        if self.where is not None:
            placement = PLACEMENTS[self.where]
            if not placement.fits(need, ram_need, room, EXPLICIT_SHARE):
                raise ResidencyError(placement.refusal(need, ram_need, room, copies))
            return placement
        return next(PLACEMENTS[name] for name, share in self.tries if PLACEMENTS[name].fits(need, ram_need, room, share))

    def fell_back(self, placement: Placement) -> bool:
        """Did a chosen placement fall back to streaming for want of memory (auto, when nothing else fit)?"""
        return self.where is None and not placement.held


RESIDENCIES: dict[str, Residency] = {r.name: r for r in (
    Residency("auto", "the GPU when the arrays fit in the run's GPU budget (60% of its free memory, for the "
                      "training and validation arrays together), else RAM when they need at most half the free "
                      "RAM, else streamed", None, (("gpu", 1.0), ("ram", 0.5), ("stream", 1.0))),
    Residency("ram", "hold the arrays in RAM", "ram"),
    Residency("gpu", "hold the arrays in GPU memory (needs a CUDA device)", "gpu"),
    Residency("none", "stream the arrays from the shard files, batch by batch", "stream"),
)}
