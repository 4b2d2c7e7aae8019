"""The radiology encoder families (RAD-DINO, BiomedCLIP, MedSigLIP, CheXagent's XraySigLIP):
their preprocessing against the reference processors, their stand-ins through the real
loaders, their native joint space, and their bad inputs.

The reference settings below are transcribed from each model's published files (the
registry's comments name them); a test that read them back from our own configs would
only compare the code with itself.
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import torch
from PIL import Image

from tests.helpers import make_table, pipe
from pipeline.encoders import create_encoder, list_encoders, resolve_encoder_name
from pipeline.encoders.catalogue import BEGIN, END, encoder_table
from pipeline.encoders.hf import WrongWeightsError
from pipeline.encoders.standins import register_tiny_trunk, standin_folder
from pipeline.encoders.registry import UnknownEncoderError
from pipeline.encoders.stored import preprocess_of, store_fingerprint, store_spec
from pipeline.encoders.weights import WeightsNotFoundError
from pipeline.imaging import RESIZE_DEFAULTS, decode_image
from pipeline.methods import METHOD_KINDS
from stages.evaluate.features import raw_features

DOCS = Path(__file__).parents[1] / "docs" / "reference" / "encoders.md"
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- images
@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    """A real radiograph (DICOM, 1955 x 1841) and a 16-bit PNG of odd size (517 x 389), decoded as `pipe embed` does."""
    dicom = Path(pydicom.data.get_testdata_file("RG1_UNCI.dcm")).read_bytes()
    rng = np.random.default_rng(7)
    coarse = rng.integers(0, 4096, (40, 52)).astype(np.float64)
    smooth = np.asarray(Image.fromarray(coarse.astype(np.float32)).resize((517, 389), Image.BICUBIC))
    grey16 = (np.clip(smooth, 0, 4095) * 16 + rng.integers(0, 16, smooth.shape)).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey16).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")   # really 16-bit on disk
    return {"RG1_UNCI.dcm": decode_image(dicom, "RG1_UNCI.dcm"), "odd-16bit.png": decode_image(buf.getvalue(), "odd.png")}


def _as_8bit_pil(img: np.ndarray) -> Image.Image:
    """What a reference processor reads: the decoded image as an 8-bit grey file would hold it."""
    return Image.fromarray(np.round(img * 255.0).astype(np.uint8))


def _torchvision_backend(cls_name: str):
    """transformers' torchvision-backed processor class (transformers 5: the plain name)."""
    import transformers

    cls = getattr(transformers, cls_name)
    return cls if getattr(cls(), "backend", None) == "torchvision" else getattr(transformers, f"{cls_name}Fast")


def _pil_backend(cls_name: str):
    """transformers' PIL-backed processor class (transformers 4: the plain name)."""
    import transformers

    return getattr(transformers, f"{cls_name}Pil", None) or getattr(transformers, cls_name)


def rad_dino_reference(side: int):
    # microsoft/rad-dino preprocessor_config.json: BitImageProcessor, shortest_edge and crop 518, resample 3,
    # rescale 1/255, mean 0.5307, std 0.2583; the authors' package loads it with use_fast=False (PIL backend).
    proc = _pil_backend("BitImageProcessor")(
        do_resize=True, size={"shortest_edge": side}, resample=3, do_center_crop=True,
        crop_size={"height": side, "width": side}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=[0.5307] * 3, image_std=[0.2583] * 3, do_convert_rgb=True)
    return lambda pil: proc(pil, return_tensors="pt")["pixel_values"][0]


