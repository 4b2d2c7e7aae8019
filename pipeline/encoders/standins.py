"""Tiny random-init stand-ins for the encoders whose weights cannot be had here.

Each stand-in is built from its family's own architecture classes (transformers' DINOv2 and
SigLIP, open_clip's CLIP with a timm trunk and a BERT text tower), seeded, and written in
the exact local layout its family's loader reads: ``save_pretrained``'s folder with a
``preprocessor_config.json`` (DINOv2, SigLIP), or an open_clip folder
(``open_clip_config.json``, ``open_clip_model.safetensors``, the text tower's ``config.json``
and tokenizer). The registered ``tiny-*`` encoders load them through the real loaders, so
embedding, training, evaluation and prediction are exercised end to end without a download.

They are written once, on first use, to ``$PIPE_STANDINS`` (default: a folder in the
system's temporary directory): a temporary folder renamed into place, so a reader never sees
half a stand-in. UNTRAINED: for tests and demos only.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from .tiny_vocab import tiny_vocab, tiny_vocab_hash

RAD_DINO_MEAN, RAD_DINO_STD = (0.5307,) * 3, (0.2583,) * 3
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TINY_TRUNK = "freeze_pipe_tiny_vit_patch16"   # the timm name of tiny-biomedclip's image trunk


@dataclass(frozen=True)
class StandIn:
    arch: dict                      # the architecture settings, and the seed
    write: Callable[[Path, dict], None]

    @property
    def digest(self) -> str:
        blob = json.dumps({"arch": self.arch, "vocab": tiny_vocab_hash(), "writer": self.write.__name__}, sort_keys=True)
        return xxhash.xxh3_64_hexdigest(blob.encode())


def standin_root() -> Path:
    return Path(os.environ.get("PIPE_STANDINS") or Path(tempfile.gettempdir()) / f"freeze-pipe-standins-{os.getuid()}")


def standin_path(name: str) -> Path:
    return standin_root() / f"{name}-{STANDINS[name].digest}"


def standin_folder(name: str) -> Path:
    """The stand-in's folder, written first if it is not there yet."""
    final = standin_path(name)
    if (final / "done").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        STANDINS[name].write(tmp, STANDINS[name].arch)
        (tmp / "done").write_text("written whole\n")
        try:
            os.replace(tmp, final)
        except OSError:   # another process put its copy there first: the same bytes, keep it
            if not (final / "done").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def register_tiny_trunk() -> None:
    """Register the stand-in's 2-layer, 48-wide timm ViT (open_clip builds its trunk by timm name)."""
    import timm  # lazy: heavy, loaded with the encoder that needs it
    from timm.models import register_model  # lazy: with timm

    if timm.is_model(TINY_TRUNK):
        return

    def freeze_pipe_tiny_vit_patch16(pretrained: bool = False, **kwargs):
        for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
            kwargs.pop(k, None)
        kwargs.setdefault("img_size", 112)
        return timm.create_model("vit_base_patch16_224", pretrained=False, patch_size=16, embed_dim=48, depth=2,
                                 num_heads=3, **kwargs)

    register_model(freeze_pipe_tiny_vit_patch16)


def _seed(arch: dict):
    import torch  # lazy: torch loads with the encoder that needs it

    torch.manual_seed(int(arch.get("seed", 0)))


def _save_tokenizer(folder: Path, max_tokens: int) -> None:
    from .tiny_vocab import tiny_tokenizer  # lazy: transformers takes seconds to import

    tiny_tokenizer(max_tokens).save_pretrained(str(folder))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=1))


def write_dinov2(folder: Path, arch: dict) -> None:
    """A DINOv2 model as RAD-DINO's hub repository holds it: ``save_pretrained`` and its processor's file."""
    from transformers import Dinov2Config, Dinov2Model  # lazy: transformers takes seconds to import

    _seed(arch)
    Dinov2Model(Dinov2Config(**arch["model"])).save_pretrained(str(folder))
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "BitImageProcessor", "do_resize": True, "size": {"shortest_edge": arch["input"]},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": arch["input"], "width": arch["input"]},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(RAD_DINO_MEAN),
        "image_std": list(RAD_DINO_STD), "do_convert_rgb": True})


def write_siglip(folder: Path, arch: dict) -> None:
    """A two-tower SigLIP model as MedSigLIP's hub repository holds it (weights, processor, tokenizer)."""
    from transformers import SiglipConfig, SiglipModel  # lazy: transformers takes seconds to import

    _seed(arch)
    text = {**arch["text"], "vocab_size": len(tiny_vocab())}
    SiglipModel(SiglipConfig(text_config=text, vision_config=arch["vision"])).save_pretrained(str(folder))
    _save_tokenizer(folder, text["max_position_embeddings"])
    side = arch["vision"]["image_size"]
    _write_json(folder / "preprocessor_config.json", {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": side, "width": side},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


def write_open_clip(folder: Path, arch: dict) -> None:
    """An open_clip model as BiomedCLIP's hub repository holds it, with its text tower's config and
    tokenizer saved beside it (where the real one names another repository for them)."""
    import open_clip  # lazy: the openclip extra
    import torch  # lazy: torch loads with the encoder that needs it
    from safetensors.torch import save_file  # lazy: with torch
    from transformers import BertConfig  # lazy: transformers takes seconds to import

    register_tiny_trunk()
    BertConfig(**arch["text"], vocab_size=len(tiny_vocab())).save_pretrained(str(folder))
    _save_tokenizer(folder, arch["model_cfg"]["text_cfg"]["context_length"])
    model_cfg = json.loads(json.dumps(arch["model_cfg"]))
    model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_model_pretrained=False)
    _seed(arch)
    model = open_clip.CustomTextCLIP(**model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(float(torch.log(torch.tensor(100.0))))   # BiomedCLIP's learned scale is near 100
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    _write_json(folder / "open_clip_config.json", {
        "model_cfg": arch["model_cfg"], "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}})


STANDINS: dict[str, StandIn] = {
    "tiny-rad-dino": StandIn({"seed": 0, "input": 112, "model": dict(
        hidden_size=48, num_hidden_layers=2, num_attention_heads=3, mlp_ratio=4, patch_size=14, image_size=112,
        layer_norm_eps=1e-6, use_mask_token=False)}, write_dinov2),
    "tiny-siglip": StandIn({"seed": 0, "vision": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=64, patch_size=16),
        "text": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     max_position_embeddings=32)}, write_siglip),
    "tiny-biomedclip": StandIn({"seed": 0, "text": dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64),
        "model_cfg": {"embed_dim": 24, "vision_cfg": {
            "timm_model_name": "freeze_pipe_tiny_vit_patch16", "timm_model_pretrained": False, "timm_pool": "",
            "timm_proj": "linear", "image_size": 112},
            "text_cfg": {"hf_model_name": "freeze-pipe/tiny-biomedbert", "hf_tokenizer_name": "freeze-pipe/tiny-biomedbert",
                         "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32}}},
        write_open_clip),
}
