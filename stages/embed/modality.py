"""The two modalities of stage one, each one object that carries what differs between them.

Everything the embed stage does per modality goes through :data:`MODALITIES`: which
option names the encoder, which units the dataset index yields, how a batch is loaded
and how it goes through the encoder. (What a store's fingerprint records per modality,
and the stored dtypes, are in :mod:`pipeline.encoders.stored`, which the trained-Adaptor
API shares.)
Adding a modality is one new entry here; the stage, the runners and the store never ask
which modality they hold.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.multiprocessing as torch_mp
import xxhash

from cache.index import Unit
from core.console import err
from pipeline.devices import to_device
from pipeline.encoders.stored import STORED_DTYPES, preprocess_of
from pipeline.imaging import DEFAULT_IMAGE_MEMORY_MB, ImageBudget, ImageDecodeError, Preprocess, read_and_decode
from pipeline.threads import available_cpus

ToHost = Callable[[torch.Tensor, torch.dtype], torch.Tensor]

__all__ = ["IMAGE", "MODALITIES", "TEXT", "Modality", "preprocess_of"]


def load_image(u: Unit, preprocess: Preprocess, budget: ImageBudget | None = None):
    """Read, check, decode and preprocess one image; an exception is returned, not raised.

    Everything that touches the item's bytes or pixels runs inside the guard: reading
    (regular files only), the memory budget (checked from the header before decoding),
    decoding and the resize/crop. Whatever one item raises is that item's failure.
    """
    budget = budget or ImageBudget(resize_size=preprocess.resize_size)
    try:
        data, img = read_and_decode(u.source, budget)
        if xxhash.xxh3_128_hexdigest(data) != u.key:
            return ValueError(f"{u.source} changed while embedding (its bytes no longer match the key); "
                              "re-run `pipe embed`")
        return preprocess(img, view=u.view, seed_key=u.key)
    except MemoryError:  # an allocation the budget did not foresee: this item's, not the run's
        return ValueError(f"{u.source}: out of memory while decoding or resizing it; lower --image-memory-mb "
                          "or remove the row")
    except Exception as e:  # recorded per item; the rest of the batch goes on
        if isinstance(e, ImageDecodeError):
            return e
        return ValueError(f"{u.source}: cannot preprocess the image ({type(e).__name__}: {e})")


def load_images(units: list[Unit], preprocess: Preprocess, budget: ImageBudget) -> tuple[torch.Tensor | None, list]:
    """A decode process's share of a batch: the images that loaded, stacked into one tensor
    (one shared-memory segment and its descriptors for the lot, not one per image), and per
    unit either its row in that tensor or its exception."""
    loaded = [load_image(u, preprocess, budget) for u in units]
    good = [x for x in loaded if not isinstance(x, Exception)]
    rows, slots = iter(range(len(good))), []
    for x in loaded:
        slots.append(x if isinstance(x, Exception) else next(rows))
    return (torch.stack(good) if good else None), slots


def _one_thread_per_process() -> None:
    torch.set_num_threads(1)  # one core per decode process


def decode_pool(threads: int, processes: int, device: torch.device) -> Executor:
    """Threads on CPU (the forward needs the cores); spawned processes to feed a GPU.

    Processes return each share of a batch as one stacked tensor through shared memory
    (:func:`load_images`). A daemonic process (a Dask worker started by a nanny that was not
    told otherwise) may not start children, so there the decoding stays in threads.
    """
    n = processes
    if n < 0:
        n = min(8, max(1, available_cpus()[0] - 1)) if device.type == "cuda" else 0
    if n and multiprocessing.current_process().daemon:
        err.print(f"note: decoding in {threads} threads, not {n} processes: this process is daemonic (a Dask worker "
                  "whose nanny starts workers as daemons) and may not start children. Start the workers with "
                  "DASK_DISTRIBUTED__WORKER__DAEMON=False to decode in processes.")
        n = 0
    if n == 0:
        return ThreadPoolExecutor(threads, thread_name_prefix="decode")
    return ProcessPoolExecutor(n, mp_context=torch_mp.get_context("spawn"), initializer=_one_thread_per_process)


def stored_arrays(out, names: tuple[str, ...]) -> tuple[str, ...]:
    """The arrays a store keeps of an encoder's output: ``native`` too where the encoder has a joint space."""
    return names + (("native",) if out.native is not None else ())