def siglip_reference(side: int):
    # google/medsiglip-448 (448) and the XraySigLIP/XrayCLIP ViT-L/16 processors (512): SiglipImageProcessor,
    # size side x side, resample 3, rescale 1/255, mean = std = 0.5.
    proc = _torchvision_backend("SiglipImageProcessor")(
        do_resize=True, size={"height": side, "width": side}, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return lambda pil: proc(pil, return_tensors="pt")["pixel_values"][0]


def open_clip_reference(side: int):
    # BiomedCLIP's open_clip_config.json: image_size 224, preprocess_cfg mean/std of OpenAI CLIP, and open_clip's
    # defaults: interpolation bicubic, resize_mode shortest.
    from open_clip.transform import image_transform

    return image_transform(side, is_train=False, mean=CLIP_MEAN, std=CLIP_STD, interpolation="bicubic",
                           resize_mode="shortest")


REFERENCES = {
    "rad-dino": lambda: rad_dino_reference(518),
    "biomedclip": lambda: open_clip_reference(224),
    "medsiglip": lambda: siglip_reference(448),
    "chexagent-siglip": lambda: siglip_reference(512),
    "tiny-rad-dino": lambda: rad_dino_reference(112),
    "tiny-siglip": lambda: siglip_reference(64),
}


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_preprocessing_matches_the_reference_processor(name, images):
    pre = preprocess_of(resolve_encoder_name(name, "image"))
    reference = REFERENCES[name]()
    for label, img in images.items():
        ours, ref = pre(img), reference(_as_8bit_pil(img))
        assert ours.shape == ref.shape, (label, ours.shape, ref.shape)
        diff = (ours - ref).abs().max().item()
        assert diff < 1e-6, f"{name} on {label}: max |ours - reference| = {diff:.3g}"
        assert ref.std() > 0.1   # a real image, not a constant that any preprocessing would match


def test_tiny_biomedclip_matches_open_clip_reading_its_own_folder(images):
    """The stand-in's folder read by open_clip itself: its transform is what our preprocessing reproduces."""
    import open_clip

    folder = standin_folder("tiny-biomedclip")
    register_tiny_trunk()   # the stand-in's trunk is a timm model this project registers
    _, _, transform = open_clip.create_model_and_transforms(
        f"local-dir:{folder}", text_cfg={**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
                                         ["text_cfg"], "hf_model_name": str(folder), "hf_model_pretrained": False})
    pre = preprocess_of(resolve_encoder_name("tiny-biomedclip", "image"))
    for img in images.values():
        assert (pre(img) - transform(_as_8bit_pil(img))).abs().max().item() < 1e-6


def test_the_wrong_geometry_would_be_caught(images):
    """The comparison has teeth: the project's default float bilinear resize misses RAD-DINO's by far more."""
    cfg = resolve_encoder_name("rad-dino")
    default = preprocess_of(cfg.replace(resize=()))
    img = images["RG1_UNCI.dcm"]
    assert (default(img) - rad_dino_reference(518)(_as_8bit_pil(img))).abs().max().item() > 1e-2


# ------------------------------------------------------------------ registry facts
def test_each_family_registers_its_towers_under_one_name():
    by = {(c.name, c.modality): c for c in list_encoders()}
    for name in ("biomedclip", "medsiglip", "tiny-biomedclip", "tiny-siglip"):
        image, text = by[(name, "image")], by[(name, "text")]
        assert image.joint_space == text.joint_space and image.native_dim == text.native_dim > 0
        assert resolve_encoder_name(name, "text") is text and resolve_encoder_name(name) is image
    for name in ("rad-dino", "chexagent-siglip"):
        assert (name, "text") not in by and not by[(name, "image")].joint_space
    assert by[("medsiglip", "image")].card.gated and not by[("rad-dino", "image")].card.gated
    assert by[("rad-dino", "image")].tokens == 1 + 37 * 37 and by[("medsiglip", "image")].tokens == 32 * 32


def test_encoders_without_a_joint_space_keep_their_fingerprints():
    """New fields stay out of the fingerprint spec of every encoder that does not use them; a resize
    setting is recorded under its own name (in the encoder's part and the preprocessing's) only where
    it is not the default."""
    for cfg in list_encoders():
        spec = store_spec(cfg, weights="w")
        assert "card" not in spec["encoder"]
        if not cfg.joint_space:
            assert "native" not in spec and "joint_space" not in spec["encoder"]
        recorded = {k: v for k, v in cfg.resize if v != RESIZE_DEFAULTS[k]}
        for part in (spec["encoder"], spec.get("preprocess", recorded)):   # each non-default setting, nothing else
            assert {k: part[k] for k in RESIZE_DEFAULTS if k in part} == recorded
        assert "resize" not in spec["encoder"]


def test_any_image_encoder_has_an_ssr_variant_with_views_a_mask_can_follow():
    """``<image encoder>-ssr``: the same network, weights and cost, its store's views warped as the
    authors' segmentation augmentation; a store of its own (the policy is in the fingerprint) while the
    base's fingerprint stays as it was; not listed; text encoders and unknown bases have none."""
    from pipeline.encoders.registry import _builder_for

    for base in ("tiny-vit", "tiny-vit-pad224", "dinov2-s-derived", "dinov2"):
        cfg, plain = resolve_encoder_name(base + "-ssr"), resolve_encoder_name(base)
        assert cfg.name == plain.name + "-ssr" and _builder_for(cfg) is _builder_for(plain)
        assert cfg.replace(name=plain.name, augment=(), description=plain.description) == plain
        pre = preprocess_of(cfg)
        assert pre.augment.follows_masks and pre.augment.kind == "shift-scale-rotate"
        assert "kind" not in store_spec(plain, weights="w")["preprocess"]["augment"]
        assert store_fingerprint(cfg, weights="w") != store_fingerprint(plain, weights="w")
    assert resolve_encoder_name("dinov2-ssr").name == "dinov2-b-ssr"   # an alias's variant is the canonical one's
    assert "tiny-vit-ssr" not in {c.name for c in list_encoders()}
    for name in ("tiny-bert-ssr", "no-such-net-ssr"):
        with pytest.raises(UnknownEncoderError):
            resolve_encoder_name(name)


def test_the_docs_table_is_the_registry():
    page = DOCS.read_text()
    assert BEGIN in page and END in page
    table = page.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert table == encoder_table(), "run `python -m pipeline.encoders.catalogue docs/reference/encoders.md`"
    for name in ("rad-dino", "biomedclip", "medsiglip", "chexagent-siglip"):
        assert f"| `{name}` |" in table


def test_pipe_encoders_shows_cost_licence_and_gating():
    rows = {(r["name"], r["modality"]): r for r in json.loads(pipe("encoders", "--json").stdout)}
    med = rows[("medsiglip", "image")]
    assert med["gated"] and "Health AI" in med["licence"] and med["gflops"] > 500 and med["native_dim"] == 1152
    assert rows[("rad-dino", "image")]["input"] == "518x518" and rows[("rad-dino", "image")]["licence"] == "MIT"
    assert rows[("tiny-siglip", "text")]["available"]


# -------------------------------------------------------------------- bad inputs
@pytest.fixture
def empty_hub(tmp_path, monkeypatch) -> Path:
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return hub


def fake_snapshot(hub: Path, hub_id: str, files_from: Path) -> Path:
    snap = hub / f"models--{hub_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(files_from, snap)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("0" * 40)
    return snap


def test_a_gated_model_says_to_accept_its_terms(empty_hub):
    with pytest.raises(WeightsNotFoundError) as e:
        create_encoder("medsiglip")
    msg = str(e.value)
    assert "'medsiglip'" in msg and "google/medsiglip-448" in msg and "gated" in msg and "accept its terms" in msg
    r = pipe("embed", "-d", "x.csv", "-b", "medsiglip", "-t", "none", expect=None)
    assert r.exit_code != 0


def test_weights_of_another_architecture_are_refused(empty_hub):
    fake_snapshot(empty_hub, "microsoft/rad-dino", standin_folder("tiny-siglip"))
    with pytest.raises(WrongWeightsError, match=r"'rad-dino'.*a siglip model.*hf download microsoft/rad-dino"):
        create_encoder("rad-dino")
    fake_snapshot(empty_hub, "google/medsiglip-448", standin_folder("tiny-siglip"))
    with pytest.raises(WrongWeightsError, match=r"'medsiglip'.*32 wide.*1152"):
        create_encoder("medsiglip")


def test_an_open_clip_folder_of_another_width_is_refused(empty_hub):
    fake_snapshot(empty_hub, "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224", standin_folder("tiny-biomedclip"))
    with pytest.raises(WrongWeightsError, match=r"'biomedclip' \(image\).*image tower is 48 wide \(the registry says 768\)"):
        create_encoder("biomedclip")
    with pytest.raises(WrongWeightsError, match=r"'biomedclip' \(text\).*text tower is 32 wide"):
        create_encoder("biomedclip", modality="text")


def test_a_text_encoder_given_as_the_backbone_says_which_option_it_belongs_to(tmp_path):
    table = make_table(tmp_path / "data", 4)
    r = pipe("embed", "-d", str(table), "-b", "tiny-bert", "-t", "none", "--cache", str(tmp_path / "c"), expect=2)
    assert "'tiny-bert' is a text encoder" in r.output and "--text-encoder" in r.output


# ------------------------------------------------ stand-ins end to end, native space
SMALL = ["adaptor.d_model=32", "adaptor.n_heads=4", "adaptor.ffn_dim=64", "batch_size=8", "optim.lr=1e-3", "epochs=1"]
FAST = ["fractions=[1.0]", "seeds=1", "heads.epochs=2", "heads.min_steps=10", "heads.max_steps=20", "heads.patience=1",
        "bootstrap=20"]
PAIRS = {"biomedclip": ("tiny-biomedclip", "tiny-biomedclip"), "siglip": ("tiny-siglip", "tiny-siglip"),
         "rad-dino": ("tiny-rad-dino", "tiny-bert")}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """Twelve items, embedded once with each family's stand-ins (in-process, as `pipe embed` runs)."""
    root = tmp_path_factory.mktemp("families")
    table, cache = make_table(root / "data", 12), root / "cache"
    names = {}
    for family, (b, t) in PAIRS.items():
        r = pipe("embed", "-d", str(table), "-b", b, "-t", t, "--cache", str(cache), "--json")
        names[family] = json.loads(r.stdout.strip().splitlines()[-1])["dataset"]
    return {"root": root, "table": table, "cache": cache, "dataset": next(iter(names.values()))}


def _pairs(world, family):
    from cache.pairs import load_pairs

    b, t = PAIRS[family]
    return load_pairs(world["cache"], world["dataset"], str(world["table"]), b, t)


def test_stored_native_vectors_are_the_models_own(world):
    """What `pipe embed` stores for the native path is what open_clip and transformers compute
    with the same weights: BiomedCLIP's encode_image/encode_text, SigLIP's get_*_features."""
    import open_clip
    from transformers import AutoTokenizer, SiglipModel

    for family in ("biomedclip", "siglip"):
        data = _pairs(world, family)
        rows_i, rows_t = data.image_rows[:3, 0], data.text_rows[:3]
        cfg = resolve_encoder_name(PAIRS[family][0], "image")
        pixels = torch.stack([preprocess_of(cfg)(decode_image(Path(p).read_bytes())) for p in data.items.image[:3]])
        texts = [str(r) for r in data.items.report[:3]]
        folder = standin_folder(PAIRS[family][0])
        with torch.no_grad():
            if family == "biomedclip":
                register_tiny_trunk()
                text_cfg = {**json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"],
                            "hf_model_name": str(folder), "hf_model_pretrained": False}
                model = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg).eval()
                img = model.encode_image(pixels)
                txt = model.encode_text(open_clip.tokenizer.HFTokenizer(str(folder), context_length=32)(texts))
            else:
                model = SiglipModel.from_pretrained(str(folder)).eval()
                img = model.get_image_features(pixel_values=pixels)
                ids = AutoTokenizer.from_pretrained(str(folder))(texts, padding="max_length", max_length=32,
                                                                 return_tensors="pt")["input_ids"]
                txt = model.get_text_features(input_ids=ids)
        img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
        stored_i, stored_t = raw_features(data.image, rows_i, "native"), raw_features(data.text, rows_t, "native")
        assert np.allclose(stored_i, img.numpy(), atol=1e-5), family
        assert np.allclose(stored_t, txt.numpy(), atol=1e-5), family
        assert data.image.attrs["joint"]["logit_scale"] == pytest.approx(float(model.logit_scale.detach().exp()), rel=1e-6)
        assert data.image.attrs["spec"]["native"]["dim"] == cfg.native_dim


