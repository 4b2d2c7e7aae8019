"""The frozen description of one encoder: everything that decides its output."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from core.jsondata import plain

MODALITIES = ("image", "text")
SOURCES = ("hf", "timm", "xrv", "package", "local", "random")
POOLINGS = {"image": ("cls", "avg"), "text": ("pooler", "cls", "mean")}


@dataclass(frozen=True)
class EncoderConfig:
    """Registry metadata for one frozen encoder (cf. timm's ``PretrainedCfg``).

    Images reach the encoder already resized (shorter side to ``resize_size``), centre
    cropped to ``input_size`` and normalised with ``mean``/``std``; ``geometry`` names another
    way to cut them (``pipeline.imaging.GEOMETRIES``: ``pad-square`` is the authors' MGCA input).
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
    geometry: str = "shorter-side-crop"

    def __post_init__(self) -> None:
        problems = []
        if self.modality not in MODALITIES:
            problems.append(f"modality {self.modality!r} not in {MODALITIES}")
        if self.source not in SOURCES:
            problems.append(f"source {self.source!r} not in {SOURCES}")
        if self.modality in POOLINGS and self.pooling not in POOLINGS[self.modality]:
            problems.append(f"pooling {self.pooling!r} not in {POOLINGS[self.modality]} for {self.modality}")
        if self.source in ("hf", "timm") and not self.hub_id:
            problems.append(f"source {self.source!r} needs a hub_id")
        if problems:
            raise ValueError(f"invalid EncoderConfig {self.name!r}: " + "; ".join(problems))

    def setting(self, key: str, default: Any = None) -> Any:
        """A builder-specific value from ``extra``."""
        return dict(self.extra).get(key, default)

    def replace(self, **changes: Any) -> "EncoderConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able form; goes into the cache fingerprint."""
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean else None
        d["std"] = list(self.std) if self.std else None
        d["extra"] = {k: plain(v) for k, v in self.extra}
        if d["geometry"] == "shorter-side-crop":  # the default: fingerprints made before the field stay valid
            d.pop("geometry")
        return d
