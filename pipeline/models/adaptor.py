"""The Adaptor: a small cross-modal module trained on cached frozen-encoder embeddings.

* ``pooled`` reproduces the paper: one pooled vector per modality, a length-1
  sequence, so each attention has a single key and its softmax is exactly 1. The
  query never matters, Q/K get no gradient and nothing crosses between modalities
  (flaw 1 in PAPER.md). Kept only to reproduce the published model.
* ``tokens`` feeds whole token sequences (image prefix + patches, report [CLS] +
  words), so cross-attention really attends over many keys.

Orientation. The authors' block adds the attention output to the key/value stream
(``img = block(residual=img, query=txt, kv=img)``), which only works when both
sequences have the same length. ``tokens`` mode therefore uses the usual orientation:
residual and query from the stream being updated, keys/values from the other one. The
order stays the authors': image stream first, then the text stream reading the
*updated* image stream. The same block objects serve both streams.

Image-only path (``encode_image``): each block is self-attention within one sample's
image sequence (query = key = value = image). In ``pooled`` mode this equals the paired
forward's image embedding exactly, since a one-key attention ignores its query. Inputs
are always 3-D ``[B, T, d]`` with ``batch_first``, so samples never attend to each
other (the authors passed ``[B, d]``, making the batch one sequence: flaw 2).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import OneOf, Validated


@dataclass(frozen=True)
class AdaptorMode:
    """One of the Adaptor's modes, with everything the rest of the project asks of it.

    The loader reads the arrays it names, evaluation asks whether a pair must be scored
    jointly and whether a per-token image path exists, the output cache sizes its batches
    by it. Adding a mode is one entry in :data:`MODES` (and its forward here).
    """

    name: str
    image_array: str               # the cached image array it reads: pooled [N, D] or tokens [N, T, D]
    text_arrays: tuple[str, ...]   # the cached text arrays it reads
    sequences: bool                # token sequences in, so cross-attention has many keys
    per_token_image: bool          # encode_image can return per-token outputs (for dense heads)
    joint_pairs: bool              # a pair's embeddings see each other: score (image, text) pairs jointly
    eval_batch: int                # rows per forward when its outputs are cached
    summary: str


POOLED = AdaptorMode("pooled", "pooled", ("pooled",), sequences=False, per_token_image=False, joint_pairs=False,
                     eval_batch=512, summary="the paper's model: one pooled vector per modality")
TOKENS = AdaptorMode("tokens", "tokens", ("tokens", "length"), sequences=True, per_token_image=True,
                     joint_pairs=True, eval_batch=64,
                     summary="cross-attention over the cached token sequences (our fix of flaw 1)")
MODES: dict[str, AdaptorMode] = {m.name: m for m in (POOLED, TOKENS)}


@dataclass(frozen=True)
class AdaptorConfig(Validated):
    mode: Annotated[str, OneOf(MODES)] = "pooled"
    image_dim: int = 768
    text_dim: int = 768
    d_model: int = 768
    n_heads: int = 12
    ffn_dim: int = 2048
    n_layers: int = 2
    dropout: float = 0.1
    grid_pool: int = 0  # tokens mode: >0 average-pools the patch grid to grid_pool x grid_pool
    image_weight: float = 0.75  # weight of the image->text loss term (see loss.clip_loss)
    logit_scale_init: float = 2.6592  # ln(1/0.07)
    logit_scale_max: float = 100.0  # clamp of exp(logit_scale); the authors never clamped

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        found = [(k, f"must be >= 1, got {v[k]}") for k in ("d_model", "n_heads", "ffn_dim", "n_layers") if v[k] < 1]
        if not found and v["d_model"] % v["n_heads"]:
            found.append(("d_model", f"{v['d_model']} is not divisible by n_heads={v['n_heads']}"))
        return found + [(k, m) for k, ok, m in (
            ("mode", v["mode"] in MODES, f"must be one of {', '.join(MODES)}, got {v['mode']!r}"),
            ("dropout", 0.0 <= v["dropout"] < 1.0, f"must lie in [0, 1), got {v['dropout']}"),
            ("image_weight", 0.0 <= v["image_weight"] <= 1.0, f"must lie in [0, 1], got {v['image_weight']}"),
            ("grid_pool", v["grid_pool"] >= 0, f"must be >= 0, got {v['grid_pool']}"),
            ("logit_scale_max", v["logit_scale_max"] > 0, f"must be > 0, got {v['logit_scale_max']}"),
        ) if not ok]


class FusionBlock(nn.Module):
    """Post-norm block: attention -> add & LayerNorm -> ReLU FFN -> add & LayerNorm.

    This is the layout that gives the paper's 5,513,984 parameters per layer at
    d=768, 12 heads, FFN 2048 (an nn.TransformerEncoderLayer whose one attention is
    used as cross-attention):
        attn   in_proj 3*d*d + 3*d, out_proj d*d + d     2,362,368
        ffn    d*f + f + f*d + d                        3,148,544
        norm1, norm2  2*d each                              3,072
    A decoder layer (self-attn + cross-attn + FFN + 3 norms) would be 7,877,888.
    """

    def __init__(self, d: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(
            nn.Linear(d, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, d)
        )
        self.drop1, self.drop2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(
        self, x: Tensor, query: Tensor, kv: Tensor, kv_pad: Tensor | None = None
    ) -> Tensor:
        # x, query: [B, T, d]; kv: [B, S, d]; kv_pad: [B, S], True = ignore that key
        attended, _ = self.attn(query, kv, kv, key_padding_mask=kv_pad, need_weights=False)
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))


class Adaptor(nn.Module):
    """Projections + shared fusion blocks + a learnable logit scale.

    ``forward(batch)`` takes a dict:
      pooled: ``image_pooled [B, Di]``, ``text_pooled [B, Dt]``
      tokens: ``image_tokens [B, Ti, Di]``, ``text_tokens [B, Tt, Dt]``,
              ``text_mask [B, Tt]`` (bool, True = real token; optional)
    and returns ``(img_emb [B, d], txt_emb [B, d])``, token 0 of each stream,
    L2-normalised. ``image_grid=(h, w)`` and ``n_prefix`` describe the image token
    layout (prefix tokens first, then the patch grid row-major); the grid defaults to
    the square that fits.
    """

    def __init__(self, cfg: AdaptorConfig = AdaptorConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        self.mode = MODES[cfg.mode]
        self.image_proj = nn.Linear(cfg.image_dim, cfg.d_model, bias=False)
        self.text_proj = nn.Linear(cfg.text_dim, cfg.d_model, bias=False)
        self.blocks = nn.ModuleList(
            FusionBlock(cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout)
            for _ in range(cfg.n_layers)
        )
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))

    def scale(self) -> Tensor:
        """exp(logit_scale), clamped at ``logit_scale_max`` (100, as CLIP; the authors
        left it unclamped). Past the clamp the scale gets no gradient."""
        return self.logit_scale.exp().clamp(max=self.cfg.logit_scale_max)

    def forward(
        self,
        batch: Mapping[str, Tensor],
        *,
        image_grid: tuple[int, int] | None = None,
        n_prefix: int = 1,
    ) -> tuple[Tensor, Tensor]:
        if not self.mode.sequences:
            img = self._image_in(batch["image_pooled"])  # [B, 1, d]
            txt = self._text_in(batch["text_pooled"])  # [B, 1, d]
            for block in self.blocks:  # the paper: one key, so the query is unused
                img = block(img, query=txt, kv=img)
                txt = block(txt, query=img, kv=txt)
        else:
            img = self._image_in(batch["image_tokens"], image_grid, n_prefix)  # [B, Ti', d]
            txt = self._text_in(batch["text_tokens"])  # [B, Tt, d]
            mask = batch.get("text_mask")
            pad = None if mask is None else ~mask.to(torch.bool)  # [B, Tt], True = pad
            for block in self.blocks:
                img = block(img, query=img, kv=txt, kv_pad=pad)
                txt = block(txt, query=txt, kv=img)
        return F.normalize(img[:, 0], dim=-1), F.normalize(txt[:, 0], dim=-1)

    def encode_image(
        self,
        image: Tensor,
        *,
        image_grid: tuple[int, int] | None = None,
        n_prefix: int = 1,
        return_tokens: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Per-sample image-only embedding: ``[B, Di]`` (pooled) or ``[B, Ti, Di]``
        (tokens) -> ``[B, d]``; with ``return_tokens`` also the normalised per-token
        outputs ``[B, Ti', d]`` (Ti' after grid pooling) for dense heads."""
        x = self._image_in(image, image_grid, n_prefix)  # [B, T, d]
        for block in self.blocks:
            x = block(x, query=x, kv=x)
        emb = F.normalize(x[:, 0], dim=-1)
        return (emb, F.normalize(x, dim=-1)) if return_tokens else emb

    def _image_in(
        self, x: Tensor, grid: tuple[int, int] | None = None, n_prefix: int = 1
    ) -> Tensor:
        x = x.to(self.image_proj.weight.dtype)
        if not self.mode.sequences:
            _expect_ndim(x, 2, "image_pooled [B, Di]")
            x = x[:, None]  # [B, 1, Di]: an explicit length-1 sequence per sample
        else:
            _expect_ndim(x, 3, "image_tokens [B, Ti, Di]")
            if self.cfg.grid_pool:
                x = pool_patch_grid(x, self.cfg.grid_pool, grid, n_prefix)
        return F.normalize(self.image_proj(x), dim=-1)

    def _text_in(self, x: Tensor) -> Tensor:
        x = x.to(self.text_proj.weight.dtype)
        if not self.mode.sequences:
            _expect_ndim(x, 2, "text_pooled [B, Dt]")
            x = x[:, None]
        else:
            _expect_ndim(x, 3, "text_tokens [B, Tt, Dt]")
        return F.normalize(self.text_proj(x), dim=-1)


