"""Contrastive loss with cross-rank negatives, and retrieval recall.

Direction weights are named by the direction they weight: ``text_to_image_weight``
multiplies the text->image term (each report picks its image among the batch's images)
and ``1 - text_to_image_weight`` the image->text term (each image picks its report).

The paper weights text->image 0.75. Its code reads otherwise at first sight: the
authors' ``CLIPLossFromSimilarities(image_weight=0.75)`` puts 0.75 on a term it calls
``image_loss``, which in Hugging Face's ``clip_loss`` would be the image->text term. But
they call it on ``logits_per_text`` ([texts x images]), and their ``image_loss`` is the
cross-entropy over dim 1 of that matrix: each *text* choosing among the images
(text->image). Their ``caption_loss`` (dim 0) is image->text, weight 0.25.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor



class _GatherWithGrad(torch.autograd.Function):
    """All-gather rows from every rank; backward sums each slice's gradient over ranks.

    Rank r's loss reaches every rank's rows, so the gradient of a row is the sum over
    ranks of what each rank's loss sends it. Summing here and letting DDP average the
    parameter gradients yields the gradient of the mean of the per-rank losses.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # x: [b_r, d]
        rows = max(sizes)
        padded = F.pad(x, (0, 0, 0, rows - x.shape[0])).contiguous()  # [max_b, d]
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.start, ctx.rows = sum(sizes[:rank]), x.shape[0]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])  # [sum(sizes), d]

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start : ctx.start + ctx.rows], None, None


def gather_with_grad(x: Tensor) -> tuple[Tensor, int]:
    """``[b_r, d]`` on each rank -> (``[sum_r b_r, d]`` in rank order, this rank's offset)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    return _GatherWithGrad.apply(x, sizes, rank), sum(sizes[:rank])


def clip_loss(
    img: Tensor,
    txt: Tensor,
    logit_scale: Tensor | float,
    text_to_image_weight: float = 0.75,
    gather: bool = False,
) -> Tensor:
    """CLIP InfoNCE on ``logits = logit_scale * img @ txt.T`` (pair i matches i):
    ``text_to_image_weight * L(text->image) + (1 - text_to_image_weight) * L(image->text)``.

    ``img``, ``txt``: ``[b, d]`` L2-normalised. ``logit_scale`` is the multiplier
    itself, i.e. ``Adaptor.scale()`` (already exponentiated and clamped).

    With ``gather=True`` and an initialised process group, every rank scores its own
    rows against the embeddings of all ranks (flaw 4: shared negatives), with labels
    offset by the sizes of the ranks before it. The per-rank loss is the sum of its
    rows' terms divided by (global batch / world size), so the mean over ranks equals
    the full-batch loss exactly, even for unequal local batches. Without a process
    group (or with one rank) it is the plain in-batch loss.
    """
    n_local = img.shape[0]
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        all_img, offset = gather_with_grad(img)  # [N, d]
        all_txt, _ = gather_with_grad(txt)  # [N, d]
        world = dist.get_world_size()
    else:
        all_img, all_txt, offset, world = img, txt, 0, 1
    labels = torch.arange(n_local, device=img.device) + offset  # [b]
    logits_i2t = logit_scale * img @ all_txt.T  # [b, N]: image -> reports
    logits_t2i = logit_scale * txt @ all_img.T  # [b, N]: report -> images
    loss_i2t = F.cross_entropy(logits_i2t, labels, reduction="sum")
    loss_t2i = F.cross_entropy(logits_t2i, labels, reduction="sum")
    total = text_to_image_weight * loss_t2i + (1.0 - text_to_image_weight) * loss_i2t
    return total * world / all_img.shape[0]


@torch.no_grad()
def retrieval_recall(img: Tensor, txt: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image->text and text->image, pair i matching i.

    Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` as fractions in [0, 1]. The rank
    of the match is the number of candidates scoring strictly higher, so ties (e.g.
    identical normal reports) count in the match's favour.
    """
    return retrieval_recall_from_sim(img.float() @ txt.float().T, ks)


