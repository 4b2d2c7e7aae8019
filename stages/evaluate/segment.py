"""Segmentation: a convolutional decoder on cached patch tokens, over label fractions and seeds.

Input tokens are the frozen Adaptor's per-token image outputs (tokens mode:
``encode_image(return_tokens=True)``) or the backbone's cached patch tokens (no Adaptor,
and pooled mode, whose Adaptor has no per-token path). Loss: alpha * focal + dice. Dice
is reported three ways (docs/concepts/method.md, flaw 3) and as pooled pixels, IoU two ways; all from
per-image counts over the whole test split.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.datasets.mask_targets import geometry, load_masks
from core.console import err, progress, escape
from core.errors import InputError
from pipeline.methods import Method
from pipeline.models.heads import SEG_DECODERS, segmentation_loss, tokens_to_grid
from pipeline.records import MethodResult, overlay_keys
from stages.evaluate import metrics as M
from stages.evaluate.context import FEATURE_SOURCES, EvalContext, TaskResult
from stages.evaluate.head_task import draw_subsets, fit_grid, summarise
from stages.evaluate.head_bank import FitSettings, Head, HeadBank, Rows, iter_predict
from stages.evaluate.pictures import input_view, to_uint8
from stages.evaluate.plots import overlays
from stages.evaluate.seg_views import TrainViews, ViewDraw, train_views
from stages.evaluate.tables import (Cell, Table, add_row, fraction_columns, fraction_label, interval_note,
                                    make_table, summary_cell, value_cell)

# (metric, title, the metric of the all-empty predictor's reference row or ""), one table each
TABLES = (("dice_positive", "Dice on images with a non-empty true mask", ""),
          ("dice_empty_is_one", "Dice over all images, empty prediction on empty mask = 1 (the authors')",
           "dice_all_empty_baseline"),
          ("dice_global", "Dice of all test pixels pooled", ""),
          ("iou_positive", "IoU on images with a non-empty true mask", ""),
          ("iou_empty_is_one", "IoU over all images, empty on empty = 1", ""))


class NoMasksError(InputError):
    """A dataset without masks for segmentation."""


def resolve_target(ctx: EvalContext) -> str:
    names = ctx.data.mask_names
    if not names:
        raise NoMasksError(
            f"dataset {ctx.dataset_name!r} has no masks, so it cannot be evaluated for segmentation. Add a mask "
            "column to the pairs table (`mask_<finding>`: a single-channel PNG per image, same size as the image, "
            "nonzero = positive, all zero when absent) and re-run `pipe embed` to re-index it.")
    target = ctx.cfg.seg.target or names[0]
    if target not in names:
        raise NoMasksError(f"seg.target={target!r} is not a mask of {ctx.dataset_name!r}; it has: {', '.join(names)}")
    if not ctx.cfg.seg.target and len(names) > 1:
        ctx.note(f"segmenting {target!r} (the first mask column); others: {', '.join(names[1:])} (seg.target=...)")
    return target


def token_sets(ctx: EvalContext) -> list[tuple[Method, str]]:
    """(method, source) of the token features to decode."""
    a = ctx.adaptor
    if a is not None and not a.mode.per_token_image:
        ctx.note(f"the checkpoint is a {a.mode.name}-mode Adaptor, which has no per-token path: its segmentation "
                 "row decodes the backbone's raw cached patch tokens (the same input as the no-Adaptor baseline)")
        ours = ctx.adaptor_method()
        return [(Method(f"{ours.name} [{a.mode.name} mode: raw patch tokens]", "adaptor", ours.base, a.mode.name,
                        variant="raw-tokens"), "backbone")]
    return [(method, source) for method, source in ctx.feature_sets() if FEATURE_SOURCES[source].tokens is not None]


def token_grid_features(ctx: EvalContext, source: str, positions: np.ndarray) -> torch.Tensor:
    """``[n, D, h, w]`` patch features of the items at ``positions`` (their plain views), in the
    cache's float16 (batches are cast to float32 as they are used)."""
    return token_grid_rows(ctx, source, ctx.image_rows[positions])


def token_grid_rows(ctx: EvalContext, source: str, rows: np.ndarray) -> torch.Tensor:
    """:func:`token_grid_features` of image store ``rows`` (any view's)."""
    tokens, grid, n_prefix = FEATURE_SOURCES[source].tokens(ctx, rows)
    if grid is None:
        side = math.isqrt(tokens.shape[1] - n_prefix)
        grid = (side, side)
    return tokens_to_grid(torch.from_numpy(np.ascontiguousarray(tokens)), n_prefix, tuple(grid))


