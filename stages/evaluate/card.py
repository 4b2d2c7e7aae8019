"""The data card of an evaluation: what the figures were computed on.

Split sizes and label prevalence of the items evaluated, the label-report agreement where
the dataset measured it (the demo does), and the items that could not be embedded, with
their reasons (from the stores' failure tables). Recorded in ``results.json`` as
``data_card``; `pipe report --html` shows it.
"""
from __future__ import annotations

import json
from collections import defaultdict

import numpy as np

from cache.index import index_folder
from stages.evaluate.context import EvalContext

SPLIT_ORDER = ("train", "valid", "test")
MAX_REASONS = 20   # distinct failure reasons kept (the count covers them all)
EXAMPLES = 3       # item ids kept per reason


def data_card(ctx: EvalContext, needs_text: bool) -> dict:
    items = ctx.data.items
    split = items["split"].astype(object).where(items["split"].notna(), "(none)").astype(str).to_numpy()
    names = sorted(set(split), key=lambda s: (SPLIT_ORDER.index(s) if s in SPLIT_ORDER else len(SPLIT_ORDER), s))
    sizes = {s: int((split == s).sum()) for s in names}
    prevalence, other = {}, []
    for label in ctx.data.label_names:
        v = items[f"label.{label}"].to_numpy(np.float64)
        known = ~np.isnan(v)
        if not np.isin(v[known], (0.0, 1.0)).all():
            other.append(label)
            continue
        prevalence[label] = {s: {"positive": int(np.nansum(v[(split == s) & known])),
                                 "known": int(((split == s) & known).sum())} for s in names}
    return {"dataset": ctx.dataset_name, "spec": ctx.cfg.dataset, "description": _description(ctx),
            "items": int(len(items)), "splits": sizes, "prevalence": prevalence, "labels_not_binary": other,
            "masks": ctx.data.mask_names, "report_agreement": ctx.report_agreement,
            "failures": _failures(ctx, needs_text)}


def _description(ctx: EvalContext) -> str:
    if ctx.description:
        return ctx.description
    try:  # the description `pipe embed` recorded with the index
        return json.loads((index_folder(ctx.root, ctx.dataset_name) / "dataset.json").read_text()).get(
            "description") or ""
    except (OSError, ValueError):
        return ""


def _failures(ctx: EvalContext, needs_text: bool) -> dict:
    """Items of this dataset that `pipe embed` could not embed (and that this run therefore lacks)."""
    kept = set(ctx.data.items.id.astype(str))
    stores = [("image", ctx.data.image)] + ([("text", ctx.data.text)] if needs_text else [])
    seen, by_reason = set(), defaultdict(list)
    for modality, store in stores:
        table = store.failures().to_pylist()
        for r in table:
            item = str(r.get("item") or "")
            if r.get("dataset") not in (None, ctx.dataset_name) or item in kept:
                continue
            key = (modality, item, r.get("reason") or "")
            if key in seen:
                continue
            seen.add(key)
            by_reason[(modality, r.get("reason") or "no reason recorded")].append(item)
    reasons = sorted(by_reason.items(), key=lambda kv: -len(kv[1]))
    return {"count": len(seen), "skipped_items": int(ctx.data.skipped.get("failed_at_embed", 0)),
            "reasons": [{"modality": m, "reason": reason, "count": len(ids), "items": ids[:EXAMPLES]}
                        for (m, reason), ids in reasons[:MAX_REASONS]]}
