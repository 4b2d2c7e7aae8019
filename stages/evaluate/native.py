"""The native joint space: the baseline an Adaptor on two CLIP-style towers must beat.

Towers trained together (BiomedCLIP's, MedSigLIP's) already share a space: `pipe embed`
stores each item's pooled output through the model's own projection (the ``native`` array)
and the model's logit scale and bias (the store's ``joint`` attribute). This row scores
zero-shot and retrieval in that space (a pair's logit: ``scale * cosine + bias``, as the
model scores it) and trains classification heads on the native image vectors. It is a row
of every table of a run on such a pair: alone with ``--adaptor native``, beside the
Adaptor's row otherwise.
"""
from __future__ import annotations

import numpy as np

from core.errors import InputError
from pipeline.encoders import resolve_encoder_name
from pipeline.encoders.stored import shares_space
from stages.evaluate.context import EvalContext
from stages.evaluate.features import raw_features

NATIVE = "native"   # the --adaptor value, the features' name in results, and its rows' method kind


class NoSharedSpace(InputError):
    """``--adaptor native`` on encoders whose towers were not trained into one space."""


def check_pair(backbone: str, text: str | None, needs_text: bool) -> None:
    """Refuse ``--adaptor native`` before any work when the pair has no space of its own."""
    image = resolve_encoder_name(backbone, "image")
    what = "use --adaptor none for the frozen features alone, or name a pair whose towers share a space " \
           "(biomedclip with biomedclip, medsiglip with medsiglip; `pipe encoders` lists each one's joint space)"
    if not image.joint_space:
        raise NoSharedSpace(f"--adaptor native: image encoder {image.name!r} has no joint space (no projection trained "
                            f"with a text tower), so there is no native space to score in; {what}.")
    if text is None:
        if needs_text:
            raise NoSharedSpace(f"--adaptor native needs --text-encoder: the text tower that shares {image.name!r}'s "
                                f"space ({image.joint_space}).")
        return
    tower = resolve_encoder_name(text, "text")
    if not shares_space(image, tower):
        why = (f"text encoder {tower.name!r} has no joint space" if not tower.joint_space else
               f"{image.name!r} was trained into the {image.joint_space} space and {tower.name!r} into the "
               f"{tower.joint_space} space")
        raise NoSharedSpace(f"--adaptor native scores a pair in the space its towers were trained into together, but "
                            f"{why}; their vectors cannot be compared. To compare them at all, train an Adaptor on "
                            f"the pair; else {what}.")


def stored(store) -> bool:
    return "native" in store.array_names


def applies(ctx: EvalContext) -> bool:
    """Both stores hold native vectors of one joint space (the text side only where the task reads it)."""
    spec = ctx.data.image.attrs["spec"].get("native")
    if not spec or not stored(ctx.data.image):
        return False
    if ctx.data.text is ctx.data.image:
        return True
    other = ctx.data.text.attrs["spec"].get("native")
    return bool(other) and other["space"] == spec["space"] and stored(ctx.data.text)


def image_vectors(ctx: EvalContext, rows: np.ndarray) -> np.ndarray:
    """``[n, E]`` float32: the images' native vectors (what classification heads read)."""
    return raw_features(ctx.data.image, rows, NATIVE).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def scoring(ctx: EvalContext) -> tuple[float, float]:
    """The model's own (scale, bias) of a pair's logit, as `pipe embed` recorded them."""
    joint = ctx.data.image.attrs.get("joint") or {}
    return float(joint.get("logit_scale", 1.0)), float(joint.get("logit_bias", 0.0))


def pair(ctx: EvalContext, img_rows: np.ndarray, text_store, txt_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit native (image, text) vectors, in float64."""
    return _unit(raw_features(ctx.data.image, img_rows, NATIVE)), _unit(raw_features(text_store, txt_rows, NATIVE))


def similarity(ctx: EvalContext, img_rows: np.ndarray, text_store, txt_rows: np.ndarray) -> np.ndarray:
    """The model's logits ``scale * cosine + bias`` of every (image, text) pair."""
    img, txt = pair(ctx, img_rows, text_store, txt_rows)
    scale, bias = scoring(ctx)
    ctx.note(f"{ctx.native_method(with_text=True).name}: scored as the model scores a pair, {scale:.4g} x cosine + {bias:.4g} (its own logit scale "
             "and bias; rankings and AUROC depend on the cosine alone)")
    return scale * (img @ txt.T) + bias