class Loader:
    """Turns a batch of units into encoder inputs (or an exception per failed unit)."""

    def load(self, batch: list[Unit]) -> list:
        return [u.payload for u in batch]

    def close(self) -> None:
        pass


class ImageLoader(Loader):
    def __init__(self, preprocess: Preprocess, pool: Executor, budget: ImageBudget | None = None):
        self.preprocess, self.pool = preprocess, pool
        self.budget = budget or ImageBudget(resize_size=preprocess.resize_size)

    def load(self, batch: list[Unit]) -> list:
        if not isinstance(self.pool, ProcessPoolExecutor):
            return list(self.pool.map(load_image, batch, [self.preprocess] * len(batch), [self.budget] * len(batch)))
        n = min(len(batch), self.pool._max_workers)  # one contiguous share per process
        shares = [batch[len(batch) * i // n:len(batch) * (i + 1) // n] for i in range(n)]
        futures = [self.pool.submit(load_images, share, self.preprocess, self.budget) for share in shares]
        out = []
        for future in futures:
            stacked, slots = future.result()
            out += [x if isinstance(x, Exception) else stacked[x] for x in slots]
        return out

    def close(self) -> None:
        """Stop the decode workers (idle threads that ran torch ops keep OpenMP teams alive)."""
        self.pool.shutdown(wait=True)


@dataclass(frozen=True)
class Modality:
    name: str          # the store's modality, as written on disk
    flag: str          # the option that names this modality's encoder
    field: str         # the EmbedConfig field holding that name

    def encoder_name(self, cfg) -> str | None:
        name = getattr(cfg, self.field)
        return name if name and name.lower() != "none" else None

    def units(self, index, views: int) -> tuple[Iterable[Unit], int]:
        """The index's units of this modality, and how many there are at most."""
        raise NotImplementedError

    def row_bytes(self, enc_cfg) -> int:
        raise NotImplementedError

    def loader(self, enc_cfg, cfg, device: torch.device) -> Loader:
        return Loader()

    def forward(self, encoder, loaded: list, device: torch.device, to_host: ToHost) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pad_tokens_to(self, enc_cfg) -> int | None:
        """Token rows are padded to this length, so a row never depends on its batch."""
        return None


class ImageModality(Modality):
    def units(self, index, views: int):
        return index.image_units(views), len(index) * (views + 1)

    def row_bytes(self, enc_cfg) -> int:
        d = enc_cfg.embed_dim
        n = (enc_cfg.input_size // enc_cfg.patch_size) ** 2 + enc_cfg.num_prefix_tokens if enc_cfg.patch_size else 64
        return n * d * 2 + d * 4 + enc_cfg.native_dim * 4

    def loader(self, enc_cfg, cfg, device):
        pre = preprocess_of(enc_cfg)
        budget = ImageBudget(getattr(cfg, "image_memory_mb", DEFAULT_IMAGE_MEMORY_MB), pre.resize_size)
        return ImageLoader(pre, decode_pool(cfg.decode_threads, cfg.decode_processes, device), budget)

    def forward(self, encoder, loaded, device, to_host):
        pixels = torch.stack(loaded)
        if device.type == "cuda":
            pixels = pixels.pin_memory()
        out = encoder(pixels.to(device, non_blocking=True))
        return {k: to_host(getattr(out, k), STORED_DTYPES[k]) for k in stored_arrays(out, ("tokens", "pooled"))}


class TextModality(Modality):
    def units(self, index, views: int):
        units = index.text_units()
        return units, len(units)

    def row_bytes(self, enc_cfg) -> int:
        d = enc_cfg.embed_dim
        return (enc_cfg.max_tokens or 128) * d * 2 + d * 4 + enc_cfg.native_dim * 4

    def forward(self, encoder, loaded, device, to_host):
        batch = {k: to_device(v, device) for k, v in encoder.tokenize(loaded).items()}
        out = encoder(**batch)
        return {k: to_host(getattr(out, k), STORED_DTYPES[k]) for k in stored_arrays(out, ("tokens", "pooled", "length"))}

    def pad_tokens_to(self, enc_cfg) -> int | None:
        return enc_cfg.max_tokens


IMAGE = ImageModality("image", "--backbone", "backbone")
TEXT = TextModality("text", "--text-encoder", "text_encoder")
MODALITIES: dict[str, Modality] = {m.name: m for m in (IMAGE, TEXT)}
