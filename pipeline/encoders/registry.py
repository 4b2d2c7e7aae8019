"""Name -> (config, builder) registry, in the style of timm's ``register_model``."""
from __future__ import annotations

import difflib
import re
import threading
from pathlib import Path
from typing import Callable

import torch

from core.errors import InputError
from pipeline.imaging import DEFAULT_GEOMETRY, ShiftScaleRotate

from . import autoconfig
from .base import FrozenEncoder, ImageEncoder, TextEncoder
from .config import EncoderConfig
from .remote import require_consent, runs_remote_code
from .weights import WeightsNotFoundError, find_hub_snapshot, hub_download_hint, weights_available

Builder = Callable[[EncoderConfig], FrozenEncoder]

_REGISTRY: dict[str, tuple[EncoderConfig, Builder]] = {}
# Every entry by (name, modality): a model family's towers share one name (``biomedclip`` is an
# image and a text encoder); ``_REGISTRY`` holds the one registered first (its image tower).
_TOWERS: dict[tuple[str, str], tuple[EncoderConfig, Builder]] = {}
_ALIASES: dict[str, str] = {}
# Builders for configs made on the fly from a hub id or a local directory, by modality.
_AUTO_BUILDERS: dict[str, Builder] = {}

_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

# ``<image encoder><suffix>``: the encoder with another policy for its cached augmented views
# (``pipe embed --views K``), made on first use for any registered image encoder. ``-ssr`` is the
# authors' segmentation augmentation (``pipeline.imaging.ShiftScaleRotate``), whose views a mask
# can follow: a decoder trains on them with ``seg.augment=true``.
AUGMENTED_SUFFIXES = {"-ssr": ShiftScaleRotate()}
_DERIVING = threading.Lock()
_DERIVED: set[str] = set()   # the variants made so far: not listed (any image encoder has them)


class UnknownEncoderError(InputError):
    """The name is neither registered, nor an alias, nor a hub id or local model directory."""


def register_encoder(config: EncoderConfig, builder: Builder | None = None, *, aliases: tuple[str, ...] = ()):
    """Register ``builder`` under ``config.name``. Without a builder, returns a decorator."""
    if builder is None:
        return lambda fn: register_encoder(config, fn, aliases=aliases) or fn
    if (config.name, config.modality) in _TOWERS or config.name in _ALIASES:
        raise ValueError(f"encoder {config.name!r} is already registered")
    _TOWERS[(config.name, config.modality)] = (config, builder)
    _REGISTRY.setdefault(config.name, (config, builder))
    for alias in aliases:
        register_alias(alias, config.name)
    return None


def register_alias(alias: str, target: str) -> None:
    if alias in _REGISTRY or alias in _ALIASES:
        raise ValueError(f"encoder name {alias!r} is already taken")
    _ALIASES[alias] = target


def register_auto_builder(modality: str, builder: Builder) -> None:
    _AUTO_BUILDERS[modality] = builder


def list_encoders(modality: str | None = None) -> list[EncoderConfig]:
    """The registered encoders (not the ``-ssr``-style variants made on first use)."""
    return [cfg for cfg, _ in _TOWERS.values() if modality in (None, cfg.modality) and cfg.name not in _DERIVED]


def list_aliases() -> dict[str, str]:
    return dict(_ALIASES)


def _unknown(name: str) -> UnknownEncoderError:
    names = sorted(_REGISTRY) + sorted(_ALIASES)
    close = difflib.get_close_matches(name, names, n=3)
    maybe = f" Did you mean {', '.join(close)}?" if close else ""
    aliases = ", ".join(f"{a} -> {t}" for a, t in sorted(_ALIASES.items()))
    return UnknownEncoderError(
        f"unknown encoder {name!r}.{maybe} Valid names: {', '.join(sorted(_REGISTRY))} "
        f"(aliases: {aliases}). A Hugging Face hub id (org/name, read from the local HF cache) "
        f"or a local model directory (with config.json) is also accepted."
    )


def _registered_by_hub_id(hub_id: str, modality: str | None = None) -> EncoderConfig | None:
    found = [cfg for cfg, _ in _TOWERS.values() if cfg.hub_id == hub_id]
    return next((c for c in found if modality in (None, c.modality)), found[0] if found else None)


def canonical_name(name: str) -> str:
    """The registered name of an encoder given by any alias, hub id or directory."""
    return resolve_encoder_name(name).name


def _registered(name: str, modality: str | None) -> EncoderConfig | None:
    """A registered name or alias; the tower of ``modality`` where the family has one."""
    name = _ALIASES.get(name, name)
    if modality and (name, modality) in _TOWERS:
        return _TOWERS[(name, modality)][0]
    return _REGISTRY[name][0] if name in _REGISTRY else None


