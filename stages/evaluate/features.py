"""Features for downstream heads: the frozen Adaptor's outputs (cached) or raw backbone features.

The Adaptor's outputs are cached per (checkpoint, store) by :mod:`cache.outputs`, so a
second evaluation of the same checkpoint on the same cache runs the Adaptor zero times.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from cache.outputs import OutputCache, ensure_outputs_meta, outputs_folder
from cache.reader import RowReader
from cache.store import Store
from core.console import err
from pipeline.models.adaptor import Adaptor, AdaptorMode, trim_text_padding
from pipeline.api.source import load_model, resolve_source
from pipeline.models.checkpoint import checkpoint_hash, resolve_checkpoint, weights_hash

PAIRS_PER_FORWARD = 256

__all__ = ["FrozenAdaptor", "PAIRS_PER_FORWARD", "raw_features", "resolve_checkpoint"]


@dataclass
class FrozenAdaptor:
    """A trained Adaptor in eval mode, with its outputs cached per store."""

    path: Path
    meta: dict
    model: Adaptor
    hash: str
    device: torch.device
    cache_root: Path
    forwards: dict[str, int] = field(default_factory=dict)   # output kind -> rows computed this run

    @classmethod
    def load(cls, path: str | Path, device: torch.device, cache_root: Path) -> "FrozenAdaptor":
        """From a run folder, a checkpoint, or a package written by `pipe export` (pipeline.api.source: the
        API's loader; a package's encoders and fingerprints are checked against the cache as a run's are)."""
        src = resolve_source(path)
        return cls(src.weights, src.checkpoint_meta, load_model(src, device), checkpoint_hash(src.weights), device,
                   cache_root)

    @cached_property
    def weights_hash(self) -> str:
        """The hash of the Adaptor's tensors (not of its file): what heads trained on its features record."""
        return weights_hash(self.model.state_dict())

    @property
    def mode(self) -> AdaptorMode:
        return self.model.mode

    @property
    def grid(self) -> tuple[tuple[int, int] | None, int]:
        g = self.meta.get("image_grid")
        return (tuple(g) if g else None), int(self.meta.get("n_prefix", 1))

    def token_grid(self) -> tuple[int, int] | None:
        """The patch grid of ``encode_image(return_tokens=True)`` (after grid pooling)."""
        gp = self.model.cfg.grid_pool
        return (gp, gp) if gp else self.grid[0]

    def folder(self, store: Store) -> Path:
        return outputs_folder(self.cache_root, self.hash, store.fingerprint)

    def _cached(self, store: Store, kind: str, rows: np.ndarray, compute) -> np.ndarray:
        folder = self.folder(store)
        ensure_outputs_meta(folder, {"checkpoint": str(self.path), "checkpoint_hash": self.hash,
                                     "fingerprint": store.fingerprint, "modality": store.modality, "mode": self.mode.name})
        values, computed = OutputCache(folder, kind).get(rows, compute)
        self.forwards[kind] = self.forwards.get(kind, 0) + computed
        return values

    # -- image-only, per sample --------------------------------------------------------
    def image_embeddings(self, store: Store, rows: np.ndarray) -> np.ndarray:
        """``encode_image`` of each row: ``[n, d]`` float32."""
        return self._cached(store, "image_pooled", rows, lambda r: self._encode(store, r, tokens=False))

    def image_tokens(self, store: Store, rows: np.ndarray) -> np.ndarray:
        """Per-token outputs of ``encode_image(return_tokens=True)``: ``[n, T', d]`` float16 (tokens mode)."""
        if not self.mode.per_token_image:
            raise ValueError(f"a {self.mode.name}-mode Adaptor has no per-token image path")
        return self._cached(store, "image_tokens", rows, lambda r: self._encode(store, r, tokens=True))

    @torch.no_grad()
    def _encode(self, store: Store, rows: np.ndarray, tokens: bool) -> np.ndarray:
        reader, batch = RowReader(store, self.mode.image_array), self.mode.eval_batch
        grid, n_prefix = self.grid
        out = []
        for s in range(0, len(rows), batch):
            x = torch.from_numpy(reader.take(rows[s:s + batch])).to(self.device)
            res = self.model.encode_image(x, image_grid=grid, n_prefix=n_prefix, return_tokens=tokens)
            out.append(res[1].half().cpu().numpy() if tokens else res.float().cpu().numpy())
        return np.concatenate(out)

    # -- text and pairs ----------------------------------------------------------------
    def text_embeddings(self, store: Store, rows: np.ndarray) -> np.ndarray:
        """The text embedding per text row: ``[n, d]`` float32. It depends on the text alone
        in both modes (pooled: each attention of the paired forward has a single key;
        tokens: the unimodal text encoder), so it is cached per report."""
        return self._cached(store, "text_pooled", rows, lambda r: self._encode_text(store, r))

    @torch.no_grad()
    def _encode_text(self, store: Store, rows: np.ndarray) -> np.ndarray:
        out = []
        if self.mode.sequences:
            tok_r, len_r = RowReader(store, "tokens"), RowReader(store, "length")
            for s in range(0, len(rows), self.mode.eval_batch):
                t, keep = _text_batch(tok_r, len_r, rows[s:s + self.mode.eval_batch], self.device)
                out.append(self.model.text_embedding(t, keep).float().cpu().numpy())
            return np.concatenate(out)
        reader = RowReader(store, "pooled")
        for s in range(0, len(rows), self.mode.eval_batch):
            t = torch.from_numpy(reader.take(rows[s:s + self.mode.eval_batch])).to(self.device)
            out.append(self.model.text_embedding(t).float().cpu().numpy())
        return np.concatenate(out)

    @property
    def has_match_head(self) -> bool:
        return self.model.has_match_head

    def match_scores(self, image: Store, image_rows: np.ndarray, text: Store, text_rows: np.ndarray,
                     pairs: np.ndarray, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Tokens mode: the matching head's logit for each pair ``(a, b)`` of ``pairs [P, 2]``,
        image ``image_rows[a]`` with report ``text_rows[b]``: ``[P]`` float32. Each image and
        report in a pair runs through its unimodal encoder once; each pair through the fusion blocks."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        ui, inv_i = np.unique(pairs[:, 0], return_inverse=True)
        ut, inv_t = np.unique(pairs[:, 1], return_inverse=True)
        score = self.match_scorer(image, image_rows[ui], text, text_rows[ut], progress)
        return score(np.stack([inv_i.reshape(-1), inv_t.reshape(-1)], 1))

    @torch.no_grad()
    def match_scorer(self, image: Store, image_rows: np.ndarray, text: Store, text_rows: np.ndarray,
                     progress: Callable[[int], None] | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """Tokens mode: run every image and report of these rows through its unimodal encoder
        once, and return ``score(pairs [P, 2]) -> [P]`` float32, the matching logits of pairs
        of indices into ``image_rows`` and ``text_rows``. Scoring many pair sets (both
        directions of a re-rank) thus encodes each item once."""
        if not self.has_match_head:
            raise ValueError("this Adaptor has no matching head (pooled mode, or fusion_layers=0)")
        grid, n_prefix, batch = *self.grid, self.mode.eval_batch
        img_r, tok_r, len_r = RowReader(image, "tokens"), RowReader(text, "tokens"), RowReader(text, "length")
        img_tok = torch.cat([self.model.image_token_states(
            torch.from_numpy(img_r.take(image_rows[s:s + batch])).to(self.device), grid, n_prefix)
            for s in range(0, len(image_rows), batch)])
        txt_tok, keep = [], []
        width = int(len_r.take(text_rows).max(initial=1))  # one width for every batch: they are concatenated
        for s in range(0, len(text_rows), batch):
            t, k = _text_batch(tok_r, len_r, text_rows[s:s + batch], self.device, width)
            txt_tok.append(self.model.text_token_states(t, k))
            keep.append(k)
        txt_tok, keep = torch.cat(txt_tok), torch.cat(keep)

        @torch.no_grad()
        def score(pairs: np.ndarray) -> np.ndarray:
            pairs = torch.from_numpy(np.asarray(pairs, dtype=np.int64).reshape(-1, 2)).to(self.device)
            logits = self.model.match_pairs(img_tok, txt_tok, keep, pairs[:, 0], pairs[:, 1],
                                            chunk=PAIRS_PER_FORWARD, progress=progress)
            self.forwards["pairs"] = self.forwards.get("pairs", 0) + len(pairs)
            return logits.float().cpu().numpy()

        return score

    def log_forwards(self) -> str:
        n = sum(self.forwards.values())
        line = f"adaptor forwards: {n:,}" + (" (cached)" if n == 0 else
                                                 " (" + ", ".join(f"{k} {v:,}" for k, v in self.forwards.items()) + ")")
        err.print(line)
        return line


def _text_batch(tokens: RowReader, length: RowReader, rows: np.ndarray, device: torch.device,
                width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached report tokens and their real-token mask, cut to ``width`` tokens (default: the
    batch's longest report; the padding cut changes no output, see ``trim_text_padding``):
    ``[b, width, Dt]``, ``[b, width]``."""
    t = torch.from_numpy(tokens.take(rows)).to(device)
    n = torch.from_numpy(length.take(rows)).long().to(device)
    keep = torch.arange(t.shape[1], device=device)[None] < n[:, None]
    if width is None:
        return trim_text_padding(t, keep)
    return t[:, :max(1, width)], keep[:, :max(1, width)]


def raw_features(store: Store, rows: np.ndarray, kind: str = "pooled") -> np.ndarray:
    """Cached backbone (or text encoder) outputs, straight from the store."""
    return RowReader(store, kind).take(np.asarray(rows, dtype=np.int64))
