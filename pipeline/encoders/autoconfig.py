"""Encoder configs for models named by hub id or local directory, read from config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from core.errors import InputError

from .config import EncoderConfig

# Transformers model types the generic builders handle, by modality.
MODEL_TYPE_MODALITY = {
    "dinov2": "image",
    "dinov2_with_registers": "image",
    "vit": "image",
    "bert": "text",
    "roberta": "text",
    "xlm-roberta": "text",
    "distilbert": "text",
    "electra": "text",
    "mpnet": "text",
    "deberta-v2": "text",
}
DEFAULT_IMAGE_NORM = (0.5, 0.5, 0.5)
DEFAULT_TEXT_MAX_TOKENS = 112
DEFAULT_INPUT_SIZE = 224
DEFAULT_RESIZE_SIZE = 256


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _side(value: Any) -> int | None:
    """A size from a preprocessor config: an int, or a dict with shortest_edge / height."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return value.get("shortest_edge") or value.get("height")
    return None


def _image_fields(model_cfg: dict, pre: dict) -> dict:
    mean, std = pre.get("image_mean"), pre.get("image_std")
    input_size = _side(pre.get("crop_size")) or DEFAULT_INPUT_SIZE
    return dict(
        embed_dim=model_cfg["hidden_size"],
        patch_size=model_cfg["patch_size"],
        num_prefix_tokens=1 + int(model_cfg.get("num_register_tokens", 0)),
        mean=tuple(mean) if mean else DEFAULT_IMAGE_NORM,
        std=tuple(std) if std else DEFAULT_IMAGE_NORM,
        resize_size=_side(pre.get("size")) or DEFAULT_RESIZE_SIZE,
        input_size=input_size,
        pooling="cls",
    )


def _has_pooler(folder: Path, model_cfg: dict) -> bool:
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        from safetensors import safe_open  # lazy: loaded with the encoder that needs it

        for shard in shards:
            with safe_open(str(shard), framework="pt") as f:
                if any(k.split(".")[0] == "pooler" or ".pooler." in k for k in f.keys()):
                    return True
        return False
    return any(a in ("BertModel", "BertForPreTraining") for a in model_cfg.get("architectures") or ())


def _text_fields(folder: Path, model_cfg: dict) -> dict:
    dim = model_cfg.get("hidden_size") or model_cfg.get("dim")
    return dict(
        embed_dim=dim,
        max_tokens=min(DEFAULT_TEXT_MAX_TOKENS, model_cfg.get("max_position_embeddings", 512)),
        pooling="pooler" if _has_pooler(folder, model_cfg) else "mean",
    )


def config_from_folder(folder: Path, *, name: str, source: str, hub_id: str | None = None,
                       revision: str = "main", extra: tuple = ()) -> EncoderConfig:
    model_cfg = _read_json(folder / "config.json")
    model_type = model_cfg.get("model_type")
    modality = MODEL_TYPE_MODALITY.get(model_type)
    if modality is None:
        raise InputError(
            f"{name}: config.json has model_type {model_type!r}; supported image types are "
            f"{sorted(k for k, v in MODEL_TYPE_MODALITY.items() if v == 'image')} and text types "
            f"{sorted(k for k, v in MODEL_TYPE_MODALITY.items() if v == 'text')}"
        )
    fields = (_image_fields(model_cfg, _read_json(folder / "preprocessor_config.json"))
              if modality == "image" else _text_fields(folder, model_cfg))
    return EncoderConfig(
        name=name, modality=modality, source=source, hub_id=hub_id, revision=revision,
        description=f"{model_type} model read from {folder}", extra=extra, **fields,
    )


def config_from_local_dir(path: Path) -> EncoderConfig:
    path = Path(path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise InputError(f"{path} is a directory but has no config.json; write the model with save_pretrained")
    return config_from_folder(path, name=str(path), source="local", extra=(("path", str(path)),))


def config_from_hub_snapshot(hub_id: str, snapshot: Path, revision: str = "main") -> EncoderConfig:
    return config_from_folder(snapshot, name=hub_id, source="hf", hub_id=hub_id, revision=revision)
