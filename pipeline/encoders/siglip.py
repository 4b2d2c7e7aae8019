"""SigLIP towers (transformers' ``SiglipVisionModel`` / ``SiglipTextModel``): MedSigLIP, the
vision tower of CheXagent (XraySigLIP), and their tiny stand-in.

Token layout: the vision tower has no class token; its last hidden states (post-layernorm)
are the patch grid, and its attention-pooling head (a probe query over every token) gives
the pooled vector, which is also the image's vector in the joint space (SigLIP has no
projection after the head). The text tower reads texts padded to ``max_tokens``, without an
attention mask, as SigLIP was trained ("pass padding='max_length'", transformers' SigLIP
docs); its pooled vector is the head of the last position. A pair's logit in the joint space
is ``exp(logit_scale) * cosine + logit_bias``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import ImageEncoder, ImageOutput, TextEncoder, TextOutput
from .config import EncoderCard, EncoderConfig
from .cost import bert_gflops, map_head_macs, vit_gflops
from .hf import check_architecture, load_tower, quiet_transformers
from .registry import register_encoder
from .weights import require_weights

HALF = (0.5, 0.5, 0.5)
# transformers' SiglipImageProcessor (its torchvision backend, the default class in transformers 5):
# both sides resized to the input size (no crop), bicubic, the 8-bit image through torchvision.
SIGLIP_RESIZE = (("geometry", "square"), ("resample", "bicubic"), ("resampler", "torch-uint8"))
SIGLIP_REFERENCE = ("transformers SiglipImageProcessor (torchvision backend): {s}x{s} bicubic, no crop, "
                    "rescale 1/255, mean = std = 0.5")


def joint_scores(folder: Path) -> dict | None:
    """``logit_scale`` (exponentiated) and ``logit_bias`` from the checkpoint, read without loading the model."""
    from safetensors import safe_open  # lazy: loaded with the encoder that needs it

    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            if "logit_scale" in st.keys():
                bias = st.get_tensor("logit_bias").item() if "logit_bias" in st.keys() else 0.0
                return {"logit_scale": float(st.get_tensor("logit_scale").exp().item()), "logit_bias": float(bias)}
    return None


class SiglipImageEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig, model: nn.Module, joint: dict | None = None):
        super().__init__(config)
        self.model, self._joint = model, joint

    def joint(self) -> dict | None:
        return self._joint if self.config.joint_space else None

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        out = self.model(pixel_values=pixels)
        p = self.config.patch_size
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        pooled = out.pooler_output
        return ImageOutput(pooled, out.last_hidden_state, grid, pooled if self.config.joint_space else None)


class SiglipTextEncoder(TextEncoder):
    def __init__(self, config: EncoderConfig, tokenizer, model: nn.Module, joint: dict | None = None):
        super().__init__(config)
        self.tokenizer, self.model, self._joint = tokenizer, model, joint

    def joint(self) -> dict | None:
        return self._joint

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        texts = [texts] if isinstance(texts, str) else list(texts)
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.config.max_tokens,
                               return_tensors="pt", return_attention_mask=True)
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **rest: torch.Tensor) -> TextOutput:
        out = self.model(input_ids=input_ids.to(self.device))   # no mask: the pads are read, as in training
        mask = attention_mask.to(self.device)
        tokens = out.last_hidden_state * mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return TextOutput(tokens, mask.sum(1).long(), out.pooler_output, out.pooler_output)


def _folder(config: EncoderConfig) -> Path:
    loc = require_weights(config)
    check_architecture(config, loc.path, ("siglip",), f"{config.modality.replace('image', 'vision')}_config.hidden_size")
    return loc.path


def build_siglip_image(config: EncoderConfig) -> SiglipImageEncoder:
    from transformers import SiglipVisionModel  # lazy: transformers takes seconds to import

    folder = _folder(config)
    return SiglipImageEncoder(config, load_tower(SiglipVisionModel, folder, config), joint_scores(folder))


def build_siglip_text(config: EncoderConfig) -> SiglipTextEncoder:
    from transformers import AutoTokenizer, SiglipTextModel  # lazy: transformers takes seconds to import

    folder = _folder(config)
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return SiglipTextEncoder(config, tokenizer, load_tower(SiglipTextModel, folder, config), joint_scores(folder))


# --- registry entries -------------------------------------------------------------------

_MEDSIGLIP = dict(
    hub_id="google/medsiglip-448", joint_space="medsiglip-448", native_dim=1152,
    extra=(("architecture", "SigLIP-400M tower"),))
_MEDSIGLIP_CARD = dict(licence="Health AI Developer Foundations terms of use", gated=True,
                       url="https://huggingface.co/google/medsiglip-448")

# google/medsiglip-448: config.json vision_config (1152 wide, 27 layers, 16 heads, MLP 4304, patch 14,
# image 448) and text_config (1152 wide, 27 layers, 64 positions, vocabulary 32,000); its
# preprocessor_config.json: SiglipImageProcessor, size 448x448, resample 3 (bicubic), rescale 1/255,
# mean = std = 0.5 (the model card: "448x448 image resolution with up to 64 text tokens").
register_encoder(EncoderConfig(
    name="medsiglip", modality="image", source="hf", embed_dim=1152, patch_size=14, num_prefix_tokens=0,
    mean=HALF, std=HALF, resize_size=448, input_size=448, pooling="head", resize=SIGLIP_RESIZE,
    description="MedSigLIP-448 vision tower (Google; SigLIP-400M tuned on medical images); 32x32 patch tokens, "
                "no class token; pooled = its attention-pooling head, also its joint-space vector",
    card=EncoderCard(gflops=round(vit_gflops(448, 14, 1152, 27, 4304, prefix=0,
                                             head_macs=map_head_macs(1024, 1152, 4304)), 1),
                     reference=SIGLIP_REFERENCE.format(s=448), **_MEDSIGLIP_CARD), **_MEDSIGLIP,
), build_siglip_image)

register_encoder(EncoderConfig(
    name="medsiglip", modality="text", source="hf", embed_dim=1152, max_tokens=64, pooling="pooler",
    description="MedSigLIP-448 text tower; texts padded to 64 tokens and read without a mask, as SigLIP was "
                "trained; pooled = the head of the last position, also its joint-space vector",
    card=EncoderCard(gflops=round(bert_gflops(64, 1152, 27, 4304, head_macs=1152 * 1152), 1),
                     reference="the repository's SigLIP tokenizer, padding='max_length', max_length=64",
                     **_MEDSIGLIP_CARD), **_MEDSIGLIP,
), build_siglip_text)

# StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli: CheXagent's vision encoder, SigLIP ViT-L/16
# (1024 wide, 24 layers, MLP 4096) from the WebLI SigLIP-L/16-384, trained further on chest X-rays.
# Its processor: SiglipImageProcessor, 512x512, resample 3, mean = std = 0.5, as the
# preprocessor_config.json of the sibling XrayCLIP__vit-l-16-siglip-384__webli uploaded with it.
register_encoder(EncoderConfig(
    name="chexagent-siglip", modality="image", source="hf", hub_id="StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli",
    embed_dim=1024, patch_size=16, num_prefix_tokens=0, mean=HALF, std=HALF, resize_size=512, input_size=512,
    pooling="head", resize=SIGLIP_RESIZE, extra=(("architecture", "SigLIP ViT-L/16 vision tower"),),
    description="CheXagent's vision encoder (XraySigLIP, Stanford AIMI; SigLIP ViT-L/16 trained on chest X-rays); "
                "32x32 patch tokens, no class token; pooled = its attention-pooling head",
    card=EncoderCard(gflops=round(vit_gflops(512, 16, 1024, 24, 4096, prefix=0,
                                             head_macs=map_head_macs(1024, 1024, 4096)), 1),
                     licence="CC BY-NC 4.0", url="https://huggingface.co/StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli",
                     reference=SIGLIP_REFERENCE.format(s=512)),
), build_siglip_image)

_TINY = dict(source="standin", trained=False, joint_space="tiny-siglip", native_dim=32)
_TINY_EXTRA = (("standin", "tiny-siglip"), ("architecture", "SigLIP tower"))
register_encoder(EncoderConfig(
    name="tiny-siglip", modality="image", embed_dim=32, patch_size=16, num_prefix_tokens=0, mean=HALF, std=HALF,
    resize_size=64, input_size=64, pooling="head", resize=SIGLIP_RESIZE, extra=_TINY_EXTRA,
    description="UNTRAINED tiny SigLIP vision tower (32 wide, 2 layers, patch 16, 64 px), seeded random init in "
                "MedSigLIP's local layout; for tests and demos only",
    card=EncoderCard(gflops=round(vit_gflops(64, 16, 32, 2, 64, prefix=0, head_macs=map_head_macs(16, 32, 64)), 4),
                     licence="MIT (this project)", reference=SIGLIP_REFERENCE.format(s=64)), **_TINY,
), build_siglip_image)

register_encoder(EncoderConfig(
    name="tiny-siglip", modality="text", embed_dim=32, max_tokens=32, pooling="pooler", extra=_TINY_EXTRA,
    description="UNTRAINED tiny SigLIP text tower (32 wide, 2 layers, 32 positions, the built-in WordPiece "
                "vocabulary), seeded random init; for tests and demos only",
    card=EncoderCard(gflops=round(bert_gflops(32, 32, 2, 64, head_macs=32 * 32), 4), licence="MIT (this project)"),
    **_TINY,
), build_siglip_text)
