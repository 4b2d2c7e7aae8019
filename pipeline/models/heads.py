"""Downstream heads trained on frozen features: classifiers and a segmentation decoder.

* ``mlp`` is the paper's classifier: Dropout -> Linear(in -> 512, no bias) -> BatchNorm1d
  -> ReLU -> Dropout -> Linear. ``linear`` is a linear probe as MAE runs it: a BatchNorm1d
  without affine parameters (feature standardisation, learned from the training batches
  and frozen at eval) in front of one Linear layer, so one learning rate suits features of
  any scale (the Adaptor's are unit-norm, a backbone's are not).
* ``SegDecoder`` upsamples a patch-token grid ``[B, D, h, w]`` to a mask logit map at the
  input resolution: stages of conv3x3 + BN + ReLU + 2x upsampling, a 1x1 conv, and a
  final bilinear resize when the grid is not a power-of-two fraction of the input.
  ``MgcaViTDecoder`` is the authors' (``seg.decoder=mgca-vit``); :data:`SEG_DECODERS` names both.
* ``segmentation_loss`` is MGCA's mixed loss, which the paper uses: alpha * focal + dice
  term, alpha = 10, where MGCA's dice term is -log(soft Dice) of the batch.
* ``save_head`` / ``load_head``: a trained classifier as one safetensors file whose
  metadata says how to rebuild it and what it reads and predicts (`pipe evaluate` writes
  them, `pipe predict`, `pipe export` and the trained-Adaptor API read them).
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from core.atomic import atomic_write_with
from core.errors import InputError, MissingFileError


class MLPHead(nn.Sequential):
    def __init__(self, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.1) -> None:
        super().__init__(
            nn.Dropout(dropout), nn.Linear(in_dim, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, n_out),
        )


class LinearHead(nn.Sequential):
    def __init__(self, in_dim: int, n_out: int) -> None:
        super().__init__(nn.BatchNorm1d(in_dim, affine=False), nn.Linear(in_dim, n_out))


@dataclass(frozen=True)
class HeadKind:
    """A classifier head: how to build it, and how it is fitted (``"steps"``: minibatch
    optimiser steps in the head bank; ``"lbfgs"``: full batch by L-BFGS, stages/evaluate/
    head_bank.py:fit_probes)."""

    name: str
    build: Callable[[int, int, int, float], nn.Module]   # (in_dim, n_out, hidden, dropout) -> module
    fit: str = "steps"
    summary: str = ""

    @property
    def by_lbfgs(self) -> bool:
        return self.fit == "lbfgs"


HEADS: dict[str, HeadKind] = {k.name: k for k in (
    HeadKind("mlp", lambda in_dim, n_out, hidden, dropout: MLPHead(in_dim, n_out, hidden, dropout),
             summary="the paper's: BatchNorm MLP with dropout"),
    HeadKind("linear", lambda in_dim, n_out, hidden, dropout: LinearHead(in_dim, n_out),
             summary="a linear layer on standardised features, trained by steps"),
    HeadKind("probe", lambda in_dim, n_out, hidden, dropout: LinearHead(in_dim, n_out), fit="lbfgs",
             summary="the same linear head, solved full-batch by L-BFGS per L2 strength"),
)}
HEAD_KINDS = tuple(HEADS)


def make_head(kind: str, in_dim: int, n_out: int, hidden: int = 512, dropout: float = 0.1) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_KINDS)}")
    return HEADS[kind].build(in_dim, n_out, hidden, dropout)


HEAD_FORMAT = "freeze-pipe-head"
# what a head file's metadata must say to rebuild the module
HEAD_SHAPE = ("kind", "in_dim", "n_out", "hidden", "dropout")


def save_head(path: Path, module: nn.Module, meta: dict) -> None:
    """A classifier and its description (``HEAD_SHAPE`` keys, labels, ...) in one file, atomically."""
    missing = [k for k in HEAD_SHAPE if k not in meta]
    if missing:
        raise ValueError(f"a head's metadata needs {', '.join(missing)}")
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    metadata = {"format": "pt", "kind": HEAD_FORMAT, "head": json.dumps(meta)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_with(path, lambda p: save_file(state, str(p), metadata=metadata))


def read_head_meta(path: Path) -> dict:
    """A head file's description; a file that is not one is one clear error."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"head {path} does not exist; `pipe evaluate --task classification` writes them "
                               "under <run>/heads/")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise InputError(f"{path} is not a head file (safetensors could not read it: "
                         f"{str(e).splitlines()[0][:120]})") from None
    if raw.get("kind") != HEAD_FORMAT or "head" not in raw:
        raise InputError(f"{path} is a safetensors file but not a classification head written by `pipe evaluate`")
    return json.loads(raw["head"])


