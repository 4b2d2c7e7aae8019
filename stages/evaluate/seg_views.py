"""Segmentation on augmented views (``seg.augment``): the authors' ShiftScaleRotate, from the cache.

The authors warp each training image and its mask afresh every epoch, before the frozen encoder
(MGCA's ``ShiftScaleRotate``: zoom within ±10%, rotation within ±10°, no shift, at p 0.5). Here
the encoder ran once per view: an image encoder's ``-ssr`` variant caches ``K`` warped views of
each image (``pipe embed --backbone NAME-ssr --views K``, :class:`pipeline.imaging.ShiftScaleRotate`),
each a pure function of the image's content key and the view's number. Each view's mask is the
plain view's mask moved by the same warp (:meth:`pipeline.imaging.Preprocess.masks_view`), so
tokens and mask agree to the pixel. Each time a batch takes a training image, it is one of its
``K`` views with probability ``seg.augment_p``, else the plain view: ``K`` draws per image stand
for the authors' fresh draw each epoch. Validation and test images are always the plain view.

What it holds: each view adds the training split's token grids and masks (the views of one
image encoder's store at a time).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from core.console import err
from core.errors import InputError
from pipeline.imaging import Preprocess
from stages.evaluate.head_bank import Rows

MASKS_PER_WARP = 256   # masks moved at once (a [256, 1, S, S] float grid sample)


class SegViewsError(InputError):
    """``seg.augment`` on a store whose views a mask cannot follow (or that has none)."""


@dataclass
class TrainViews:
    """The cached views of the training images (in the order of the training positions)."""

    rows: np.ndarray      # [n, K] store rows of views 1..K (an absent view: the plain view's row)
    masks: Tensor         # [K, n, S, S] uint8: each view's mask
    p: float              # how often a drawn image is a view instead of the plain one

    @property
    def k(self) -> int:
        return self.rows.shape[1]


def hint(ctx) -> str:
    return (f"embed it with views a mask can follow, e.g. `pipe embed --dataset {ctx.cfg.dataset} --backbone "
            f"{ctx.backbone.removesuffix('-ssr')}-ssr --views 4`, and evaluate with that --backbone")


def train_views(ctx, items: np.ndarray, masks: np.ndarray) -> TrainViews | None:
    """The views of the training ``items`` (positions in the dataset) and their moved ``masks``
    (``[n, S, S]`` bool on the plain view's grid); None without ``seg.augment``."""
    s = ctx.cfg.seg
    if not s.augment:
        return None
    pre = Preprocess.from_dict(ctx.data.image.attrs["spec"]["preprocess"])
    if not pre.augment.follows_masks:
        raise SegViewsError(f"seg.augment=true needs cached views that a mask can follow, but the {ctx.backbone!r} "
                            f"store's views are {pre.augment.kind!r} (a crop a mask cannot follow): {hint(ctx)}")
    rows = ctx.data.image_rows[items]
    if rows.shape[1] < 2 or (rows[:, 1:] < 0).all():
        raise SegViewsError(f"seg.augment=true needs augmented views, and the {ctx.backbone!r} store of dataset "
                            f"{ctx.dataset_name!r} holds none: {hint(ctx)}")
    views = rows[:, 1:].copy()
    absent = views < 0
    views[absent] = np.repeat(rows[:, :1], views.shape[1], 1)[absent]
    keys = ctx.data.items["image_key"].to_numpy()[items].tolist()
    plain = torch.from_numpy(np.ascontiguousarray(masks).view(np.uint8))
    moved = torch.stack([_moved(pre, plain, keys, v + 1, absent[:, v]) for v in range(views.shape[1])])
    err.print(f"seg.augment: {views.shape[1]} cached {pre.augment.kind} views of each of {len(items):,} training "
              f"images ({int(absent.sum()):,} absent: the plain view), used at p {s.augment_p:g}")
    return TrainViews(views, moved, float(s.augment_p))


def _moved(pre: Preprocess, masks: Tensor, keys: list[str], view: int, absent: np.ndarray) -> Tensor:
    out = torch.empty_like(masks)
    for s in range(0, len(masks), MASKS_PER_WARP):
        sl = slice(s, s + MASKS_PER_WARP)
        out[sl] = pre.masks_view(masks[sl], keys[sl], view).to(torch.uint8)
    out[torch.from_numpy(absent)] = masks[torch.from_numpy(absent)]
    return out


class ViewDraw:
    """A decoder's training batches with views: ``draw(idx) -> (tokens, masks)`` for the batch
    ``idx`` of the training subset ``x``/``y`` (:class:`~stages.evaluate.head_bank.Rows`), each
    image one of its views with probability ``p``, from its own seeded generator."""

    def __init__(self, x: Rows, y: Rows, xv: Tensor, yv: Tensor, index: Tensor, p: float, seed: int):
        self.x, self.y, self.xv, self.yv, self.index, self.p = x, y, xv, yv, index, p
        self.gen = torch.Generator().manual_seed(seed)

    def __call__(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        xb, yb = self.x[idx].float(), self.y[idx]
        use = torch.rand(len(idx), generator=self.gen) < self.p
        which = torch.randint(len(self.xv), (len(idx),), generator=self.gen)
        if bool(use.any()):
            at = self.index[idx.to(self.index.device)][use.to(self.index.device)]
            v = which[use].to(self.xv.device)
            xb[use.to(xb.device)] = self.xv[v, at].float()
            yb[use.to(yb.device)] = self.yv[v, at]
        return xb, yb
