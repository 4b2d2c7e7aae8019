"""Segmentation masks on the encoder's input grid, read once and cached.

A mask PNG has the size of its image (nonzero = positive). It gets the geometry of the
encoder's preprocessing, read from the image store's spec: shorter side resized to
``resize_size`` (nearest neighbour, so it stays binary) and a centre crop of
``input_size`` (or the store's other recorded cut: its ``geometry``, e.g. padded to a square
first or a square resize, and its crop rounding), by ``pipeline.imaging.resize_and_crop``, as
the images. The result is
cached bit-packed under ``<cache>/masks/<dataset>/``, keyed by the geometry and by each
mask file's path (relative to the cache root for masks inside it, so a moved cache keeps
its entries), size and modification time. The file carries a crc32c per array
(:mod:`cache.npz`), checked whenever it is read, and is committed through the cache's
storage over the version read (:func:`cache.npz.commit_checked`): in a bucket, another
host reads the masks this one aligned.
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
from cache.mirror import storage_at
from cache.npz import commit_checked, read_checked
from cache.paths import plain_name, portable
from core.errors import InputError
from pipeline.datasets.masks import decode_mask
from pipeline.imaging import (CUT_SETTINGS, DEFAULT_GEOMETRY, RESIZE_DEFAULTS, recorded_resize, resize_and_crop,
                              shorter_side_size)


class MaskError(InputError):
    """A mask that cannot be used; the message names the item and the fix."""


def geometry(spec: dict) -> tuple[int, int, str, str]:
    """(resize, crop) of the image store's preprocessing."""
    pre = spec.get("preprocess") or {}
    if "resize_size" not in pre:
        raise MaskError("the image store records no preprocessing geometry (resize/crop), so masks cannot be "
                        "aligned with its patch tokens; re-run `pipe embed` with a current version")
    return int(pre["resize_size"]), int(pre["input_size"])


def cut(spec: dict) -> tuple[str, str]:
    """How the image store's plain views were cut: their ``geometry`` (``pipeline.imaging.GEOMETRIES``)
    and crop rounding, as its preprocessing record names them (read as ``Preprocess.from_dict`` reads them)."""
    settings = recorded_resize(spec.get("preprocess") or {})
    return tuple(settings[k] for k in CUT_SETTINGS)


def align_mask(mask: np.ndarray, resize: int, crop: int, how: str = DEFAULT_GEOMETRY,
               rounding: str = "round") -> np.ndarray:
    """``[H, W]`` bool -> ``[crop, crop]`` bool: the images' resize and crop, nearest neighbour."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))[None, None].float()
    return resize_and_crop(t, resize, crop, nearest=True, geometry=how, rounding=rounding)[0, 0].numpy() > 0.5


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


def _read_one(item_id: str, mask_path: str, image_path: str, resize: int, crop: int,
              how: tuple[str, str] = (DEFAULT_GEOMETRY, "round")) -> np.ndarray:
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
    return align_mask(mask, resize, crop, *how)


def _stamp(path: str, root: Path) -> str:
    name = portable(path, Path(root))
    try:
        st = os.stat(path)
        return f"{name}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        return f"{name}|missing"


def cache_path(cache_root: Path, dataset: str, target: str, resize: int, crop: int,
               how: tuple[str, str] = (DEFAULT_GEOMETRY, "round")) -> Path:
    """Where a target's aligned masks are cached; a dataset or mask name that is not a plain file
    name (a table column ``mask_../../x``) is refused, never a path out of ``<cache>/masks/``."""
    # the cut's settings that differ from their defaults, in order: old caches keep their name
    key = [resize, crop, 1, *(v for k, v in zip(CUT_SETTINGS, how) if v != RESIZE_DEFAULTS[k])]
    geo = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    for what, name in (("dataset", dataset), ("mask", target)):
        if not plain_name(name):
            raise MaskError(f"{what} name {name!r} cannot be used as a file name in the mask cache (no '/', '\\', "
                            "'..', leading '.' or control character); rename the table's mask column (mask_<name>)")
    return Path(cache_root) / "masks" / dataset / f"{target}-{geo}.npz"


def load_masks(items, target: str, spec: dict, cache_root: Path, dataset: str) -> tuple[np.ndarray, int]:
    """Aligned boolean masks ``[n, S, S]`` of ``items`` (rows with a mask path), and how many
    mask files had to be read (0 when the cache had them all)."""
    resize, crop = geometry(spec)
    how = cut(spec)
    storage = storage_at(cache_root)
    key = storage.key_of(cache_path(cache_root, dataset, target, resize, crop, how))
    ids = items.id.astype(str).to_numpy()
    mask_paths = items[MASK_PREFIX + target].astype(str).to_numpy()
    stamps = np.array([_stamp(p, cache_root) for p in mask_paths])
    packed, version = read_checked(storage, key, _fix(cache_root))
    cached = _unpack(packed, crop)
    out = np.zeros((len(ids), crop, crop), bool)
    todo = [i for i, (k, s) in enumerate(zip(ids, stamps)) if cached.get(k, (None,))[0] != s]
    for i in sorted(set(range(len(ids))) - set(todo)):
        out[i] = cached[ids[i]][1]
    with ThreadPoolExecutor(4) as pool:
        for i, m in zip(todo, pool.map(lambda i: _read_one(ids[i], mask_paths[i], items.image.iloc[i], resize, crop,
                                                           how), todo)):
            out[i] = m
    if todo:
        new = {ids[i]: (stamps[i], out[i]) for i in todo}
        ensure_marker(storage)
        commit_checked(storage, key, _pack({**cached, **new}), version,
                       lambda theirs: _pack({**_unpack(theirs, crop), **new}), _fix(cache_root))
    return out, len(todo)


def _fix(cache_root: Path) -> str:
    return (f"Run `pipe cache verify --repair --cache {cache_root}` to remove it; the masks are then read again "
            "from their files.")


def _unpack(z: dict | None, crop: int) -> dict[str, tuple[str, np.ndarray]]:
    """id -> (stamp, mask) of a mask cache file (nothing for none, or one written before it carried checksums)."""
    if z is None:
        return {}
    bits = np.unpackbits(z["bits"], axis=1, count=crop * crop).reshape(-1, crop, crop).astype(bool)
    return {k: (s, b) for k, s, b in zip(z["ids"], z["stamps"], bits)}


def _pack(entries: dict[str, tuple[str, np.ndarray]]) -> dict[str, np.ndarray]:
    keys = sorted(entries)
    bits = np.packbits(np.stack([entries[k][1].reshape(-1) for k in keys]), axis=1)
    return {"ids": np.array(keys), "stamps": np.array([entries[k][0] for k in keys]), "bits": bits}
