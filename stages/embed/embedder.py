"""Turning a group of units into one shard's arrays: load, encode, hand to the writer.

Used in-process by the local runner and on Dask workers by the distributed one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from cache.index import Unit
from cache.store import ShardSink
from pipeline.encoders import create_encoder, resolve_encoder_name
from pipeline.encoders.stored import encoder_arithmetic
from stages.embed.modality import Modality
from stages.embed.overlap import call_now, prefetched

_ENCODERS: dict[tuple[str, str], object] = {}


def get_encoder(name: str, device: torch.device, modality: str | None = None):
    """Build an encoder once per process (a later run in the same process reuses it)."""
    key = (name, modality, str(device))
    if key not in _ENCODERS:
        _ENCODERS.clear()  # hold one model at a time: they can be large
        _ENCODERS[key] = create_encoder(name, device=str(device), modality=modality)
    return _ENCODERS[key]


@dataclass
class HostBatch:
    """One batch of outputs in host memory, maybe still being copied from the GPU."""

    tensors: dict[str, torch.Tensor]
    done: object = None           # a CUDA event recorded after the copies
    max_tokens: int | None = None  # pad token states to this length

    def arrays(self) -> dict[str, np.ndarray]:
        if self.done is not None:
            self.done.synchronize()
        arrays = {k: t.numpy() for k, t in self.tensors.items()}
        if self.max_tokens is not None:  # pad to max_tokens: a row must not depend on its batch
            tok, T = arrays["tokens"], self.max_tokens
            padded = np.zeros((tok.shape[0], T, tok.shape[2]), np.float16)
            padded[:, : min(tok.shape[1], T)] = tok[:, :T]
            arrays["tokens"] = padded
        return arrays


def append_to(sink: ShardSink, batch: HostBatch) -> None:
    sink.append(batch.arrays())


class GroupEmbedder:
    """Embeds groups of units of one modality with one encoder, batch by batch."""

    def __init__(self, modality: Modality, encoder_name: str, cfg, device: torch.device):
        self.modality, self.cfg, self.device = modality, cfg, device
        self.enc_cfg = resolve_encoder_name(encoder_name, modality.name)
        self.loader = modality.loader(self.enc_cfg, cfg, device)
        self._encoder = None
        self._copy_stream = None
        self._held = None
        self._joint_recorded = False

    def close(self) -> None:
        self.loader.close()

    @property
    def encoder(self):
        if self._encoder is None:
            self._encoder = get_encoder(self.enc_cfg.name, self.device, self.modality.name)
        return self._encoder

    def embed(self, units: list[Unit], dataset: str, sink: ShardSink, write: Callable = call_now,
              advance: Callable[[int], None] = lambda n: None) -> tuple[list[Unit], list[dict]]:
        """Embed units in fixed batches into ``sink``; items that fail are left out and reported.

        Each batch's host outputs go to ``write(fn, *args)``: a write-behind queue streams
        them into the shard while the next batch runs (the default writes inline).
        Returns the units written, in row order, and the failures.
        """
        bs = self.cfg.batch_size
        batches = [units[i:i + bs] for i in range(0, len(units), bs)]
        kept, failures = [], []
        for batch, loaded in prefetched(batches, self.loader.load):
            ok = [(u, x) for u, x in zip(batch, loaded) if not isinstance(x, Exception)]
            failures += [{"item": u.item, "source": u.source, "key": u.key, "dataset": dataset, "reason": str(x),
                          "modality": self.modality.name} for u, x in zip(batch, loaded) if isinstance(x, Exception)]
            if ok:
                kept += [u for u, _ in ok]
                out = self._forward([x for _, x in ok])
                self._record_joint(sink)
                write(append_to, sink, out)
                # Held until the next forward has run: freeing a batch's outputs first lets
                # glibc trim the heap top, and the next forward then page-faults its
                # activations back in (tiny-vit on CPU ran ~35% slower that way).
                self._held = out
            advance(len(batch))
        self._held = None
        return kept, failures

    def _record_joint(self, sink: ShardSink) -> None:
        """Once per run: the joint space's logit scale and bias in the store's attributes, which
        the native baseline of `pipe evaluate` scores pairs with (the weights decide them, and the
        weights are in the fingerprint)."""
        joint = self.encoder.joint() if not self._joint_recorded else None
        if joint is not None:
            sink.store.record_attribute("joint", {"space": self.enc_cfg.joint_space, **joint})
        self._joint_recorded = True

    @torch.inference_mode()
    def _forward(self, loaded: list) -> HostBatch:
        """Launch one batch; results come back as host tensors, on GPU copied behind compute."""
        dev = self.device
        with encoder_arithmetic(dev):  # bf16 autocast on CUDA: the store's fingerprint records it
            host = self.modality.forward(self.encoder, loaded, dev, self._to_host)
        done = None
        if self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return HostBatch(host, done, self.modality.pad_tokens_to(self.enc_cfg))

    def _to_host(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Device-to-host on a side stream into pinned memory, so the next forward starts at once."""
        t = t.detach().to(dtype)
        if t.device.type != "cuda":
            return t
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(t.device)
        host = torch.empty(t.shape, dtype=dtype, pin_memory=True)
        self._copy_stream.wait_stream(torch.cuda.current_stream(t.device))
        with torch.cuda.stream(self._copy_stream):
            host.copy_(t, non_blocking=True)
        t.record_stream(self._copy_stream)
        return host
