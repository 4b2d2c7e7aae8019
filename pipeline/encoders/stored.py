"""What stage one stores of an encoder's outputs, and the fingerprint that names it.

Two users must agree on every detail here: `pipe embed` (stages/embed), which writes the
stores, and the trained-Adaptor API (pipeline/api), which computes for a new image or
report exactly what a store row would hold — the same preprocessing, the same arithmetic
(bf16 autocast on CUDA, float32 on CPU) and the same stored dtypes — so that an Adaptor
reads the same numbers from either.
"""
from __future__ import annotations

import contextlib

import torch

from cache.keys import fingerprint
from pipeline.imaging import Preprocess, augment_policy

from .config import EncoderConfig
from .weights import weights_identity

# The dtype each stored array has (and the API converts to before the Adaptor reads it).
STORED_DTYPES = {"tokens": torch.float16, "pooled": torch.float32, "length": torch.int32, "native": torch.float32}
CUDA_COMPUTE = "cuda, bf16 autocast"


def preprocess_of(enc_cfg: EncoderConfig) -> Preprocess:
    """The image preprocessing an encoder's config asks for."""
    return Preprocess(resize_size=enc_cfg.resize_size or enc_cfg.input_size, input_size=enc_cfg.input_size,
                      mean=tuple(enc_cfg.mean), std=tuple(enc_cfg.std), augment=augment_policy(dict(enc_cfg.augment)),
                      **dict(enc_cfg.resize))


def image_store_spec(enc_cfg: EncoderConfig) -> dict:
    """What an image store's fingerprint records beyond the encoder: its preprocessing."""
    return {"preprocess": preprocess_of(enc_cfg).to_dict()}


def text_store_spec(enc_cfg: EncoderConfig) -> dict:
    """What a text store's fingerprint records beyond the encoder: normalisation and token padding."""
    return {"text": {"normalisation": "nfc-collapse-whitespace", "max_tokens": enc_cfg.max_tokens,
                     "tokens": "all, padded to max_tokens"}}


MODALITY_SPECS = {"image": image_store_spec, "text": text_store_spec}


def compute_kind(device: torch.device | str | None) -> str | None:
    """The arithmetic the encoders run in on ``device``: the CUDA autocast, or None (float32)."""
    return CUDA_COMPUTE if device is not None and torch.device(device).type == "cuda" else None


def store_spec(enc_cfg: EncoderConfig, device: torch.device | str | None = None,
               weights: str | None = None) -> dict:
    """Everything that changes what a store holds: the input of its fingerprint.

    The arithmetic is part of it: on CUDA the encoders run under bf16 autocast, whose
    outputs differ from the CPU's float32 ones, so the two never share a store. (The key
    is only added on CUDA, so stores written on CPU keep their fingerprints.) ``weights``
    is the weights' identity when the caller already has it.
    """
    spec = {"encoder": enc_cfg.to_dict(), "weights": weights or weights_identity(enc_cfg),
            "dtype": {k: str(STORED_DTYPES[k]).removeprefix("torch.") for k in ("tokens", "pooled")},
            "tokens": "prefix+patches"}
    if compute_kind(device):
        spec["compute"] = compute_kind(device)
    if enc_cfg.joint_space:   # only encoders with a joint space store (and record) their projected vectors
        spec["native"] = native_spec(enc_cfg)
    return {**spec, **MODALITY_SPECS[enc_cfg.modality](enc_cfg)}


def native_spec(enc_cfg: EncoderConfig) -> dict:
    """The ``native`` array of an encoder with a joint space: the pooled output in that space."""
    return {"space": enc_cfg.joint_space, "dim": enc_cfg.native_dim, "dtype": "float32",
            "what": "pooled output through the model's own projection into the joint space"}


def shares_space(image: EncoderConfig, text: EncoderConfig) -> bool:
    """Whether two towers were trained into one space (so their native vectors can be compared)."""
    return bool(image.joint_space) and image.joint_space == text.joint_space


def store_fingerprint(enc_cfg: EncoderConfig, device: torch.device | str | None = None,
                      weights: str | None = None) -> str:
    return fingerprint(store_spec(enc_cfg, device, weights))


def encoder_arithmetic(device: torch.device):
    """The context the encoders run in: bf16 autocast on CUDA, plain float32 elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pad_token_rows(tokens: torch.Tensor, length: int) -> torch.Tensor:
    """Token states ``[B, T, D]`` zero-padded (or cut) to ``length`` positions, so a row never
    depends on its batch-mates' lengths (text stores hold ``max_tokens`` positions)."""
    out = tokens.new_zeros((tokens.shape[0], length, tokens.shape[2]))
    n = min(tokens.shape[1], length)
    out[:, :n] = tokens[:, :n]
    return out
