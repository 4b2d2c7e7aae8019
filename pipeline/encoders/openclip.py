"""open_clip models with a timm image trunk and a Hugging Face text tower: BiomedCLIP and its
tiny stand-in.

BiomedCLIP (microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is published for
open_clip: ``open_clip_config.json`` (model_cfg: embed_dim 512; vision_cfg: timm
``vit_base_patch16_224``, timm_pool "", timm_proj "linear", image_size 224; text_cfg:
hf_model_name and hf_tokenizer_name ``microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract``,
hf_proj_type "mlp", hf_pooler_type "cls_last_hidden_state_pooler", context_length 256;
preprocess_cfg: the OpenAI CLIP mean and std) and ``open_clip_pytorch_model.bin``. Its
transform is open_clip's ``image_transform`` with those settings: a bicubic resize of the
shorter side to 224 and a centre crop of 224 on the PIL image, then ``ToTensor`` and the
normalisation. The text tower's configuration and tokenizer come from the BiomedBERT
repository it names, so both repositories are needed offline.

Token layout: image tokens are the trunk's final-normed sequence (class token, then the
14x14 patch grid), pooled = the class token, and the joint-space vector is that through the
linear projection; text tokens are BERT's last hidden states, pooled = [CLS], and the
joint-space vector is [CLS] through the two-layer MLP projection. A pair's logit is
``exp(logit_scale) * cosine``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from core.errors import InputError

from .base import ImageEncoder, ImageOutput, TextEncoder, TextOutput
from .config import EncoderCard, EncoderConfig
from .cost import bert_gflops, vit_gflops
from .hf import quiet_transformers, read_json, seeded, wrong_weights
from .registry import register_encoder
from .standins import CLIP_MEAN, CLIP_STD, TINY_TRUNK, register_tiny_trunk
from .weights import require_weights, text_tower_folder

OPENCLIP_INSTALL_HINT = "install the openclip extra: pip install 'freeze-pipe[openclip]'"


class OpenClipMissing(InputError):
    """open_clip is an optional dependency."""


def _open_clip():
    try:
        import open_clip  # lazy: the openclip extra
    except ImportError as err:
        raise OpenClipMissing(f"encoders published for open_clip (biomedclip) need open_clip_torch, which cannot be "
                              f"imported here ({err}); {OPENCLIP_INSTALL_HINT}") from err
    return open_clip


def _model_cfg(config: EncoderConfig, folder: Path) -> dict:
    found = read_json(folder / "open_clip_config.json").get("model_cfg") or {}
    if "timm_model_name" not in found.get("vision_cfg", {}) or "hf_model_name" not in found.get("text_cfg", {}):
        raise wrong_weights(config, folder, "not an open_clip model with a timm trunk and a Hugging Face text tower "
                                            "(open_clip_config.json)")
    return found


def load_open_clip(config: EncoderConfig) -> tuple[nn.Module, Path, int]:
    """The CLIP model from its folder (open_clip's ``local-dir:`` loader), its text tower's folder
    and context length. Nothing is downloaded: the text tower is built from its local config and
    every weight comes from the CLIP checkpoint (strict)."""
    open_clip = _open_clip()
    folder = require_weights(config).path
    model_cfg = _model_cfg(config, folder)
    if model_cfg["vision_cfg"]["timm_model_name"] == TINY_TRUNK:
        register_tiny_trunk()
    text = text_tower_folder(folder, config) or folder
    text_cfg = {**model_cfg["text_cfg"], "hf_model_name": str(text), "hf_tokenizer_name": str(text),
                "hf_model_pretrained": False}
    was = logging.root.manager.disable
    logging.disable(logging.WARNING)   # open_clip logs each step of a load as a warning or info
    try:
        with seeded(0), quiet_transformers():
            model = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg, load_weights=True,
                                           require_pretrained=True)
    except RuntimeError as err:   # a checkpoint that does not fit the config (load_state_dict, strict)
        raise wrong_weights(config, folder, f"weights that do not fit its open_clip_config.json ({str(err)[:200]})")
    finally:
        logging.disable(was)
    return model.eval().float(), text, int(model_cfg["text_cfg"].get("context_length", 77))


def _joint(model: nn.Module) -> dict:
    bias = getattr(model, "logit_bias", None)
    return {"logit_scale": float(model.logit_scale.exp().item()), "logit_bias": float(bias.item()) if bias is not None else 0.0}


class OpenClipImageEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig, visual: nn.Module, joint: dict):
        super().__init__(config)
        self.visual, self._joint = visual, joint

    def joint(self) -> dict:
        return self._joint

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        tokens = self.visual.trunk.forward_features(pixels)            # class token + patches, final-normed
        pooled = self.visual.trunk.forward_head(tokens, pre_logits=True)
        p = self.config.patch_size
        return ImageOutput(pooled, tokens, (pixels.shape[-2] // p, pixels.shape[-1] // p), self.visual.head(pooled))


class OpenClipTextEncoder(TextEncoder):
    def __init__(self, config: EncoderConfig, tokenizer, text: nn.Module, joint: dict):
        super().__init__(config)
        self.tokenizer, self.text, self._joint = tokenizer, text, joint

    def joint(self) -> dict:
        return self._joint

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """open_clip's own tokenizer (its whitespace cleaning, truncation at the context length);
        the mask is what open_clip's text tower derives: every non-pad position."""
        ids = self.tokenizer([texts] if isinstance(texts, str) else list(texts))
        mask = (ids != self.tokenizer.tokenizer.pad_token_id).long()
        longest = max(int(mask.sum(1).max()), 1)
        return {"input_ids": ids[:, :longest], "attention_mask": mask[:, :longest]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **rest: torch.Tensor) -> TextOutput:
        ids, mask = input_ids.to(self.device), attention_mask.to(self.device)
        out = self.text.transformer(input_ids=ids, attention_mask=mask)
        states = out.last_hidden_state
        pooled = self.text.pooler(out, mask)     # cls_last_hidden_state_pooler: [CLS] of the last layer
        tokens = states * mask.unsqueeze(-1).to(states.dtype)
        return TextOutput(tokens, mask.sum(1).long(), pooled, self.text.proj(pooled))


def _check_width(config: EncoderConfig, actual: int) -> None:
    if config.embed_dim and actual != config.embed_dim:
        raise wrong_weights(config, require_weights(config).path,
                            f"an open_clip model whose {config.modality} tower is {actual} wide (the registry says "
                            f"{config.embed_dim})")


def build_open_clip_image(config: EncoderConfig) -> OpenClipImageEncoder:
    model, _, _ = load_open_clip(config)
    _check_width(config, model.visual.trunk.num_features)
    return OpenClipImageEncoder(config, model.visual, _joint(model))


def build_open_clip_text(config: EncoderConfig) -> OpenClipTextEncoder:
    model, text_folder, context = load_open_clip(config)
    _check_width(config, model.text.config.hidden_size)
    with quiet_transformers():
        tokenizer = _open_clip().tokenizer.HFTokenizer(str(text_folder), context_length=context)
    return OpenClipTextEncoder(config, tokenizer, model.text, _joint(model))


# --- registry entries -------------------------------------------------------------------

# open_clip's image_transform (resize_mode "shortest", interpolation "bicubic"): torchvision's Resize
# and CenterCrop of the PIL image (Pillow's bicubic, the crop origin rounded), ToTensor, Normalize.
OPENCLIP_RESIZE = (("resample", "bicubic"), ("resampler", "pil"))
_BIOMEDCLIP = dict(
    source="open_clip", hub_id="microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
    joint_space="biomedclip", native_dim=512,
    extra=(("text_tower_hub_id", "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"),
           ("architecture", "open_clip CustomTextCLIP (timm ViT-B/16 + PubMedBERT)")))
_CARD = dict(licence="MIT", url="https://huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224")

register_encoder(EncoderConfig(
    name="biomedclip", modality="image", embed_dim=768, patch_size=16, num_prefix_tokens=1, mean=CLIP_MEAN,
    std=CLIP_STD, resize_size=224, input_size=224, pooling="cls", resize=OPENCLIP_RESIZE,
    description="BiomedCLIP image tower (Microsoft; ViT-B/16 trained on PMC-15M figure-caption pairs); class token "
                "+ 14x14 patches; pooled = class token; joint space = its 512-d linear projection",
    card=EncoderCard(gflops=round(vit_gflops(224, 16, 768, 12, 3072, head_macs=768 * 512), 1),
                     reference="open_clip image_transform (shortest side 224, bicubic, centre crop 224, OpenAI CLIP "
                               "mean/std) on the 8-bit PIL image", **_CARD), **_BIOMEDCLIP,
), build_open_clip_image)

register_encoder(EncoderConfig(
    name="biomedclip", modality="text", embed_dim=768, max_tokens=256, pooling="cls",
    description="BiomedCLIP text tower (PubMedBERT, 256 tokens); pooled = [CLS] of the last layer; joint space = "
                "its 512-d MLP projection",
    card=EncoderCard(gflops=round(bert_gflops(256, head_macs=768 * 640 + 640 * 512), 1),
                     reference="open_clip HFTokenizer of BiomedNLP-BiomedBERT-base-uncased-abstract, context length 256",
                     **_CARD), **_BIOMEDCLIP,
), build_open_clip_text)

_TINY = dict(source="standin", trained=False, joint_space="tiny-biomedclip", native_dim=24)
_TINY_EXTRA = (("standin", "tiny-biomedclip"), ("architecture", "open_clip CustomTextCLIP"))
register_encoder(EncoderConfig(
    name="tiny-biomedclip", modality="image", embed_dim=48, patch_size=16, num_prefix_tokens=1, mean=CLIP_MEAN,
    std=CLIP_STD, resize_size=112, input_size=112, pooling="cls", resize=OPENCLIP_RESIZE, extra=_TINY_EXTRA,
    description="UNTRAINED tiny open_clip model (timm ViT 48 wide, 2 layers, patch 16, 112 px) in BiomedCLIP's "
                "layout, seeded random init; for tests and demos only",
    card=EncoderCard(gflops=round(vit_gflops(112, 16, 48, 2, 192, head_macs=48 * 24), 4), licence="MIT (this project)",
                     reference="open_clip image_transform at 112 px"), **_TINY,
), build_open_clip_image)

register_encoder(EncoderConfig(
    name="tiny-biomedclip", modality="text", embed_dim=32, max_tokens=32, pooling="cls", extra=_TINY_EXTRA,
    description="UNTRAINED tiny BERT text tower of tiny-biomedclip (32 wide, 2 layers, the built-in vocabulary); "
                "for tests and demos only",
    card=EncoderCard(gflops=round(bert_gflops(32, 32, 2, 64, head_macs=32 * 28 + 28 * 24), 4),
                     licence="MIT (this project)"), **_TINY,
), build_open_clip_text)
