"""The Adaptor, its loss and the flaws of the original code that it must not repeat."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.config import ConfigError, load_config
from pipeline.models.adaptor import Adaptor, AdaptorConfig, adaptor_config_from_saved, trim_text_padding
from pipeline.models.loss import (clip_loss, itm_loss, rerank_top_k, retrieval_recall, retrieval_recall_from_sim,
                                  sample_hard_negatives)
from stages.train.trainer import TrainConfig
from tests.helpers import ranks
from tests.helpers.s3server import free_port

TINY = dict(image_dim=12, text_dim=10, d_model=16, n_heads=4, ffn_dim=24, dropout=0.0)


def tiny(mode: str, **kw) -> Adaptor:
    torch.manual_seed(0)
    return Adaptor(AdaptorConfig(mode=mode, **{**TINY, **kw}))


def pooled_batch(b: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image_pooled": torch.randn(b, 12, generator=g), "text_pooled": torch.randn(b, 10, generator=g)}


def tokens_batch(b: int = 6, grid: int = 4, tt: int = 7) -> dict:
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(b, tt, dtype=torch.bool)
    for i in range(b):
        mask[i, 2 + i % (tt - 2) :] = False  # different report lengths, [CLS] always real
    return {
        "image_tokens": torch.randn(b, 1 + grid * grid, 12, generator=g),
        "text_tokens": torch.randn(b, tt, 10, generator=g),
        "text_mask": mask,
    }


def n_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- size
def test_parameter_counts_match_the_paper():
    assert n_trainable(Adaptor(AdaptorConfig(image_dim=768, text_dim=768))) == 12_207_617
    assert n_trainable(Adaptor(AdaptorConfig(image_dim=384, text_dim=768))) == 11_912_705
    block = Adaptor(AdaptorConfig()).blocks[0]
    assert n_trainable(block) == 5_513_984
    # tokens mode: the same shared blocks (unimodal encoders) + one shared fusion block + the matching head
    assert n_trainable(Adaptor(AdaptorConfig(mode="tokens", grid_pool=8, fusion_layers=0))) == 12_207_617
    assert n_trainable(Adaptor(AdaptorConfig(mode="tokens", grid_pool=8))) == 12_207_617 + 5_513_984 + 3 * 768 + 1


# ------------------------------------------------------------------------ flaw 1
def _qk_and_v_grads(model: Adaptor, batch: dict) -> tuple[float, float]:
    img, txt = model(batch)
    clip_loss(img, txt, model.scale()).backward()
    qk, v = 0.0, 0.0
    d = model.cfg.d_model
    for block in model.blocks:
        g = block.attn.in_proj_weight.grad
        qk = max(qk, g[: 2 * d].abs().max().item())
        v = max(v, g[2 * d :].abs().max().item())
    return qk, v


def test_tokens_mode_trains_queries_and_keys():
    qk, v = _qk_and_v_grads(tiny("tokens"), tokens_batch())
    assert qk > 1e-4 and v > 1e-4


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_matching_loss_trains_cross_attention_queries_and_keys(readout):
    """The fusion blocks' attention (image queries over report keys, and back) learns: Q, K
    and V of both directions get gradient from the matching loss."""
    model = tiny("tokens", readout=readout)
    torch.manual_seed(1)
    _, _, match = model(tokens_batch(), match=True)
    itm_loss(match).backward()
    d = model.cfg.d_model
    for block in model.fusion:
        g = block.attn.in_proj_weight.grad
        assert g[:d].abs().max() > 1e-5 and g[d:2 * d].abs().max() > 1e-5 and g[2 * d:].abs().max() > 1e-5
    assert model.match_head.weight.grad.abs().max() > 1e-5


def test_cross_attention_carries_information():
    """The matching logit of an image depends on the report it is paired with (the pooled
    mode's single-key attention could not make it so)."""
    model = tiny("tokens").eval()
    b = tokens_batch()
    img_tok = model.image_token_states(b["image_tokens"])
    txt_tok = model.text_token_states(b["text_tokens"], b["text_mask"])
    logits = torch.stack([model.match_logits(img_tok, txt_tok[[j] * 6], b["text_mask"][[j] * 6]) for j in range(6)])
    assert (logits.std(dim=0) > 1e-4).all()  # for each image, the logit moves with the report


def test_pooled_mode_gives_queries_and_keys_no_gradient():
    """Flaw 1: one key per attention, so softmax == 1 and Q/K never learn."""
    qk, v = _qk_and_v_grads(tiny("pooled"), pooled_batch())
    assert v > 1e-4
    assert qk < 1e-7 * max(v, 1.0)


def _full_attention(block, x, query, kv, kv_pad=None):
    """FusionBlock.forward as it was before the one-key path: the whole multi-head attention."""
    attended, _ = block.attn(query, kv, kv, key_padding_mask=kv_pad, need_weights=False)
    x = block.norm1(x + block.drop1(attended))
    return block.norm2(x + block.drop2(block.ffn(x)))


def _per_stream_blocks(model, img, txt):
    """The pooled blocks as they ran before both streams were batched: the image stream, then the text."""
    for block in model.blocks:
        img = block(img, query=txt, kv=img)
        txt = block(txt, query=img, kv=txt)
    return img, txt


@pytest.mark.parametrize("train", [True, False])
def test_the_one_key_path_equals_the_full_attention(train, monkeypatch):
    """Pooled mode skips the query/key projections (a one-key softmax is 1) and runs both streams of a
    block as one batch: embeddings, loss and every gradient equal the full multi-head attention's, one
    stream at a time, dropout included (same seed, same draws)."""
    from pipeline.models import adaptor as adaptor_module

    def run(full: bool):
        if full:
            monkeypatch.setattr(adaptor_module.FusionBlock, "forward", _full_attention)
            monkeypatch.setattr(adaptor_module.Adaptor, "_pooled_blocks", _per_stream_blocks)
        else:
            monkeypatch.undo()
        model = tiny("pooled", dropout=0.3, n_layers=2).train(train)
        torch.manual_seed(123)
        img, txt = model(pooled_batch(8))
        only = model.encode_image(pooled_batch(8)["image_pooled"])
        loss = clip_loss(img, txt, model.scale(), 0.75) + only.sum()
        loss.backward()
        return img, txt, only, loss, {n: p.grad for n, p in model.named_parameters()}

    full, fast = run(True), run(False)
    for a, b in zip(full[:4], fast[:4]):
        assert_close(b, a, atol=1e-6, rtol=0)
    assert full[4].keys() == fast[4].keys()
    for name, grad in full[4].items():
        assert_close(fast[4][name], grad, atol=1e-6, rtol=0, msg=name)
    if train:  # the dropout really acted: a run without it gives other embeddings
        torch.manual_seed(0)
        plain = Adaptor(AdaptorConfig(mode="pooled", **{**TINY, "dropout": 0.0}))
        plain.load_state_dict(tiny("pooled", dropout=0.3).state_dict())
        assert not torch.allclose(plain.train()(pooled_batch(8))[0], fast[0], atol=1e-4)


def test_both_pooled_streams_of_a_block_run_as_one_batch(monkeypatch):
    """Each block runs once per forward, over the image and the text streams stacked (2B rows), with the
    dropout masks drawn beforehand in the per-stream order; training gives the per-stream result."""
    from pipeline.models.adaptor import FusionBlock

    rows = []
    original = FusionBlock.one_key_streams
    monkeypatch.setattr(FusionBlock, "one_key_streams", lambda self, x, keep: rows.append(len(x)) or original(self, x, keep))
    model = tiny("pooled", dropout=0.3, n_layers=3).train()
    torch.manual_seed(7)
    batched = model(pooled_batch(5))
    assert rows == [10, 10, 10]
    torch.manual_seed(7)
    per_stream = _per_stream_blocks(model, model._image_in(pooled_batch(5)["image_pooled"]),
                                    model._text_in(pooled_batch(5)["text_pooled"]))
    for a, b in zip(batched, per_stream):
        assert_close(a, F.normalize(b[:, 0], dim=-1), atol=1e-6, rtol=0)


def test_the_one_key_path_skips_the_query_and_key_projections(monkeypatch):
    """The one-key path does not call the attention module at all, in pooled mode; tokens mode still does."""
    calls = []
    monkeypatch.setattr(torch.nn.MultiheadAttention, "forward",
                        lambda self, *a, **k: calls.append(1) or (a[0], None))
    tiny("pooled")(pooled_batch())
    assert calls == []
    tiny("tokens", fusion_layers=0)(tokens_batch())
    assert calls


def test_a_pooled_checkpoint_written_before_the_one_key_path_gives_the_same_embeddings():
    """tests/data/pooled-adaptor-before-one-key: an Adaptor saved, and its embeddings computed, by the full
    multi-head attention (commit 4e6a272). It loads into today's model and gives the same outputs."""

    import numpy as np
    from pipeline.models.checkpoint import load_weights, read_meta

    folder = Path(__file__).parent / "data" / "pooled-adaptor-before-one-key"
    meta = read_meta(folder / "adaptor.safetensors")
    cfg = meta["adaptor"]
    model = Adaptor(adaptor_config_from_saved(cfg)).eval()
    load_weights(folder / "adaptor.safetensors", model)
    want = np.load(folder / "expected.npz")
    with torch.no_grad():
        img, txt = model({"image_pooled": torch.from_numpy(want["image"]),
                          "text_pooled": torch.from_numpy(want["text"])})
        only = model.encode_image(torch.from_numpy(want["image"]))
    for got, key in ((img, "img_emb"), (txt, "txt_emb"), (only, "image_only")):
        assert_close(got, torch.from_numpy(want[key]), atol=1e-6, rtol=0)


def test_the_pooled_text_embedding_runs_the_text_stream_alone():
    """Evaluation's pooled text path computes the text stream only: the paired forward's text output
    never reads the image (one-key attentions ignore their query), so it is the same whatever image it
    is paired with (to float rounding: the paired forward runs both streams as one batch), and the
    image projection is never called."""
    model = tiny("pooled", dropout=0.3, n_layers=2).eval()
    batch = pooled_batch(8)
    calls = []
    model.image_proj.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        alone = model.text_embedding(batch["text_pooled"])
        assert calls == []
        for image in (batch["image_pooled"], torch.zeros(8, 12), 1e3 * torch.randn(8, 12)):
            assert_close(alone, model({**batch, "image_pooled": image})[1], atol=1e-6, rtol=0)


def _rows_seen_by_the_last_block(model: Adaptor) -> list[int]:
    seen: list[int] = []
    model.blocks[-1].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    return seen


@pytest.mark.parametrize("train,dropout", [(False, 0.3), (True, 0.0)])
def test_the_last_block_computes_only_the_readout_row_with_the_same_result(train, dropout, monkeypatch):
    """With the cls readout, where only the readout is used (forward without the matching head,
    encode_image, encode_text) the unimodal encoders' last block computes token 0's row alone:
    embeddings, loss and every gradient equal those of every row within 1e-6, in eval mode and in
    training without dropout."""

    def run(every_row: bool):
        if every_row:
            monkeypatch.setattr(Adaptor, "_skips_unread_rows", lambda self: False)
        else:
            monkeypatch.undo()
        model = tiny("tokens", dropout=dropout, n_layers=2).train(train)
        seen = _rows_seen_by_the_last_block(model)
        batch = tokens_batch(8)
        img, txt = model(batch)
        only_img = model.encode_image(batch["image_tokens"])
        only_txt = model.encode_text(batch["text_tokens"], batch["text_mask"])
        loss = clip_loss(img, txt, model.scale(), 0.75) + only_img.sum() + only_txt.sum()
        loss.backward()
        return (img, txt, only_img, only_txt, loss), {n: p.grad for n, p in model.named_parameters()}, seen

    full, full_grads, full_rows = run(True)
    fast, fast_grads, fast_rows = run(False)
    assert full_rows == [17, 7, 17, 7] and fast_rows == [1, 1, 1, 1]  # [CLS] + 4x4 patches; 7 report tokens
    for a, b in zip(full, fast):
        assert_close(b, a, atol=1e-6, rtol=0)
    assert full_grads.keys() == fast_grads.keys()
    for name, grad in full_grads.items():
        assert (grad is None) == (fast_grads[name] is None), name
        if grad is not None:
            assert_close(fast_grads[name], grad, atol=1e-6, rtol=0, msg=name)


@pytest.mark.parametrize("readout,train,dropout,match,rows", [
    ("cls", False, 0.3, False, 1),   # eval: only the readout row
    ("cls", True, 0.3, False, 17),   # dropout draws masks shaped like the tensors: every row
    ("mean", False, 0.0, False, 17),  # the mean reads every row
    ("cls", False, 0.0, True, 17),   # the matching head reads every token state
])
def test_rows_are_skipped_only_where_nothing_reads_them(readout, train, dropout, match, rows):
    model = tiny("tokens", readout=readout, dropout=dropout).train(train)
    seen = _rows_seen_by_the_last_block(model)
    torch.manual_seed(0)
    model(tokens_batch(), match=match)
    assert seen[0] == rows


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_text_padding_cut_to_the_longest_report_changes_no_output(readout):
    """Cached reports are padded to max_tokens; evaluation and validation cut a batch after its longest
    report. Embeddings, token states of real tokens and matching logits equal the padded batch's."""
    model = tiny("tokens", readout=readout, n_layers=2).eval()
    batch = tokens_batch(6, tt=12)  # reports of 2..7 tokens, padded to 12
    text, keep = trim_text_padding(batch["text_tokens"], batch["text_mask"])
    assert text.shape == (6, 7, 10) and keep.shape == (6, 7) and keep.sum() == batch["text_mask"].sum()
    cut = {**batch, "text_tokens": text, "text_mask": keep}
    with torch.no_grad():
        for a, b in zip(model(batch), model(cut)):
            assert_close(b, a, atol=1e-6, rtol=0)
        assert_close(model.encode_text(text, keep), model.encode_text(batch["text_tokens"], batch["text_mask"]),
                     atol=1e-6, rtol=0)
        img_tok = model.image_token_states(batch["image_tokens"])
        full = model.text_token_states(batch["text_tokens"], batch["text_mask"])
        short = model.text_token_states(text, keep)
        assert_close(short[keep], full[:, :7][keep], atol=1e-6, rtol=0)
        pairs = torch.tensor([[0, 1], [2, 2], [3, 5], [5, 0]])
        logits = [model.match_logits(img_tok[pairs[:, 0]], t[pairs[:, 1]], k[pairs[:, 1]])
                  for t, k in ((full, batch["text_mask"]), (short, keep))]
    assert_close(logits[1], logits[0], atol=1e-6, rtol=0)


def test_trimming_keeps_every_used_column_and_at_least_one():
    t = torch.randn(3, 6, 2)
    assert trim_text_padding(t, None) == (t, None)
    holey = torch.tensor([[1, 0, 0, 1, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert trim_text_padding(t, holey)[0].shape[1] == 4  # cut after the last used column, not the count
    assert trim_text_padding(t, torch.zeros(3, 6, dtype=torch.bool))[1].shape == (3, 1)
    full = torch.ones(3, 6, dtype=torch.bool)
    assert trim_text_padding(t, full)[0] is t


def test_pooled_mode_image_stream_ignores_text():
    """Flaw 1 again: the image embedding is the same whatever report it is paired with,
    which is why the image-only path reproduces it exactly."""
    model = tiny("pooled").eval()
    batch = pooled_batch()
    img, _ = model(batch)
    other = {**batch, "text_pooled": torch.randn_like(batch["text_pooled"])}
    assert_close(model(other)[0], img)
    assert_close(model.encode_image(batch["image_pooled"]), img)


# ------------------------------------------------------------------------ flaw 2
@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_image_only_path_is_per_sample(mode):
    model = tiny(mode).eval()
    x = pooled_batch(8)["image_pooled"] if mode == "pooled" else tokens_batch(8)["image_tokens"]
    with torch.no_grad():
        full = model.encode_image(x)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(3))
        shuffled = model.encode_image(x[perm])
        halves = torch.cat([model.encode_image(x[:3]), model.encode_image(x[3:])])
        singles = torch.cat([model.encode_image(x[i : i + 1]) for i in range(8)])
    assert full.shape == (8, 16)
    assert_close(shuffled[perm.argsort()], full)
    assert_close(halves, full)
    assert_close(singles, full)


def test_image_only_path_rejects_a_flat_token_batch():
    with pytest.raises(ValueError, match="image_tokens"):
        tiny("tokens").encode_image(torch.randn(4, 12))


# ---------------------------------------------------------------- tokens mode bits
def test_grid_pooling_16_to_8_keeps_the_prefix_token():
    model = tiny("tokens", grid_pool=8).eval()
    batch = tokens_batch(3, grid=16)
    seen = []
    hook = model.blocks[0].register_forward_hook(lambda m, args, out: seen.append(out.shape))
    img, txt = model(batch)
    hook.remove()
    assert seen[0] == (3, 65, 16)  # image stream: 1 prefix + 8*8 pooled patches
    emb, tokens = model.encode_image(batch["image_tokens"], return_tokens=True)
    assert tokens.shape == (3, 65, 16) and emb.shape == (3, 16)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()
    assert_close(tokens.norm(dim=-1), torch.ones(3, 65))


def test_grid_pooling_averages_patch_blocks():
    from pipeline.models.adaptor import pool_patch_grid

    x = torch.arange(2 * 17 * 1, dtype=torch.float32).reshape(2, 17, 1)  # 1 prefix + 4x4
    out = pool_patch_grid(x, 2)
    assert out.shape == (2, 5, 1)
    assert out[0, 0, 0] == 0  # prefix untouched
    assert out[0, 1, 0] == (1 + 2 + 5 + 6) / 4  # top-left 2x2 block
    with pytest.raises(ValueError, match="grid"):
        pool_patch_grid(torch.zeros(1, 16, 1), 2)  # 15 patches: no square grid


@pytest.mark.parametrize("readout", ["cls", "mean"])
def test_padded_text_tokens_do_not_matter(readout):
    """Neither the embeddings nor the matching logits change when padded report tokens do
    (zero padding, as cached, or huge noise), and nothing is NaN."""
    model = tiny("tokens", readout=readout).eval()
    batch = tokens_batch()
    pads = ~batch["text_mask"]
    zeroed = batch["text_tokens"].clone()
    zeroed[pads] = 0.0  # what the cache stores there: normalising it must not give NaN
    batch = {**batch, "text_tokens": zeroed}
    img, txt = model(batch)
    torch.manual_seed(5)
    _, _, match = model(batch, match=True)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all() and torch.isfinite(match).all()
    noisy = zeroed.clone()
    noisy[pads] = 1e3 * torch.randn(int(pads.sum()), 10)
    img2, txt2 = model({**batch, "text_tokens": noisy})
    torch.manual_seed(5)
    _, _, match2 = model({**batch, "text_tokens": noisy}, match=True)
    assert_close(img2, img)
    assert_close(txt2, txt)
    assert_close(match2, match)
    # and the mask is really used: without it the padding changes the outputs
    unmasked = {k: v for k, v in batch.items() if k != "text_mask"}
    assert not torch.allclose(model({**unmasked, "text_tokens": noisy})[1], txt)


def test_tokens_mode_embeddings_are_unimodal_and_the_image_path_is_the_training_path():
    """Each tokens-mode embedding depends on its own modality alone (so in-batch CLIP logits
    cannot copy the partner), and the image-only path used downstream is exactly the
    training forward's image embedding (no self-attention path that training never ran)."""
    model = tiny("tokens").eval()
    batch = tokens_batch()
    img, txt = model(batch)
    other = {**batch, "text_tokens": torch.randn_like(batch["text_tokens"])}
    assert_close(model(other)[0], img)
    other = {**batch, "image_tokens": torch.randn_like(batch["image_tokens"])}
    assert_close(model(other)[1], txt)
    assert_close(model.encode_image(batch["image_tokens"]), img)
    assert_close(model.encode_text(batch["text_tokens"], batch["text_mask"]), txt)


def test_outputs_are_unit_vectors():
    for model, batch in ((tiny("pooled"), pooled_batch()), (tiny("tokens"), tokens_batch())):
        img, txt = model(batch)
        assert_close(img.norm(dim=-1), torch.ones(6))
        assert_close(txt.norm(dim=-1), torch.ones(6))


# ---------------------------------------------------------------------------- loss
def test_clip_loss_matches_a_hand_computation():
    img = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=-1)
    txt = F.normalize(torch.tensor([[1.0, 0.2], [0.0, 1.0], [-1.0, 0.5]]), dim=-1)
    s = 10.0
    logits = [[s * sum(a * b for a, b in zip(i, t)) for t in txt.tolist()] for i in img.tolist()]

    def ce(rows):  # mean over rows of -log softmax(row)[i]
        return sum(math.log(sum(math.exp(v) for v in r)) - r[i] for i, r in enumerate(rows)) / 3

    i2t = ce(logits)
    t2i = ce([list(col) for col in zip(*logits)])
    expected = 0.75 * t2i + 0.25 * i2t  # the default is the paper's: text->image weighted 0.75
    assert_close(clip_loss(img, txt, s).item(), expected, rtol=1e-6, atol=1e-6)
    assert_close(clip_loss(img, txt, s, text_to_image_weight=1.0).item(), t2i, rtol=1e-6, atol=1e-6)
    assert_close(clip_loss(img, txt, torch.tensor(s), text_to_image_weight=0.5).item(),
                 0.5 * (i2t + t2i), rtol=1e-6, atol=1e-6)


def _authors_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                  image_weight: float = 0.75) -> torch.Tensor:
    """The authors' loss, transcribed from holajoa/Adaptor-VL-SSL models/adaptor.py (2414548):
    ``AdaptorModule.forward`` builds ``logits_per_text = text_embeds @ image_embeds.T * logit_scale.exp()``
    and calls ``CLIPLossFromSimilarities(image_weight)`` on it; that loss takes
    ``contrastive_loss(s, dim) = -diag(log_softmax(s, dim)).mean()``, ``caption_loss`` over dim 0,
    ``image_loss`` over dim 1, and returns ``(1 - image_weight) * caption_loss + image_weight * image_loss``."""
    similarity = torch.matmul(txt, img.t()) * logit_scale.exp()  # logits_per_text [texts, images]

    def contrastive_loss(logits: torch.Tensor, dim: int) -> torch.Tensor:
        return -torch.diag(F.log_softmax(logits, dim=dim)).mean()

    caption_loss = contrastive_loss(similarity, dim=0)
    image_loss = contrastive_loss(similarity, dim=1)
    return (1 - image_weight) * caption_loss + image_weight * image_loss


def test_the_paper_preset_reproduces_the_authors_loss_and_gradients():
    """On a batch where the two directions differ, the paper preset's loss and its gradients (the
    embeddings', the logit scale's, and a pooled Adaptor's parameters') equal the authors' to 1e-6;
    the old weighting (image->text 0.75) does not."""

    preset = load_config(TrainConfig, "adaptor_paper").adaptor
    assert preset.text_to_image_weight == 0.75
    torch.manual_seed(3)
    model = Adaptor(AdaptorConfig(**{**TINY, "mode": "pooled"})).double()
    batch = {k: v.double() for k, v in pooled_batch(8).items()}
    batch["text_pooled"][:4] = batch["text_pooled"][0]  # four near-identical reports: the directions differ

    def run(loss_fn):
        model.zero_grad()
        img, txt = model(batch)
        img.retain_grad()
        txt.retain_grad()
        loss = loss_fn(img, txt)
        loss.backward()
        return loss.detach(), img.grad.clone(), txt.grad.clone(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ours = run(lambda i, t: clip_loss(i, t, model.logit_scale.exp(), preset.text_to_image_weight))
    theirs = run(lambda i, t: _authors_loss(i, t, model.logit_scale, image_weight=0.75))
    for a, b in zip(ours[:3], theirs[:3]):
        assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ours[3].keys() == theirs[3].keys()
    for name in ours[3]:
        assert_close(ours[3][name], theirs[3][name], rtol=1e-6, atol=1e-6, msg=name)
    swapped = run(lambda i, t: clip_loss(i, t, model.logit_scale.exp(), 1 - preset.text_to_image_weight))
    assert abs(float(swapped[0] - theirs[0])) > 1e-3  # the batch tells the two weightings apart


def test_the_old_weight_key_is_refused_with_the_new_one():
    """``adaptor.image_weight`` weighted image->text: a config that still says it is refused, with the
    new key and the value that keeps its meaning, never read as the other direction. Checkpoints
    written under the old key load with the same loss, translated."""

    with pytest.raises(ConfigError, match=r"adaptor\.image_weight: renamed: write adaptor\.text_to_image_weight"
                                          r".*image_weight: 0\.75 means text_to_image_weight: 0\.25"):
        load_config(TrainConfig, None, ["adaptor.image_weight=0.75"])
    saved = {**TINY, "mode": "pooled", "image_weight": 0.75}
    assert adaptor_config_from_saved(saved).text_to_image_weight == 0.25


def test_logit_scale_starts_at_1_over_007_and_is_clamped():
    model = tiny("pooled")
    assert_close(model.scale().item(), 1 / 0.07, rtol=1e-4, atol=0)
    with torch.no_grad():
        model.logit_scale.fill_(50.0)
    assert model.scale().item() == 100.0


def test_retrieval_recall_on_a_hand_case():
    img = torch.eye(4)
    # report 0 and 1 both point at image 0; 2 matches; 3 points at image 2
    txt = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.8, 0.2]])
    r = retrieval_recall(img, txt, ks=(1, 2))
    # image->text ranks: img0->txt0 first; img1->txt1 first; img2->txt2 first; img3->txt3 first
    assert r["i2t_R@1"] == 1.0
    # text->image ranks: t0: 0; t1: img1 behind img0 -> 1; t2: 0; t3: img3 behind img2 -> 1
    assert r["t2i_R@1"] == 0.5 and r["t2i_R@2"] == 1.0


