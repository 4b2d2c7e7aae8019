"""Image-text retrieval on the test split: recall@1/5/10 in both directions.

Each modality's Adaptor embedding depends on that modality alone (pooled mode: every
attention in the paired forward has a single key; tokens mode: the unimodal encoders),
so one embedding per image and per report gives the whole similarity matrix. A
tokens-mode Adaptor with a matching head adds a second row: each query's top
``rerank_k`` candidates re-ranked by the matching head's logit (the rest keep their
order, so recall@K for K >= rerank_k is unchanged). Without an Adaptor the raw pooled
features are compared, which is only defined when both encoders have the same width
(and even then they share no trained space). A few queries each way, with their top-5
answers and thumbnails of the images shown, are saved as examples for the report.
"""
from __future__ import annotations

import json

import numpy as np
import torch

from core.atomic import atomic_write_text
from core.console import err, progress, escape
from core.errors import InputError
from pipeline.methods import Method
from pipeline.models.ranking import match_ranks, reranked_ranks
from stages.evaluate import metrics as M
from stages.evaluate import native
from stages.evaluate.context import EvalContext, TaskResult
from stages.evaluate.features import raw_features
from stages.evaluate.pictures import thumbnails
from stages.evaluate.plots import recall_bars
from pipeline.records import DIRECTIONS, Candidate, Examples, MethodResult, Query
from stages.evaluate.tables import Column, Table, add_estimates_row, add_row, interval_note, make_table, value_cell

KS = (1, 5, 10)