def _evaluate(module, x: torch.Tensor, y: torch.Tensor, threshold: float, loss=None,
              keep: dict | None = None) -> tuple[np.ndarray, float]:
    """Per-image overlap counts of thresholded predictions (and the mean loss, given one);
    ``keep`` collects the predicted masks of chosen images."""
    logit_t = math.log(threshold / (1 - threshold))
    counts, losses = [], []
    for sl, logits in iter_predict(module, x, 16):
        if loss is not None:
            losses.append(float(loss(logits, y[sl])) * len(logits))
        pred = (logits > logit_t).cpu().numpy()
        counts.append(M.overlap_counts(pred, y[sl].cpu().numpy() > 0))
        for i in range(*sl.indices(len(x))):
            if keep is not None and i in keep:
                keep[i] = pred[i - sl.start]
    return np.concatenate(counts), (sum(losses) / len(x) if losses else float("nan"))


def train_decoders(ctx: EvalContext, x_tr, y_tr, x_va, y_va, seed: int, draw=None) -> tuple[Head, dict]:
    s, h = ctx.cfg.seg, ctx.cfg.heads
    torch.manual_seed(seed)
    grid, size = x_tr.shape[-1], y_tr.shape[-1]
    make = SEG_DECODERS[s.decoder]
    heads = [Head("decoder", lr, make(x_tr.shape[1], grid, size, s.channels).to(ctx.device)) for lr in h.lrs]

    def loss(logits, target):
        return segmentation_loss(logits, target.float(), s.alpha, s.gamma)

    def score(module) -> tuple[float, float]:
        counts, val_loss = _evaluate(module, x_va, y_va, s.threshold, loss)
        return float(M.SEGMENTATION_METRICS[s.select](counts)), val_loss

    settings = FitSettings.of(h, s.epochs, s.batch_size, seed, s.min_steps, s.max_steps, s.val_every)
    bank = HeadBank(heads, loss, score, settings)
    return bank.fit(x_tr, y_tr, has_val=len(x_va) > 0, draw=draw)["decoder"], bank.sweep()


def evaluate_tokens(ctx, method: Method, source: str, x, masks, pos, plan, cases: list[tuple[int, str]] | None,
                    tick, views: TrainViews | None = None) -> tuple[MethodResult, dict]:
    """Every (seed, fraction) for one token set; and its predictions on the overlay cases (the
    seed-0, largest-fraction decoder), choosing the cases when ``cases`` is None. With ``views``
    (``seg.augment``), decoders also train on the training images' cached views."""
    dev = ctx.device
    x_all, m_all = x.to(dev), masks.to(dev)   # one copy each; the splits and fractions are views of it
    x_tr, y_tr = Rows(x_all, pos["train"]), Rows(m_all, pos["train"])
    x_va, y_va = Rows(x_all, pos["valid"]), Rows(m_all, pos["valid"])
    x_te, y_te = Rows(x_all, pos["test"]), Rows(m_all, pos["test"])
    shown: dict = {}
    draws = _view_draws(ctx, source, views, x_tr, y_tr)

    def fit(seed: int, f: float, sub: np.ndarray) -> dict[str, dict]:
        head, sweep = train_decoders(ctx, x_tr.subset(sub), y_tr.subset(sub), x_va, y_va, seed, draws(sub, seed))
        counts, _ = _evaluate(head.module, x_te, y_te, ctx.cfg.seg.threshold)
        if seed == ctx.seeds[0] and f == max(ctx.cfg.fractions):
            shown.update(_shown(ctx, head, x_te, y_te, counts, cases))
        return {"decoder": {"seed": seed, "n_train": int(len(sub)), **head.record(),
                            f"val_{ctx.cfg.seg.select}": head.best_metric, "sweep": sweep,
                            "test": {k: fn(counts) for k, fn in M.SEGMENTATION_METRICS.items()}, "counts": counts}}

    runs = fit_grid(ctx, plan, ["decoder"], fit, tick)["decoder"]

    def metrics(run: dict, w: np.ndarray) -> dict:
        return {k: fn(run["counts"], w) for k, fn in M.SEGMENTATION_METRICS.items()}

    cells = {}
    for f, rs in runs.items():
        cells[fraction_label(f)] = summarise(ctx, f, rs, len(rs[0]["counts"]), metrics, skip_nan=False)
        for r in rs:
            r.pop("counts")
    return MethodResult(method, source, {"decoder": cells}, {"feature_shape": list(x.shape[1:])}), shown


def _view_draws(ctx, source: str, views: TrainViews | None, x_tr: Rows, y_tr: Rows):
    """``draws(subset, seed)``: the :class:`ViewDraw` of a training subset (None without views). The
    views' token grids are read once per token set, for every subset."""
    if views is None:
        return lambda sub, seed: None
    dev = ctx.device
    xv = torch.stack([token_grid_rows(ctx, source, views.rows[:, v]) for v in range(views.k)]).to(dev)
    yv = views.masks.to(dev)
    return lambda sub, seed: ViewDraw(x_tr.subset(sub), y_tr.subset(sub), xv, yv,
                                      torch.as_tensor(np.asarray(sub), dtype=torch.long), views.p, seed)