# --------------------------------------------------------------------- flaw 4: DDP
def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (F.normalize(torch.randn(10, 8, generator=g), dim=-1),
            F.normalize(torch.randn(10, 8, generator=g), dim=-1))


def _rank_worker(rank: int, world: int, port: int, sizes: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = _global_batch()
        start = sum(sizes[:rank])
        img = img[start : start + sizes[rank]].clone().requires_grad_()
        txt = txt[start : start + sizes[rank]].clone().requires_grad_()
        loss = clip_loss(img, txt, 5.0, gather=True)
        loss.backward()
        Path(out, f"{rank}.json").write_text(json.dumps([rank, loss.item(), img.grad.tolist(), txt.grad.tolist()]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes per case
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [[5, 5], [6, 4]])
def test_gathered_loss_matches_the_full_batch(sizes, tmp_path):
    ranks.spawn(_rank_worker, 2, 2, free_port(), sizes, str(tmp_path))
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]

    img, txt = (t.clone().requires_grad_() for t in _global_batch())
    full = clip_loss(img, txt, 5.0)
    full.backward()
    mean_loss = sum(r[1] for r in results) / 2
    assert_close(mean_loss, full.item(), rtol=0, atol=1e-5)
    # each rank's input gradient is the sum over ranks' losses; DDP averages it
    img_grad = torch.tensor([row for r in results for row in r[2]])
    txt_grad = torch.tensor([row for r in results for row in r[3]])
    assert_close(img_grad / 2, img.grad, rtol=0, atol=1e-5)
    assert_close(txt_grad / 2, txt.grad, rtol=0, atol=1e-5)
    # without gathering, each rank would only see its own negatives: a different loss
    local = sum(clip_loss(img[a:b], txt[a:b], 5.0).item()
                for a, b in ((0, sizes[0]), (sizes[0], 10))) / 2
    assert abs(local - full.item()) > 1e-3


def test_hard_negatives_never_pick_the_true_pair_and_avoid_repeats():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(6, 8, generator=g), dim=-1)
    txt[3] = txt[1]  # a report repeated word for word: never a negative for the other while others remain
    for seed in range(20):
        neg_txt, neg_img = sample_hard_negatives(img, txt, 10.0, torch.Generator().manual_seed(seed))
        assert (neg_txt != torch.arange(6)).all() and (neg_img != torch.arange(6)).all()
        assert neg_txt[1] != 3 and neg_txt[3] != 1
    # seeded: the same draws again; and with a sharp scale, the most similar other report
    a = sample_hard_negatives(img, txt, 10.0, torch.Generator().manual_seed(4))
    b = sample_hard_negatives(img, txt, 10.0, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    sim = img @ txt.T
    hardest = sim.masked_fill(torch.eye(6, dtype=torch.bool), -9).masked_fill(torch.tensor(
        [[j == 3 and i == 1 or j == 1 and i == 3 for j in range(6)] for i in range(6)]), -9).argmax(1)
    assert torch.equal(sample_hard_negatives(img, txt, 1e4, torch.Generator().manual_seed(0))[0], hardest)


def test_itm_loss_by_hand():
    logits = torch.tensor([2.0, 0.5, -1.0, 1.0, -3.0, 0.0])  # 2 pairs, 2 + 2 negatives
    sig = torch.sigmoid(logits)
    expected = -(sig[:2].log().sum() + (1 - sig[2:]).log().sum()) / 6
    assert_close(itm_loss(logits), expected)


def test_rerank_reorders_only_the_top_k():
    sim = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.7, 0.6, 0.5, 0.0], [0.0, 0.25, 0.2, 0.3], [0.4, 0.0, 0.0, 0.35]])
    # the matching head prefers the true pair wherever it is among the top 2
    i2t, t2i = rerank_top_k(sim, lambda i, t: (i == t).float(), k=2)
    r = retrieval_recall_from_sim(i2t, ks=(1, 2), t2i=t2i)
    before = retrieval_recall_from_sim(sim, ks=(1, 2))
    # images 1 and 3 have their report 2nd by similarity: re-ranked to 1st; image 2's is 3rd,
    # outside the top 2, and stays a miss
    assert before["i2t_R@1"] == 0.25 and r["i2t_R@1"] == 0.75 and r["i2t_R@2"] == 0.75
    assert r["i2t_R@2"] == before["i2t_R@2"] and r["t2i_R@2"] == before["t2i_R@2"]
    assert i2t.shape == (4, 4) and t2i.shape == (4, 4)


