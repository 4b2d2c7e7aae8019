"""Image-text retrieval on the test split: recall@1/5/10 in both directions.

Each modality's Adaptor embedding depends on that modality alone (pooled mode: every
attention in the paired forward has a single key; tokens mode: the unimodal encoders),
so one embedding per image and per report gives the whole similarity matrix. A
tokens-mode Adaptor with a matching head adds a second row: each query's top
``rerank_k`` candidates re-ranked by the matching head's logit (the rest keep their
order, so recall@K for K >= rerank_k is unchanged). Without an Adaptor the raw pooled
features are compared, which is only defined when both encoders have the same width
(and even then they share no trained space).
"""
from __future__ import annotations

import numpy as np

from pipeline.console import err, progress
from pipeline.evaluation import metrics as M
from pipeline.evaluation.context import EvalContext, TaskResult
from pipeline.evaluation.features import raw_features
from pipeline.evaluation.plots import recall_bars
from pipeline.evaluation.tables import add_estimates_row, add_row, make_table, value_cell

KS = (1, 5, 10)


def raw_similarity(ctx: EvalContext, img_rows: np.ndarray, text_store,
                   txt_rows: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Cosine similarity of the raw pooled features, or (None, why it is undefined)."""
    img = raw_features(ctx.data.image, img_rows).astype(np.float64)
    txt = raw_features(text_store, txt_rows).astype(np.float64)
    if img.shape[1] != txt.shape[1]:
        return None, (f"not applicable: {ctx.backbone} features are {img.shape[1]}-d and {ctx.text_encoder} "
                      f"features are {txt.shape[1]}-d, so without an Adaptor there is no shared space to compare in")
    img /= np.linalg.norm(img, axis=1, keepdims=True) + 1e-12
    txt /= np.linalg.norm(txt, axis=1, keepdims=True) + 1e-12
    return img @ txt.T, ("raw pooled features of separately trained encoders: no shared space was learned, "
                         "so this row is a chance-level reference")


def adaptor_similarity(ctx: EvalContext, img_rows: np.ndarray, text_store, txt_rows: np.ndarray) -> np.ndarray:
    a = ctx.adaptor
    img = a.image_embeddings(ctx.data.image, img_rows)
    txt = a.text_embeddings(text_store, txt_rows)
    return img.astype(np.float64) @ txt.astype(np.float64).T


def reranked_similarity(ctx: EvalContext, sim: np.ndarray, img_rows: np.ndarray,
                        txt_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(image→text, text→image) similarities after the matching head re-ranks each query's
    top ``rerank_k`` candidates; each pair is scored once."""
    k = min(ctx.cfg.rerank_k, sim.shape[1], sim.shape[0])
    top_t = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # [n_img, k] reports per image
    top_i = np.argsort(-sim.T, axis=1, kind="stable")[:, :k]  # [n_txt, k] images per report
    pairs = np.concatenate([np.stack([np.repeat(np.arange(len(sim)), k), top_t.ravel()], 1),
                            np.stack([top_i.ravel(), np.repeat(np.arange(sim.shape[1]), k)], 1)])
    pairs, inverse = np.unique(pairs, axis=0, return_inverse=True)
    with progress() as bar:
        task = bar.add_task("re-rank pairs", total=len(pairs))
        logits = ctx.adaptor.match_scores(ctx.data.image, img_rows, ctx.data.text, txt_rows, pairs,
                                          lambda n: bar.advance(task, n))[inverse.ravel()]
    n = len(sim) * k

    def lifted(s: np.ndarray, top: np.ndarray, new: np.ndarray) -> np.ndarray:
        s = s.copy()
        new = new.reshape(top.shape)
        np.put_along_axis(s, top, s.max() + 1.0 + (new - new.min()), axis=1)
        return s

    return lifted(sim, top_t, logits[:n]), lifted(sim.T, top_i, logits[n:])


def recall_figures(sim: np.ndarray, ctx: EvalContext, t2i: np.ndarray | None = None) -> dict:
    """Recall@K both ways from ``sim [n_img, n_txt]`` (``t2i [n_txt, n_img]`` replaces ``sim.T``)."""
    ranks = {"image→text": M.match_ranks(sim), "text→image": M.match_ranks(sim.T if t2i is None else t2i)}
    values = {f"{d} R@{k}": M.recall_at(r, k) for d, r in ranks.items() for k in KS}

    def resampled(w):
        return {f"{d} R@{k}": M.recall_at(r, k, w) for d, r in ranks.items() for k in KS}

    cis = M.bootstrap_cis(resampled, len(sim), ctx.cfg.bootstrap, ctx.cfg.seed, ctx.cfg.ci)
    return {"recall": values, "ci": {k: list(v) for k, v in cis.items()},
            "median_rank": {d: float(np.median(r) + 1) for d, r in ranks.items()}}


def _test_items(ctx: EvalContext) -> np.ndarray:
    test = ctx.positions()["test"]
    if len(test) < 2:
        raise ValueError(f"retrieval needs at least 2 items in the {ctx.cfg.test_split!r} split, found {len(test)}; "
                         "check the split column or set test_split=...")
    return test


def run(ctx: EvalContext) -> TaskResult:
    test = _test_items(ctx)
    img_rows, txt_rows = ctx.image_rows[test], ctx.data.text_rows[test]
    distinct = len(np.unique(txt_rows))
    if distinct < len(test):
        ctx.note(f"{len(test) - distinct} of {len(test)} test reports repeat another one word for word; a tie "
                 "with the true match counts as a hit (candidates must score strictly higher to outrank it)")
    methods = []
    if ctx.adaptor is not None:
        sim = adaptor_similarity(ctx, img_rows, ctx.data.text, txt_rows)
        methods.append({"name": ctx.adaptor_name(), "features": "adaptor", **recall_figures(sim, ctx)})
        if ctx.adaptor.has_match_head and ctx.cfg.rerank_k > 1:
            i2t, t2i = reranked_similarity(ctx, sim, img_rows, txt_rows)
            methods.append({"name": f"{ctx.adaptor_name()} + ITM re-rank of top {ctx.cfg.rerank_k}",
                            "features": "adaptor", **recall_figures(i2t, ctx, t2i)})
    sim, why = raw_similarity(ctx, img_rows, ctx.data.text, txt_rows)
    base = {"name": ctx.baseline_name(with_text=True), "features": "backbone", "note": why}
    ctx.note(f"{base['name']}: {why}")
    methods.append({**base, **recall_figures(sim, ctx)} if sim is not None else {**base, "applicable": False})
    result = TaskResult(methods=methods, tables=[_table(methods, len(test))])
    result.data = {"splits": {"test": int(len(test))}, "distinct_reports": distinct,
                   "chance": {f"R@{k}": min(1.0, k / len(test)) for k in KS}}
    ok = {m["name"]: m["recall"] for m in methods if "recall" in m}
    chance = {f"{d} R@{k}": min(1.0, k / len(test)) for d in ("image→text", "text→image") for k in KS}
    title = f"retrieval · {ctx.dataset_name} · {len(test)} test pairs"
    result.plots.append(str(recall_bars(ok, ctx.out / "recall.png", title, chance)))
    err.print(f"retrieval over {len(test)} test pairs ({distinct} distinct reports)")
    return result


def _table(methods: list[dict], n: int) -> dict:
    cols = [f"{d} R@{k}" for d in ("image→text", "text→image") for k in KS]
    t = make_table("retrieval · recall@K on the test split (%)", "recall", cols)
    for m in methods:
        add_estimates_row(t, m["name"], m.get("recall"), m.get("ci"))
    add_row(t, f"chance ({n} candidates)", {c: value_cell(min(1.0, int(c.rsplit('@', 1)[1]) / n)) for c in cols})
    return t
