"""Shared image decoding and preprocessing for chest X-rays.

Every reader (PNG/JPEG/TIFF exports, DICOM) goes through :func:`decode_image`,
which always yields a float32 ``[H, W]`` array in ``[0, 1]`` with the X-ray
convention *bright = dense*. :class:`Preprocess` turns that array into the
normalised ``[3, S, S]`` tensor a frozen encoder expects, either as the plain
deterministic view or as a seeded augmented view for the embedding cache.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Callable, ClassVar

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
import xxhash
from PIL import Image, UnidentifiedImageError

from cache import files

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut, apply_voi_lut
    from pydicom.pixels import pixel_array as _pixel_array

    _ONE_FRAME = True  # pydicom 3 decodes a single frame of a multi-frame file
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

    _pixel_array = None
    _ONE_FRAME = False

__all__ = [
    "AUGMENTATIONS",
    "AugmentPolicy",
    "ShiftScaleRotate",
    "augment_policy",
    "Warp",
    "warp",
    "GEOMETRIES",
    "DEFAULT_IMAGE_MEMORY_MB",
    "ImageBudget",
    "ImageDecodeError",
    "Preprocess",
    "decode_array",
    "decode_image",
    "decode_pil",
    "read_and_decode",
    "read_regular_file",
]

# What decoding and preprocessing one image may take, by default (`pipe embed --image-memory-mb`).
DEFAULT_IMAGE_MEMORY_MB = 2048

_DEFAULT_HINT = "re-export the file, or remove it from the table or pass --allow-failures"

# Bumped whenever the preprocessing maths changes, so cached embeddings made by
# older code stop matching the cache fingerprint.
_PREPROCESS_VERSION = 1

# PIL modes holding more than 8 bits per pixel; these are min..max scaled
# because X-rays are usually 10-14 bit data stored in 16-bit containers.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})

_DICOM_PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")

# ITU-R 601 luma, the same weights PIL uses for convert("L").
_LUMA = np.array([0.299, 0.587, 0.114])


class ImageDecodeError(ValueError):
    """An image could not be turned into pixels; names the file and what to do."""

    def __init__(self, source: str, reason: str, hint: str = _DEFAULT_HINT):
        # Keep all parts in ``args`` so the error survives pickling between
        # worker processes.
        super().__init__(source, reason, hint)
        self.source = source
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return f"cannot decode image {self.source!r}: {self.reason}; {self.hint}"


# --------------------------------------------------------------------------
# The memory budget of one image
# --------------------------------------------------------------------------

# Bytes per decoded pixel, at most: the decoder's own buffer (up to 4 bytes per pixel),
# a greyscale copy, the float32 result and the float32/float64 temporaries of scaling
# and the DICOM lookup tables.
_DECODE_BYTES_PER_PIXEL = 16


@dataclass(frozen=True)
class ImageBudget:
    """How much memory decoding and preprocessing one image may take.

    Checked from the header, before any pixel is decoded: an image whose pixel count, or
    whose aspect ratio once its shorter side is resized to ``resize_size``, would need more
    than ``max_mb`` is refused with the reason (a valid 1 x 2,000,000 PNG passes PIL's
    decompression-bomb limit, but resizing its short side to 256 would ask for ~0.5 TB).
    """

    max_mb: float = DEFAULT_IMAGE_MEMORY_MB
    resize_size: int | None = None  # the encoder's shorter-side resize (None: decoding only)

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)

    def need(self, height: int, width: int, frames: int = 1) -> tuple[int, str]:
        """(bytes, what for) of the larger of decoding and resizing an image of this size."""
        h, w = max(int(height), 1), max(int(width), 1)
        decode = h * w * max(int(frames), 1) * _DECODE_BYTES_PER_PIXEL
        what = f"decoding {w:,}x{h:,} pixels" + (f" x {frames} frames" if frames > 1 else "")
        if self.resize_size:
            s = self.resize_size
            nh, nw = (s, int(s * w / h)) if h <= w else (int(s * h / w), s)
            resize = nh * nw * 4 * 2  # the float32 result and the antialiasing pass's buffer
            if resize > decode:
                ratio = max(h, w) / min(h, w)
                return resize, (f"resizing {w:,}x{h:,} pixels (aspect ratio {ratio:,.0f}:1) to a shorter side of "
                                f"{s} ({nw:,}x{nh:,})")
        return decode, what

    def check(self, source: str, height: int, width: int, frames: int = 1) -> None:
        need, what = self.need(height, width, frames)
        if need > self.max_bytes:
            raise ImageDecodeError(
                source, f"image too large: {what} would need {_human(need)}, over the memory budget of one image "
                f"({self.max_mb:,.0f} MiB)",
                "check the file (a corrupt or hostile header?); if it is a real image, raise the budget with "
                "--image-memory-mb, or remove it from the table or pass --allow-failures")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024:
            return f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n:,.1f} PiB"


# --------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------


def decode_image(data: bytes, source: str = "<bytes>", budget: ImageBudget | None = None) -> np.ndarray:
    """Decode image bytes to a float32 ``[H, W]`` array in ``[0, 1]`` (bright = dense).

    The image's size is checked against ``budget`` (default: :class:`ImageBudget`'s)
    from its header, before its pixels are decoded.
    """
    budget = budget or ImageBudget()
    if not data:
        raise ImageDecodeError(source, "empty file")
    if _has_dicom_preamble(data):
        return _decode_dicom(data, source, budget=budget)
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        # DICOMs written without the 128-byte preamble are still common.
        if _looks_like_bare_dicom(data):
            return _decode_dicom(data, source, force=True, budget=budget)
        raise ImageDecodeError(source, "not a recognised image format") from None
    except Exception as exc:  # PIL raises many types on malformed headers
        raise ImageDecodeError(source, f"unreadable image header ({exc})") from exc
    try:
        budget.check(source, img.size[1], img.size[0])  # PIL decodes the first frame only
    except BaseException:
        img.close()
        raise
    return _decode_pil(img, source)


def read_regular_file(path: str | os.PathLike, max_bytes: int | None = None) -> bytes:
    """A regular file's bytes; anything else (a FIFO, a device such as ``/dev/zero``, a
    directory, a socket) is an :class:`ImageDecodeError` at once, never a read that blocks
    or never ends (see :mod:`cache.files`)."""
    source = os.fspath(path)
    try:
        return files.read_regular_file(source, max_bytes)
    except files.UnreadableFile as e:
        if e.reason == "file not found":
            hint = "fix the path in the table, or remove the row or pass --allow-failures"
        elif "memory budget" in e.reason:
            hint = "raise it with --image-memory-mb, or remove the row"
        else:
            hint = "fix the path in the table, or remove the row"
        raise ImageDecodeError(source, e.reason, hint) from None


def read_and_decode(path: str | os.PathLike, budget: ImageBudget | None = None) -> tuple[bytes, np.ndarray]:
    """Read a regular file once (so callers can hash the same bytes) and decode it."""
    source = os.fspath(path)
    budget = budget or ImageBudget()
    data = read_regular_file(source, budget.max_bytes)
    return data, decode_image(data, source, budget)


def decode_pil(img: Image.Image, source: str = "<PIL image>") -> np.ndarray:
    """A PIL image (already opened) as :func:`decode_image` would decode its file."""
    return _decode_pil(img, source)


def decode_array(arr: np.ndarray, source: str = "<array>") -> np.ndarray:
    """Pixels already in memory, as :func:`decode_image` would decode an image file holding them.

    ``[H, W]`` grey: uint8 is divided by 255, other integers are stretched min..max (like
    16-bit files), floats must already lie in [0, 1] (bright = dense). ``[H, W, 3|4]`` RGB(A)
    is reduced to luminance; ``[1, H, W]`` and ``[H, W, 1]`` are grey.
    """
    a = np.asarray(arr)
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        if a.dtype == np.uint8:
            return _decode_pil(Image.fromarray(np.ascontiguousarray(a[..., :3])), source)
        a = a[..., :3].astype(np.float64) @ _LUMA
    if a.ndim != 2 or min(a.shape) < 1:
        raise ImageDecodeError(source, f"an array image must be [H, W] grey or [H, W, 3] RGB, got shape {a.shape}",
                               "pass one image per array")
    if a.dtype == np.uint8:
        return _scale_uint8(a)
    if a.dtype.kind in "iub":
        return _minmax_scale(a.astype(np.int64), source)
    if a.dtype.kind != "f":
        raise ImageDecodeError(source, f"an array of {a.dtype} is not an image", "pass numbers")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ImageDecodeError(source, "a float array must hold grey values in [0, 1] (bright = dense)",
                               "scale it to [0, 1] first, or pass the integer pixels")
    return np.array(a, dtype=np.float32, order="C")


def _has_dicom_preamble(data: bytes) -> bool:
    return data[128:132] == b"DICM"


def _looks_like_bare_dicom(data: bytes) -> bool:
    # A preamble-less file starts with a little-endian group 0002 (file meta)
    # or 0008 (identifying) tag; text or other binaries never do, which keeps
    # pydicom's permissive force=True parser away from arbitrary junk.
    return data[:2] in (b"\x02\x00", b"\x08\x00")


def _decode_pil(img: Image.Image, source: str) -> np.ndarray:
    fmt = img.format or "image"
    try:
        # Image.open is lazy; a full load is the only way truncation surfaces.
        img.load()
        mode = img.mode
        if mode == "L":
            return _scale_uint8(np.asarray(img))
        if mode in _HIGH_DEPTH_MODES:
            return _minmax_scale(np.asarray(img), source)
        if mode == "LA":
            return _scale_uint8(np.asarray(img.getchannel("L")))
        # RGB, RGBA, P, PA, CMYK, YCbCr, 1, ...: reduce to luminance.
        return _scale_uint8(np.asarray(img.convert("L")))
    except ImageDecodeError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, ...
        raise ImageDecodeError(source, f"truncated or corrupt {fmt} data ({exc})") from exc
    finally:
        img.close()


def _scale_uint8(arr: np.ndarray) -> np.ndarray:
    # Dividing (not multiplying by 1/255) keeps 255 at exactly 1.0.
    return np.divide(arr, np.float32(255.0), dtype=np.float32)


def _minmax_scale(arr: np.ndarray, source: str) -> np.ndarray:
    """Stretch to [0, 1] by the image's own range; constant images become zeros."""
    lo, hi = arr.min(), arr.max()
    if arr.dtype.kind == "f" and not (np.isfinite(lo) and np.isfinite(hi)):
        raise ImageDecodeError(source, "pixel data contains NaN or infinite values")
    out = np.subtract(arr, lo, dtype=np.float32)
    # Computing the span in float32 exactly as the pixels were makes the
    # maximum land on 1.0 without a clamp.
    span = np.float32(hi) - np.float32(lo)
    if span > 0:
        out /= span
    else:
        out.fill(0.0)
    return out