@pytest.mark.parametrize("family", sorted(PAIRS))
def test_standins_train_evaluate_and_predict(world, family, tmp_path):
    b, t = PAIRS[family]
    run = tmp_path / "run"
    pipe("train-adaptor", "-d", str(world["table"]), "-b", b, "-t", t, "--cache", str(world["cache"]),
         "--out", str(run), *SMALL)
    out = tmp_path / "retrieval"
    pipe("evaluate", "--task", "retrieval", "-d", str(world["table"]), "--adaptor", str(run), "--cache",
         str(world["cache"]), "--out", str(out), *FAST)
    methods = {m["features"] for m in json.loads((out / "results.json").read_text())["methods"]}
    assert "adaptor" in methods and ("native" in methods) == (family != "rad-dino")
    r = pipe("predict", str(world["table"].parent / "img" / "0001.png"), "--adaptor", str(run), "--cache",
             str(world["cache"]), "--json", "--device", "cpu")
    image = json.loads(r.stdout.strip().splitlines()[-1])["images"][0]
    assert image["error"] is None and image["zero_shot"]


def test_adaptor_native_is_a_row_of_every_table_and_of_the_report(world, tmp_path):
    b, t = PAIRS["siglip"]
    outs = []
    for task in ("classification", "zero-shot", "retrieval"):
        out = tmp_path / task
        pipe("evaluate", "--task", task, "-d", str(world["table"]), "--adaptor", "native", "-b", b, "-t", t,
             "--cache", str(world["cache"]), "--out", str(out), *FAST)
        res = json.loads((out / "results.json").read_text())
        native = [m for m in res["methods"] if m["features"] == "native"]
        assert len(native) == 1 and native[0]["name"].startswith("native joint space tiny-siglip")
        assert native[0]["identity"]["kind"] == "native"   # a typed record: readers ask the kind, not the name
        assert all(any(r["identity"]["kind"] == "native" for r in tab["rows"]) for tab in res["tables"])
        assert res["checkpoint"] is None
        outs.append(out)
    ret = json.loads((outs[2] / "results.json").read_text())["methods"]
    assert next(m for m in ret if m["features"] == "native")["recall"]["image→text R@10"] == 1.0   # 3 test pairs
    pipe("report", *map(str, outs), "--html", str(tmp_path / "page.html"), "--format", "md")
    page = (tmp_path / "page.html").read_text()
    kind = METHOD_KINDS["native"]
    assert "native joint space" in page and kind.colour in page and not kind.ours   # its kind's label and colour