def load_head(path: Path) -> tuple[nn.Module, dict]:
    """The head (in eval mode, on the CPU) and its description."""
    meta = read_head_meta(path)
    module = make_head(meta["kind"], meta["in_dim"], meta["n_out"], meta["hidden"], meta["dropout"])
    module.load_state_dict(load_file(str(path)))
    return module.eval(), meta


class SegDecoder(nn.Module):
    """``[B, D, h, w]`` patch features -> ``[B, out_size, out_size]`` mask logits."""

    def __init__(self, in_dim: int, grid: int, out_size: int, channels: Sequence[int] = (256, 128, 64, 32)):
        super().__init__()
        n_stages = max(1, math.ceil(math.log2(out_size / grid)))
        widths = [channels[min(i, len(channels) - 1)] for i in range(n_stages)]
        stages, c_in = [], in_dim
        for c in widths:
            stages += [nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)]
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(c_in, 1, 1)
        self.out_size = out_size

    def forward(self, x: Tensor) -> Tensor:
        y = self.out(self.stages(x))  # [B, 1, h * 2^n, w * 2^n]
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y[:, 0]


class MgcaViTDecoder(nn.Module):
    """The authors' DINOv2 decoder (their ``ViTDecoder``, after MGCA's): a 3x3 valid conv + BN + ReLU
    (16 -> 14 patches at 224), then per width a 3x3 conv + BN + ReLU + 2x nearest upsampling, and a
    3x3 conv to one logit map; convs with biases, initialised as theirs (Kaiming normal, fan-out)."""

    def __init__(self, in_dim: int, grid: int, out_size: int, channels: Sequence[int] = (512, 256, 128, 64)):
        super().__init__()
        stages = [nn.Conv2d(in_dim, in_dim, 3, padding=0), nn.BatchNorm2d(in_dim), nn.ReLU(inplace=True)]
        c_in = in_dim
        for c in channels:
            stages += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2)]
            c_in = c
        self.stages = nn.Sequential(*stages)
        self.out = nn.Conv2d(c_in, 1, 3, padding=1)
        self.out_size = out_size
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> Tensor:
        y = self.out(self.stages(x))
        if y.shape[-1] != self.out_size or y.shape[-2] != self.out_size:
            y = F.interpolate(y, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return y[:, 0]


# A segmentation decoder by name (``seg.decoder``): (in_dim, grid, out_size, channels) -> module.
SEG_DECODERS: dict[str, Callable[..., nn.Module]] = {"upsample": SegDecoder, "mgca-vit": MgcaViTDecoder}


def tokens_to_grid(tokens: Tensor, n_prefix: int, grid: tuple[int, int]) -> Tensor:
    """``[B, n_prefix + h*w, D]`` -> ``[B, D, h, w]`` (prefix tokens dropped)."""
    patches = tokens[:, n_prefix:]
    h, w = grid
    if patches.shape[1] != h * w:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form the {h}x{w} grid")
    return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], h, w)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0) -> Tensor:
    """Binary focal loss, mean over pixels (MGCA's FocalLoss)."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = torch.exp(-bce)
    return ((1.0 - p_t) ** gamma * bce).mean()


def soft_dice(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    """Soft Dice over the whole batch's pixels (smoothed, so an all-empty batch is defined)."""
    p = torch.sigmoid(logits).flatten()
    t = target.flatten()
    return (2.0 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def segmentation_loss(logits: Tensor, target: Tensor, alpha: float = 10.0, gamma: float = 2.0) -> Tensor:
    """MGCA's MixedLoss: ``alpha * focal - log(soft Dice)``. The log keeps a strong gradient
    while the Dice is small, which stops the decoder from settling on empty masks."""
    return alpha * focal_loss(logits, target, gamma) - torch.log(soft_dice(logits, target))
