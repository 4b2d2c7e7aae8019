"""One output schema and one module interface for every frozen encoder.

The embed stage only ever sees these types, so it never branches on which encoder runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import EncoderConfig
from .weights import weights_identity


@dataclass
class ImageOutput:
    pooled: torch.Tensor       # [B, D]
    tokens: torch.Tensor       # [B, P + N, D]: P prefix tokens, then N patch / spatial tokens
    grid: tuple[int, int]      # (h, w) with h * w == N
    native: torch.Tensor | None = None   # [B, E]: the pooled output in the joint space (config.joint_space)


@dataclass
class TextOutput:
    tokens: torch.Tensor       # [B, T, D], padded to the longest text in the batch
    length: torch.Tensor       # [B] int64, real tokens per text
    pooled: torch.Tensor       # [B, D]
    native: torch.Tensor | None = None   # [B, E]: the pooled output in the joint space (config.joint_space)


def check_embed_dim(config: EncoderConfig, actual: int) -> None:
    """Loaded weights must have the width the registry promises the cache."""
    if config.embed_dim and actual != config.embed_dim:
        raise RuntimeError(f"{config.name}: the loaded model is {actual} wide, the registry says {config.embed_dim}")


class FrozenEncoder(nn.Module):
    """Eval mode for good and no gradients: ``train()`` cannot switch it back."""

    def __init__(self, config: EncoderConfig, weights_id: str | None = None):
        super().__init__()
        self.config = config
        self._weights_id = weights_id

    def freeze(self) -> "FrozenEncoder":
        self.requires_grad_(False)
        return super().train(False)

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # BatchNorm statistics or dropout must never change a frozen encoder's output.
        return super().train(False)

    def joint(self) -> dict | None:
        """The joint space's own scoring, for an encoder with one: ``{"logit_scale": s,
        "logit_bias": b}`` (a pair's logit is ``s * cosine + b``, as the model scores it)."""
        return None

    def weights_id(self) -> str:
        """The weights' identity for the cache fingerprint (hub commit, file hash or seed)."""
        if self._weights_id is None:
            self._weights_id = weights_identity(self.config)
        return self._weights_id

    @property
    def device(self) -> torch.device:
        first = next(self.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        first = next(self.parameters(), None)
        return first.dtype if first is not None else torch.float32

    def extra_repr(self) -> str:
        return f"name={self.config.name!r}, dim={self.config.embed_dim}"


class ImageEncoder(FrozenEncoder):
    """``forward(pixels [B, 3, H, W], normalised as config says) -> ImageOutput``."""

    def forward(self, pixels: torch.Tensor) -> ImageOutput:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"{self.config.name}: expected pixels [B, 3, H, W], got {tuple(pixels.shape)}")
        out = self.encode(pixels.to(self.device, self.dtype))
        n_expected = self.config.num_prefix_tokens + out.grid[0] * out.grid[1]
        if out.tokens.shape[1] != n_expected:
            raise RuntimeError(f"{self.config.name}: {out.tokens.shape[1]} tokens, expected {n_expected}")
        return out

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        raise NotImplementedError


class TextEncoder(FrozenEncoder):
    """``tokenize(texts) -> batch``; ``forward(**batch) -> TextOutput``."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError
