"""Loading transformers models offline and reproducibly."""
from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import torch

from core.errors import InputError

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


class WrongWeightsError(InputError):
    """The folder found for an encoder holds another model's weights."""


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def wrong_weights(config: EncoderConfig, folder: Path, found: str) -> WrongWeightsError:
    fix = (f"`hf download {config.hub_id}`" if config.hub_id else "a folder written by its own save_pretrained")
    return WrongWeightsError(
        f"encoder {config.name!r} ({config.modality}): the weights in {folder} are {found}, not the "
        f"{config.setting('architecture', 'model')} this encoder is. The folder holds another model's files; "
        f"replace them with {fix} (or remove the folder and fetch it again).")


def check_architecture(config: EncoderConfig, folder: Path, model_types: tuple[str, ...], width_key: str) -> None:
    """Refuse, before loading, weights whose ``config.json`` names another model type or width."""
    found = read_json(Path(folder) / "config.json")
    kind = found.get("model_type")
    sub = found.get(width_key.split(".")[0], {}) if "." in width_key else found
    width = sub.get(width_key.split(".")[-1]) if isinstance(sub, dict) else None
    if kind not in model_types:
        raise wrong_weights(config, folder, f"a {kind or 'unknown'} model (config.json model_type)")
    if config.embed_dim and width not in (None, config.embed_dim):
        raise wrong_weights(config, folder, f"a {kind} model {width} wide (the registry says {config.embed_dim})")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No progress bars and no loading report from transformers: a tower loaded from a
    two-tower checkpoint leaves the other tower's weights unused, by design."""
    from transformers.utils import logging  # lazy: transformers takes seconds to import

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with quiet_loading():
            yield
    finally:
        logging.set_verbosity(level)


def load_tower(model_class, folder: Path, config: EncoderConfig):
    """One tower of a two-tower checkpoint (``SiglipVisionModel`` from a ``SiglipModel``'s files):
    every weight of the tower must be in the file, the other tower's are left unread."""
    with seeded(0), quiet_transformers():
        model, info = model_class.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    bad = {k: sorted(v)[:4] for k, v in info.items() if k in ("missing_keys", "mismatched_keys") and v}
    if bad:
        raise wrong_weights(config, Path(folder), f"missing weights the {model_class.__name__} needs ({bad})")
    return model.float()