# ------------------------------------------------------------- tokens mode learns
def synthetic_pairs(n: int, seed: int, p: int = 16, tt: int = 12, di: int = 24, dt: int = 20) -> dict:
    """Pairs shaped like the demo's caches: the pair's identity (a random 8-d code) is
    written into 2 random patch tokens and 2 random report tokens, over unit noise; image
    token 0 is the patch mean (a CLS-like summary), report token 0 is a near-constant
    [CLS]-like vector, reports have 4-12 tokens, and padding is zeros. The pooled
    vectors (what pooled mode reads) are the image token 0 and the mean of the report's
    words."""
    gw = torch.Generator().manual_seed(0)  # the same "encoders" for every split
    wi, wt = torch.randn(8, di, generator=gw) / 8 ** 0.5, torch.randn(8, dt, generator=gw) / 8 ** 0.5
    cls = torch.randn(dt, generator=gw)
    g = torch.Generator().manual_seed(seed)
    code = torch.randn(n, 8, generator=g)
    rows = torch.arange(n)[:, None]
    img = torch.randn(n, 1 + p, di, generator=g)
    img[rows, torch.rand(n, p, generator=g).argsort(1)[:, :2] + 1] += 2 * (code @ wi)[:, None]
    img[:, 0] = img[:, 1:].mean(1)
    length = torch.randint(4, tt + 1, (n,), generator=g)
    keep = torch.arange(tt)[None] < length[:, None]
    txt = torch.randn(n, tt, dt, generator=g)
    beyond = (torch.arange(1, tt)[None] >= length[:, None]).float()  # sorts padding last
    txt[rows, (torch.rand(n, tt - 1, generator=g) + beyond).argsort(1)[:, :2] + 1] += 2 * (code @ wt)[:, None]
    txt[:, 0] = cls + 0.1 * torch.randn(n, dt, generator=g)
    txt[~keep] = 0.0
    words = (txt[:, 1:] * keep[:, 1:, None]).sum(1) / (length[:, None] - 1)
    return {"image_tokens": img, "text_tokens": txt, "text_mask": keep,
            "image_pooled": img[:, 0].clone(), "text_pooled": words}