def resolve_encoder_name(name: str, modality: str | None = None) -> EncoderConfig:
    """The config for a registered name, an alias, a hub id or a local model directory.

    ``modality`` picks a family's tower (``biomedclip`` names an image and a text encoder);
    without it a name means the tower registered first."""
    name = str(name)
    registered = _registered(name, modality) or _augmented_variant(name, modality)
    if registered is not None:
        return registered
    path = Path(name).expanduser()
    if path.is_dir():
        return autoconfig.config_from_local_dir(path)
    if _HUB_ID.match(name):
        registered = _registered_by_hub_id(name, modality)
        if registered is not None:
            return registered
        snapshot = find_hub_snapshot(name)
        if snapshot is None:
            raise WeightsNotFoundError(
                f"encoder {name!r} looks like a Hugging Face hub id (revision main), but it is not in "
                f"the local HF cache, and nothing is downloaded implicitly. To get it: "
                f"{hub_download_hint(name, 'main')}."
            )
        return autoconfig.config_from_hub_snapshot(name, snapshot)
    raise _unknown(name)


def _augmented_variant(name: str, modality: str | None) -> EncoderConfig | None:
    """``<base><suffix>`` (:data:`AUGMENTED_SUFFIXES`) for a registered image encoder ``base``,
    registered under its canonical name (with ``name`` as an alias where they differ)."""
    if modality not in (None, "image"):
        return None
    for suffix, policy in AUGMENTED_SUFFIXES.items():
        base = _registered(name[:-len(suffix)], "image") if name.endswith(suffix) else None
        if base is None or base.modality != "image":
            continue
        canonical = base.name + suffix
        with _DERIVING:
            if (canonical, "image") not in _TOWERS:
                _DERIVED.add(canonical)
                register_encoder(base.replace(   # the same network and cost: only its views differ
                    name=canonical, augment=tuple(policy.to_dict().items()),
                    description=f"{base.description}. Augmented views ({policy.kind}) that a mask can follow"
                    if policy.follows_masks else f"{base.description}. Augmented views: {policy.kind}"),
                    _TOWERS[(base.name, "image")][1])
            if name != canonical and name not in _ALIASES:
                register_alias(name, canonical)
        return _TOWERS[(canonical, "image")][0]
    return None


def _builder_for(config: EncoderConfig) -> Builder:
    if (config.name, config.modality) in _TOWERS:
        return _TOWERS[(config.name, config.modality)][1]
    return _AUTO_BUILDERS[config.modality]


def create_encoder(name: str | EncoderConfig, device: str | torch.device = "cpu",
                   modality: str | None = None) -> ImageEncoder | TextEncoder:
    """Build a frozen encoder (eval mode, no gradients) on ``device``.

    Raises UnknownEncoderError for unknown names and WeightsNotFoundError, within
    seconds and without networking, when the weights are not on this machine.
    """
    config = name if isinstance(name, EncoderConfig) else resolve_encoder_name(name, modality)
    require_consent(config)  # an encoder that runs its repository's code needs the user's opt-in
    encoder = _builder_for(config)(config)
    return encoder.freeze().to(device)


def describe_encoders() -> list[dict]:
    """One row per registered encoder, for ``pipe encoders`` and ``pipe doctor``."""
    rows = []
    for cfg in list_encoders():
        available, where = weights_available(cfg)
        rows.append({
            "name": cfg.name,
            "modality": cfg.modality,
            "dim": cfg.embed_dim,
            "source": cfg.source,
            "hub_id": cfg.hub_id,
            "trained": cfg.trained,
            "status": "UNTRAINED" if not cfg.trained else ("available" if available else "missing"),
            "available": available,
            "where": where,
            "aliases": sorted(a for a, t in _ALIASES.items() if t == cfg.name),
            "description": cfg.description,
            "runs_remote_code": runs_remote_code(cfg),
            **card_row(cfg),
        })
    return rows


def card_row(cfg: EncoderConfig) -> dict:
    """The registry's facts about an encoder that `pipe encoders` and the docs' table show."""
    size = (f"{cfg.input_size}x{cfg.input_size}" if cfg.modality == "image" and cfg.input_size
            else (f"{cfg.max_tokens} tokens" if cfg.max_tokens else None))
    if size and cfg.modality == "image" and cfg.geometry != DEFAULT_GEOMETRY:   # cut otherwise than shorter side + crop
        size += f", {cfg.geometry}"
    return {"input": size, "tokens": cfg.tokens, "prefix_tokens": cfg.num_prefix_tokens if cfg.modality == "image" else None,
            "pooling": cfg.pooling, "gflops": cfg.card.gflops, "licence": cfg.card.licence or None,
            "gated": cfg.card.gated, "joint_space": cfg.joint_space, "native_dim": cfg.native_dim or None,
            "url": cfg.card.url or None, "reference": cfg.card.reference or None}