def retrieval_recall_from_sim(sim: Tensor, ks: Sequence[int] = (1, 5, 10),
                              t2i: Tensor | None = None) -> dict[str, float]:
    """Recall@k from a similarity matrix ``[N, N]`` whose diagonal holds the true pairs
    (rows: images); ``t2i`` (rows: reports) replaces ``sim.T`` for text->image."""
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T if t2i is None else t2i)):
        rank = (s > s.diagonal()[:, None]).sum(dim=1)  # [N]
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


@torch.no_grad()
def sample_hard_negatives(img: Tensor, txt: Tensor, logit_scale: Tensor | float,
                          generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Tokens mode: hard negatives for the matching head, drawn from the contrastive similarities.

    ``img``, ``txt``: ``[B, d]`` unimodal embeddings of B pairs (pair i matches i). Returns
    (``neg_txt [B]``: a report for each image, ``neg_img [B]``: an image for each report),
    each drawn with probability softmax(``logit_scale`` * similarity) over the batch's
    other items, as ALBEF does: mostly the confusable ones, but not always the single
    most similar, which in radiology is often a report saying the same thing. Reports
    (images) whose embedding equals the true one's, e.g. a word-for-word repeat, are
    drawn only when nothing else is left. Sampled by the Gumbel-max trick, from the
    global generator unless one is given (seeded either way, so runs repeat).
    """
    b = img.shape[0]
    if b < 2:
        raise ValueError("hard negatives need at least 2 pairs in a batch")
    img, txt = img.float(), txt.float()
    sim = logit_scale * img @ txt.T  # [B, B]
    eye = torch.eye(b, dtype=torch.bool, device=img.device)

    def draw(s: Tensor, same: Tensor) -> Tensor:
        s = s.masked_fill(same & ~eye, -1e4).masked_fill(eye, float("-inf"))
        u = torch.rand(s.shape, generator=generator, device=s.device).clamp_(1e-20, 1.0)
        return (s - torch.log(-torch.log(u))).argmax(dim=1)

    same_txt = txt @ txt.T > 1 - 1e-6  # [B, B]: reports with identical embeddings
    same_img = img @ img.T > 1 - 1e-6
    return draw(sim, same_txt), draw(sim.T, same_img)


def itm_loss(logits: Tensor) -> Tensor:
    """Binary cross-entropy of the matching logits ``[3B]`` that ``Adaptor.forward(...,
    match=True)`` returns: the first B are true pairs, the other 2B hard negatives."""
    b = logits.shape[0] // 3
    target = torch.zeros_like(logits)
    target[:b] = 1.0
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


@torch.no_grad()
def rerank_top_k(sim: Tensor, score: Callable[[Tensor, Tensor], Tensor], k: int) -> tuple[Tensor, Tensor]:
    """Re-rank each query's top-``k`` candidates by a pair score (the matching head).

    ``sim [n_img, n_txt]``: contrastive similarities. ``score(img_idx, txt_idx) -> [P]``
    scores P pairs. Returns ``(i2t [n_img, n_txt], t2i [n_txt, n_img])``: the
    similarities with each query's k best candidates lifted above all others and
    ordered by ``score``; the rest keep their contrastive order, so recall@K for K >= k
    is unchanged and only the order inside the top k moves.
    """
    def one(s: Tensor, pair: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        s = s.float().clone()
        kk = min(k, s.shape[1])
        top = s.topk(kk, dim=1).indices  # [n, kk]
        q = torch.arange(s.shape[0], device=s.device)[:, None].expand(-1, kk)
        new = pair(q.reshape(-1), top.reshape(-1)).float().view(s.shape[0], kk)
        s.scatter_(1, top, s.max() + 1.0 + (new - new.min()))
        return s

    return one(sim, score), one(sim.T, lambda t, i: score(i, t))