def test_native_needs_a_shared_space_and_mixed_pairs_train_like_any(world, tmp_path):
    for b, t, why in (("tiny-rad-dino", "tiny-bert", "'tiny-rad-dino' has no joint space"),
                      ("tiny-siglip", "tiny-biomedclip", "into the tiny-siglip space and 'tiny-biomedclip' into")):
        pipe("embed", "-d", str(world["table"]), "-b", b, "-t", t, "--cache", str(world["cache"]))
        r = pipe("evaluate", "--task", "retrieval", "-d", str(world["table"]), "--adaptor", "native", "-b", b, "-t", t,
                 "--cache", str(world["cache"]), "--out", str(tmp_path / "x"), expect=2)
        assert why in r.output and "--adaptor none" in r.output and not (tmp_path / "x").exists()
    pipe("train-adaptor", "-d", str(world["table"]), "-b", "tiny-siglip", "-t", "tiny-biomedclip", "--cache",
         str(world["cache"]), "--out", str(tmp_path / "mixed"), *SMALL)
    assert (tmp_path / "mixed" / "last.safetensors").is_file()


@pytest.mark.parametrize("name,modality", [("tiny-rad-dino", "image"), ("tiny-siglip", "image"),
                                           ("tiny-biomedclip", "image"), ("tiny-siglip", "text"),
                                           ("tiny-biomedclip", "text"), ("tiny-vit", "image"), ("tiny-bert", "text")])
def test_a_configs_cost_is_what_torch_counts(name, modality):
    """The card's GFLOPs (the formula the real entries' figures come from) against torch's own
    FLOP counter on each family's stand-in, attention computed by its counted math path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    enc = create_encoder(name, modality=modality)
    cfg = enc.config
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        if modality == "image":
            enc(torch.zeros(1, 3, cfg.input_size, cfg.input_size))
        else:   # a text as long as the encoder reads
            enc(**enc.tokenize(["effusion " * 300]))
    assert counter.get_total_flops() / 1e9 == pytest.approx(cfg.card.gflops, rel=0.05)


def test_open_clip_missing_says_how_to_install_it(monkeypatch):
    import sys

    from pipeline.encoders.openclip import OpenClipMissing

    monkeypatch.setitem(sys.modules, "open_clip", None)   # an import of it now fails, as without the extra
    with pytest.raises(OpenClipMissing, match=r"biomedclip.*pip install 'freeze-pipe\[openclip\]'"):
        create_encoder("tiny-biomedclip")
