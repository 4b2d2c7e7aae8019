"""Loading transformers models offline and reproducibly."""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import torch

from .config import EncoderConfig


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator inside, and leave the caller's RNG state untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """No "Loading weights" bars from transformers: the embed stage draws its own progress."""
    from transformers.utils import logging  # lazy: transformers takes seconds to import

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_pretrained(auto_class, folder: Path, config: EncoderConfig, **kwargs):
    """``auto_class.from_pretrained`` from a local folder, never from the network.

    Weights missing from a checkpoint (BERT checkpoints saved without their pooler, say)
    would be randomly initialised; the seed makes that reproducible, and a warning says so.
    """
    if config.setting("trust_remote_code"):
        kwargs["trust_remote_code"] = True
    with seeded(0), quiet_loading():
        model, info = auto_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True, **kwargs)
    missing = info.get("missing_keys") or []
    if missing:
        warnings.warn(f"{config.name}: weights missing from the checkpoint, seeded random init used: {sorted(missing)[:8]}",
                      stacklevel=2)
    return model.float()
