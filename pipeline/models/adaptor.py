"""The Adaptor: a small cross-modal module trained on cached frozen-encoder embeddings.

* ``pooled`` reproduces the paper: one pooled vector per modality, a length-1
  sequence, so each attention has a single key and its softmax is exactly 1. The
  query never matters, Q/K get no gradient and nothing crosses between modalities
  (flaw 1 in docs/concepts/method.md). Kept only to reproduce the published model.
* ``tokens`` feeds whole token sequences (image prefix + patches, report [CLS] +
  words) and is built like ALBEF/BLIP, because a pair's fused embeddings cannot be
  scored contrastively (each has seen the other):

  - **unimodal encoders**: the ``blocks`` run as self-attention within one sample's
    image tokens, and (the same weights) within one report's tokens with its padding
    masked. Their readouts (token 0, or the masked mean: ``readout``) are the
    contrastive embeddings: in-batch CLIP InfoNCE, gatherable across ranks.
  - **matching head** (``fusion_layers`` > 0): cross-attention blocks over the two
    unimodal token sequences of a pair, shared by both streams in the authors' order
    (image stream first, queries from the image and keys/values from the report; then
    the report stream reading the *updated* image), and a linear image-text matching
    (ITM) logit on both streams' readouts and their elementwise product. It is trained
    on hard negatives drawn from the contrastive similarities, so cross-attention
    carries gradient and information.

Pooled-mode orientation. The authors' block adds the attention output to the key/value
stream (``img = block(residual=img, query=txt, kv=img)``), which only works when both
sequences have the same length; the fusion blocks of ``tokens`` mode use the usual
orientation: residual and query from the stream being updated, keys/values from the
other one.

Image-only path (``encode_image``): in ``pooled`` mode each block is self-attention over
the single image vector, which equals the paired forward's image embedding exactly,
since a one-key attention ignores its query. In ``tokens`` mode it *is* the unimodal
image encoder that training uses. Inputs are always 3-D ``[B, T, d]`` with
``batch_first``, so samples never attend to each other (the authors passed ``[B, d]``,
making the batch one sequence: flaw 2).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.config import OneOf, Validated
from pipeline.models.loss import sample_hard_negatives


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
    matching_head: bool            # may carry an image-text matching head (fusion_layers > 0)
    eval_batch: int                # rows per forward when its outputs are cached
    summary: str


POOLED = AdaptorMode("pooled", "pooled", ("pooled",), sequences=False, per_token_image=False, matching_head=False,
                     eval_batch=512, summary="the paper's model: one pooled vector per modality")
TOKENS = AdaptorMode("tokens", "tokens", ("tokens", "length"), sequences=True, per_token_image=True,
                     matching_head=True, eval_batch=64,
                     summary="unimodal token encoders for the contrastive embeddings, cross-attention in a "
                             "matching head (our fix of flaw 1)")
MODES: dict[str, AdaptorMode] = {m.name: m for m in (POOLED, TOKENS)}


def _renamed_image_weight(w) -> str:
    keep = f"text_to_image_weight: {1 - float(w):g}" if isinstance(w, (int, float)) else "text_to_image_weight: 1 - w"
    return ("renamed: write adaptor.text_to_image_weight, the weight of the text->image term. The old key "
            f"weighted the other direction (image->text), so image_weight: {w} means {keep}. The paper weights "
            "text->image 0.75 (its code's image_weight=0.75 is applied to logits_per_text: see \"The loss's "
            "direction\" in the documentation, docs/concepts/method.md).")


@dataclass(frozen=True)
class AdaptorConfig(Validated):
    """The Adaptor: its mode, its size and its loss."""
    mode: Annotated[str, OneOf(MODES)] = "pooled"  # pooled (the paper's model) or tokens (attention over the cached token sequences)
    image_dim: int = 768           # width of the image encoder's features (set from the cache when training)
    text_dim: int = 768            # width of the text encoder's features (set from the cache when training)
    d_model: int = 768             # the Adaptor's width: both modalities are projected to it
    n_heads: int = 12              # attention heads per block (must divide d_model)
    ffn_dim: int = 2048            # hidden width of each block's feed-forward layer
    n_layers: int = 2              # weight-shared blocks (the paper: 2)
    dropout: float = 0.1           # dropout inside the blocks
    grid_pool: int = 0  # tokens mode: >0 average-pools the patch grid to grid_pool x grid_pool
    readout: Literal["cls", "mean"] = "cls"  # tokens mode: token 0, or the mean over (real) tokens
    fusion_layers: int = 1  # tokens mode: cross-attention blocks under the matching head (0: no head)
    text_to_image_weight: float = 0.75  # the text->image loss term's weight, the paper's 0.75 (loss.clip_loss)
    logit_scale_init: float = 2.6592  # ln(1/0.07)
    logit_scale_max: float = 100.0  # clamp of exp(logit_scale); the authors never clamped

    RENAMED = {"image_weight": _renamed_image_weight}

    @staticmethod
    def checks(v) -> list[tuple[str, str]]:
        found = [(k, f"must be >= 1, got {v[k]}") for k in ("d_model", "n_heads", "ffn_dim", "n_layers") if v[k] < 1]
        if not found and v["d_model"] % v["n_heads"]:
            found.append(("d_model", f"{v['d_model']} is not divisible by n_heads={v['n_heads']}"))
        return found + [(k, m) for k, ok, m in (
            ("mode", v["mode"] in MODES, f"must be one of {', '.join(MODES)}, got {v['mode']!r}"),
            ("dropout", 0.0 <= v["dropout"] < 1.0, f"must lie in [0, 1), got {v['dropout']}"),
            ("text_to_image_weight", 0.0 <= v["text_to_image_weight"] <= 1.0,
             f"must lie in [0, 1], got {v['text_to_image_weight']}"),
            ("grid_pool", v["grid_pool"] >= 0, f"must be >= 0, got {v['grid_pool']}"),
            ("logit_scale_max", v["logit_scale_max"] > 0, f"must be > 0, got {v['logit_scale_max']}"),
            ("readout", v["readout"] in ("cls", "mean"), f"must be 'cls' or 'mean', got {v['readout']!r}"),
            ("fusion_layers", v["fusion_layers"] >= 0, f"must be >= 0, got {v['fusion_layers']}"),
        ) if not ok]


def adaptor_config_from_saved(saved: Mapping) -> AdaptorConfig:
    """The Adaptor config a checkpoint recorded. One written before the loss weight was renamed
    holds ``image_weight: w`` (the image->text weight): the same loss is ``text_to_image_weight: 1 - w``.
    The weight does not change the model, only how it was trained, so the translation is exact."""
    saved = dict(saved)
    if "image_weight" in saved:
        saved["text_to_image_weight"] = 1.0 - float(saved.pop("image_weight"))
    return AdaptorConfig(**saved)


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
        if kv.shape[1] == 1 and kv_pad is None:
            attended = self.one_key_attention(kv)
        else:
            attended, _ = self.attn(query, kv, kv, key_padding_mask=kv_pad, need_weights=False)
        x = self.norm1(x + self.drop1(attended))
        return self.norm2(x + self.drop2(self.ffn(x)))

    def one_key_attention(self, kv: Tensor, keep: Tensor | None = None) -> Tensor:
        """The attention's output when every query sees one key ``kv [B, 1, d]`` (pooled mode).

        The softmax over one key is exactly 1, so the output is the value projection through
        the output projection, whatever the query: the query and key projections (a fifth of
        the block's multiply-adds) cannot change it and are not computed. Their weights stay
        in the module, so checkpoints keep their layout; their gradient is zero either way.
        In training the attention's dropout acts on that weight of 1, one draw per sample and
        head, drawn here as ``nn.MultiheadAttention`` draws it (same shape, same generator),
        so the result equals the full computation's bit for bit under the same seed. ``keep``:
        that draw, made beforehand (:meth:`dropout_masks`).
        """
        attn, (b, _, d) = self.attn, kv.shape
        heads = attn.num_heads
        v = F.linear(kv, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:])  # [B, 1, d]
        if keep is None and self.training and attn.dropout > 0:
            keep = F.dropout(v.new_ones(b, heads, 1, 1), attn.dropout, training=True)  # [B, H, 1, 1]
        if keep is not None:
            v = (v.view(b, 1, heads, d // heads) * keep.view(b, 1, heads, 1)).view(b, 1, d)
        return attn.out_proj(v)

    def dropout_masks(self, n: int, like: Tensor) -> tuple[Tensor, ...] | None:
        """The dropout masks that a one-key ``forward`` of ``n`` samples draws, drawn here in its
        order, with its shapes and the dtype its dropouts see (``like``'s, or autocast's), so they
        are the same values: the attention's weight ``[n, H, 1, 1]``, after the attention
        ``[n, 1, d]``, inside the FFN ``[n, 1, f]``, after the FFN ``[n, 1, d]``. Each is 0 or
        1 / (1 - p), as ``F.dropout`` scales. None where nothing is drawn (eval mode, or p = 0)."""
        sites = ((self.attn.dropout, (self.attn.num_heads, 1)), (self.drop1.p, (1, like.shape[-1])),
                 (self.ffn[2].p, (1, self.ffn[0].out_features)), (self.drop2.p, (1, like.shape[-1])))
        if not self.training or not any(p > 0 for p, _ in sites):
            return None
        kind = like.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else like.dtype
        return tuple(F.dropout(like.new_ones((n, *shape), dtype=dtype), p, training=True) for p, shape in sites)

    def one_key_streams(self, x: Tensor, keep: tuple[Tensor, ...] | None) -> Tensor:
        """This block over several pooled streams at once, ``x [N, 1, d]`` (the streams stacked along
        the batch; each sample is its own one key), with the dropout masks ``keep`` of
        :meth:`dropout_masks` for those N samples. Each row is what ``forward(x, query=x, kv=x)``
        computes for it (to float rounding: one matrix product of N rows, not several)."""
        k_attn, k1, k_ffn, k2 = keep if keep is not None else (None,) * 4
        attended = self.one_key_attention(x, k_attn)
        x = self.norm1(x + (attended if k1 is None else attended * k1))
        h = self.ffn[1](self.ffn[0](x))
        h = self.ffn[3](h if k_ffn is None else h * k_ffn)
        return self.norm2(x + (h if k2 is None else h * k2))


class Adaptor(nn.Module):
    """Projections + shared blocks + a learnable logit scale (+ the matching head in tokens mode).

    ``forward(batch)`` takes a dict:
      pooled: ``image_pooled [B, Di]``, ``text_pooled [B, Dt]``
      tokens: ``image_tokens [B, Ti, Di]``, ``text_tokens [B, Tt, Dt]``,
              ``text_mask [B, Tt]`` (bool, True = real token; optional)
    and returns ``(img_emb [B, d], txt_emb [B, d])``, L2-normalised. In ``pooled`` mode
    they are token 0 of the paper's fused streams; in ``tokens`` mode they are the
    unimodal embeddings, so each depends on its own modality alone and the in-batch
    CLIP logits ``img_emb @ txt_emb.T`` are honest. With ``match=True`` (tokens mode) it
    also returns the matching logits ``[3B]`` of each pair (first B), each image with a
    report drawn as a hard negative (next B) and each report with a hard-negative image
    (last B); see :func:`pipeline.models.loss.itm_loss`. ``image_grid=(h, w)`` and
    ``n_prefix`` describe the image token layout (prefix tokens first, then the patch
    grid row-major); the grid defaults to the square that fits.
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
        self.fusion = nn.ModuleList()
        self.match_head: nn.Linear | None = None
        if self.mode.matching_head and cfg.fusion_layers:
            self.fusion.extend(
                FusionBlock(cfg.d_model, cfg.n_heads, cfg.ffn_dim, cfg.dropout)
                for _ in range(cfg.fusion_layers)
            )
            self.match_head = nn.Linear(3 * cfg.d_model, 1)

    @property
    def has_match_head(self) -> bool:
        return self.match_head is not None

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
        match: bool = False,
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        if not self.mode.sequences:
            if match:
                raise ValueError("a pooled-mode Adaptor has no matching head (its attention has one key)")
            img, txt = self._pooled_blocks(self._image_in(batch["image_pooled"]), self._text_in(batch["text_pooled"]))
            return F.normalize(img[:, 0], dim=-1), F.normalize(txt[:, 0], dim=-1)
        keep = batch.get("text_mask")
        keep = None if keep is None else keep.to(torch.bool)  # [B, Tt], True = real token
        # without the matching head only the readouts are used: the last block may compute token 0 alone
        img_tok = self.image_token_states(batch["image_tokens"], image_grid, n_prefix, readout_only=not match)
        txt_tok = self.text_token_states(batch["text_tokens"], keep, readout_only=not match)  # [B, Tt, d]
        img, txt = self.embedding(img_tok), self.embedding(txt_tok, keep)
        if not match:
            return img, txt
        if not self.has_match_head:
            raise ValueError("this Adaptor has no matching head (fusion_layers=0)")
        neg_txt, neg_img = sample_hard_negatives(img, txt, self.scale())
        b = torch.arange(img.shape[0], device=img.device)
        i_idx, t_idx = torch.cat([b, b, neg_img]), torch.cat([b, neg_txt, b])
        logits = self.match_logits(img_tok[i_idx], txt_tok[t_idx], None if keep is None else keep[t_idx])
        return img, txt, logits

    def _pooled_blocks(self, img: Tensor, txt: Tensor) -> tuple[Tensor, Tensor]:
        """The paper's blocks over the two pooled streams ``[B, 1, d]``: per block, the image stream
        (``block(img, query=txt, kv=img)``), then the text stream reading the updated image as its
        query. A one-key attention never reads its query, so the two streams of a block are
        independent, and both run as one batch of 2B rows: one matrix product per weight instead
        of two, and one gradient per parameter instead of two to add. The dropout masks are drawn
        first, in the per-stream order (the image stream's four, then the text stream's), so the
        result is the per-stream computation's, the same draws included (to float rounding)."""
        b, x = len(img), torch.cat([img, txt])  # [2B, 1, d]
        for block in self.blocks:
            masks = [block.dropout_masks(b, x) for _ in range(2)]  # image stream's, then text stream's
            keep = None if masks[0] is None else tuple(torch.cat(pair) for pair in zip(*masks))
            x = block.one_key_streams(x, keep)
        return x[:b], x[b:]

    # -- tokens mode: unimodal encoders and the matching head -----------------------------
    def image_token_states(
        self, image: Tensor, image_grid: tuple[int, int] | None = None, n_prefix: int = 1,
        readout_only: bool = False,
    ) -> Tensor:
        """Unimodal image encoder: ``[B, Ti, Di] -> [B, Ti', d]`` (tokens mode), self-attention
        within each sample. ``readout_only``: the caller reads only the readout (see
        :meth:`_self_attention_stack`), and may get token 0's row alone, ``[B, 1, d]``."""
        return self._self_attention_stack(self._image_in(image, image_grid, n_prefix), None, readout_only)

    def text_token_states(self, text: Tensor, keep: Tensor | None = None, readout_only: bool = False) -> Tensor:
        """Unimodal text encoder: ``[B, Tt, Dt] -> [B, Tt, d]`` (tokens mode), self-attention
        within each report over its real tokens (``keep``: True = real); ``readout_only`` as
        for :meth:`image_token_states`."""
        return self._self_attention_stack(self._text_in(text), None if keep is None else ~keep, readout_only)

    def _self_attention_stack(self, x: Tensor, pad: Tensor | None, readout_only: bool) -> Tensor:
        """The shared blocks as self-attention. With ``readout_only`` and the ``cls`` readout,
        the last block computes token 0's row alone (its query, attention over every token,
        FFN and norms): no other row of it is read, and each row is computed from its own
        query, so the readout is the same (to float rounding). Not while dropout draws masks
        (training with dropout > 0): the draws follow the tensors' shapes, and fewer rows
        would shift every later draw, so the result would no longer be the same."""
        last = len(self.blocks) - 1
        for n, block in enumerate(self.blocks):
            if n == last and readout_only and self._skips_unread_rows():
                return block(x[:, :1], query=x[:, :1], kv=x, kv_pad=pad)
            x = block(x, query=x, kv=x, kv_pad=pad)
        return x

    def _skips_unread_rows(self) -> bool:
        return self.cfg.readout == "cls" and not (self.training and self.cfg.dropout > 0)

    def encode_text(self, text: Tensor, keep: Tensor | None = None) -> Tensor:
        """Unimodal text embedding ``[B, d]`` (tokens mode): what ``forward`` returns for the text."""
        if not self.mode.sequences:
            raise ValueError("encode_text is the tokens-mode text path; a pooled Adaptor's text output "
                             "comes from forward()")
        keep = None if keep is None else keep.to(torch.bool)
        return self.embedding(self.text_token_states(text, keep, readout_only=True), keep)

    def text_embedding(self, text: Tensor, keep: Tensor | None = None) -> Tensor:
        """The text embedding ``[B, d]`` in either mode, from cached text features: pooled
        ``[B, Dt]`` (the paired forward's text output, which depends on the text alone, as
        each of its attentions has a single key) or tokens ``[B, Tt, Dt]`` with ``keep``
        (the unimodal text encoder).

        Pooled, only the text stream runs: in the paired forward each text block reads the
        image as its query, which a one-key attention never uses, so the image stream cannot
        change the text output and is not computed. (In training its dropout draws come
        first, so there only the distribution is the same; evaluation runs in eval mode.)"""
        if self.mode.sequences:
            return self.encode_text(text, keep)
        x = self._text_in(text)  # [B, 1, d]
        for block in self.blocks:
            x = block(x, query=x, kv=x)
        return F.normalize(x[:, 0], dim=-1)

    def match_logits(self, img_tok: Tensor, txt_tok: Tensor, keep: Tensor | None = None) -> Tensor:
        """Image-text matching logits ``[P]`` of P pairs of unimodal token states
        (``[P, Ti, d]``, ``[P, Tt, d]``, ``keep [P, Tt]``)."""
        if self.match_head is None:
            raise ValueError("this Adaptor has no matching head (pooled mode, or fusion_layers=0)")
        pad = None if keep is None else ~keep
        i, t = img_tok, txt_tok
        last = len(self.fusion) - 1
        for n, block in enumerate(self.fusion):  # the authors' order: image first, then text reads the updated image
            i = block(i, query=i, kv=t, kv_pad=pad)
            if n == last and self.cfg.readout == "cls":
                t = t[:, :1]  # only token 0 is read out: its row alone is computed (the same values)
            t = block(t, query=t, kv=i)
        # the product gives the linear head the pair's interaction directly: with the two
        # readouts alone it generalised barely above chance (held-out AUROC 0.52 on the demo)
        i, t = self.pool_tokens(i), self.pool_tokens(t, keep)
        return self.match_head(torch.cat([i, t, i * t], dim=-1)).squeeze(-1)

    def match_pairs(self, img_tok: Tensor, txt_tok: Tensor, keep: Tensor | None, i: Tensor, t: Tensor,
                    chunk: int = 256, progress: Callable[[int], None] | None = None) -> Tensor:
        """Matching logits ``[P]`` of the pairs (``img_tok[i[p]]``, ``txt_tok[t[p]]``), ``chunk``
        pairs per forward: the token states of each image and report are computed once, by
        the caller, however many pairs they are in."""
        out = []
        for s in range(0, len(i), chunk):
            a, b = i[s:s + chunk], t[s:s + chunk]
            out.append(self.match_logits(img_tok[a], txt_tok[b], None if keep is None else keep[b]))
            if progress is not None:
                progress(len(a))
        return torch.cat(out) if out else img_tok.new_zeros(0)

    def embedding(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """Tokens mode: the contrastive embedding ``[B, d]`` of unimodal token states
        ``[B, T, d]``: their readout, L2-normalised."""
        return F.normalize(self.pool_tokens(x, keep), dim=-1)

    def pool_tokens(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        """``[B, T, d] -> [B, d]``: token 0, or the mean over real tokens (``readout``)."""
        if self.cfg.readout == "cls":
            return x[:, 0]
        if keep is None:
            return x.mean(1)
        w = keep.to(x.dtype)[..., None]  # [B, T, 1]
        return (x * w).sum(1) / w.sum(1).clamp_min(1.0)

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
        outputs ``[B, Ti', d]`` (Ti' after grid pooling) for dense heads. In tokens mode
        this is the unimodal image encoder that training uses (equal to ``forward``'s
        image embedding)."""
        if self.mode.sequences:
            x = self.image_token_states(image, image_grid, n_prefix, readout_only=not return_tokens)
            emb = self.embedding(x)
        else:
            x = self._image_in(image, image_grid, n_prefix)  # [B, 1, d]
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


def trim_text_padding(text: Tensor, keep: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Report tokens ``[B, Tt, Dt]`` and their mask ``keep [B, Tt]`` cut after the last
    position that any report of the batch uses.

    Cached reports are padded to ``max_tokens``, so a batch of short reports would spend most
    of its attention and FFN rows on padding. The columns cut are padding in every row: masked
    wherever they are keys, and read by no readout (token 0, or the mean over real tokens), so
    the embeddings and matching logits are those of the padded batch (to float rounding: each
    attention sums fewer zero-weight terms). For eval mode: in training, dropout's draws follow
    the tensors' shapes. One host sync (the mask's extent); at least one column is kept.
    """
    if keep is None:
        return text, keep
    used = keep.any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else 1
    return (text, keep) if width >= text.shape[1] else (text[:, :width], keep[:, :width])


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