def _decode_dicom(data: bytes, source: str, force: bool = False, budget: ImageBudget | None = None) -> np.ndarray:
    budget = budget or ImageBudget()
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=force)
    except Exception as exc:
        raise ImageDecodeError(source, f"unreadable DICOM ({exc})") from exc
    if not any(tag in ds for tag in _DICOM_PIXEL_TAGS):
        raise ImageDecodeError(
            source, "DICOM has no pixel data (e.g. a structured report or presentation state)",
            "remove it from the table or pass --allow-failures",
        )
    try:
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise ImageDecodeError(source, f"unreadable DICOM image size ({exc})") from exc
    if rows <= 0 or cols <= 0:
        raise ImageDecodeError(source, f"DICOM image size {cols}x{rows} is not an image size")
    # one frame is decoded (pydicom 3); pydicom 2 can only decode them all, so all count
    budget.check(source, rows, cols * samples, 1 if _ONE_FRAME else _frames(ds))
    try:
        arr = _first_frame(ds)
    except Exception as exc:  # missing codec plugins, bad lengths, ...
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise ImageDecodeError(
            source, f"cannot decode DICOM pixel data (transfer syntax {syntax}: {exc})"
        ) from exc
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:
        # Colour DICOM (secondary captures); pydicom already converted YBR to RGB.
        return _minmax_scale(arr @ _LUMA, source)
    try:
        arr = _apply_dicom_luts(_mask_unused_bits(arr, ds), ds, photometric)
    except Exception as exc:
        raise ImageDecodeError(source, f"invalid rescale or VOI LUT / window ({exc})") from exc
    if photometric == "MONOCHROME1":
        # MONOCHROME1 stores dense tissue as dark; negating before the min..max
        # stretch maps it to MONOCHROME2 and keeps constant images at zero.
        arr = np.negative(arr, dtype=np.result_type(arr.dtype, np.float32))
    return _minmax_scale(arr, source)


