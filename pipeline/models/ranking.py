"""Ranks, recall and the contrastive loss over a whole split, in blocks of queries.

A split of N pairs has an N × N similarity matrix: 45 GB in float64 for MIMIC-CXR's 75k
test images. Nothing here holds it. Each function walks the queries in blocks of
``block`` rows, scores a block against every candidate (``block × N`` values), keeps
what it needs per query (a rank, a log-sum-exp, the top k) and drops the block. Memory
is ``block × N``; the figures equal those of the full matrix, because every value is
the same dot product, compared with the same diagonal value computed in the same block.

The functions take numpy arrays or torch tensors (on any device) alike: the evaluation
works in float64 numpy, validation in float32 on the training device.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

BLOCK_BYTES = 64 << 20  # one block of similarities: 64 MiB


def block_rows(n_candidates: int, itemsize: int = 8, budget: int = BLOCK_BYTES) -> int:
    """Queries per block so that one ``[block, n_candidates]`` block fits in ``budget`` bytes."""
    return int(max(1, budget // max(1, n_candidates * itemsize)))


def _blocks(queries, candidates, block: int | None) -> Iterator[tuple[int, object]]:
    """(first query, similarities ``[b, N]``) for each block of queries; query i's match is candidate i."""
    n = len(queries)
    if len(candidates) != n:
        raise ValueError(f"{n} queries but {len(candidates)} candidates: pair i must match candidate i")
    step = block or block_rows(n, queries.dtype.itemsize if hasattr(queries.dtype, "itemsize")
                               else torch.empty((), dtype=queries.dtype).element_size())
    c_t = candidates.T
    for start in range(0, n, step):
        yield start, queries[start:start + step] @ c_t


def _cat(parts: list):
    if parts and isinstance(parts[0], Tensor):
        return torch.cat(parts)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def match_ranks(queries, candidates, block: int | None = None):
    """For each query i, how many candidates score strictly higher than candidate i (ties
    count in the match's favour): ``[N]`` ints, from ``queries [N, d]`` and ``candidates [N, d]``."""
    ranks = []
    for start, s in _blocks(queries, candidates, block):
        diag = s.diagonal(start)  # s[j, start + j]: each query's true match
        ranks.append((s > diag[:, None]).sum(1))
    return _cat(ranks)


def recall_both_ways(img, txt, ks=(1, 5, 10), block: int | None = None) -> dict[str, float]:
    """Recall@k image→text and text→image as fractions, ``{"i2t_R@1": ..., "t2i_R@1": ...}``."""
    out: dict[str, float] = {}
    for name, (q, c) in (("i2t", (img, txt)), ("t2i", (txt, img))):
        r = match_ranks(q, c, block)
        for k in ks:
            out[f"{name}_R@{k}"] = float((r < k).sum()) / max(1, len(r))
    return out


@torch.no_grad()
def split_clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor | float, weights: tuple[float, float],
                    block: int | None = None) -> float:
    """The InfoNCE loss with every other item of the split as a negative, ``weights =
    (image→text, text→image)``: the same value as the loss on one batch holding the whole
    split, without its ``N × N`` logits."""
    total = 0.0
    for w, (q, c) in zip(weights, ((img, txt), (txt, img))):
        if not w:
            continue
        part = 0.0
        for start, s in _blocks(q, c, block):
            logits = logit_scale * s.float()
            part += float((torch.logsumexp(logits, 1) - logits.diagonal(start)).sum())
        total += w * part
    return total / max(1, len(img))


@torch.no_grad()
def batched_clip_loss(img: Tensor, txt: Tensor, logit_scale: Tensor | float, weights: tuple[float, float],
                      batch: int) -> float:
    """The mean in-batch InfoNCE loss over consecutive batches of ``batch`` pairs (the last,
    shorter one weighted by its size): what the training loss measures, so the two compare,
    and a figure that does not grow with the split (the full-split loss grows like ln N)."""
    total, counted = 0.0, 0
    for start in range(0, len(img), batch):
        i, t = img[start:start + batch], txt[start:start + batch]
        if len(i) > 1:  # a batch of one has no negative
            total += split_clip_loss(i, t, logit_scale, weights) * len(i)
            counted += len(i)
    return total / max(1, counted)


@torch.no_grad()
def reranked_ranks(queries, candidates, score: Callable[[Tensor, Tensor], Tensor], k: int,
                   block: int | None = None) -> np.ndarray:
    """Ranks of each query's match after its top-``k`` candidates are re-ordered by ``score``.

    The same figures as :func:`pipeline.models.loss.rerank_top_k` on the full matrix (which
    lifts each row's top k above the matrix's largest value, ordered by score, in float32),
    kept in ``O(N·k)`` memory: one pass collects each query's top k, its plain rank and its
    match's similarity; the pairs are scored once; the ranks follow per query.
    """
    tops, vals, diags, plain, high = [], [], [], [], -np.inf
    for start, s in _blocks(queries, candidates, block):
        s = torch.as_tensor(s).float()
        kk = min(k, s.shape[1])
        v, i = s.topk(kk, dim=1)
        d = s.diagonal(start)
        tops.append(i.cpu()), vals.append(v.cpu()), diags.append(d.cpu())
        plain.append((s > d[:, None]).sum(1).cpu())
        high = max(high, float(s.max()))
    top, val, diag, rank = torch.cat(tops), torch.cat(vals), torch.cat(diags), torch.cat(plain)
    n, kk = top.shape
    new = score(torch.arange(n)[:, None].expand(-1, kk).reshape(-1), top.reshape(-1)).float().view(n, kk).cpu()
    lifted = torch.tensor(high, dtype=torch.float32) + 1.0 + (new - new.min())
    is_match = top == torch.arange(n)[:, None]
    in_top = is_match.any(1)
    match_lift = (lifted * is_match).sum(1)
    inside = (lifted > match_lift[:, None]).sum(1)
    outside = kk + rank - (val > diag[:, None]).sum(1)
    return torch.where(in_top, inside, outside).numpy()