def pair_scores(model, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None, partners: Tensor,
                **fwd) -> Tensor:
    """Score image ``i`` against the texts ``partners[i, j]``, each pair by its own joint forward.

    ``image_tokens [B, Ti, Di]``, ``text_tokens [N, Tt, Dt]``, ``text_mask [N, Tt]``,
    ``partners [B, K]`` (indices into the texts) -> cosine of the pair's outputs ``[B, K]``.
    For modes whose pair embeddings see each other (``joint_pairs``), so that no embedding
    scored against a text has seen another one. Every all-pairs and shifted-pairs scoring
    in the project goes through here.
    """
    b, k = partners.shape
    flat = partners.reshape(-1).to(text_tokens.device)
    pairs = {"image_tokens": image_tokens.repeat_interleave(k, 0), "text_tokens": text_tokens[flat]}
    if text_mask is not None:
        pairs["text_mask"] = text_mask[flat]
    img, txt = model(pairs, **fwd)
    return (img * txt).sum(-1).view(b, k)


def all_pair_scores(model, image_tokens: Tensor, text_tokens: Tensor, text_mask: Tensor | None,
                    block_pairs: int = 2048, **fwd) -> Tensor:
    """``[n_img, n_txt]`` scores of every (image, text) pair, ``block_pairs`` pairs per forward."""
    n_img, n_txt = image_tokens.shape[0], text_tokens.shape[0]
    block = max(1, block_pairs // n_txt)
    every = torch.arange(n_txt, device=text_tokens.device)
    return torch.cat([pair_scores(model, image_tokens[s:s + block], text_tokens, text_mask,
                                  every.expand(min(block, n_img - s), n_txt), **fwd)
                      for s in range(0, n_img, block)])


def pool_patch_grid(
    x: Tensor, size: int, grid: tuple[int, int] | None = None, n_prefix: int = 1
) -> Tensor:
    """Average-pool the patch grid to ``size x size``, keeping prefix tokens in front.

    ``[B, n_prefix + h*w, D] -> [B, n_prefix + size*size, D]``.
    """
    prefix, patches = x[:, :n_prefix], x[:, n_prefix:]
    n = patches.shape[1]
    h, w = grid if grid is not None else (math.isqrt(n), math.isqrt(n))
    if h * w != n:
        raise ValueError(
            f"{n} patch tokens do not form a {h}x{w} grid; pass image_grid=(h, w) and n_prefix"
        )
    b, _, d = patches.shape
    maps = patches.transpose(1, 2).reshape(b, d, h, w)  # [B, D, h, w]
    pooled = F.adaptive_avg_pool2d(maps, size).flatten(2).transpose(1, 2)  # [B, s*s, D]
    return torch.cat([prefix, pooled], dim=1)


def _expect_ndim(x: Tensor, ndim: int, what: str) -> None:
    if x.ndim != ndim:
        raise ValueError(f"expected {what}, got shape {tuple(x.shape)}")