def _train_on_synthetic(mode: str, steps: int) -> tuple[Adaptor, list[float], dict]:
    """AdamW on 256 synthetic pairs, batch 32; returns the model, the contrastive losses and
    the recall on 64 held-out pairs (chance: R@1 1/64, R@10 10/64)."""
    train, held_out = synthetic_pairs(256, 1), synthetic_pairs(64, 2)
    torch.manual_seed(0)
    model = Adaptor(AdaptorConfig(mode=mode, image_dim=24, text_dim=20, d_model=32, n_heads=4, ffn_dim=64,
                                  dropout=0.0, grid_pool=2 if mode == "tokens" else 0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    g, losses = torch.Generator().manual_seed(0), []
    for _ in range(steps):
        idx = torch.randperm(256, generator=g)[:32]
        batch = {k: v[idx] for k, v in train.items()}
        if mode == "tokens":
            img, txt, match = model(batch, match=True)
            contrastive = clip_loss(img, txt, model.scale())
            loss = contrastive + itm_loss(match)
        else:
            img, txt = model(batch)
            loss = contrastive = clip_loss(img, txt, model.scale())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(contrastive.item())
    model.eval()
    with torch.no_grad():
        img, txt = model(held_out)
    return model, losses, retrieval_recall(img, txt)


def _single_thread(fn, *args):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_tokens_mode_leaves_chance_on_a_problem_the_pooled_adaptor_solves(mode):
    """Within 60 steps both modes cut the contrastive loss well below chance (ln 32 = 3.47)
    and retrieve held-out pairs far above chance (R@10 chance = 0.156). The previous tokens
    design (paired cross-encoder forwards scored by a dot product) did not leave chance on
    the demo within its time budget."""
    _, losses, recall = _single_thread(_train_on_synthetic, mode, 60)
    chance = math.log(32)
    assert losses[0] > chance - 0.3  # it starts at chance ...
    assert sum(losses[-10:]) / 10 < chance - 1.0  # ... and leaves it
    assert recall["i2t_R@10"] > 2 * 10 / 64 and recall["t2i_R@10"] > 2 * 10 / 64
    assert recall["i2t_R@1"] > 3 / 64


def test_the_matching_head_learns_to_tell_held_out_pairs_from_mismatches():
    """After 200 steps the matching logit separates held-out true pairs from the same images
    with other reports (AUROC ~0.84; 0.5 is chance): cross-attention carries information
    that generalises, not only gradient."""
    from stages.evaluate.metrics import auroc

    model, _, _ = _single_thread(_train_on_synthetic, "tokens", 200)
    b = synthetic_pairs(64, 2)
    other = (torch.arange(64) + 1 + torch.arange(64) % 7) % 64  # another report for each image
    with torch.no_grad():
        img = model.image_token_states(b["image_tokens"])
        txt = model.text_token_states(b["text_tokens"], b["text_mask"])
        true = model.match_logits(img, txt, b["text_mask"])
        wrong = model.match_logits(img, txt[other], b["text_mask"][other])
    assert auroc([1] * 64 + [0] * 64, torch.cat([true, wrong]).numpy()) > 0.7
