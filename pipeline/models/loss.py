"""Contrastive loss with cross-rank negatives, and retrieval recall.

Direction weights follow the authors' naming (HF ``clip_loss``: ``image_loss`` is the
cross-entropy over ``logits_per_image``): ``image_weight`` multiplies the
image->text term (each image picks its report among the batch's reports) and
``1 - image_weight`` the text->image term. The paper uses image_weight = 0.75.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pipeline.models.adaptor import pair_scores


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
    image_weight: float = 0.75,
    gather: bool = False,
) -> Tensor:
    """CLIP InfoNCE on ``logits = logit_scale * img @ txt.T`` (pair i matches i).

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
    total = image_weight * loss_i2t + (1.0 - image_weight) * loss_t2i
    return total * world / all_img.shape[0]


@torch.no_grad()
def retrieval_recall(img: Tensor, txt: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k for image->text and text->image, pair i matching i.

    Returns ``{"i2t_R@1": ..., "t2i_R@1": ..., ...}`` as fractions in [0, 1]. The rank
    of the match is the number of candidates scoring strictly higher, so ties (e.g.
    identical normal reports) count in the match's favour.
    """
    return retrieval_recall_from_sim(img.float() @ txt.float().T, ks)


def retrieval_recall_from_sim(sim: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k from a similarity matrix ``[N, N]`` whose diagonal holds the true pairs."""
    out: dict[str, float] = {}
    for name, s in (("i2t", sim), ("t2i", sim.T)):
        rank = (s > s.diagonal()[:, None]).sum(dim=1)  # [N]
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
    return out


def shifted_pair_logits(model, batch: dict, k: int, **fwd) -> Tensor:
    """Tokens mode: scores of each image with its report and the next ``k`` reports of the batch.

    ``[B, k+1]``; column 0 is the true pair. Every score comes from its own paired forward
    (image i cross-attends to report i+s and back), so no embedding that is scored against a
    negative has seen its true partner. CLIP's in-batch logits on paired forwards would let
    the fused image embedding copy its own report and solve the task without the image.
    The batch order is shuffled every epoch, so the shifted reports are random negatives.
    """
    b, dev = batch["image_tokens"].shape[0], batch["image_tokens"].device
    k = min(k, b - 1)
    # built on the device: a copy from the host inside a step would wait for the GPU, and
    # cannot be captured into a CUDA graph at all
    partner = (torch.arange(b, device=dev)[:, None] + torch.arange(k + 1, device=dev)[None]) % b  # [B, k+1]
    return pair_scores(model, batch["image_tokens"], batch["text_tokens"], batch.get("text_mask"), partner, **fwd)


def pairwise_clip_loss(scores: Tensor, logit_scale: Tensor | float, image_weight: float = 0.75) -> Tensor:
    """InfoNCE over :func:`shifted_pair_logits`: image→report over each row, and
    report→image over the images that were paired with each report (the same forwards)."""
    b, k1 = scores.shape
    logits = logit_scale * scores
    target = torch.zeros(b, dtype=torch.long, device=scores.device)
    i2t = F.cross_entropy(logits, target)
    dev = scores.device
    # the image paired with report j at shift s (indices built on the device, as above)
    rows = (torch.arange(b, device=dev)[:, None] - torch.arange(k1, device=dev)[None]) % b
    t2i = F.cross_entropy(logits[rows, torch.arange(k1, device=dev)[None]], target)
    return image_weight * i2t + (1.0 - image_weight) * t2i
