"""Segmentation masks on the encoder's input grid, read once and cached.

A mask PNG has the size of its image (nonzero = positive). It gets the geometry of the
encoder's preprocessing, read from the image store's spec: shorter side resized to
``resize_size`` (nearest neighbour, so it stays binary) and a centre crop of
``input_size`` (or the other geometries an encoder's config may name: a square resize),
by ``pipeline.imaging.resize_and_crop``, as the images. The result is
cached bit-packed under ``<cache>/masks/<dataset>/``, keyed by the geometry and by each
mask file's path (relative to the cache root for masks inside it, so a moved cache keeps
its entries), size and modification time. The file carries a crc32c per array
(:mod:`cache.npz`), checked whenever it is read.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cache.files import UnreadableFile, read_regular_file
from cache.index import MASK_PREFIX
from cache.marker import ensure_marker
from cache.npz import load_checked, save_checked
from cache.paths import plain_name, portable
from core.errors import InputError
from pipeline.datasets.masks import decode_mask
from pipeline.imaging import RESIZE_DEFAULTS, resize_and_crop, shorter_side_size


class MaskError(InputError):
    """A mask that cannot be used; the message names the item and the fix."""


def geometry(spec: dict) -> tuple[int, int, str, str]:
    """(resize, crop, geometry, crop rounding) of the image store's preprocessing."""
    pre = spec.get("preprocess") or {}
    if "resize_size" not in pre:
        raise MaskError("the image store records no preprocessing geometry (resize/crop), so masks cannot be "
                        "aligned with its patch tokens; re-run `pipe embed` with a current version")
    return (int(pre["resize_size"]), int(pre["input_size"]), pre.get("geometry", RESIZE_DEFAULTS["geometry"]),
            pre.get("crop_rounding", RESIZE_DEFAULTS["crop_rounding"]))


def align_mask(mask: np.ndarray, resize: int, crop: int, geo: str = "shortest", rounding: str = "round") -> np.ndarray:
    """``[H, W]`` bool -> ``[crop, crop]`` bool: the images' resize and crop, nearest neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None].float()
    return resize_and_crop(t, resize, crop, nearest=True, geometry=geo, rounding=rounding)[0, 0].numpy() > 0.5


def _regular(path: str) -> bool:
    """Only regular files are opened: a FIFO would block, a device never end."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def image_size(path: str) -> tuple[int, int] | None:
    """(height, width) from the image header, without decoding pixels; None if unreadable."""
    if not _regular(path):
        return None
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except Exception:
        pass
    try:
        import pydicom  # lazy: pydicom is needed only for DICOM headers

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return int(ds.Rows), int(ds.Columns)
    except Exception:
        return None


MAX_MASK_BYTES = 2 * 2**30  # a mask's decoded and resized pixels, at most (as an image's default budget)


def _check_size(item_id: str, path: str, h: int, w: int, resize: int) -> None:
    """Refuse a mask whose pixel count or aspect ratio would need more memory than
    :data:`MAX_MASK_BYTES`, from its header (a 1 x 2,000,000 PNG resized to a short side
    of 256 would ask for ~0.5 TB)."""
    nh, nw = shorter_side_size(max(h, 1), max(w, 1), resize)
    need = max(h * w * 8, nh * nw * 8)
    if need > MAX_MASK_BYTES:
        raise MaskError(f"item {item_id!r}: mask {path} is {w:,}x{h:,} pixels; decoding and aligning it would need "
                        f"{need / 2**30:,.1f} GiB, over the {MAX_MASK_BYTES / 2**30:,.0f} GiB a mask may take. "
                        "Check the file, or re-export it at its image's size.")