def _shown(ctx, head, x_te, y_te, counts: np.ndarray, cases: list[tuple[int, str]] | None) -> dict:
    """The overlay cases (chosen by this decoder's test counts unless given) and its predictions on them."""
    chosen = cases if cases is not None else pick_cases(counts, ctx.cfg.seg.overlays)
    idx = [i for i, _ in chosen]
    keep = dict.fromkeys(range(len(idx)))
    if idx:
        _evaluate(head.module, x_te[idx], y_te[idx], ctx.cfg.seg.threshold, keep=keep)
    dice = M.image_dice(counts)
    return {"cases": chosen, "pred": [keep[j] for j in range(len(idx))], "dice": [float(dice[i]) for i in idx]}


def _masked_items(ctx: EvalContext, target: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Positions of the items that have a ``target`` mask, and each split's indices into them."""
    col = ctx.data.items["mask." + target]
    kept = np.flatnonzero(col.notna().to_numpy() & (col.astype(str) != "None").to_numpy())
    split_pos = ctx.positions(np.isin(np.arange(len(col)), kept))
    pos = {k: np.searchsorted(kept, v) for k, v in split_pos.items()}
    if not len(pos["train"]) or not len(pos["test"]):
        raise NoMasksError(f"segmentation needs items with a {target!r} mask in the train and test splits; found "
                           f"{len(pos['train'])} and {len(pos['test'])}. Check the split column and the mask paths.")
    if not len(pos["valid"]):
        ctx.note(f"no {target!r} masks in the {ctx.cfg.val_split!r} split: each decoder keeps its last epoch "
                 "and the first learning rate")
    return kept, pos


def run(ctx: EvalContext) -> TaskResult:
    target = resolve_target(ctx)
    kept, pos = _masked_items(ctx, target)
    spec = ctx.data.image.attrs["spec"]
    masks_np, read = load_masks(ctx.data.items.iloc[kept], target, spec, ctx.root, ctx.dataset_name)
    err.print(f"masks: {len(kept):,} {escape(repr(target))} masks on the {escape(str(masks_np.shape[-1]))}px input grid "
              f"({'read ' + str(read) + ' mask files' if read else 'all from the mask cache'})")
    positive = masks_np.reshape(len(kept), -1).any(1)
    if ctx.cfg.seg.balance_negatives:
        pos["train"] = balanced_negatives(ctx, pos["train"], positive)
    plan = draw_subsets(ctx, positive[pos["train"]], [f"mask {target} (non-empty)"], kept[pos["train"]],
                        whole=ctx.cfg.seg.balance_negatives)
    views = train_views(ctx, kept[pos["train"]], masks_np[pos["train"]])
    masks = torch.from_numpy(masks_np.view(np.uint8))  # the same bytes (bool is one byte): no second copy
    sets = token_sets(ctx)
    methods, shown = [], []
    with progress() as bar:
        task = bar.add_task("train decoders", total=len(sets) * len(ctx.seeds) * len(ctx.cfg.fractions))
        for method, source in sets:
            x = token_grid_features(ctx, source, kept)
            cases = shown[0]["cases"] if shown else None  # every method on the first one's cases
            m, preds = evaluate_tokens(ctx, method, source, x, masks, pos, plan, cases, lambda: bar.advance(task), views)
            methods.append(m)
            shown.append(preds)
    result = TaskResult(methods=methods, tables=_tables(ctx, methods, len(pos["test"])))
    result.data = {"target": target, "mask_size": int(masks_np.shape[-1]), "geometry": list(geometry(spec)),
                   "splits": {k: int(len(v)) for k, v in pos.items()},
                   "positive_masks": {k: int(positive[v].sum()) for k, v in pos.items()}, "mask_files_read": read,
                   "balanced_negatives": bool(ctx.cfg.seg.balance_negatives),
                   "augmented_views": {"views": views.k, "p": views.p} if views is not None else None,
                   "fractions": {fraction_label(f): {str(s): int(len(plan[s][f])) for s in plan}
                                 for f in ctx.cfg.fractions}}
    result.data["overlays"] = {"fraction": fraction_label(max(ctx.cfg.fractions)), "seed": ctx.seeds[0],
                               "threshold": ctx.cfg.seg.threshold, "chosen_by": methods[0].method.name,
                               "methods": [m.method.name for m in methods]}
    picture = _overlay_picture(ctx, result, kept[pos["test"]], masks_np[pos["test"]], shown, methods, target)
    result.plots += [str(picture)] if picture else []
    return result


BALANCE_SEED = 42  # MGCA's SIIMImageDataset draws with numpy's global generator, seeded 42 at import


def balanced_negatives(ctx: EvalContext, train: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """The training images with a non-empty mask and as many of the empty ones, drawn once as MGCA's
    SIIM dataset does (``np.random.choice(negatives, n_positive, replace=False)`` from a generator
    seeded 42, over the negatives in item order); the validation and test splits keep every image."""
    pos, neg = train[positive[train]], train[~positive[train]]
    if len(neg) <= len(pos):
        ctx.note(f"balance_negatives: {len(neg):,} empty training masks, no more than the {len(pos):,} non-empty "
                 "ones: all are kept")
        return train
    chosen = np.random.RandomState(BALANCE_SEED).choice(neg, size=len(pos), replace=False)
    ctx.note(f"balance_negatives: training on the {len(pos):,} images with a non-empty mask and {len(pos):,} of the "
             f"{len(neg):,} empty ones (as MGCA's SIIM dataset; validation and test keep every image)")
    return np.sort(np.concatenate([pos, chosen]))


def pick_cases(counts: np.ndarray, n: int) -> list[tuple[int, str]]:
    """The test images an overlay shows: the best and the worst by per-image Dice among those
    with a non-empty true mask (best first, then worst, worst last); with no such image, the
    empty ones with the least and the most predicted area."""
    if n < 1 or not len(counts):
        return []
    positive = np.flatnonzero(counts[:, 2] > 0)
    if len(positive):
        dice = M.image_dice(counts)[positive]
        order = positive[np.argsort(-dice, kind="stable")]
    else:
        order = np.argsort(counts[:, 1], kind="stable")
    n = min(n, len(order))
    n_best = math.ceil(n / 2)
    best, worst = order[:n_best], order[len(order) - (n - n_best):] if n > n_best else order[:0]
    return [(int(i), "best") for i in best] + [(int(i), "worst") for i in worst]


def _tables(ctx: EvalContext, methods: list[MethodResult], n_test: int) -> list[Table]:
    cols = fraction_columns(ctx.cfg.fractions)
    note = interval_note(ctx.cfg.ci, n_test, ctx.cfg.bootstrap, len(ctx.seeds), ctx.subsets_note)
    tables = []
    for key, title, reference in TABLES:
        t = make_table("segmentation", title, key, cols, note)
        for m in methods:
            cells = m.heads["decoder"]
            add_row(t, m.method.with_head("decoder"), {c.name: summary_cell(cells[c.name].summary[key]) for c in cols})
        if reference:  # what an empty mask everywhere scores here, the same in every column
            ref = methods[0].heads["decoder"][cols[0].name].summary[reference]
            add_row(t, Method("all-empty predictor (reference)", "all-empty"),
                    {c.name: Cell(value_cell(ref.value, ref.ci).text, ref) for c in cols})
        tables.append(t)
    return tables


def _overlay_picture(ctx, result: TaskResult, test_items: np.ndarray, true: np.ndarray, shown: list[dict],
                     methods: list[dict], target: str):
    """Image, true and predicted mask of the best and worst test images: overlays.png (the first
    method) and overlays.npz (every method, for the report); reads those image files only."""
    cases = shown[0]["cases"] if shown else []
    keep, images = [], []
    for j, (i, _) in enumerate(cases):
        view = input_view(ctx, test_items[i])
        if view is not None:
            keep.append(j)
            images.append(view)
    if not keep:
        return None
    ids = [str(ctx.data.items.id.iloc[test_items[cases[j][0]]]) for j in keep]
    rows = [(f"item {ids[n]} · {cases[j][1]} · Dice {shown[0]['dice'][j]:.2f}", images[n], true[cases[j][0]],
             shown[0]["pred"][j]) for n, j in enumerate(keep)]
    arrays = {"ids": np.array(ids), "kind": np.array([cases[j][1] for j in keep]),
              "image": np.stack([to_uint8(im) for im in images]), "true": true[[cases[j][0] for j in keep]] > 0,
              "method_names": np.array([m.method.name for m in methods])}
    for mi, s in enumerate(shown):
        pred, dice = overlay_keys(mi)
        arrays[pred] = np.stack([s["pred"][j] for j in keep]).astype(bool)
        arrays[dice] = np.array([s["dice"][j] for j in keep], np.float32)
    result.files["overlays"] = ctx.out / "overlays.npz"
    np.savez_compressed(result.files["overlays"], **arrays)
    title = (f"{target} · {methods[0].method.name} · {fraction_label(max(ctx.cfg.fractions))} labels, seed "
             f"{ctx.seeds[0]} · threshold {ctx.cfg.seg.threshold} · best and worst test images by Dice")
    return overlays(rows, ctx.out / "overlays.png", title)
