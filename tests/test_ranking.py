"""Blocked ranks, recall and losses equal the full-matrix figures they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.models.loss import clip_loss, rerank_top_k, retrieval_recall_from_sim
from pipeline.models.ranking import (batched_clip_loss, block_rows, match_ranks, recall_both_ways, reranked_ranks,
                                     split_clip_loss)
from stages.evaluate import metrics as M


def _pairs(n: int, d: int = 16, seed: int = 0, dtype=np.float64):
    """Unit embeddings with repeated reports (exact ties) and near-duplicates."""
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, d))
    txt = img + rng.normal(scale=1.5, size=(n, d))
    txt[5:10] = txt[4]          # five word-for-word repeats of report 4
    img[20] = img[21]           # two identical images
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img.astype(dtype), txt.astype(dtype)


@pytest.mark.parametrize("block", [1, 7, 64, None])
def test_blocked_ranks_equal_the_full_matrix(block):
    img, txt = _pairs(150)
    full = img @ txt.T
    np.testing.assert_array_equal(match_ranks(img, txt, block), M.match_ranks(full))
    np.testing.assert_array_equal(match_ranks(txt, img, block), M.match_ranks(txt @ img.T))
    # ties count for the match: each repeated report's image ranks its own report no lower than the repeats
    assert M.match_ranks(full)[5] == match_ranks(img, txt, block)[5]


def test_blocked_recall_and_losses_on_torch_equal_the_full_batch():
    img, txt = (torch.from_numpy(a) for a in _pairs(97, dtype=np.float32))
    assert recall_both_ways(img, txt, block=10) == pytest.approx(retrieval_recall_from_sim(img @ txt.T))
    scale = torch.tensor(14.3)
    for w in (0.75, 0.25, 0.5, 1.0):  # clip_loss takes the text→image weight; ours (image→text, text→image)
        ref = float(clip_loss(img, txt, scale, w))
        assert split_clip_loss(img, txt, scale, (1 - w, w), block=9) == pytest.approx(ref, rel=1e-5)
    # in batches: the mean over batches of the in-batch loss, a batch of one (no negative) left out
    parts = [(float(clip_loss(img[s:s + 32], txt[s:s + 32], scale, 0.75)), len(img[s:s + 32])) for s in (0, 32, 64)]
    want = sum(v * n for v, n in parts) / 96
    assert batched_clip_loss(img, txt, scale, (0.25, 0.75), 32) == pytest.approx(want, rel=1e-5)


def test_the_batched_validation_loss_does_not_grow_with_the_split():
    """The whole-split loss grows like ln N at chance; the batched one stays at ln(batch)."""
    rng = np.random.default_rng(1)
    out = {}
    for n in (256, 2048):
        a = torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32))
        b = torch.from_numpy(rng.normal(size=(n, 8)).astype(np.float32))
        a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
        out[n] = (split_clip_loss(a, b, 0.0, (0.5, 0.5)), batched_clip_loss(a, b, 0.0, (0.5, 0.5), 128))
    assert out[256][0] == pytest.approx(np.log(256), rel=1e-4) and out[2048][0] == pytest.approx(np.log(2048), rel=1e-4)
    assert out[256][1] == pytest.approx(np.log(128), rel=1e-4) == out[2048][1]


@pytest.mark.parametrize("block", [3, 50, None])
def test_blocked_rerank_equals_the_full_matrix_rerank(block):
    img, txt = _pairs(120)
    rng = np.random.default_rng(3)
    head = torch.from_numpy(rng.normal(size=(120, 120)).astype(np.float32))
    head[np.arange(60), np.arange(60)] += 3.0  # the head knows half of the true pairs

    def score(i, t):
        return head[i, t]

    i2t, t2i = rerank_top_k(torch.from_numpy(img @ txt.T), score, 10)
    want_i2t = (i2t > i2t.diagonal()[:, None]).sum(1).numpy()
    want_t2i = (t2i > t2i.diagonal()[:, None]).sum(1).numpy()
    np.testing.assert_array_equal(reranked_ranks(img, txt, score, 10, block), want_i2t)
    np.testing.assert_array_equal(reranked_ranks(txt, img, lambda t, i: score(i, t), 10, block), want_t2i)
    assert (want_i2t != M.match_ranks(img @ txt.T)).any()  # the head moved something


def test_block_rows_bounds_the_block():
    assert block_rows(75_000) * 75_000 * 8 <= 64 << 20
    assert block_rows(10**12) == 1


def test_the_head_step_cap_spreads_the_validations_and_leaves_small_splits_alone():
    from stages.evaluate.head_bank import FitSettings

    s = FitSettings(epochs=50, batch_size=128, weight_decay=0.0, patience=10, restart_epochs=10, seed=0,
                    min_steps=500, max_steps=3000)
    assert s.plan(35_000) == (3000, 60, 274)            # 13,700 steps uncapped; 50 validations over 3,000
    assert s.plan(1_400) == (550, 11, 11)               # the demo's 100% split: 11 steps x 50 epochs, as before
    assert s.plan(100) == (500, 10, 1)                  # min_steps still wins for a 1% split
    uncapped = FitSettings(50, 128, 0.0, 10, 10, 0, 500, 0)
    assert uncapped.plan(35_000) == (274 * 50, 274, 274)


def test_a_cap_that_does_not_bite_trains_the_same_heads():
    from torch import nn

    from stages.evaluate.head_bank import FitSettings, Head, HeadBank

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 8, generator=g), (torch.rand(300, 1, generator=g) > 0.5).float()

    def fit(max_steps):
        torch.manual_seed(0)
        head = Head("linear", 1e-2, nn.Linear(8, 1))
        bank = HeadBank([head], nn.functional.binary_cross_entropy_with_logits,
                        lambda m: (-nn.functional.binary_cross_entropy_with_logits(m(x[:50]), y[:50]).item(), 0.0),
                        FitSettings(5, 32, 0.0, 3, 2, 0, 20, max_steps))
        return bank.fit(x, y, has_val=True)["linear"]

    a, b, c = fit(0), fit(10_000), fit(12)
    assert a.best_steps == b.best_steps and all(torch.equal(p, q) for p, q in zip(a.module.parameters(),
                                                                                 b.module.parameters()))
    assert c.steps <= 20 < a.steps  # capped (min_steps=20 still holds)