def _read_one(item_id: str, mask_path: str, image_path: str, geo: tuple) -> np.ndarray:
    resize = geo[0]
    try:
        data = read_regular_file(mask_path)  # a FIFO or a device is refused, never read
        mask = decode_mask(data, lambda h, w: _check_size(item_id, mask_path, h, w, resize))
    except UnreadableFile as e:
        if e.reason == "file not found":
            raise MaskError(f"item {item_id!r}: mask file {mask_path} does not exist. Fix its path in the table's "
                            "mask column (relative to the table) and re-run `pipe embed` to re-index.") from None
        raise MaskError(f"item {item_id!r}: cannot use mask {mask_path}: {e.reason}") from None
    except MaskError:
        raise
    except FileNotFoundError:
        raise MaskError(f"item {item_id!r}: mask file {mask_path} does not exist. Fix its path in the table's "
                        "mask column (relative to the table) and re-run `pipe embed` to re-index.") from None
    except Exception as e:
        raise MaskError(f"item {item_id!r}: cannot read mask {mask_path} ({e}); masks are single-channel "
                        "PNGs, nonzero = positive") from None
    size = image_size(image_path)
    if size is not None and size != mask.shape:
        raise MaskError(f"item {item_id!r}: mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} (w x h) but its "
                        f"image {image_path} is {size[1]}x{size[0]}. A mask must have its image's size; "
                        "re-export the mask at the image's resolution.")
    return align_mask(mask, *geo)


def _stamp(path: str, root: Path) -> str:
    name = portable(path, Path(root))
    try:
        st = os.stat(path)
        return f"{name}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{name}|missing"


def cache_path(cache_root: Path, dataset: str, target: str, resize: int, crop: int, geo: str = "shortest",
               rounding: str = "round") -> Path:
    """Where a target's aligned masks are cached; a dataset or mask name that is not a plain file
    name (a table column ``mask_../../x``) is refused, never a path out of ``<cache>/masks/``."""
    other = [g for g, d in ((geo, "shortest"), (rounding, "round")) if g != d] and [geo, rounding]
    geo = hashlib.sha256(json.dumps([resize, crop, 1, *other]).encode()).hexdigest()[:12]
    for what, name in (("dataset", dataset), ("mask", target)):
        if not plain_name(name):
            raise MaskError(f"{what} name {name!r} cannot be used as a file name in the mask cache (no '/', '\\', "
                            "'..', leading '.' or control character); rename the table's mask column (mask_<name>)")
    return Path(cache_root) / "masks" / dataset / f"{target}-{geo}.npz"


def load_masks(items, target: str, spec: dict, cache_root: Path, dataset: str) -> tuple[np.ndarray, int]:
    """Aligned boolean masks ``[n, S, S]`` of ``items`` (rows with a mask path), and how many
    mask files had to be read (0 when the cache had them all)."""
    geo = geometry(spec)
    crop = geo[1]
    path = cache_path(cache_root, dataset, target, *geo)
    ids = items.id.astype(str).to_numpy()
    mask_paths = items[MASK_PREFIX + target].astype(str).to_numpy()
    stamps = np.array([_stamp(p, cache_root) for p in mask_paths])
    cached = _load_cache(path, crop)
    out = np.zeros((len(ids), crop, crop), bool)
    todo = [i for i, (k, s) in enumerate(zip(ids, stamps)) if cached.get(k, (None,))[0] != s]
    for i in sorted(set(range(len(ids))) - set(todo)):
        out[i] = cached[ids[i]][1]
    with ThreadPoolExecutor(4) as pool:
        for i, m in zip(todo, pool.map(lambda i: _read_one(ids[i], mask_paths[i], items.image.iloc[i], geo),
                                       todo)):
            out[i] = m
    if todo:
        merged = {**cached, **{ids[i]: (stamps[i], out[i]) for i in todo}}
        _write_cache(path, merged, crop)
    return out, len(todo)


def _load_cache(path: Path, crop: int) -> dict[str, tuple[str, np.ndarray]]:
    if not path.exists():
        return {}
    root = path.parents[2]  # <root>/masks/<dataset>/<file>
    z = load_checked(path, f"Run `pipe cache verify --repair --cache {root}` to remove it; the masks are then "
                           "read again from their files.")
    if z is None:  # written before the cache carried checksums: read the masks again
        return {}
    bits = np.unpackbits(z["bits"], axis=1, count=crop * crop).reshape(-1, crop, crop).astype(bool)
    return {k: (s, b) for k, s, b in zip(z["ids"], z["stamps"], bits)}


def _write_cache(path: Path, entries: dict[str, tuple[str, np.ndarray]], crop: int) -> None:
    ensure_marker(path.parents[2])  # <root>/masks/<dataset>/<file>
    keys = sorted(entries)
    bits = np.packbits(np.stack([entries[k][1].reshape(-1) for k in keys]), axis=1)
    save_checked(path, {"ids": np.array(keys), "stamps": np.array([entries[k][0] for k in keys]), "bits": bits})