def _frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _first_frame(ds: pydicom.Dataset) -> np.ndarray:
    """The first frame's pixels; with pydicom 3 only that frame is decoded (a multi-frame
    DICOM's other frames are never read into memory)."""
    frames = _frames(ds)
    if _ONE_FRAME and frames > 1:
        return _pixel_array(ds, index=0)
    arr = ds.pixel_array
    return arr[0] if frames > 1 else arr


def _mask_unused_bits(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    # Some writers leave overlay bits above BitsStored; pydicom 3 masks them
    # but 2.x does not, and they would wreck the min..max stretch.
    bits = int(ds.get("BitsStored", arr.dtype.itemsize * 8) or 0)
    if arr.dtype.kind == "u" and 0 < bits < arr.dtype.itemsize * 8:
        return arr & arr.dtype.type((1 << bits) - 1)
    return arr


def _apply_dicom_luts(arr: np.ndarray, ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    # Rescale slope/intercept (or a modality LUT) first, then the VOI LUT or
    # window: the order the DICOM display pipeline defines.
    arr = apply_modality_lut(arr, ds)
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        arr = apply_voi_lut(arr, ds, index=0)
    return arr


# --------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentPolicy:
    """Parameter ranges for seeded augmented views: a random resized crop of the decoded image,
    a rotation, brightness and contrast (views for pre-training; a mask cannot follow them)."""

    scale: tuple[float, float] = (0.6, 1.0)
    ratio: tuple[float, float] = (0.8, 1.25)
    rotation_deg: float = 10.0
    brightness: float = 0.2
    contrast: float = 0.2

    kind: ClassVar[str] = "resized-crop"
    follows_masks: ClassVar[bool] = False

    def __post_init__(self) -> None:
        # Configs arrive from YAML/JSON as lists; tuples keep the policy hashable.
        object.__setattr__(self, "scale", _float_pair(self.scale, "scale"))
        object.__setattr__(self, "ratio", _float_pair(self.ratio, "ratio"))
        # ``10`` and ``10.0`` must fingerprint identically.
        for name in ("rotation_deg", "brightness", "contrast"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"AugmentPolicy.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"AugmentPolicy.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if self.rotation_deg < 0:
            raise ValueError(f"AugmentPolicy.rotation_deg must be >= 0, got {self.rotation_deg}")
        for name in ("brightness", "contrast"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentPolicy.{name} must be in [0, 1], got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """As stores record it (no ``kind``: the default kind, as every store made before kinds existed)."""
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    def view(self, pre: "Preprocess", x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """``[1, 1, H, W]`` grey in [0, 1] -> an augmented ``[1, 1, S, S]`` view."""
        # Draw every parameter up front in a fixed order so a view is a pure
        # function of (seed_key, view, policy).
        top, left, h, w = _random_crop_box(x.shape[-2], x.shape[-1], self, rng)
        angle = float(rng.uniform(-self.rotation_deg, self.rotation_deg))
        brightness = float(rng.uniform(1.0 - self.brightness, 1.0 + self.brightness))
        contrast = float(rng.uniform(1.0 - self.contrast, 1.0 + self.contrast))

        size = (pre.input_size, pre.input_size)
        x = _resize(x[..., top : top + h, left : left + w], size)
        if angle != 0.0:
            from torchvision.transforms.v2 import functional as TF  # noqa: N812  (torchvision loads in ~2 s: only here)

            x = TF.rotate(x, angle, interpolation=TF.InterpolationMode.BILINEAR, fill=0.0)
        x = x * brightness
        mean = x.mean()
        x = (x - mean) * contrast + mean
        return x.clamp_(0.0, 1.0)


@dataclass(frozen=True)
class ShiftScaleRotate:
    """The authors' segmentation augmentation (MGCA's ``ShiftScaleRotate``): the plain view zoomed
    by a factor in ``[1 - scale_limit, 1 + scale_limit]``, rotated by up to ``rotate_limit``
    degrees about its centre and shifted by up to ``shift_limit`` of its side, the border filled
    with black. The same warp moves a mask (:meth:`Preprocess.mask_view`), so a decoder can train
    on a view's patch tokens against its moved mask. A cached view is always warped; how often a
    decoder uses one instead of the plain view is the decoder's setting (``seg.augment_p``)."""

    scale_limit: float = 0.1
    rotate_limit: float = 10.0
    shift_limit: float = 0.0

    kind: ClassVar[str] = "shift-scale-rotate"
    follows_masks: ClassVar[bool] = True

    def __post_init__(self) -> None:
        for name in ("scale_limit", "rotate_limit", "shift_limit"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if not 0.0 <= self.scale_limit < 1.0:
            raise ValueError(f"ShiftScaleRotate.scale_limit must be in [0, 1), got {self.scale_limit}")
        if not 0.0 <= self.rotate_limit <= 180.0:
            raise ValueError(f"ShiftScaleRotate.rotate_limit must be in [0, 180] degrees, got {self.rotate_limit}")
        if not 0.0 <= self.shift_limit <= 1.0:
            raise ValueError(f"ShiftScaleRotate.shift_limit must be in [0, 1], got {self.shift_limit}")

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}

    def draw(self, rng: np.random.Generator) -> tuple[float, float, float, float]:
        """(zoom, degrees, shift x, shift y) of one view, in a fixed order."""
        zoom = float(rng.uniform(1.0 - self.scale_limit, 1.0 + self.scale_limit))
        angle = float(rng.uniform(-self.rotate_limit, self.rotate_limit))
        dx, dy = (float(v) for v in rng.uniform(-self.shift_limit, self.shift_limit, 2))
        return zoom, angle, dx, dy

    def view(self, pre: "Preprocess", x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return warp(pre.plain_view(x), self.draw(rng)).clamp_(0.0, 1.0)


Warp = tuple[float, float, float, float]   # (zoom, degrees, shift x, shift y): ShiftScaleRotate.draw


def warp(x: torch.Tensor, params: Warp | list[Warp], nearest: bool = False) -> torch.Tensor:
    """``[N, C, S, S]`` zoomed, rotated about the centre and shifted by ``params`` (one for all, or one
    per image; :meth:`ShiftScaleRotate.draw`), zeros outside: bilinear for pixels, nearest neighbour
    for masks (which stay binary). An image and its mask take the same sampling grid, so they move
    alike to the pixel."""
    many = params if isinstance(params, list) else [params]
    theta = torch.tensor([_inverse_affine(*p) for p in many], dtype=torch.float32)
    theta = theta.expand(len(x), 2, 3) if len(many) == 1 else theta
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="nearest" if nearest else "bilinear", padding_mode="zeros",
                         align_corners=False)


def _inverse_affine(zoom: float, angle: float, dx: float, dy: float) -> list[list[float]]:
    """Output -> input coordinates (normalised to [-1, 1]) of a zoom and rotation about the centre
    followed by a shift of (dx, dy) sides: the 2 x 3 matrix ``affine_grid`` takes."""
    a = math.radians(angle)
    c, s = math.cos(a) / zoom, math.sin(a) / zoom
    tx, ty = 2 * dx, 2 * dy
    return [[c, s, -(c * tx + s * ty)], [-s, c, -(-s * tx + c * ty)]]


# Augmentation kinds by name: a store records its policy's ``to_dict`` (with ``kind`` for every kind but the first).
AUGMENTATIONS = {p.kind: p for p in (AugmentPolicy, ShiftScaleRotate)}


def augment_policy(d: dict | None) -> "AugmentPolicy | ShiftScaleRotate":
    """The policy a record names (:meth:`to_dict`); the default policy for none."""
    d = dict(d or {})
    kind = d.pop("kind", AugmentPolicy.kind)
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation kind {kind!r}; known: {', '.join(AUGMENTATIONS)}")
    return AUGMENTATIONS[kind](**d)


def _float_pair(value, name: str) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"AugmentPolicy.{name} needs two values, got {value!r}")
    return pair


@dataclass(frozen=True)
class Preprocess:
    """Decoded image -> normalised ``[3, input_size, input_size]`` encoder input."""

    resize_size: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    augment: AugmentPolicy | ShiftScaleRotate = AugmentPolicy()
    # How the plain view is resized and cut: each a name in its registry below. The defaults are
    # this project's own float pipeline; an encoder whose reference processor (or whose authors'
    # recipe) works otherwise names its own in its config's ``resize``.
    geometry: str = "shorter-side-crop"   # GEOMETRIES: shorter side and crop, a square, or padded to a square
    resample: str = "bilinear"            # INTERPOLATIONS: the resize's interpolation
    resampler: str = "torch"              # RESAMPLERS: float torch, or the 8-bit image through torchvision or Pillow
    crop_rounding: str = "round"          # CROP_ROUNDINGS: torchvision's centre crop (round) or transformers' (floor)

    def __post_init__(self) -> None:
        mean = tuple(float(m) for m in self.mean)
        std = tuple(float(s) for s in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("Preprocess.mean and .std need three values (one per channel)")
        if min(std) <= 0:
            raise ValueError(f"Preprocess.std must be positive, got {std}")
        for name, registry in (("geometry", GEOMETRIES), ("resample", INTERPOLATIONS), ("resampler", RESAMPLERS),
                               ("crop_rounding", CROP_ROUNDINGS)):
            if getattr(self, name) not in registry:
                raise ValueError(f"Preprocess.{name} must be one of {', '.join(registry)}, got {getattr(self, name)!r}")
        if not 0 < self.input_size <= self.resize_size:
            raise ValueError(
                f"need 0 < input_size <= resize_size, got {self.input_size} and {self.resize_size}"
            )
        if isinstance(self.augment, dict):
            object.__setattr__(self, "augment", augment_policy(self.augment))
        object.__setattr__(self, "resize_size", int(self.resize_size))
        object.__setattr__(self, "input_size", int(self.input_size))
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        # Normalisation folded into one fused multiply-add. Plain attributes,
        # not fields, so they stay out of eq/hash/repr and the fingerprint.
        inv_std = torch.tensor([1.0 / s for s in std], dtype=torch.float32).view(3, 1, 1)
        shift = -torch.tensor(mean, dtype=torch.float32).view(3, 1, 1) * inv_std
        object.__setattr__(self, "_scale", inv_std)
        object.__setattr__(self, "_shift", shift)

    def __call__(self, img: np.ndarray, view: int = 0, seed_key: str = "") -> torch.Tensor:
        x = _as_image_tensor(img)
        if view == 0:
            x = self.plain_view(x)
        elif view > 0:
            x = self.augment.view(self, x, _view_rng(seed_key, view))
        else:
            raise ValueError(f"view must be >= 0, got {view}")
        return self._normalise(x)

    def to_dict(self) -> dict:
        """What the store's fingerprint records. The resize settings (geometry, interpolation,
        resampler, crop rounding) appear only where they differ from the defaults, so every store
        made before they existed keeps its fingerprint."""
        d = {
            "version": _PREPROCESS_VERSION,
            "resize_size": self.resize_size,
            "input_size": self.input_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "augment": self.augment.to_dict(),
        }
        return {**d, **{k: getattr(self, k) for k, default in RESIZE_DEFAULTS.items() if getattr(self, k) != default}}

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        """The preprocessing a store's spec records (:meth:`to_dict`)."""
        return cls(int(d["resize_size"]), int(d["input_size"]), tuple(d["mean"]), tuple(d["std"]),
                   augment_policy(d.get("augment")), **recorded_resize(d))

    def plain_view(self, x: torch.Tensor) -> torch.Tensor:
        """``[1, 1, H, W]`` grey in [0, 1] -> ``[1, 1, S, S]``: the deterministic view, resized and cut."""
        g = GEOMETRIES[self.geometry]
        x = RESAMPLERS[self.resampler](x, g.resized(*x.shape[-2:], self.resize_size), self.resample)
        return g.cut(x, self.input_size, self.crop_rounding)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        # Broadcasting [H, W] against [3, 1, 1] replicates the grey channel and
        # normalises in one pass, producing a fresh contiguous tensor.
        return torch.addcmul(self._shift, x[0, 0], self._scale)

    def mask_view(self, mask: torch.Tensor, seed_key: str, view: int) -> torch.Tensor:
        """A mask on the plain view's grid (``[S, S]``, nonzero = positive) moved as view ``view`` of
        the image keyed ``seed_key`` moved its pixels: ``[S, S]`` bool. Only a policy whose views a
        mask can follow (``follows_masks``) has such views."""
        return self.masks_view(mask[None], [seed_key], view)[0]

    def masks_view(self, masks: torch.Tensor, seed_keys: list[str], view: int) -> torch.Tensor:
        """:meth:`mask_view` of ``[N, S, S]`` masks at once, image ``i`` keyed ``seed_keys[i]``."""
        if view == 0:
            return masks > 0
        if not self.augment.follows_masks:
            raise ValueError(f"a {self.augment.kind!r} view cannot move a mask alike")
        params = [self.augment.draw(_view_rng(k, view)) for k in seed_keys]
        return warp(masks[:, None].float(), params, nearest=True)[:, 0] > 0.5


def _as_image_tensor(img: np.ndarray) -> torch.Tensor:
    if img.ndim != 2:
        raise ValueError(f"expected a 2-D grayscale image from decode_image, got shape {img.shape}")
    # No copy for decode_image output (already contiguous, writable float32).
    if img.dtype != np.float32 or not img.flags.c_contiguous or not img.flags.writeable:
        img = np.array(img, dtype=np.float32, order="C")
    return torch.from_numpy(img)[None, None]


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return _resize_float(x, size, "bilinear")


def shorter_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The (h, w) an image of (h, w) is resized to so that its shorter side is ``size``.

    Same rounding as torchvision's Resize(int), so results match reference pipelines that
    used it."""
    return (size, int(size * w / h)) if h <= w else (int(size * h / w), size)


# How a centred crop's origin is rounded when the margin is odd, by the library it copies.
CROP_ROUNDINGS = {
    "round": lambda margin: int(round(margin / 2.0)),   # torchvision's CenterCrop (open_clip)
    "floor": lambda margin: margin // 2,                # transformers' center_crop (both backends)
}


def centre_crop_origin(h: int, w: int, size: int, rounding: str = "round") -> tuple[int, int]:
    """(top, left) of the centred ``size`` x ``size`` crop of an (h, w) image."""
    half = CROP_ROUNDINGS[rounding]
    return half(h - size), half(w - size)


def longer_side_size(h: int, w: int, size: int) -> tuple[int, int]:
    """The (h, w) an image of (h, w) is resized to so that its longer side is ``size`` (the other
    side truncated, as MGCA's ``resize_img``; a square counts as taller)."""
    return (size, int(w * size / h)) if h >= w else (int(h * size / w), size)


def square_size(h: int, w: int, size: int) -> tuple[int, int]:
    """Both sides to ``size``: the aspect ratio is not kept (SigLIP's processor)."""
    return size, size


def pad_to_square(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``[..., H, W]`` to a square: the shorter side gets floor(pad / 2) before and the
    rest after (MGCA's ``resize_img``); zero is black, as their padding of 8-bit pixels."""
    h, w = x.shape[-2:]
    pad = abs(h - w)
    if not pad:
        return x
    lo, hi = pad // 2, pad - pad // 2
    return F.pad(x, (lo, hi, 0, 0) if h > w else (0, 0, lo, hi))


@dataclass(frozen=True)
class Geometry:
    """How a plain view is cut from an image: the resized size, whether it is then padded to a
    square, and the centre crop that follows."""

    name: str
    resized: Callable[[int, int, int], tuple[int, int]]   # (h, w, resize_size) -> the resized (h, w)
    pads: bool
    summary: str

    def cut(self, x: torch.Tensor, crop: int, rounding: str = "round") -> torch.Tensor:
        """The resized ``[..., h, w]`` padded (if this geometry pads) and centre cropped to ``crop``."""
        if self.pads:
            x = pad_to_square(x)
        top, left = centre_crop_origin(*x.shape[-2:], crop, rounding)
        return x[..., top : top + crop, left : left + crop]


GEOMETRIES = {g.name: g for g in (
    Geometry("shorter-side-crop", shorter_side_size, False,
             "shorter side resized to resize_size, then the centre input_size crop (torchvision's Resize + CenterCrop)"),
    Geometry("square", square_size, False,
             "both sides resized to resize_size, the aspect ratio not kept, then the centre input_size crop (SigLIP's "
             "processor, where the two sizes are equal: no crop)"),
    Geometry("pad-square", longer_side_size, True,
             "longer side resized to resize_size, the shorter zero-padded to a square, then the centre input_size "
             "crop (MGCA's resize_img, then CenterCrop: the authors' input)"),
)}
DEFAULT_GEOMETRY = "shorter-side-crop"


def resize_and_crop(x: torch.Tensor, resize: int, crop: int, nearest: bool = False,
                    geometry: str = DEFAULT_GEOMETRY, rounding: str = "round") -> torch.Tensor:
    """``[N, C, H, W]`` -> ``[N, C, crop, crop]`` by a :data:`GEOMETRIES` entry (by default the
    shorter side resized to ``resize``, then a centre crop, its origin rounded by ``rounding``).
    Images are resized bilinearly (with antialiasing), masks (``nearest``) by nearest neighbour,
    so they stay binary and line up with the images of any encoder's geometry."""
    g = GEOMETRIES[geometry]
    h, w = x.shape[-2:]
    size = g.resized(h, w, resize)
    if nearest and size != (h, w):
        x = F.interpolate(x, size=size, mode="nearest-exact")
    elif not nearest:
        x = _resize(x, size)
    return g.cut(x, crop, rounding)


# --------------------------------------------------------------------------
# The resize variants of the plain view (data in an encoder's config, functions here)
# --------------------------------------------------------------------------

# The resize interpolations by name (torchvision's InterpolationMode values, which torchvision's
# resize takes as these strings; torchvision is imported only where it resizes, as it is slow to load).
INTERPOLATIONS = {"bilinear": "bilinear", "bicubic": "bicubic"}
_PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Grey values in [0, 1] as the 8-bit image a reference processor reads (an 8-bit file
    decodes to v / 255, which comes back here as v exactly)."""
    return np.round(x.numpy() * 255.0).astype(np.uint8)


def _resize_float(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """This project's own: float pixels, antialiased ``F.interpolate``."""
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=resample, antialias=True, align_corners=False)


def _resize_torchvision_uint8(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """The 8-bit image through torchvision's resize, as transformers' torchvision image processors
    (the default ``SiglipImageProcessor`` of transformers 5) resize what PIL decoded."""
    from torchvision.transforms.v2 import functional as TF  # noqa: N812

    q = torch.from_numpy(to_uint8(x))
    out = TF.resize(q, list(size), interpolation=TF.InterpolationMode(INTERPOLATIONS[resample]), antialias=True)
    return out.to(torch.float32) / 255.0


def _resize_pil(x: torch.Tensor, size: tuple[int, int], resample: str) -> torch.Tensor:
    """The 8-bit image through Pillow's resize, as transformers' PIL image processors and
    open_clip's transform (torchvision's Resize of a PIL image) do."""
    img = Image.fromarray(to_uint8(x)[0, 0]).resize((size[1], size[0]), _PIL_FILTERS[resample])
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / np.float32(255.0))[None, None]


RESAMPLERS = {"torch": _resize_float, "torch-uint8": _resize_torchvision_uint8, "pil": _resize_pil}
# The defaults of the resize settings, each left out of a preprocessing record (and so of a
# store's fingerprint) when it is the default; geometry and crop rounding decide where a pixel
# lands (masks follow them), interpolation and resampler only its value.
RESIZE_DEFAULTS = {"geometry": DEFAULT_GEOMETRY, "resample": "bilinear", "resampler": "torch", "crop_rounding": "round"}
CUT_SETTINGS = ("geometry", "crop_rounding")


def recorded_resize(pre: dict) -> dict:
    """The resize settings a preprocessing record (:meth:`Preprocess.to_dict`) names, each at its
    default where it names none: what a store's images went through, for its masks and pictures too."""
    return {k: pre.get(k, default) for k, default in RESIZE_DEFAULTS.items()}


def _view_rng(seed_key: str, view: int) -> np.random.Generator:
    # A private generator per view: independent of the global RNG, worker
    # scheduling and the order in which images are processed. Explicit UTF-8
    # because newer xxhash releases no longer accept str.
    seed = xxhash.xxh64_intdigest(f"{seed_key}:{view}".encode("utf-8"))
    return np.random.default_rng(seed)


def _random_crop_box(
    height: int, width: int, policy: AugmentPolicy, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Random-resized-crop box (top, left, h, w), as in torchvision's RandomResizedCrop."""
    area = height * width
    log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(*policy.scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    # Fallback: the largest centred box whose aspect ratio is within range.
    in_ratio = width / height
    if in_ratio < policy.ratio[0]:
        w, h = width, int(round(width / policy.ratio[0]))
    elif in_ratio > policy.ratio[1]:
        h, w = height, int(round(height * policy.ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w
