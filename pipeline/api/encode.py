"""New images and reports through the frozen encoders and the Adaptor, exactly as the cache would.

An image goes through stage one's own steps: decoded (:mod:`pipeline.imaging`),
preprocessed for its encoder (:func:`pipeline.encoders.stored.preprocess_of`), encoded
under stage one's arithmetic and converted to the stored dtypes; a report is
normalised like every cached report, encoded and its token states padded to the
store's length. The Adaptor then reads those arrays as it reads cache rows
(``encode_image``; ``text_embedding``), so an image encoded here equals its cached row
through the same Adaptor, to the float16 rounding of the stored tokens.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Union

import numpy as np
import torch
from PIL import Image

from cache.keys import normalise_report
from pipeline.encoders import EncoderConfig
from pipeline.encoders.stored import STORED_DTYPES, encoder_arithmetic, pad_token_rows
from pipeline.imaging import ImageDecodeError, Preprocess, decode_array, decode_image, decode_pil, read_and_decode
from pipeline.models.adaptor import Adaptor, trim_text_padding

ImageInput = Union[str, os.PathLike, bytes, np.ndarray, Image.Image, torch.Tensor]


def image_label(x: ImageInput, i: int) -> str:
    """How an input is named in messages and results: its path, else its position."""
    if isinstance(x, (str, os.PathLike)):
        return os.fspath(x)
    return f"<{type(x).__name__} #{i}>"


def decode_input(x: ImageInput, label: str) -> np.ndarray:
    """Any accepted input as a decoded ``[H, W]`` float32 grey image in [0, 1] (bright = dense)."""
    if isinstance(x, (str, os.PathLike)):
        return read_and_decode(x)[1]  # PNG, JPEG, TIFF, DICOM (with or without a preamble), ...
    if isinstance(x, (bytes, bytearray, memoryview)):
        return decode_image(bytes(x), label)
    if isinstance(x, Image.Image):
        return decode_pil(x.copy(), label)  # decode_pil closes what it is given
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return decode_array(x, label)
    raise ImageDecodeError(label, f"a {type(x).__name__} is not an image",
                           "pass a path, the file's bytes, a numpy array or a PIL image")


def load_pixels(items: list[ImageInput], labels: list[str], preprocess: Preprocess,
                pool: ThreadPoolExecutor) -> list[torch.Tensor | Exception]:
    """Decode and preprocess a batch (the plain view, as the cache holds); an exception per failure."""
    def one(x, label):
        try:
            return preprocess(decode_input(x, label))
        except ImageDecodeError as e:  # that image's failure; the others go on
            return ImageDecodeError(e.source, e.reason, "check the file (the other images are still encoded)")
        except (ValueError, OSError) as e:
            return ImageDecodeError(label, str(e), "check the file (the other images are still encoded)")
    return list(pool.map(one, items, labels))


@torch.inference_mode()
def image_features(encoder, pixels: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays an image store row holds (tokens float16, pooled float32), on ``device``."""
    with encoder_arithmetic(device):
        out = encoder(pixels.to(device))
    return {k: getattr(out, k).to(STORED_DTYPES[k]) for k in ("tokens", "pooled")}


@torch.inference_mode()
def text_features(encoder, cfg: EncoderConfig, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The arrays a text store row holds (tokens padded to ``max_tokens``, pooled, length)."""
    norm = [normalise_report(t) for t in texts]
    empty = [i for i, t in enumerate(norm) if not t]
    if empty:
        raise ValueError(f"text {empty[0]} is empty; a report needs words")
    batch = {k: v.to(device) for k, v in encoder.tokenize(norm).items()}
    with encoder_arithmetic(device):
        out = encoder(**batch)
    tokens = out.tokens.to(STORED_DTYPES["tokens"])
    if cfg.max_tokens:
        tokens = pad_token_rows(tokens, cfg.max_tokens)
    return {"tokens": tokens, "pooled": out.pooled.to(STORED_DTYPES["pooled"]),
            "length": out.length.to(STORED_DTYPES["length"])}


@torch.no_grad()
def adaptor_image(model: Adaptor, feats: dict[str, torch.Tensor], grid, n_prefix: int) -> np.ndarray:
    """The Adaptor's image embedding ``[B, d]`` float32 of stored image arrays."""
    x = feats[model.mode.image_array]
    return model.encode_image(x.clone(), image_grid=grid, n_prefix=n_prefix).float().cpu().numpy()


@torch.no_grad()
def adaptor_text(model: Adaptor, feats: dict[str, torch.Tensor]) -> np.ndarray:
    """The Adaptor's text embedding ``[B, d]`` float32 of stored text arrays."""
    if model.mode.sequences:
        t = feats["tokens"].clone()
        keep = torch.arange(t.shape[1], device=t.device)[None] < feats["length"].long()[:, None]
        return model.text_embedding(*trim_text_padding(t, keep)).float().cpu().numpy()
    return model.text_embedding(feats["pooled"].clone()).float().cpu().numpy()
