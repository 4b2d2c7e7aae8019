"""Tests for the shared image decoder and preprocessing."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import torch
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pipeline.imaging import (
    AugmentPolicy,
    ImageDecodeError,
    Preprocess,
    ShiftScaleRotate,
    augment_policy,
    decode_image,
    read_and_decode,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _encode(arr: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kwargs)
    return buf.getvalue()


def _gradient(h: int = 64, w: int = 80) -> np.ndarray:
    return np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))


def _random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w), dtype=np.float32)


def _dicom_bytes(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    **extra,
) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # digital X-ray
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("synthetic.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.astype("<u2").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _ramp12(h: int = 32, w: int = 48) -> np.ndarray:
    return np.linspace(0, 4095, h * w).round().astype(np.uint16).reshape(h, w)


# ---------------------------------------------------------------- raster formats


def test_8bit_grayscale_png_round_trip():
    src = _gradient()
    img = decode_image(_encode(src, "PNG"), "grad.png")
    assert img.dtype == np.float32 and img.shape == src.shape
    assert img.min() == 0.0 and img.max() == 1.0
    np.testing.assert_allclose(img, src / 255.0, atol=1e-6)


def test_rgb_jpeg_of_known_gray_decodes_to_that_gray():
    rgb = np.full((40, 60, 3), 100, dtype=np.uint8)
    img = decode_image(_encode(rgb, "JPEG", quality=95), "gray.jpg")
    assert img.shape == (40, 60) and img.dtype == np.float32
    assert 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_allclose(img, 100 / 255.0, atol=2 / 255.0)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_other_8bit_modes_reduce_to_luminance(mode):
    gray = Image.fromarray(np.full((20, 30), 180, dtype=np.uint8))
    img = decode_image(_encode(np.asarray(gray.convert(mode)), "PNG"), f"x-{mode}.png")
    assert img.shape == (20, 30)
    np.testing.assert_allclose(img, 180 / 255.0, atol=1 / 255.0)


def test_16bit_png_with_12bit_data_uses_full_range():
    src = _ramp12()
    data = _encode(src, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really stored as 16-bit
    img = decode_image(data, "ramp16.png")
    assert img.dtype == np.float32 and img.shape == src.shape
    assert img.min() == 0.0 and img.max() == 1.0
    assert len(np.unique(img)) > 256
    # Strictly monotone in the stored value: ordering is preserved.
    order = np.argsort(src.ravel(), kind="stable")
    assert np.all(np.diff(img.ravel()[order]) > 0)


def test_float_tiff_is_minmax_scaled():
    src = np.linspace(-3.0, 5.0, 30 * 40, dtype=np.float32).reshape(30, 40)
    img = decode_image(_encode(src, "TIFF"), "f.tif")
    np.testing.assert_allclose(img, (src + 3.0) / 8.0, atol=1e-6)


def test_constant_high_depth_image_maps_to_zeros():
    img = decode_image(_encode(np.full((16, 16), 1234, dtype=np.uint16), "PNG"), "flat.png")
    assert img.shape == (16, 16) and np.all(img == 0.0)


def test_read_and_decode_returns_the_bytes_it_decoded(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(_encode(_gradient(), "PNG"))
    data, img = read_and_decode(path)
    assert data == path.read_bytes()
    np.testing.assert_array_equal(img, decode_image(data))


# ---------------------------------------------------------------------- DICOM


def test_real_monochrome1_radiograph_is_inverted():
    path = pydicom.data.get_testdata_file("RG1_UNCI.dcm")
    raw_ds = pydicom.dcmread(path)
    assert raw_ds.PhotometricInterpretation == "MONOCHROME1"
    raw = raw_ds.pixel_array.astype(np.float64)

    _, img = read_and_decode(path)
    assert img.dtype == np.float32 and img.shape == raw.shape
    assert img.min() == 0.0 and img.max() == 1.0
    corr = np.corrcoef(img[::8, ::8].ravel(), raw[::8, ::8].ravel())[0, 1]
    assert corr < -0.9


def test_synthetic_monochrome2_12bit_scales_to_full_range():
    src = _ramp12()
    img = decode_image(_dicom_bytes(src), "m2.dcm")
    assert img.dtype == np.float32 and img.shape == src.shape
    np.testing.assert_allclose(img, src / 4095.0, atol=1e-6)


def test_synthetic_monochrome1_is_inverted():
    src = _ramp12()
    m1 = decode_image(_dicom_bytes(src, "MONOCHROME1"), "m1.dcm")
    np.testing.assert_allclose(m1, 1.0 - src / 4095.0, atol=1e-6)


def test_dicom_rescale_and_window_are_applied():
    src = _ramp12()
    # Window 1000..3000 (after rescale): everything outside saturates.
    data = _dicom_bytes(
        src, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=2000
    )
    img = decode_image(data, "win.dcm")
    hu = src.astype(np.float64) * 2 - 1000
    assert np.all(img[hu <= 1000] == 0.0)
    assert np.all(img[hu >= 3000] == 1.0)
    inside = (hu > 1100) & (hu < 2900)
    np.testing.assert_allclose(img[inside], (hu[inside] - 1000) / 2000, atol=2e-3)


def test_dicom_overlay_bits_above_bits_stored_are_ignored():
    src = _ramp12()
    dirty = src | np.uint16(0xF000)
    img = decode_image(_dicom_bytes(dirty), "dirty.dcm")
    np.testing.assert_allclose(img, src / 4095.0, atol=1e-6)


def test_multiframe_dicom_uses_first_frame():
    first = _ramp12()
    frames = np.stack([first, 4095 - first, np.zeros_like(first)])
    img = decode_image(_dicom_bytes(frames), "multi.dcm")
    np.testing.assert_allclose(img, first / 4095.0, atol=1e-6)


def test_dicom_without_preamble_falls_back_to_pydicom():
    src = _ramp12()
    bare = _dicom_bytes(src)[128 + 4 :]  # strip preamble and the DICM marker
    np.testing.assert_allclose(decode_image(bare, "bare.dcm"), src / 4095.0, atol=1e-6)


def test_dicom_without_pixel_data_raises():
    data = _dicom_bytes(_ramp12())
    ds = pydicom.dcmread(io.BytesIO(data))
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf)
    with pytest.raises(ImageDecodeError, match="no pixel data") as err:
        decode_image(buf.getvalue(), "report.dcm")
    assert "report.dcm" in str(err.value)


# --------------------------------------------------------------------- errors


def _bad_files():
    png = _encode(_gradient(256, 256), "PNG")
    yield "empty.png", b"", "empty file"
    yield "half.png", png[: len(png) // 2], "truncated"
    yield "notes.png", b"this is a radiology report, not an image\n" * 5, "not a recognised"
    dcm = _dicom_bytes(_ramp12())
    yield "half.dcm", dcm[: len(dcm) // 2], "DICOM"


@pytest.mark.parametrize("name,content,reason", list(_bad_files()))
def test_bad_files_raise_with_source_and_hint(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageDecodeError) as err:
        read_and_decode(path)
    message = str(err.value)
    assert str(path) in message and reason in message
    assert "--allow-failures" in message
    assert isinstance(err.value, ValueError)


def test_missing_file_raises(tmp_path):
    path = tmp_path / "nope.png"
    with pytest.raises(ImageDecodeError, match="file not found") as err:
        read_and_decode(path)
    assert str(path) in str(err.value)


def test_decode_error_survives_pickling():
    err = pickle.loads(pickle.dumps(ImageDecodeError("x.png", "empty file")))
    assert isinstance(err, ImageDecodeError)
    assert err.source == "x.png" and "empty file" in str(err)


# ----------------------------------------------------------------- preprocess


@pytest.fixture
def prep() -> Preprocess:
    return Preprocess(resize_size=256, input_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD)


def test_plain_view_shape_dtype_and_determinism(prep):
    img = _random_image(300, 400)
    out = prep(img)
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.equal(out, prep(img))
    # Grey replicated: channels differ only through their own mean/std.
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    unnorm = out * std + mean
    torch.testing.assert_close(unnorm[0], unnorm[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(unnorm[0], unnorm[2], atol=1e-5, rtol=0)


def test_normalisation_uses_mean_and_std():
    prep = Preprocess(256, 224, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    out = prep(np.full((300, 300), 0.5, dtype=np.float32))
    assert out.abs().max() < 1e-5
    prep2 = Preprocess(256, 224, mean=(0.0, 0.25, 0.5), std=(1.0, 0.5, 0.25))
    out2 = prep2(np.full((300, 300), 1.0, dtype=np.float32))
    torch.testing.assert_close(out2.mean(dim=(1, 2)), torch.tensor([1.0, 1.5, 2.0]))


def test_non_square_image_resized_on_shorter_side_then_centre_cropped():
    # Left third dark, middle bright, right third dark; a 300x500 (HxW) image
    # resizes to 256x426, and the 224 centre crop drops 101 px of each side.
    img = np.zeros((300, 500), dtype=np.float32)
    img[:, 200:300] = 1.0
    prep = Preprocess(256, 224, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = prep(img)[0]
    assert out.shape == (224, 224)
    col = out.mean(dim=0)
    # Bright band spans columns 170.7..256 of the 426-wide resize -> 69.7..155 after crop.
    assert col[112] > 0.99 and col[75] > 0.99 and col[150] > 0.99
    assert col[:60].max() < 0.01 and col[165:].max() < 0.01
    # Tall image: same behaviour on the other axis.
    assert prep(img.T.copy())[0].T.sub(out).abs().max() < 1e-5


def test_small_image_is_upsampled(prep):
    out = prep(_random_image(50, 60))
    assert out.shape == (3, 224, 224)


def test_augmented_views_are_seeded(prep):
    img = _random_image(320, 280)
    a1 = prep(img, view=1, seed_key="study-1")
    assert a1.shape == (3, 224, 224) and a1.dtype == torch.float32
    assert torch.equal(a1, prep(img, view=1, seed_key="study-1"))
    assert not torch.allclose(a1, prep(img, view=2, seed_key="study-1"))
    assert not torch.allclose(a1, prep(img, view=1, seed_key="study-2"))
    assert not torch.allclose(a1, prep(img, view=0))


def test_augmented_views_ignore_global_rng(prep):
    img = _random_image(200, 200)
    np.random.seed(0)
    torch.manual_seed(0)
    a = prep(img, view=3, seed_key="k")
    np.random.seed(1)
    torch.manual_seed(1)
    assert torch.equal(a, prep(img, view=3, seed_key="k"))


def test_augmented_view_stays_in_value_range():
    prep = Preprocess(256, 224, mean=(0.0,) * 3, std=(1.0,) * 3)
    out = prep(_random_image(256, 256), view=5, seed_key="x")
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_identity_policy_is_plain_resized_full_image():
    policy = AugmentPolicy(scale=(1.0, 1.0), ratio=(1.0, 1.0), rotation_deg=0, brightness=0, contrast=0)
    prep = Preprocess(224, 224, mean=(0.0,) * 3, std=(1.0,) * 3, augment=policy)
    img = _random_image(300, 300)
    torch.testing.assert_close(prep(img, view=1, seed_key="k"), prep(img))


def _boxed(size: int = 224) -> tuple[np.ndarray, torch.Tensor]:
    """A black image with an off-centre white box, and the box's mask on the plain view's grid."""
    img = np.zeros((size, size), np.float32)
    img[40:110, 120:190] = 1.0
    return img, torch.from_numpy(img > 0.5)


def test_shift_scale_rotate_views_move_the_mask_alike():
    """An ``-ssr`` view (the authors' ShiftScaleRotate) warps the plain view; ``mask_view`` moves a
    mask by the same warp, so the view's bright pixels are the moved mask's, to the box's edge."""
    prep = Preprocess(224, 224, mean=(0.0,) * 3, std=(1.0,) * 3, augment=ShiftScaleRotate())
    img, mask = _boxed()
    moved_any = False
    for view in range(1, 7):
        bright = prep(img, view=view, seed_key="study-7")[0] > 0.5
        moved = prep.mask_view(mask, "study-7", view)
        assert torch.equal(moved, prep.masks_view(mask[None], ["study-7"], view)[0])
        inter, union = (bright & moved).sum().item(), (bright | moved).sum().item()
        assert inter / union > 0.95, (view, inter / union)
        moved_any |= not torch.equal(moved, mask)
    assert moved_any and torch.equal(prep.mask_view(mask, "study-7", 0), mask)


def test_shift_scale_rotate_without_range_is_the_plain_view():
    prep = Preprocess(256, 224, mean=(0.0,) * 3, std=(1.0,) * 3,
                      augment=ShiftScaleRotate(scale_limit=0, rotate_limit=0))
    img = _random_image(300, 260)
    torch.testing.assert_close(prep(img, view=2, seed_key="k"), prep(img), atol=1e-4, rtol=0)  # grid rounding


def test_augmentation_kinds_are_recorded_and_read_back():
    """The default policy is recorded without a kind (every store made before kinds keeps its
    fingerprint); another kind is recorded with it and read back; a crop cannot move a mask."""
    plain = Preprocess(256, 224, mean=(0.5,) * 3, std=(0.25,) * 3)
    ssr = Preprocess(256, 224, mean=(0.5,) * 3, std=(0.25,) * 3, augment={"kind": "shift-scale-rotate"})
    assert "kind" not in plain.to_dict()["augment"] and ssr.augment == ShiftScaleRotate()
    assert ssr.to_dict()["augment"] == {"kind": "shift-scale-rotate", "scale_limit": 0.1, "rotate_limit": 10.0,
                                        "shift_limit": 0.0}
    assert Preprocess.from_dict(ssr.to_dict()) == ssr and Preprocess.from_dict(plain.to_dict()) == plain
    with pytest.raises(ValueError, match="cannot move a mask"):
        plain.mask_view(torch.zeros(224, 224), "k", 1)
    with pytest.raises(ValueError, match="unknown augmentation kind 'flip'"):
        augment_policy({"kind": "flip"})
    for bad in ({"scale_limit": 1.0}, {"rotate_limit": -1}, {"shift_limit": 2}):
        with pytest.raises(ValueError, match="ShiftScaleRotate"):
            ShiftScaleRotate(**bad)


def test_negative_view_rejected(prep):
    with pytest.raises(ValueError):
        prep(_random_image(10, 10), view=-1)


def test_to_dict_is_json_able_and_normalised():
    import json

    a = Preprocess(256, 224, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    b = Preprocess(256, 224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                   augment=AugmentPolicy(rotation_deg=10))
    assert a == b and hash(a) == hash(b)
    d = json.loads(json.dumps(a.to_dict()))
    assert d == b.to_dict()
    assert d["resize_size"] == 256 and d["input_size"] == 224
    assert d["mean"] == [0.5] * 3 and d["std"] == [0.25] * 3
    assert d["augment"] == {
        "scale": [0.6, 1.0], "ratio": [0.8, 1.25], "rotation_deg": 10.0,
        "brightness": 0.2, "contrast": 0.2,
    }
    c = Preprocess(256, 224, mean=(0.5,) * 3, std=(0.25,) * 3, augment=AugmentPolicy(brightness=0.3))
    assert c.to_dict() != a.to_dict()


def test_invalid_config_rejected():
    with pytest.raises(ValueError):
        Preprocess(200, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    with pytest.raises(ValueError):
        Preprocess(256, 224, mean=IMAGENET_MEAN, std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError):
        AugmentPolicy(scale=(0.9, 0.5))


def test_the_authors_pad_square_geometry_pads_then_crops_and_keeps_default_fingerprints():
    """``pad-square`` (MGCA's resize_img, then a centre crop): a tall image's longer side goes to
    ``resize``, its width is zero-padded on both sides (floor before, the rest after) to a square,
    and the centre ``crop`` is cut; masks get the same cut. The default geometry is left out of the
    preprocessing record, so existing stores keep their fingerprints; a padded encoder gets its own."""
    from pipeline.datasets.mask_targets import align_mask
    from pipeline.encoders import resolve_encoder_name
    from pipeline.encoders.stored import store_fingerprint
    from pipeline.imaging import Preprocess, resize_and_crop

    img = np.ones((60, 29), np.float32)                       # tall: 60 -> 32, 29 -> int(29 * 32 / 60) = 15
    out = resize_and_crop(torch.from_numpy(img)[None, None], 32, 28, geometry="pad-square")[0, 0].numpy()
    assert out.shape == (28, 28)
    # 17 columns of padding: 8 before and 9 after; the centre crop drops 2 of each side
    assert (out[:, :6] == 0).all() and (out[:, 6:21] > 0.99).all() and (out[:, 21:] == 0).all()
    wide = resize_and_crop(torch.ones(1, 1, 20, 40), 32, 32, geometry="pad-square")[0, 0]
    assert (wide[:8] == 0).all() and (wide[8:24] > 0.99).all() and (wide[24:] == 0).all()
    square = torch.rand(1, 1, 50, 50)
    assert torch.equal(resize_and_crop(square, 32, 28, geometry="pad-square"), resize_and_crop(square, 32, 28))

    mask = np.zeros((60, 29), bool)
    mask[10:50, 5:20] = True
    on_grid = align_mask(mask, 32, 28, "pad-square")
    as_image = resize_and_crop(torch.from_numpy(mask.astype(np.float32))[None, None], 32, 28, nearest=True,
                               geometry="pad-square")[0, 0].numpy() > 0.5
    assert on_grid.shape == (28, 28) and on_grid.any() and (on_grid == as_image).all() and not on_grid[:, :6].any()

    plain, padded = resolve_encoder_name("tiny-vit"), resolve_encoder_name("tiny-vit-pad")
    assert "geometry" not in plain.to_dict() and "geometry" not in Preprocess(256, 224, (.5,) * 3, (.5,) * 3).to_dict()
    assert store_fingerprint(plain, weights="w") != store_fingerprint(padded, weights="w")
    assert padded.geometry == "pad-square" and resolve_encoder_name("resnet-ae-pad").resize_size == 224
    with pytest.raises(ValueError, match="geometry must be one of"):
        Preprocess(256, 224, (.5,) * 3, (.5,) * 3, geometry="stretch")


def test_one_registry_of_geometries_and_what_a_store_records_is_read_back_for_its_masks_and_pictures():
    """The three ways to cut a plain view live in one registry; a store's preprocessing record
    holds only the settings that differ from the defaults and is read back whole
    (``Preprocess.from_dict``: the report's pictures), and its masks are cut by the same recorded
    geometry and crop rounding (``cut``): a store whose crop origin rounds down, as transformers'
    does, gets masks on its images' pixels, not one column off. Stores keep their fingerprints and
    mask caches their names: the -pad encoders' are the ones the recipe gave them."""
    import hashlib
    import json

    from pipeline.datasets.mask_targets import align_mask, cache_path, cut
    from pipeline.encoders import resolve_encoder_name
    from pipeline.encoders.stored import store_fingerprint
    from pipeline.imaging import GEOMETRIES, RESIZE_DEFAULTS, Preprocess

    assert set(GEOMETRIES) == {"shorter-side-crop", "square", "pad-square"}
    for settings in ({}, {"geometry": "square", "resample": "bicubic", "resampler": "torch-uint8"},
                     {"geometry": "pad-square"}, {"crop_rounding": "floor", "resample": "bicubic", "resampler": "pil"}):
        p = Preprocess(40, 32, (.5,) * 3, (.5,) * 3, **settings)
        record = json.loads(json.dumps(p.to_dict()))   # as a store's spec holds it
        assert {k: record[k] for k in RESIZE_DEFAULTS if k in record} == settings
        assert Preprocess.from_dict(record) == p
        assert cut({"preprocess": record}) == (settings.get("geometry", "shorter-side-crop"),
                                               settings.get("crop_rounding", "round"))

    img = np.zeros((32, 39), np.float32)
    img[:, ::2] = 1.0                                # stripes: a crop one column off inverts every pixel
    floor = Preprocess(32, 32, (0.,) * 3, (1.,) * 3, crop_rounding="floor")   # a margin of 7: 3 (floor), 4 (round)
    view = floor(img)[0].numpy() > 0.5
    assert (align_mask(img > 0.5, 32, 32, *cut({"preprocess": floor.to_dict()})) == view).all()
    assert (align_mask(img > 0.5, 32, 32) != view).all()
    square = Preprocess(16, 16, (0.,) * 3, (1.,) * 3, geometry="square")
    block = np.zeros((32, 39), np.float32)
    block[:, :20] = 1.0
    seen = square(block)[0].numpy() > 0.5
    aligned = align_mask(block > 0.5, 16, 16, *cut({"preprocess": square.to_dict()}))
    assert aligned.shape == (16, 16) and (seen & aligned).sum() / (seen | aligned).sum() > 0.9 and not aligned[:, -4:].any()

    pinned = {"tiny-vit": "9f90e32713964d0432af1c92d9b4ee72", "tiny-vit-pad": "7ca3a29ec134ec4d0c4efd10f3c41b83",
              "tiny-vit-pad224": "c288832889292c37a5fbd14de028f580"}
    assert {name: store_fingerprint(resolve_encoder_name(name), weights="w") for name in pinned} == pinned
    name = lambda *key: hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:12]   # noqa: E731
    assert cache_path(Path("/c"), "d", "m", 256, 224).name == f"m-{name(256, 224, 1)}.npz"
    padded = cache_path(Path("/c"), "d", "m", 256, 224, ("pad-square", "round"))
    assert padded.name == f"m-{name(256, 224, 1, 'pad-square')}.npz"
    assert cache_path(Path("/c"), "d", "m", 518, 518, ("shorter-side-crop", "floor")).name == f"m-{name(518, 518, 1, 'floor')}.npz"
