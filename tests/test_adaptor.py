"""The Adaptor, its loss and the flaws of the original code that it must not repeat."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from pipeline.models.adaptor import Adaptor, AdaptorConfig
from pipeline.models.loss import clip_loss, retrieval_recall

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
    assert n_trainable(Adaptor(AdaptorConfig(mode="tokens", grid_pool=8))) == 12_207_617


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


def test_pooled_mode_gives_queries_and_keys_no_gradient():
    """Flaw 1: one key per attention, so softmax == 1 and Q/K never learn."""
    qk, v = _qk_and_v_grads(tiny("pooled"), pooled_batch())
    assert v > 1e-4
    assert qk < 1e-7 * max(v, 1.0)


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


def test_padded_text_tokens_do_not_matter():
    model = tiny("tokens").eval()
    batch = tokens_batch()
    img, txt = model(batch)
    noisy = batch["text_tokens"].clone()
    noisy[~batch["text_mask"]] = 1e3 * torch.randn(int((~batch["text_mask"]).sum()), 10)
    img2, txt2 = model({**batch, "text_tokens": noisy})
    assert_close(img2, img)
    assert_close(txt2, txt)
    # and the mask is really used: without it the padding changes the outputs
    unmasked = {k: v for k, v in batch.items() if k != "text_mask"}
    assert not torch.allclose(model({**unmasked, "text_tokens": noisy})[0], img)


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
    expected = 0.75 * i2t + 0.25 * t2i
    assert_close(clip_loss(img, txt, s).item(), expected, rtol=1e-6, atol=1e-6)
    assert_close(clip_loss(img, txt, s, image_weight=1.0).item(), i2t, rtol=1e-6, atol=1e-6)
    assert_close(clip_loss(img, txt, torch.tensor(s), image_weight=0.5).item(),
                 0.5 * (i2t + t2i), rtol=1e-6, atol=1e-6)


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
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return (F.normalize(torch.randn(10, 8, generator=g), dim=-1),
            F.normalize(torch.randn(10, 8, generator=g), dim=-1))


def _rank_worker(rank: int, world: int, port: int, sizes: list[int], queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        img, txt = _global_batch()
        start = sum(sizes[:rank])
        img = img[start : start + sizes[rank]].clone().requires_grad_()
        txt = txt[start : start + sizes[rank]].clone().requires_grad_()
        loss = clip_loss(img, txt, 5.0, gather=True)
        loss.backward()
        queue.put((rank, loss.item(), img.grad.tolist(), txt.grad.tolist()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two gloo processes per case
@pytest.mark.timeout(60)
@pytest.mark.parametrize("sizes", [[5, 5], [6, 4]])
def test_gathered_loss_matches_the_full_batch(sizes):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_rank_worker, args=(2, _free_port(), sizes, queue), nprocs=2, join=True)
    results = sorted(queue.get() for _ in range(2))

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


def test_pairwise_tokens_loss_scores_each_pair_by_its_own_forward():
    """The shifted-pair scores equal separate paired forwards, and both directions use them."""
    from pipeline.models.loss import pairwise_clip_loss, shifted_pair_logits

    torch.manual_seed(0)
    model = Adaptor(AdaptorConfig(mode="tokens", image_dim=8, text_dim=12, d_model=16, n_heads=2, ffn_dim=32,
                                  dropout=0.0)).eval()
    b = {"image_tokens": torch.randn(5, 5, 8), "text_tokens": torch.randn(5, 3, 12),
         "text_mask": torch.tensor([[1, 1, 0]] * 5, dtype=torch.bool)}
    scores = shifted_pair_logits(model, b, k=2, image_grid=(2, 2), n_prefix=1)
    assert scores.shape == (5, 3)
    for i in range(5):
        for s in range(3):
            j = (i + s) % 5
            one = {"image_tokens": b["image_tokens"][i:i + 1], "text_tokens": b["text_tokens"][j:j + 1],
                   "text_mask": b["text_mask"][j:j + 1]}
            im, tx = model(one, image_grid=(2, 2), n_prefix=1)
            torch.testing.assert_close(scores[i, s], (im * tx).sum(), atol=1e-5, rtol=1e-5)
    loss = pairwise_clip_loss(scores, 10.0, 0.75)
    i2t = torch.nn.functional.cross_entropy(10 * scores, torch.zeros(5, dtype=torch.long))
    t2i_rows = torch.stack([torch.stack([10 * scores[(j - s) % 5, s] for s in range(3)]) for j in range(5)])
    t2i = torch.nn.functional.cross_entropy(t2i_rows, torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(loss, 0.75 * i2t + 0.25 * t2i)
