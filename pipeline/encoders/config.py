"""The frozen description of one encoder: everything that decides its output, and its card."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from core.jsondata import plain
from pipeline.imaging import RESIZE_DEFAULTS

MODALITIES = ("image", "text")
SOURCES = ("hf", "timm", "xrv", "package", "local", "random", "open_clip", "standin")
POOLINGS = {"image": ("cls", "avg", "head"), "text": ("pooler", "cls", "mean")}


@dataclass(frozen=True)
class EncoderCard:
    """What `pipe encoders` and the docs say about an encoder, none of which changes its outputs
    (so none of it goes into a store's fingerprint)."""

    gflops: float | None = None    # forward FLOPs per image (per text at max_tokens), 1e9; a multiply-add is 2
    licence: str = ""              # the weights' licence, as the model card names it
    gated: bool = False            # the hub asks each user to accept its terms before the download
    url: str = ""                  # the model card
    reference: str = ""            # the processor its preprocessing reproduces (and is tested against)


# Fields added after stores were first written: in a fingerprint only where they differ from these.
_LATER_FIELDS = {"joint_space": None, "native_dim": 0}


@dataclass(frozen=True)
class EncoderConfig:
    """Registry metadata for one frozen encoder (cf. timm's ``PretrainedCfg``).

    Images reach the encoder already resized (shorter side to ``resize_size``), centre
    cropped to ``input_size`` and normalised with ``mean``/``std``; ``resize`` names other
    variants of that resize and cut (:class:`pipeline.imaging.Preprocess`: another geometry,
    a square or ``pad-square`` (the authors' MGCA input); bicubic interpolation; the 8-bit
    resamplers of reference processors; their crop rounding). :attr:`geometry` reads it.
    An encoder whose towers share a space with a partner's (``joint_space``) also returns its
    pooled output projected into that space (``native_dim`` wide).
    """

    name: str
    modality: str
    source: str
    hub_id: str | None = None
    revision: str = "main"
    embed_dim: int = 0
    patch_size: int | None = None
    num_prefix_tokens: int = 0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    resize_size: int | None = None
    input_size: int | None = None
    max_tokens: int | None = None
    pooling: str = "cls"
    trained: bool = True
    description: str = ""
    extra: tuple[tuple[str, Any], ...] = ()
    resize: tuple[tuple[str, str], ...] = ()   # (setting, value) of pipeline.imaging.RESIZE_DEFAULTS that differ
    augment: tuple[tuple[str, Any], ...] = ()  # its cached views' policy (pipeline.imaging.augment_policy); () the default
    joint_space: str | None = None             # the space its towers were trained into together (CLIP-style pairs)
    native_dim: int = 0                        # the width of its projected (native) vectors in that space
    card: EncoderCard = field(default_factory=EncoderCard)   # what is said of it; never in a fingerprint

    def __post_init__(self) -> None:
        problems = []
        if self.modality not in MODALITIES:
            problems.append(f"modality {self.modality!r} not in {MODALITIES}")
        if self.source not in SOURCES:
            problems.append(f"source {self.source!r} not in {SOURCES}")
        if self.modality in POOLINGS and self.pooling not in POOLINGS[self.modality]:
            problems.append(f"pooling {self.pooling!r} not in {POOLINGS[self.modality]} for {self.modality}")
        if self.source in ("hf", "timm", "open_clip") and not self.hub_id:
            problems.append(f"source {self.source!r} needs a hub_id")
        if bool(self.joint_space) != bool(self.native_dim):
            problems.append("joint_space and native_dim go together")
        problems += [f"resize setting {k!r} not in {tuple(RESIZE_DEFAULTS)}" for k, _ in self.resize
                     if k not in RESIZE_DEFAULTS]
        if problems:
            raise ValueError(f"invalid EncoderConfig {self.name!r}: " + "; ".join(problems))

    def setting(self, key: str, default: Any = None) -> Any:
        """A builder-specific value from ``extra``."""
        return dict(self.extra).get(key, default)

    def replace(self, **changes: Any) -> "EncoderConfig":
        return replace(self, **changes)

    @property
    def geometry(self) -> str:
        """How its images are resized and cut (``pipeline.imaging.GEOMETRIES``), from ``resize``."""
        return dict(self.resize).get("geometry", RESIZE_DEFAULTS["geometry"])

    @property
    def tokens(self) -> int | None:
        """Token rows per item: prefix tokens plus the patch grid (images), ``max_tokens`` (texts)."""
        if self.modality == "text":
            return self.max_tokens
        if not (self.patch_size and self.input_size):
            return None
        return self.num_prefix_tokens + (self.input_size // self.patch_size) ** 2

    def to_dict(self) -> dict:
        """JSON-able form; goes into the cache fingerprint (the card does not)."""
        d = asdict(self)
        d.pop("card")
        d["mean"] = list(self.mean) if self.mean else None
        d["std"] = list(self.std) if self.std else None
        d["extra"] = {k: plain(v) for k, v in self.extra}
        d.pop("resize")
        d.pop("augment")   # the store's preprocessing records the views' policy (and the name differs)
        # each resize setting under its own name, and only where it is not the default (as the recipe's
        # geometry was first recorded): fingerprints made before the settings existed stay valid
        d.update({k: v for k, v in self.resize if v != RESIZE_DEFAULTS[k]})
        for key, default in _LATER_FIELDS.items():
            if getattr(self, key) == default:
                del d[key]
        return d
