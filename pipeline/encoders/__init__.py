"""Frozen image and text encoders behind one registry and one output schema.

    enc = create_encoder("dinov2-s", device)
    out = enc(pixels)                    # ImageOutput(pooled, tokens, grid)
    out = enc(**enc.tokenize(texts))     # TextOutput(tokens, length, pooled)
"""
# isort: off
from .base import FrozenEncoder, ImageEncoder, ImageOutput, TextEncoder, TextOutput
from .config import EncoderConfig
from .registry import (UnknownEncoderError, canonical_name, create_encoder, describe_encoders, list_aliases,
                       list_encoders, register_alias, register_encoder, resolve_encoder_name)
from .weights import WeightsNotFoundError, locate_weights, weights_available, weights_identity
from . import image as _image, text as _text  # noqa: F401  (registers the built-in encoders)
from . import openclip as _openclip, siglip as _siglip  # noqa: F401  (and the CLIP-style families)
# isort: on

__all__ = [
    "EncoderConfig", "FrozenEncoder", "ImageEncoder", "ImageOutput", "TextEncoder", "TextOutput",
    "UnknownEncoderError", "WeightsNotFoundError", "canonical_name", "create_encoder", "describe_encoders",
    "list_aliases", "list_encoders", "locate_weights", "register_alias", "register_encoder",
    "resolve_encoder_name", "weights_available", "weights_identity",
]