def raw_pair(ctx: EvalContext, img_rows: np.ndarray, text_store,
             txt_rows: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """Unit raw pooled features (images, texts), or (None, why comparing them is undefined)."""
    img = raw_features(ctx.data.image, img_rows).astype(np.float64)
    txt = raw_features(text_store, txt_rows).astype(np.float64)
    if img.shape[1] != txt.shape[1]:
        return None, (f"not applicable: {ctx.backbone} features are {img.shape[1]}-d and {ctx.text_encoder} "
                      f"features are {txt.shape[1]}-d, so without an Adaptor there is no shared space to compare in")
    img /= np.linalg.norm(img, axis=1, keepdims=True) + 1e-12
    txt /= np.linalg.norm(txt, axis=1, keepdims=True) + 1e-12
    return (img, txt), ("raw pooled features of two separately trained encoders compared directly: no shared "
                        "space was learned, so the scores measure no alignment; a figure away from chance, in "
                        "either direction, reflects incidental structure of the two feature spaces")


def raw_similarity(ctx: EvalContext, img_rows: np.ndarray, text_store,
                   txt_rows: np.ndarray) -> tuple[np.ndarray | None, str]:
    """Cosine similarity of the raw pooled features, or (None, why it is undefined)."""
    pair, why = raw_pair(ctx, img_rows, text_store, txt_rows)
    return (None if pair is None else pair[0] @ pair[1].T), why


LINEAR_MAP = "linear map, least squares (no training loop)"
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


def fit_linear_map(ctx: EvalContext) -> tuple[np.ndarray, float]:
    """The cheapest alignment: a ridge least-squares map from the frozen image features to the
    frozen text features of the training pairs, ``W = (XᵀX + λI)⁻¹ XᵀY``, one solve per ridge.

    λ (relative to the mean eigenvalue of XᵀX) is chosen by the validation pairs' median
    rank of the true report; without validation pairs the middle value is used.
    """
    pos = ctx.positions()
    x, y = (_unit(raw_features(ctx.data.image, ctx.image_rows[pos["train"]])),
            _unit(raw_features(ctx.data.text, ctx.data.text_rows[pos["train"]])))
    gram, cross = x.T @ x, x.T @ y
    scale = np.trace(gram) / len(gram)
    maps = {lam: np.linalg.solve(gram + lam * scale * np.eye(len(gram)), cross) for lam in RIDGES}
    val = pos["valid"]
    if len(val) < 2:
        return maps[RIDGES[len(RIDGES) // 2]], RIDGES[len(RIDGES) // 2]
    xv = _unit(raw_features(ctx.data.image, ctx.image_rows[val]))
    yv = _unit(raw_features(ctx.data.text, ctx.data.text_rows[val]))
    best = min(RIDGES, key=lambda lam: np.median(match_ranks(_unit(xv @ maps[lam]), yv)))
    return maps[best], best


def linear_map_pair(ctx: EvalContext, img_rows: np.ndarray, text_store,
                    txt_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit (mapped images, texts) after the least-squares map of :func:`fit_linear_map`."""
    w, lam = fit_linear_map(ctx)
    ctx.note(f"{LINEAR_MAP}: ridge λ = {lam:g} × mean eigenvalue, chosen on the validation pairs")
    return _unit(_unit(raw_features(ctx.data.image, img_rows)) @ w), _unit(raw_features(text_store, txt_rows))


def linear_map_similarity(ctx: EvalContext, img_rows: np.ndarray, text_store, txt_rows: np.ndarray) -> np.ndarray:
    """Cosine similarity after the least-squares map of :func:`fit_linear_map`."""
    img, txt = linear_map_pair(ctx, img_rows, text_store, txt_rows)
    return img @ txt.T


def adaptor_pair(ctx: EvalContext, img_rows: np.ndarray, text_store,
                 txt_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Adaptor's unit (image, text) embeddings, in float64."""
    a = ctx.adaptor
    return (a.image_embeddings(ctx.data.image, img_rows).astype(np.float64),
            a.text_embeddings(text_store, txt_rows).astype(np.float64))


def adaptor_similarity(ctx: EvalContext, img_rows: np.ndarray, text_store, txt_rows: np.ndarray) -> np.ndarray:
    img, txt = adaptor_pair(ctx, img_rows, text_store, txt_rows)
    return img @ txt.T


def itm_reranked_ranks(ctx: EvalContext, img: np.ndarray, txt: np.ndarray, img_rows: np.ndarray,
                   txt_rows: np.ndarray) -> dict[str, np.ndarray]:
    """Each direction's ranks after the matching head re-orders each query's top
    ``rerank_k`` candidates (:func:`pipeline.models.ranking.reranked_ranks`, the figures of
    :func:`pipeline.models.loss.rerank_top_k` as validation computes them, in blocks)."""
    k = min(ctx.cfg.retrieval.rerank_k, len(img))
    with progress() as bar:
        task = bar.add_task("re-rank pairs", total=2 * k * len(img))

        # every test image and report through its unimodal encoder once, for both directions
        scorer = ctx.adaptor.match_scorer(ctx.data.image, img_rows, ctx.data.text, txt_rows,
                                          lambda n: bar.advance(task, n))

        def score(i: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(scorer(np.stack([i.numpy(), t.numpy()], 1)))

        return {"image→text": reranked_ranks(img, txt, score, k),
                "text→image": reranked_ranks(txt, img, lambda t, i: score(i, t), k)}


def plain_ranks(img: np.ndarray, txt: np.ndarray) -> dict[str, np.ndarray]:
    """Both directions' ranks of the true match, computed in blocks of queries (never N × N)."""
    return {"image→text": match_ranks(img, txt), "text→image": match_ranks(txt, img)}


def recall_figures(ranks: dict[str, np.ndarray], ctx: EvalContext) -> dict:
    """Recall@K, their bootstrap CIs and the median rank, from each direction's ranks."""
    values = {f"{d} R@{k}": M.recall_at(r, k) for d, r in ranks.items() for k in KS}

    def resampled(w):
        return {f"{d} R@{k}": M.recall_at(r, k, w) for d, r in ranks.items() for k in KS}

    n = len(next(iter(ranks.values())))
    cis = M.bootstrap_cis(resampled, n, ctx.cfg.bootstrap, ctx.cfg.seed, ctx.cfg.ci)
    return {"recall": values, "ci": {k: list(v) for k, v in cis.items()},
            "median_rank": {d: float(np.median(r) + 1) for d, r in ranks.items()}}


def _test_items(ctx: EvalContext) -> np.ndarray:
    test = ctx.positions()["test"]
    if len(test) < 2:
        raise InputError(f"retrieval needs at least 2 items in the {ctx.cfg.test_split!r} split, found {len(test)}; "
                         "check the split column or set test_split=...")
    return test


def run(ctx: EvalContext) -> TaskResult:
    test = _test_items(ctx)
    img_rows, txt_rows = ctx.image_rows[test], ctx.data.text_rows[test]
    distinct = len(np.unique(txt_rows))
    if distinct < len(test):
        ctx.note(f"{len(test) - distinct} of {len(test)} test reports repeat another one word for word; a tie "
                 "with the true match counts as a hit (candidates must score strictly higher to outrank it)")
    methods, shown = _methods(ctx, img_rows, txt_rows)
    result = TaskResult(methods=methods, tables=[_table(ctx, methods, len(test))])
    result.data = {"splits": {"test": int(len(test))}, "distinct_reports": distinct,
                   "chance": {f"R@{k}": min(1.0, k / len(test)) for k in KS}}
    ok = {m.method.name: m.figures["recall"] for m in methods if "recall" in m.figures}
    chance = {f"{d} R@{k}": min(1.0, k / len(test)) for d in ("image→text", "text→image") for k in KS}
    title = f"retrieval · {ctx.dataset_name} · {len(test)} test pairs"
    result.plots.append(str(recall_bars(ok, ctx.out / "recall.png", title, chance)))
    result.files.update(save_examples(ctx, shown, test, methods[0].method.name))
    err.print(f"retrieval over {len(test)} test pairs ({escape(str(distinct))} distinct reports)")
    return result


def _methods(ctx: EvalContext, img_rows: np.ndarray, txt_rows: np.ndarray
             ) -> tuple[list[MethodResult], tuple[np.ndarray, np.ndarray]]:
    """Every method's figures, and the (image, text) embeddings the examples are drawn from (the first method's)."""
    methods, shown = [], None
    if ctx.adaptor is not None:
        img, txt = adaptor_pair(ctx, img_rows, ctx.data.text, txt_rows)
        ours = ctx.adaptor_method()
        methods.append(MethodResult(ours, "adaptor", figures=recall_figures(plain_ranks(img, txt), ctx)))
        shown = img, txt
        if ctx.adaptor.has_match_head and ctx.cfg.retrieval.rerank_k > 1:
            ranks = itm_reranked_ranks(ctx, img, txt, img_rows, txt_rows)
            rerank = Method(f"{ours.name} + ITM re-rank of top {ctx.cfg.retrieval.rerank_k}", "adaptor", ours.base,
                            ours.mode, variant="itm-rerank")
            methods.append(MethodResult(rerank, "adaptor", figures=recall_figures(ranks, ctx)))
    if native.applies(ctx):   # the pair's own joint space: the baseline an Adaptor must beat
        img, txt = native.pair(ctx, img_rows, ctx.data.text, txt_rows)
        methods.append(MethodResult(ctx.native_method(with_text=True), native.NATIVE,
                                    figures=recall_figures(plain_ranks(img, txt), ctx)))
        shown = (img, txt) if shown is None else shown
    img, txt = linear_map_pair(ctx, img_rows, ctx.data.text, txt_rows)
    linear = Method(f"{LINEAR_MAP} {ctx.backbone} → {ctx.text_encoder}", "linear-map")
    methods.append(MethodResult(linear, "linear-map", figures=recall_figures(plain_ranks(img, txt), ctx)))
    shown = (img, txt) if shown is None else shown
    pair, why = raw_pair(ctx, img_rows, ctx.data.text, txt_rows)
    baseline = ctx.baseline_method(with_text=True)
    ctx.note(f"{baseline.name}: {why}")
    figures = recall_figures(plain_ranks(*pair), ctx) if pair is not None else {"applicable": False}
    methods.append(MethodResult(baseline, "backbone", figures={"note": why, **figures}))
    return methods, shown


def _table(ctx: EvalContext, methods: list[MethodResult], n: int) -> Table:
    cols = {Column(f"{d} R@{k}"): k for d in ("image→text", "text→image") for k in KS}
    t = make_table("retrieval", f"recall@K on {ctx.scored}", "recall", list(cols),
                   interval_note(ctx.cfg.ci, n, ctx.cfg.bootstrap))
    for m in methods:
        add_estimates_row(t, m.method, m.figures.get("recall"), m.figures.get("ci"))
    add_row(t, Method(f"chance ({n} candidates)", "chance"), {c.name: value_cell(min(1.0, k / n)) for c, k in cols.items()})
    return t


EXAMPLE_QUERIES = (4, 3)   # image queries, report queries
TOP = 5


def example_queries(n: int, count: int, offset: float = 0.0) -> list[int]:
    """``count`` query positions spread evenly over ``n`` test items (the same for every run on
    the same test split, so reports can set runs side by side)."""
    count = min(count, n)
    return sorted({int((i + offset) * n / count) % n for i in range(count)})


def _ranked(query: str, scores: np.ndarray, same: np.ndarray, ids: np.ndarray) -> Query:
    """The top candidates of one query, the true one(s) marked, and the rank of the first true one."""
    order = np.argsort(-scores, kind="stable")
    true_rank = int(np.flatnonzero(same[order])[0]) + 1 if same.any() else None
    return Query(query, true_rank, [Candidate(str(ids[j]), round(float(scores[j]), 4), bool(same[j]))
                                    for j in order[:TOP]])


def save_examples(ctx: EvalContext, shown: tuple[np.ndarray, np.ndarray], test: np.ndarray, method: str) -> dict:
    """A few queries each way with their top-5 answers (examples.json) and the thumbnails of the
    images they show (thumbnails.npz): what `pipe report --html` draws as retrieval examples.

    ``shown``: the (image, text) embeddings of one method; only the queries' rows and columns
    of their similarity are computed (never the whole test × test matrix)."""
    img, txt = shown
    items = ctx.data.items.iloc[test]
    ids, reports = items.id.astype(str).to_numpy(), items.report.to_numpy()
    rows = ctx.data.text_rows[test]  # a repeated report is a hit: same text row
    i2t, t2i, texts, pictures = [], [], set(), set()
    for q in example_queries(len(test), EXAMPLE_QUERIES[0]):
        r = _ranked(str(ids[q]), txt @ img[q], rows == rows[q], ids)
        i2t.append(r)
        pictures.add(q)
        texts.update(c.id for c in r.top)
    for q in example_queries(len(test), EXAMPLE_QUERIES[1], offset=0.5):
        r = _ranked(str(ids[q]), img @ txt[q], rows == rows[q], ids)
        t2i.append(r)
        texts.add(str(ids[q]))
        pictures.update(int(np.flatnonzero(ids == c.id)[0]) for c in r.top)
    thumbs = thumbnails(ctx, test[sorted(pictures)])
    examples = Examples(method, TOP, int(len(test)), dict(zip(DIRECTIONS, (i2t, t2i))),
                        {str(i): str(t) for i, t in zip(ids, reports) if str(i) in texts})
    files = {"examples": ctx.out / "examples.json", "thumbnails": ctx.out / "thumbnails.npz"}
    atomic_write_text(files["examples"], json.dumps(examples.to_dict(), indent=1))
    np.savez_compressed(files["thumbnails"], ids=np.array(list(thumbs), dtype=str),
                        images=np.stack(list(thumbs.values())) if thumbs else np.zeros((0, 1, 1), np.uint8))
    return files
