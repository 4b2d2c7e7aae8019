"""The training reader: only the arrays a mode needs, resident when they fit.

``pooled`` mode needs the pooled vectors (a few KB per item), so they are always held in
memory. ``tokens`` mode needs the token arrays: held in RAM or on the GPU when they fit
(``resident``), otherwise streamed from the shard files in block-shuffled order, one batch
ahead, into pinned memory.

Under DDP each rank builds its own loader with ``rank``/``world``. ``batch_size`` stays
the global batch: every rank computes the same seeded epoch order and takes its own
contiguous slice of each global batch, so the ranks' slices of a step, in rank order, are
exactly the one-process step. A streaming rank reads only its own slices; a resident
rank holds the split's rows (the epoch order reshuffles which rank needs which row).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from cache.pairs import PairData
from cache.reader import RowReader, available_ram, block_shuffled_order
from core.console import err
from pipeline.devices import to_device
from core.errors import InputError
from pipeline.models.adaptor import MODES, AdaptorMode
from stages.train.residency import RESIDENCIES, Placement, ResidencyError, Room

__all__ = ["PairLoader", "ResidencyError"]


GPU_CACHE_SHARE = 0.6  # of the GPU memory free when training starts, for every loader's resident arrays together


class GpuBudget:
    """The GPU memory that a run's resident arrays may take, shared by its loaders.

    Each loader used to take up to 80% of whatever was free when it was built, so the
    validation loader, built second, could take 80% of the rest, and training was left with
    4% of the card. One budget for the run: the arrays of every loader together get
    :data:`GPU_CACHE_SHARE` of the memory free at the start, and the rest stays for the
    model, its optimizer state and the step's activations.
    """

    def __init__(self, device: torch.device, share: float = GPU_CACHE_SHARE):
        self.left = int(share * torch.cuda.mem_get_info(device)[0]) if device.type == "cuda" else 0
        self.share = share

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.left

    def take(self, nbytes: int) -> None:
        self.left -= nbytes


@dataclass
class _Source:
    """One array, either resident (a tensor over compact rows) or a streaming reader."""

    name: str
    reader: RowReader
    rows: np.ndarray            # store rows that this loader may ask for (sorted, unique)
    resident: torch.Tensor | None = None

    def gather(self, store_rows: np.ndarray, pin: bool) -> torch.Tensor:
        if self.resident is not None:
            pos = torch.from_numpy(np.searchsorted(self.rows, store_rows))
            return self.resident.index_select(0, to_device(pos, self.resident.device))
        out = torch.empty((len(store_rows), *self.reader.row_shape),
                          dtype=_torch_dtype(self.reader.dtype), pin_memory=pin)
        self.reader.take(store_rows, out=out.numpy())
        return out


def _torch_dtype(dt: np.dtype) -> torch.dtype:
    return {np.dtype("float16"): torch.float16, np.dtype("float32"): torch.float32,
            np.dtype("int32"): torch.int32}[np.dtype(dt)]


class PairLoader:
    """Batches of (image, text) arrays for a set of item positions."""

    def __init__(self, data: PairData, positions: np.ndarray, mode: AdaptorMode | str, batch_size: int,
                 device: torch.device, resident: str = "auto", views: bool = True,
                 seed: int = 0, buffer_chunks: int = 8, drop_last: bool = False, text: bool = True,
                 rank: int = 0, world: int = 1, ram_copies: int = 1, gpu_budget: GpuBudget | None = None):
        if batch_size % world:
            raise InputError(f"batch_size={batch_size} is the global batch and must split evenly over {world} "
                             f"processes; use a multiple of {world}")
        mode = MODES[mode] if isinstance(mode, str) else mode
        self.data, self.positions, self.mode = data, np.asarray(positions), mode
        self.batch_size, self.device, self.seed = batch_size, device, seed
        self.rank, self.world, self.ram_copies = rank, world, ram_copies
        self.views, self.buffer_chunks, self.drop_last = views, buffer_chunks, drop_last
        self.wait_seconds = 0.0
        img_rows = data.image_rows[self.positions]
        if not views:
            img_rows = img_rows[:, :1]
        self.image_rows = img_rows
        self.text_rows = data.text_rows[self.positions]
        self.sources: dict[str, _Source] = {}
        self.gpu_budget = gpu_budget or GpuBudget(device)
        used_img = np.unique(img_rows[img_rows >= 0])
        n = mode.image_array
        self.sources[f"image_{n}"] = _Source(n, RowReader(data.image, n), used_img)
        if text:
            used_txt = np.unique(self.text_rows)
            for n in mode.text_arrays:
                self.sources[f"text_{n}"] = _Source(n, RowReader(data.text, n), used_txt)
        self.placement = self._make_resident(resident)

    @property
    def residency(self) -> str:
        """Where the arrays are: the placement's name (gpu, ram or stream)."""
        return self.placement.name

    @property
    def local_batch(self) -> int:
        """Items per step on this rank: the global batch over the ranks."""
        return self.batch_size // self.world

    # -- residency -----------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(s.reader.nbytes(len(s.rows)) for s in self.sources.values())

    def _make_resident(self, resident: str) -> Placement:
        """Where the arrays go (stages/train/residency.py), and the held ones read there."""
        choice = RESIDENCIES.get(resident)
        if choice is None:
            raise InputError(f"resident={resident!r} is not a residency; use one of {', '.join(RESIDENCIES)}")
        need = self.nbytes()
        ram_need = need * self.ram_copies  # every process on this machine holds its own copy
        cuda = self.device.type == "cuda"
        room = Room(cuda, self.gpu_budget.left if cuda else 0, available_ram())
        placement = choice.choose(need, ram_need, room, self.ram_copies)
        if placement.on_device:
            self.gpu_budget.take(need)
        if choice.fell_back(placement) and self.rank == 0:  # pooled vectors too: a 10M-image table's are 32 GiB
            what = "token arrays" if self.mode.sequences else "pooled vectors"
            err.print(f"[yellow]{what} need {need / 2**30:.1f} GiB, more than half the free RAM: "
                      "streaming them from the cache instead")
        if placement.held:
            for s in self.sources.values():
                s.resident = placement.hold(torch.from_numpy(s.reader.take(s.rows)), self.device)
        return placement

    # -- iteration -----------------------------------------------------------------------
    def __len__(self) -> int:
        n = len(self.positions)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The items' order for an epoch, and the view each item uses in it.

        Both come from a generator seeded by (seed, epoch) only, so a resumed run sees
        exactly the epochs an uninterrupted run sees.
        """
        rng = np.random.default_rng([self.seed, epoch])
        n_views = (self.image_rows >= 0).sum(1)
        view = (rng.random(len(self.positions)) * n_views).astype(np.int64) if self.views else np.zeros(len(n_views), np.int64)
        if not self.placement.held:  # streamed: shuffled by blocks of chunks, so reads stay sequential
            lay = self.sources[next(iter(self.sources))].reader.layout
            order = block_shuffled_order(self.image_rows[np.arange(len(view)), view], lay.chunk_rows,
                                         self.buffer_chunks, rng)
        else:
            order = rng.permutation(len(self.positions))
        return order, view

    def fixed_order(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self.positions)
        return np.arange(n), np.zeros(n, np.int64)

    def batches(self, epoch: int | None) -> Iterator[dict[str, torch.Tensor]]:
        """Batches for an epoch (shuffled, sampled views) or, with None, in order, plain views."""
        order, view = self.epoch_order(epoch) if epoch is not None else self.fixed_order()
        bs = self.batch_size
        stops = range(0, len(order) - (len(order) % bs if self.drop_last else 0), bs)
        steps = [order[s:s + bs] for s in stops]
        idx = [self._own_slice(i) for i in steps if len(i)]
        if not self.placement.held:
            yield from self._prefetched(idx, view)
        else:
            for sel in idx:
                t = time.perf_counter()
                batch = self._assemble(sel, view)
                self.wait_seconds += time.perf_counter() - t
                yield batch

    def _own_slice(self, step: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (all of it on one process)."""
        return np.array_split(step, self.world)[self.rank] if self.world > 1 else step

    def _assemble(self, sel: np.ndarray, view: np.ndarray) -> dict[str, torch.Tensor]:
        pin = not self.placement.held and self.device.type == "cuda"
        img_rows = self.image_rows[sel, view[sel]]
        out = {"index": torch.from_numpy(self.positions[sel])}
        for key, src in self.sources.items():
            rows = img_rows if key.startswith("image_") else self.text_rows[sel]
            out[key] = src.gather(rows, pin)
        if "text_length" in out:
            t = out.pop("text_length").long()
            T = out["text_tokens"].shape[1]
            out["text_mask"] = torch.arange(T, device=t.device)[None, :] < t[:, None]
        return {k: to_device(v, self.device) for k, v in out.items()}

    def _prefetched(self, idx: list[np.ndarray], view: np.ndarray) -> Iterator[dict[str, torch.Tensor]]:
        """Read batch i+1 in a thread while the model trains on batch i."""
        with ThreadPoolExecutor(1, thread_name_prefix="cache-read") as pool:
            nxt = pool.submit(self._assemble, idx[0], view) if idx else None
            for i in range(len(idx)):
                t = time.perf_counter()
                batch = nxt.result()
                self.wait_seconds += time.perf_counter() - t
                if i + 1 < len(idx):
                    nxt = pool.submit(self._assemble, idx[i + 1], view)
                yield batch
