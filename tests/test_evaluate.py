"""Stage three: downstream evaluation from the cache, through the real CLI, plus its metrics."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.methods import Method
from stages.evaluate import metrics as M
from stages.evaluate import tables as T
from stages.evaluate.fractions import FractionTooSmallError, check_subset, plan_subsets, stratified_order
from pipeline.models.adaptor import Adaptor, AdaptorConfig
from pipeline.models.heads import MLPHead, SegDecoder, make_head, segmentation_loss
from tests.helpers import SMALL, SMALL_HEADS, SMALL_SEG, embed_json, make_eval_table, pipe

ONE_EPOCH = [*SMALL, "epochs=1"]
FAST = [*SMALL_HEADS, "bootstrap=200"]
FAST_SEG = [*SMALL_SEG, "bootstrap=100", "seg.overlays=3"]


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One small table embedded once, with a pooled and a tokens-mode Adaptor trained on it."""
    root = tmp_path_factory.mktemp("evaluate")
    table = make_eval_table(root / "data")
    cache = root / "cache"
    embed_json(table, cache)
    ckpts = {}
    for mode in ("pooled", "tokens"):
        pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(root / mode), *ONE_EPOCH, f"adaptor.mode={mode}", "adaptor.grid_pool=4")
        ckpts[mode] = root / mode / "last.safetensors"
    return {"table": table, "cache": cache, "root": root, **ckpts}


def evaluate(w, task: str, adaptor: str, out: Path, *extra: str, expect: int | None = 0):
    r = pipe("evaluate", "--task", task, "-d", str(w["table"]), "--adaptor", adaptor, "--cache", str(w["cache"]),
             "--out", str(out), *extra, expect=expect)
    return r, (json.loads((out / "results.json").read_text()) if expect == 0 else None)


# ------------------------------------------------------------------------------ metrics
def test_auroc_against_hand_computed_cases_with_ties():
    assert M.auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    # pos {0.5, 0.9} vs neg {0.5, 0.2}: the tie counts 1/2 -> (0.5 + 1 + 1 + 1) / 4
    assert M.auroc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert M.auroc([1, 0, 1, 0], [3, 3, 3, 3]) == pytest.approx(0.5)
    assert M.auroc([0, 1, np.nan, 1], [0.1, 0.9, 0.0, 0.8]) == pytest.approx(1.0)  # NaN label ignored
    assert np.isnan(M.auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    np.testing.assert_allclose(M.average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    fpr, tpr = M.roc_curve([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1.0])
    np.testing.assert_allclose(tpr, [0, 0.5, 1.0, 1.0])


def test_accuracy_and_macro_f1_by_hand():
    y, p = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 2, 0]
    assert M.accuracy(y, p) == pytest.approx(4 / 6)
    # F1: class 0 2/(2+1+1) = .5, class 1 4/(4+1+0) = .8, class 2 2/(2+0+1) = 2/3
    assert M.macro_f1(y, p) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert M.macro_f1([0, 0], [0, 1]) == pytest.approx((2 / 3 + 0) / 2)  # a class only predicted counts


def test_three_dice_conventions_the_all_empty_baseline_and_iou():
    true, pred = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    true[0, 0, :4] = True                      # A: 4 true px, 2 of them predicted + 2 extra px
    pred[0, 0, :2] = pred[0, 1, :2] = True
    pred[2, 3, :3] = True                      # C: empty truth, 3 px predicted
    true[3, 2, :2] = True                      # D: 2 true px, nothing predicted; B: empty and empty
    c = M.overlap_counts(pred, true)
    np.testing.assert_array_equal(c, [[2, 4, 4], [0, 0, 0], [0, 3, 0], [0, 0, 2]])
    assert M.dice_positive(c) == pytest.approx((0.5 + 0) / 2)              # A and D only
    assert M.dice_empty_is_one(c) == pytest.approx((0.5 + 1 + 0 + 0) / 4)   # B counts 1, C counts 0
    assert M.dice_all_empty_baseline(c) == pytest.approx(2 / 4)              # B and C are empty
    assert M.dice_global(c) == pytest.approx(2 * 2 / (7 + 6))
    assert M.iou_positive(c) == pytest.approx((2 / 6 + 0) / 2)
    assert M.iou_empty_is_one(c) == pytest.approx((2 / 6 + 1 + 0 + 0) / 4)
    # an all-empty predictor scores exactly the baseline under convention 2, and 0 on positives
    empty = M.overlap_counts(np.zeros_like(true), true)
    assert M.dice_empty_is_one(empty) == M.dice_all_empty_baseline(c) and M.dice_positive(empty) == 0


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_matches_explicit_resampling():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 80).astype(float)
    s = y * 0.8 + rng.normal(0, 0.6, 80)
    point = M.auroc(y, s)
    ci = M.bootstrap_ci(lambda w: M.auroc(y, s, w), 80, 500, seed=7)
    assert ci[0] <= point <= ci[1] and ci[1] - ci[0] > 0.01
    assert M.bootstrap_ci(lambda w: M.auroc(y, s, w), 80, 500, seed=7) == ci
    assert M.bootstrap_ci(lambda w: M.auroc(y, s, w), 80, 500, seed=8) != ci
    # a row of multiplicities is the same as the resampled data set
    idx = rng.integers(0, 80, 80)
    w = np.bincount(idx, minlength=80)[None].astype(float)
    assert M.auroc(y, s, w)[0] == pytest.approx(M.auroc(y[idx], s[idx]))
    t, p = rng.integers(0, 3, 80), rng.integers(0, 3, 80)
    assert M.macro_f1(t, p, w)[0] == pytest.approx(M.macro_f1(t[idx], p[idx]))


def test_a_biased_statistic_gets_an_interval_that_contains_its_estimate():
    """ECE of exactly calibrated predictions is 0, and every resample's ECE is above 0: the plain
    percentile interval misses its own estimate (as the demo's ``4.2 [4.7, 5.8]`` did). The
    re-centred interval contains it and keeps the spread; an unbiased metric (AUROC) is untouched."""
    conf = np.repeat(np.arange(15) / 15 + 1 / 30, 60)                  # 60 items in each of the 15 bins
    hits = np.concatenate([np.arange(60) < round(60 * c) for c in np.arange(15) / 15 + 1 / 30]).astype(float)
    n = len(conf)
    estimate = M.calibration_error(hits, conf)
    assert estimate < 0.01  # calibrated to within the rounding of 60 items per bin

    def ece(w):
        return {"ece": M.calibration_error(hits, conf, w)}
    naive = M.bootstrap_cis(ece, n, 400, seed=1, centred=())["ece"]
    fixed = M.bootstrap_cis(ece, n, 400, seed=1)["ece"]
    assert naive[0] > estimate                                          # the naive interval excludes it
    assert fixed[0] <= estimate <= fixed[1]
    assert fixed[0] == 0.0 and 0.3 * (naive[1] - naive[0]) < fixed[1] - estimate < naive[1]  # spread kept, clipped at 0
    y = (conf > 0.5).astype(float)
    auc = M.bootstrap_cis(lambda w: {"auroc": M.auroc(y, conf + hits, w)}, n, 200, seed=1)
    assert auc == M.bootstrap_cis(lambda w: {"auroc": M.auroc(y, conf + hits, w)}, n, 200, seed=1, centred=())


def test_every_table_says_what_its_interval_covers():
    many = T.interval_note(0.95, 409, 1000, seeds=3)
    assert "mean ± std over 3 seeds" in many and "409 test items" in many and "not the spread across seeds" in many
    assert "centred on the estimate" in T.interval_note(0.95, 409, 1000, seeds=3, centred=True)
    assert T.interval_note(0.95, 409, 1000).startswith("Cells: value [lo, hi]: 95% bootstrap interval")
    assert "no interval" in T.interval_note(0.95, 409, 0, seeds=3)
    table = T.make_table("", "t", "ece", ["1%"], note=many, unit="")
    T.add_row(table, Method("m", "adaptor"), {"1%": T.text_cell("4.2 ± 0.6 [3.1, 4.9]")})
    assert T.to_markdown(table).rstrip().endswith(f"_{many}_")
    merged = T.merge_tables([("d", [table])], ["run"])
    assert merged[0].note == many


def test_recall_ranks_by_hand_and_against_the_training_code():
    from pipeline.models.loss import retrieval_recall

    sim = np.array([[0.9, 0.1, 0.5], [0.8, 0.2, 0.9], [0.1, 0.3, 0.7]])
    np.testing.assert_array_equal(M.match_ranks(sim), [0, 2, 0])
    np.testing.assert_array_equal(M.match_ranks(sim.T), [0, 1, 1])
    assert M.recall_at(M.match_ranks(sim), 1) == pytest.approx(2 / 3)
    assert M.recall_at(M.match_ranks(sim.T), 2) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(30, 8)), rng.normal(size=(30, 8))
    ref = retrieval_recall(torch.from_numpy(img), torch.from_numpy(txt))
    s = img @ txt.T
    for k in (1, 5, 10):
        assert M.recall_at(M.match_ranks(s), k) == pytest.approx(ref[f"i2t_R@{k}"])
        assert M.recall_at(M.match_ranks(s.T), k) == pytest.approx(ref[f"t2i_R@{k}"])


# ---------------------------------------------------------------------------- fractions
def _multilabel(n=1000, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((n, 3)) < [0.3, 0.1, 0.02]).astype(float)


def test_fractions_are_nested_deterministic_and_stratified():
    y = _multilabel()
    names = ["a", "b", "c"]
    subsets = plan_subsets(y, names, [0.01, 0.1, 1.0], [5])[5]
    a, b, c = (set(subsets[f]) for f in (0.01, 0.1, 1.0))
    assert a <= b <= c and len(c) == 1000 and (len(a), len(b)) == (10, 100)
    again = plan_subsets(y, names, [0.01, 0.1, 1.0], [5])[5]
    assert all(np.array_equal(subsets[f], again[f]) for f in subsets)
    assert not np.array_equal(plan_subsets(y, names, [0.1], [6])[6][0.1], subsets[0.1])
    assert (y[subsets[0.01]].sum(0) >= 1).all()            # even the rare (2%) label has a positive at 1%
    assert (y[subsets[0.01]] == 0).any(0).all()             # and every label a negative
    np.testing.assert_allclose(y[subsets[0.1]].mean(0), y.mean(0), atol=0.03)  # about the full prevalence


def test_a_fraction_too_small_for_a_label_names_it_and_a_larger_fraction():
    y = _multilabel()
    order, front = stratified_order(y, seed=0)
    with pytest.raises(FractionTooSmallError) as e:
        check_subset(y[order[:2]], ["a", "b", "rare"], 0.002, 1000, front)
    msg = str(e.value)
    assert "'b'" in msg or "'rare'" in msg
    assert "larger fraction" in msg and f"{front / 1000:.3g}" in msg


# ------------------------------------------------------------------------ heads, adaptor
def test_the_paper_mlp_head_and_the_decoder_shapes():
    head = make_head("mlp", 96, 3)
    kinds = [type(m).__name__ for m in head]
    assert kinds == ["Dropout", "Linear", "BatchNorm1d", "ReLU", "Dropout", "Linear"]
    assert head[1].bias is None and head[1].out_features == 512 and isinstance(head, MLPHead)
    probe = make_head("linear", 96, 3)  # MAE's linear probe: parameter-free BatchNorm, then Linear
    assert [type(m).__name__ for m in probe] == ["BatchNorm1d", "Linear"] and not probe[0].affine
    for grid in (14, 16, 4):
        dec = SegDecoder(32, grid, 224, (16, 8))
        out = dec(torch.randn(2, 32, grid, grid))
        assert out.shape == (2, 224, 224)
    target = torch.zeros(2, 224, 224)
    target[0, :20, :20] = 1
    assert torch.isfinite(segmentation_loss(out, target))


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_adaptor_and_head_predictions_do_not_depend_on_the_batch(mode):
    torch.manual_seed(0)
    adaptor = Adaptor(AdaptorConfig(mode=mode, image_dim=24, text_dim=16, d_model=32, n_heads=4, ffn_dim=64)).eval()
    head = make_head("mlp", 32, 2).eval()
    x = torch.randn(12, 24) if mode == "pooled" else torch.randn(12, 1 + 16, 24)

    def predict(batch):
        with torch.no_grad():
            return head(adaptor.encode_image(batch, image_grid=(4, 4), n_prefix=1))

    full = predict(x)
    perm = torch.randperm(12)
    torch.testing.assert_close(predict(x[perm]), full[perm], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.cat([predict(x[:5]), predict(x[5:])]), full, rtol=1e-5, atol=1e-6)


def test_pooled_text_output_depends_on_the_text_alone():
    """Why a pooled Adaptor's text embeddings can be cached per report (retrieval, prompts)."""
    torch.manual_seed(0)
    a = Adaptor(AdaptorConfig(image_dim=24, text_dim=16, d_model=32, n_heads=4, ffn_dim=64)).eval()
    txt = torch.randn(5, 16)
    with torch.no_grad():
        i1, t1 = a({"image_pooled": torch.randn(5, 24), "text_pooled": txt})
        i2, t2 = a({"image_pooled": torch.zeros(5, 24), "text_pooled": txt})
        img = torch.randn(5, 24)
        i3, _ = a({"image_pooled": img, "text_pooled": txt})
        torch.testing.assert_close(t1, t2)
        torch.testing.assert_close(i3, a.encode_image(img))


def test_masks_get_the_encoders_geometry():
    """A mask aligned with align_mask covers the same pixels as its image after Preprocess."""
    from pipeline.datasets.mask_targets import align_mask
    from pipeline.imaging import Preprocess

    img = np.zeros((120, 90), np.float32)
    img[70:100, 10:40] = 1.0
    pre = Preprocess(resize_size=256, input_size=224, mean=(0.5,) * 3, std=(0.5,) * 3)
    seen = (pre(img)[0] * 0.5 + 0.5).numpy() > 0.5
    aligned = align_mask(img > 0.5, 256, 224)
    assert aligned.shape == (224, 224)
    iou = (seen & aligned).sum() / (seen | aligned).sum()
    assert iou > 0.95


# ----------------------------------------------------------------------- end to end (CLI)
def test_classification_end_to_end_with_heads_lrs_seeds_and_baseline(world, tmp_path):
    out = tmp_path / "cls"
    r, res = evaluate(world, "classification", str(world["pooled"]), out, "--fraction", "0.25", "0.5", "1.0",
                      "--head", "mlp", "--head", "linear", "--seeds", "2", "--baseline",
                      "labels=[effusion,nodule]", "heads.lrs=[1e-3,1e-4]", *FAST)
    assert res["task"] == "classification" and res["checkpoint"]["hash"] and len(res["checkpoint"]["hash"]) == 32
    assert res["fingerprints"]["image"] and res["config"]["heads"]["lrs"] == [1e-3, 1e-4]
    assert res["data"]["label_type"] == "multilabel" and res["data"]["splits"] == {"train": 24, "valid": 12, "test": 12}
    assert res["data"]["fractions"] == {"25%": {"0": 6, "1": 6}, "50%": {"0": 12, "1": 12}, "100%": {"0": 24, "1": 24}}
    names = [m["name"] for m in res["methods"]]
    assert names == ["Adaptor (pooled) tiny-vit + tiny-bert", "no Adaptor tiny-vit"]
    cell = res["methods"][0]["heads"]["linear"]["50%"]
    assert [r_["seed"] for r_ in cell["runs"]] == [0, 1] and all(r_["lr"] in (1e-3, 1e-4) for r_ in cell["runs"])
    s = cell["summary"]["macro_auroc"]
    vals = [r_["test"]["macro_auroc"] for r_ in cell["runs"]]
    assert s["mean"] == pytest.approx(np.mean(vals)) and s["std"] == pytest.approx(np.std(vals, ddof=1))
    assert set(cell["summary"]) == {"macro_auroc", "ece", "auroc/effusion", "auroc/nodule"}
    macro = next(t for t in res["tables"] if t["metric"] == "macro_auroc")
    assert macro["columns"] == ["25%", "50%", "100%"]
    assert [row["method"] for row in macro["rows"]] == [
        "Adaptor (pooled) tiny-vit + tiny-bert (mlp)", "Adaptor (pooled) tiny-vit + tiny-bert (linear)",
        "no Adaptor tiny-vit (mlp)", "no Adaptor tiny-vit (linear)"]
    assert "±" in macro["rows"][0]["cells"]["100%"] and "[" in macro["rows"][0]["cells"]["100%"]
    md = (out / "results.md").read_text()
    assert "| Adaptor (pooled) tiny-vit + tiny-bert (mlp) |" in md and "| method | 25% | 50% | 100% |" in md
    for f in ("roc.png", "predictions.npz", "config.yaml"):
        assert (out / f).stat().st_size > 0, f
    subsets = json.loads((out / "subsets.json").read_text())
    assert set(subsets["0"]["0.25"]) <= set(subsets["0"]["0.5"]) and len(subsets["1"]["0.25"]) == 6
    preds = np.load(out / "predictions.npz")
    assert preds["m0/mlp/100%/seed1"].shape == (12, 2)


def test_second_run_reads_adaptor_outputs_from_the_cache(world, tmp_path, monkeypatch):
    import shutil

    shutil.rmtree(world["cache"] / "adaptor-outputs", ignore_errors=True)
    args = ("--fraction", "1.0", "--seeds", "1", "labels=[effusion]", *FAST)
    r1, res1 = evaluate(world, "classification", str(world["pooled"]), tmp_path / "a", *args)
    assert res1["checkpoint"]["adaptor_forwards"] == {"image_pooled": 48} and "(cached)" not in r1.output

    def boom(*a, **k):
        raise AssertionError("the Adaptor ran although its outputs are cached")

    monkeypatch.setattr(Adaptor, "encode_image", boom)
    r2, res2 = evaluate(world, "classification", str(world["pooled"]), tmp_path / "b", "--head", "linear", *args)
    assert "adaptor forwards: 0 (cached)" in r2.output
    assert res2["checkpoint"]["adaptor_forwards"] == {"image_pooled": 0}
    folder = Path(res2["checkpoint"]["adaptor_outputs"])
    assert folder.name == f"{res2['checkpoint']['hash'][:16]}-{res2['fingerprints']['image'][:16]}"
    assert (folder / "image_pooled.npz").exists()


def test_multiclass_label_reports_accuracy_and_macro_f1(world, tmp_path):
    _, res = evaluate(world, "classification", "none", tmp_path / "mc", "-b", "tiny-vit", "--fraction", "1.0",
                      "--seeds", "1", "labels=[grade]", *FAST)
    assert res["data"]["label_type"] == "multiclass" and res["data"]["labels"] == ["grade=0", "grade=1", "grade=2"]
    assert [t["metric"] for t in res["tables"]] == ["accuracy", "macro_f1", "ece"]
    assert res["checkpoint"] is None and res["methods"][0]["name"] == "no Adaptor tiny-vit"
    assert 0 <= res["methods"][0]["heads"]["mlp"]["100%"]["summary"]["accuracy"]["mean"] <= 1


def test_segmentation_end_to_end_reports_the_dice_conventions(world, tmp_path):
    out = tmp_path / "seg"
    r, res = evaluate(world, "segmentation", str(world["tokens"]), out, "--fraction", "0.5", "1.0",
                      "--seeds", "1", *FAST_SEG)
    assert res["data"]["target"] == "effusion" and res["data"]["mask_size"] == 224
    assert res["data"]["positive_masks"] == {"train": 8, "valid": 4, "test": 4}
    summary = res["methods"][0]["heads"]["decoder"]["100%"]["summary"]
    assert set(summary) == set(M.SEGMENTATION_METRICS)
    assert summary["dice_all_empty_baseline"]["mean"] == pytest.approx(8 / 12)  # 8 of 12 test masks are empty
    assert res["methods"][0]["feature_shape"] == [32, 4, 4]  # tokens-mode Adaptor, grid pooled to 4x4
    conv2 = next(t for t in res["tables"] if t["metric"] == "dice_empty_is_one")
    assert conv2["rows"][-1]["method"] == "all-empty predictor (reference)"
    assert conv2["rows"][-1]["cells"]["100%"].startswith("66.7")
    assert {t["metric"] for t in res["tables"]} >= {"dice_positive", "dice_empty_is_one", "iou_positive"}
    assert (out / "overlays.png").stat().st_size > 0 and res["data"]["mask_files_read"] == 48
    r2, res2 = evaluate(world, "segmentation", "none", tmp_path / "seg2", "-b", "tiny-vit", "--fraction", "1.0",
                        "--seeds", "1", *FAST_SEG)
    assert res2["data"]["mask_files_read"] == 0 and "all from the mask cache" in r2.output
    assert res2["methods"][0]["feature_shape"] == [96, 14, 14]  # raw tiny-vit patch grid


def test_pooled_adaptor_segmentation_says_it_uses_raw_patch_tokens(world, tmp_path):
    _, res = evaluate(world, "segmentation", str(world["pooled"]), tmp_path / "seg", "--fraction", "1.0",
                      "--seeds", "1", *FAST_SEG)
    assert "raw patch tokens" in res["methods"][0]["name"]
    assert any("no per-token path" in n for n in res["notes"])


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_retrieval_with_and_without_the_adaptor(world, tmp_path, mode):
    _, res = evaluate(world, "retrieval", str(world[mode]), tmp_path / "ret", "bootstrap=100", "rerank_k=5")
    table = res["tables"][0]
    assert table["columns"][0] == "image→text R@1" and len(table["columns"]) == 6
    adaptor, *reranked, linear, baseline = res["methods"]
    assert set(adaptor["recall"]) == {f"{d} R@{k}" for d in ("image→text", "text→image") for k in (1, 5, 10)}
    assert 1 >= adaptor["recall"]["image→text R@10"] >= adaptor["recall"]["image→text R@5"] >= 0
    assert linear["features"] == "linear-map" and set(linear["recall"]) == set(adaptor["recall"])
    assert baseline["applicable"] is False and "96-d" in baseline["note"] and "64-d" in baseline["note"]
    n = len(res["methods"])
    assert table["rows"][n - 2]["method"].startswith("linear map, least squares")
    assert table["rows"][n - 1]["cells"]["image→text R@1"] == "n/a"
    assert table["rows"][n]["method"] == "chance (12 candidates)"
    if mode == "tokens":  # the matching head re-ranks each query's top 5: recall@K for K >= 5 is unchanged
        (rr,) = reranked
        assert "ITM re-rank of top 5" in rr["name"]
        for d in ("image→text", "text→image"):
            for k in (5, 10):
                assert rr["recall"][f"{d} R@{k}"] == adaptor["recall"][f"{d} R@{k}"]
    else:
        assert reranked == []
    assert (tmp_path / "ret" / "recall.png").exists()


def test_no_adaptor_similarity_is_the_cosine_of_raw_features_when_widths_agree(world, tmp_path):
    from pipeline.config import load_config
    from stages.evaluate.features import raw_features
    from stages.evaluate.retrieve import raw_similarity
    from stages.evaluate.stage import EvalConfig, _context

    cfg = load_config(EvalConfig, None, ["task=retrieval", f"dataset={world['table']}", "adaptor=none",
                                         "backbone=tiny-vit", "text_encoder=tiny-bert", f"cache={world['cache']}",
                                         f"out={tmp_path}"])
    ctx = _context(cfg)
    rows = ctx.image_rows[:5]
    sim, why = raw_similarity(ctx, rows, ctx.data.image, rows)  # the image store as "text": same width
    feats = raw_features(ctx.data.image, rows).astype(np.float64)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(sim, feats @ feats.T, atol=1e-9)
    assert "measure no alignment" in why
    sim, why = raw_similarity(ctx, rows, ctx.data.text, ctx.data.text_rows[:5])
    assert sim is None and "not applicable" in why


def test_zero_shot_prompts_are_embedded_into_the_text_cache_once(world, tmp_path, monkeypatch):
    prompts = tmp_path / "prompts.yaml"
    prompts.write_text("effusion:\n  positive: [There is a pleural effusion.]\n  negative: [No pleural effusion.]\n"
                       "nodule:\n  positive: [A lung nodule.]\n  negative: [No nodules.]\n"
                       "pneumothorax:\n  positive: [Pneumothorax.]\n  negative: [No pneumothorax.]\n")
    _, res = evaluate(world, "zero-shot", str(world["pooled"]), tmp_path / "zs", f"prompts={prompts}",
                      "bootstrap=100")
    assert res["data"]["findings"] == ["effusion", "nodule"]
    table = res["tables"][0]
    assert table["columns"] == ["effusion", "nodule", "macro"]
    auroc = res["methods"][0]["auroc"]
    assert all(0 <= auroc[k] <= 1 for k in ("effusion", "nodule")) and auroc["macro"] == pytest.approx(
        (auroc["effusion"] + auroc["nodule"]) / 2)
    from cache.keys import text_key
    from cache.store import Store

    keys = set(Store.open(next((world["cache"] / "stores" / "text").iterdir())).manifest().column("key").to_pylist())
    assert text_key("There is a pleural effusion.") in keys
    import pipeline.encoders as encoders

    monkeypatch.setattr(encoders, "create_encoder", lambda *a, **k: pytest.fail("prompts were embedded twice"))
    _, again = evaluate(world, "zero-shot", str(world["tokens"]), tmp_path / "zs2", f"prompts={prompts}",
                        "bootstrap=100")
    assert again["methods"][0]["auroc"]["effusion"] >= 0 and (tmp_path / "zs2" / "roc.png").exists()


def test_tokens_mode_text_embeddings_and_match_scores_are_the_models(world):
    """Retrieval's tokens-mode figures come from the model's own unimodal text path and
    matching head, fed the cached tokens with their real-token masks."""
    from stages.evaluate.features import FrozenAdaptor
    from stages.train.loader import PairLoader
    from cache.pairs import load_pairs

    a = FrozenAdaptor.load(world["tokens"], torch.device("cpu"), world["cache"])
    name = json.loads((next((world["cache"] / "datasets").iterdir()) / "dataset.json").read_text())["name"]
    data = load_pairs(world["cache"], name, str(world["table"]), "tiny-vit", "tiny-bert")
    img_rows, txt_rows = data.image_rows[:4, 0], data.text_rows[:4]
    pairs = np.array([[0, 1], [2, 2], [3, 0], [1, 3], [0, 1]])
    scores = a.match_scores(data.image, img_rows, data.text, txt_rows, pairs)
    txt = a.text_embeddings(data.text, txt_rows)
    batch = next(PairLoader(data, np.arange(4), "tokens", 4, torch.device("cpu"), views=False).batches(None))
    # the references below run on the reports padded as cached; evaluation cuts them to the longest report
    assert int(batch["text_mask"].sum(1).max()) < batch["text_tokens"].shape[1]
    grid, n_prefix = a.grid
    with torch.no_grad():
        img_emb, txt_emb = a.model(batch, image_grid=grid, n_prefix=n_prefix)
        it = a.model.image_token_states(batch["image_tokens"], grid, n_prefix)
        tt = a.model.text_token_states(batch["text_tokens"], batch["text_mask"])
        ref = a.model.match_logits(it[pairs[:, 0]], tt[pairs[:, 1]], batch["text_mask"][pairs[:, 1]])
    np.testing.assert_allclose(txt, txt_emb.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.image_embeddings(data.image, img_rows), img_emb.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(scores, ref.numpy(), rtol=1e-4, atol=1e-5)
    # the same pair at two positions of one batch: equal up to the batched CPU kernels' rounding (1 ulp
    # seen once the default loss weighting changed the trained weights)
    np.testing.assert_allclose(scores[0], scores[4], rtol=1e-6, atol=0)


def test_report_gathers_runs_into_one_table(world, tmp_path):
    args = ("--fraction", "0.5", "1.0", "--seeds", "1", "labels=[effusion]", *FAST)
    evaluate(world, "classification", str(world["pooled"]), tmp_path / "a", *args)
    evaluate(world, "classification", "none", tmp_path / "b", "-b", "tiny-vit", *args)
    r = pipe("report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "t.md"))
    md = (tmp_path / "t.md").read_text()
    assert "| method | 50% | 100% |" in md
    assert "| Adaptor (pooled) tiny-vit + tiny-bert (mlp) |" in md and "| no Adaptor tiny-vit (mlp) |" in md
    assert "AUROC" in r.output


# -------------------------------------------------------------------------------- errors
def test_a_dataset_without_labels_or_masks_is_refused_with_the_fix(tmp_path):
    table = make_eval_table(tmp_path / "d", n=8, with_labels=False)
    df = pd.read_csv(table).drop(columns=["mask_effusion"])
    df.to_csv(table, index=False)
    cache = tmp_path / "c"
    embed_json(table, cache)
    for task, words in (("classification", "has no labels"), ("segmentation", "has no masks"),
                        ("zero-shot", "has no labels")):
        r = pipe("evaluate", "--task", task, "-d", str(table), "-a", "none", "-b", "tiny-vit", "-t", "tiny-bert",
                 "--cache", str(cache), "--out", str(tmp_path / task), expect=2)
        assert words in r.output and "pipe embed" in r.output, r.output
        assert not (tmp_path / task).exists()  # a refused run leaves no directory behind


def test_a_fraction_too_small_is_refused_naming_the_label(world, tmp_path):
    r, _ = evaluate(world, "classification", "none", tmp_path / "x", "-b", "tiny-vit", "--fraction", "0.05",
                    "labels=[effusion,nodule]", expect=2)
    assert "label fraction 0.05" in r.output and "has no" in r.output and "larger fraction" in r.output


def test_a_checkpoint_from_other_embeddings_is_refused(world, tmp_path):
    from pipeline.models.checkpoint import read_meta, save_checkpoint
    from safetensors.torch import load_file

    meta = read_meta(world["pooled"])
    meta["fingerprints"] = {**meta["fingerprints"], "image": "0" * 32}
    model = Adaptor(AdaptorConfig(**meta["config"]["adaptor"]))
    model.load_state_dict(load_file(str(world["pooled"])))
    bad = tmp_path / "other.safetensors"
    save_checkpoint(bad, model, meta)
    r, _ = evaluate(world, "classification", str(bad), tmp_path / "x", expect=2)
    assert "trained on other embeddings" in r.output and "00000000" in r.output
    r, _ = evaluate(world, "classification", str(world["pooled"]), tmp_path / "y", "-b", "tiny-bert", expect=2)
    assert "differs from the checkpoint's encoder" in r.output


def test_masks_of_the_wrong_size_are_refused_naming_the_item(tmp_path):
    table = make_eval_table(tmp_path / "d", n=8, mask_shape=(32, 32))
    cache = tmp_path / "c"
    embed_json(table, cache)
    r = pipe("evaluate", "--task", "segmentation", "-d", str(table), "-a", "none", "-b", "tiny-vit",
             "--cache", str(cache), "--out", str(tmp_path / "x"), expect=2)
    assert "item 'e0'" in r.output and "32x32" in r.output and "72x64" in r.output
    assert "re-export the mask" in r.output


def test_bare_numbers_are_fractions_and_anything_else_is_refused(world, tmp_path):
    r = pipe("evaluate", "--task", "classification", "-d", str(world["table"]), "-a", "none", "-b", "tiny-vit",
             "--cache", str(world["cache"]), "--fraction", "1.0", "oops", expect=2)
    assert "neither a label fraction" in r.output
    from cli.evaluate import split_fractions

    assert split_fractions(["0.01,0.1"], ["1.0", "seeds=2"]) == ([0.01, 0.1, 1.0], ["seeds=2"])


# ------------------------------------------------------------------------------- beyond the paper
def test_expected_calibration_error_by_hand():
    # two bins used (15 bins): confidences 0.2 (2 items, 1 positive) and 0.9 (2 items, 2 positive)
    y, p = np.array([0.0, 1.0, 1.0, 1.0]), np.array([0.2, 0.2, 0.9, 0.9])
    # bin 0.2: |0.2 - 0.5| * 2/4 = 0.15; bin 0.9: |0.9 - 1.0| * 2/4 = 0.05
    assert M.calibration_error(y, p) == pytest.approx(0.20)
    assert M.binary_ece(y[:, None], p[:, None]) == pytest.approx(0.20)
    w = np.array([[1, 1, 1, 1], [0, 2, 2, 0]], float)  # the second resample: one item per bin, twice
    np.testing.assert_allclose(M.calibration_error(y, p, w), [0.20, 0.5 * 0.8 + 0.5 * 0.1])
    onehot = np.eye(3)[[0, 1, 2, 2]]
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    # top-class confidences 0.7 (right), 0.6 (wrong), 0.8, 0.8 (both right)
    assert M.top_class_ece(onehot, probs) == pytest.approx((0.3 + 0.6 + 2 * 0.2) / 4)
    assert np.isnan(M.calibration_error(np.array([np.nan]), np.array([0.5])))


def test_the_lbfgs_probe_reaches_the_optimum_and_validation_picks_its_strength():
    """At the probe's solution the regularised objective's gradient vanishes; the best strength on validation wins."""
    import torch.nn.functional as F

    from pipeline.models.heads import make_head
    from stages.evaluate.head_bank import fit_probes, predict

    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g) * torch.linspace(0.5, 3, 16) + 2.0   # unstandardised on purpose
    w = torch.randn(16, 2, generator=g)
    y = (x @ w + torch.randn(600, 2, generator=g) * 3 > (x @ w).median(0).values).float()
    y[::7, 1] = float("nan")                                                      # unknown labels are masked out

    def loss(logits, t):
        known = ~torch.isnan(t)
        return F.binary_cross_entropy_with_logits(logits[known], t[known])

    xv, yv = x[400:], y[400:]
    chosen = []

    def score(module):
        out = torch.from_numpy(predict(module, xv))
        value = float(loss(out, yv))
        chosen.append(value)
        return -value, value                                                      # higher is better: minus the loss

    head, sweep = fit_probes(lambda: make_head("probe", 16, 2), [1e-4, 1e-2, 10.0], x[:400], y[:400], loss, score,
                             has_val=True)
    assert set(sweep) == {"probe@l2=0.0001", "probe@l2=0.01", "probe@l2=10"}
    assert head.lr == [1e-4, 1e-2, 10.0][int(np.argmin(chosen))] and head.record()["l2"] == head.lr
    bn, lin = head.module[0], head.module[1]
    assert torch.allclose(bn.running_mean, x[:400].mean(0), atol=1e-5)           # standardised by the train split
    z = ((x[:400] - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)).detach()
    W = lin.weight.detach().clone().requires_grad_(True)
    b = lin.bias.detach().clone().requires_grad_(True)
    objective = loss(z @ W.T + b, y[:400]) + head.lr * W.pow(2).sum()
    gw, gb = torch.autograd.grad(objective, (W, b))
    assert float(gw.abs().max()) < 1e-4 and float(gb.abs().max()) < 1e-4
    assert chosen[2] > min(chosen[:2])                                          # a strength too strong loses on validation


def test_classification_with_the_probe_head_end_to_end(world, tmp_path):
    out = tmp_path / "probe"
    _, res = evaluate(world, "classification", str(world["pooled"]), out, "--fraction", "1.0", "--head", "probe",
                      "--head", "linear", "labels=[effusion,nodule]", "heads.probe_l2s=[1e-3,1e-1]", *FAST)
    probe = res["methods"][0]["heads"]["probe"]["100%"]
    run = probe["runs"][0]
    assert run["l2"] in (1e-3, 1e-1) and run["steps"] >= 1
    assert 0.0 <= probe["summary"]["macro_auroc"]["mean"] <= 1.0
    assert {"probe@l2=0.001", "probe@l2=0.1"} <= set(run["sweep"])
    bad = evaluate(world, "classification", str(world["pooled"]), tmp_path / "bad", "heads.probe_l2s=[]", expect=2)[0]
    assert "probe_l2s" in bad.output


def test_classification_reports_calibration_beside_auroc(world, tmp_path):
    _, res = evaluate(world, "classification", str(world["pooled"]), tmp_path / "cls", "seeds=1",
                      "fractions=[1.0]", "heads.min_steps=20", "bootstrap=50")
    titles = [t["title"] for t in res["tables"]]
    assert any("expected calibration error" in t for t in titles)
    ece = res["methods"][0]["heads"]["mlp"]["100%"]["summary"]["ece"]
    assert 0.0 <= ece["mean"] <= 1.0 and len(ece["ci"]) == 2


def test_the_linear_map_baseline_recovers_a_linear_relation(monkeypatch):
    """On features where text = image @ A (plus a little noise), the least-squares map
    retrieves every pair, and λ is chosen on the validation pairs."""
    from types import SimpleNamespace

    from stages.evaluate import retrieve

    rng = np.random.default_rng(0)
    n, di, dt = 120, 16, 12
    img = rng.normal(size=(n, di))
    txt = img @ rng.normal(size=(di, dt)) + 0.01 * rng.normal(size=(n, dt))
    stores = {"image": img, "text": txt}
    monkeypatch.setattr(retrieve, "raw_features", lambda store, rows, kind="pooled": stores[store][rows])
    split = np.array(["train"] * 80 + ["valid"] * 20 + ["test"] * 20)
    ctx = SimpleNamespace(data=SimpleNamespace(image="image", text="text", text_rows=np.arange(n)),
                          image_rows=np.arange(n), note=lambda m: None,
                          positions=lambda: {s: np.flatnonzero(split == s) for s in ("train", "valid", "test")})
    w, lam = retrieve.fit_linear_map(ctx)
    assert w.shape == (di, dt) and lam in retrieve.RIDGES
    test = np.flatnonzero(split == "test")
    sim = retrieve.linear_map_similarity(ctx, test, "text", test)
    assert (sim.argmax(1) == np.arange(len(test))).all()


def test_the_run_keeps_the_checkpoint_with_the_lowest_validation_loss(world, tmp_path):
    import pandas as pd

    from pipeline.models.checkpoint import read_meta
    from stages.evaluate.features import resolve_checkpoint

    run = tmp_path / "run"
    pipe("train-adaptor", "-d", str(world["table"]), "-b", "tiny-vit", "-t", "tiny-bert", "--cache",
         str(world["cache"]), "--out", str(run), "epochs=6", "batch_size=8", "adaptor.d_model=32", "adaptor.n_heads=2",
         "adaptor.ffn_dim=32", "optim.lr=3e-3")
    metrics = pd.read_csv(run / "metrics.csv")
    meta = read_meta(run / "best.safetensors")
    assert meta["val_loss"] == pytest.approx(metrics.val_loss.min(), rel=1e-6)
    assert meta["epoch"] == int(metrics.epoch[metrics.val_loss.idxmin()])
    assert resolve_checkpoint(run) == run / "best.safetensors"
    assert resolve_checkpoint(run / "last.safetensors") == run / "last.safetensors"


def test_row_views_index_like_copies_without_copying():
    from stages.evaluate.head_bank import Rows

    base = torch.arange(40.0).reshape(10, 4)
    pos = np.array([7, 2, 5, 9])
    view, copy = Rows(base, pos), base[pos]
    assert len(view) == 4 and view.shape == (4, 4) and view.base is base
    for key in (slice(1, 3), torch.tensor([3, 0]), [2, 2], np.array([1])):
        assert torch.equal(view[key], copy[key])
    sub = view.subset([3, 1])
    assert torch.equal(sub[torch.arange(2)], copy[[3, 1]]) and sub.base is base


def test_the_authors_head_schedule_steps_per_epoch_and_min_delta_counts_patience():
    """``epoch-restarts`` is the authors' head schedule: a cosine stepped once per epoch whose period
    is 0.4 of the run counted in one GPU's steps; with ``min_delta`` a validation that beats the best
    by less keeps its weights but does not reset patience (Lightning's checkpoint and early stop)."""
    import math

    from stages.evaluate.head_bank import FitSettings, Head, HeadBank

    torch.manual_seed(0)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20, 1)).float()
    scores = iter([0.5, 0.5005, 0.5008, 0.9, 0.9])
    seen = []
    head = Head("linear", 0.1, torch.nn.Linear(3, 1))

    def score(module):
        seen.append(head.opt.param_groups[0]["lr"])
        return next(scores), 0.0

    settings = FitSettings(epochs=6, batch_size=4, weight_decay=0.0, patience=2, restart_epochs=1, seed=0,
                           min_steps=1, schedule_name="epoch-restarts", restart_frac=0.4, replicas=2,
                           min_delta=1e-3, val_every=1)
    best = HeadBank([head], torch.nn.functional.binary_cross_entropy_with_logits, score, settings).fit(x, y, True)
    period = int(0.4 * math.ceil(20 / 2) * 6)  # 24 epochs: one GPU's 10 steps per epoch, 6 epochs
    expected = [1e-8 + (0.1 - 1e-8) * (1 + math.cos(math.pi * e / period)) / 2 for e in (1, 2, 3)]
    assert seen == pytest.approx(expected, rel=1e-9)   # stepped once per epoch, not per step
    assert best["linear"].best_epoch == 3 and len(seen) == 3  # 0.5008 is kept, but patience ran out


def test_segmentation_as_the_authors_balanced_negatives_and_their_dice_picks_the_epoch(world, tmp_path):
    """``seg.balance_negatives``: the decoder trains on the non-empty training masks and as many empty
    ones, drawn as MGCA's SIIM dataset draws them; ``seg.select`` picks each decoder's epoch on the
    authors' Dice (empty on empty = 1); ``seg.val_every`` validates every k epochs."""
    out = tmp_path / "bal"
    r, res = evaluate(world, "segmentation", "none", out, "-b", "tiny-vit", "--fraction", "1.0", "--seeds", "1",
                      *FAST_SEG, "seg.balance_negatives=true", "seg.select=dice_empty_is_one", "seg.val_every=2",
                      "seg.epochs=4", "seg.min_steps=1", "seg.max_steps=0")
    n_pos = res["data"]["positive_masks"]["train"]
    run = res["methods"][0]["heads"]["decoder"]["100%"]["runs"][0]
    assert run["n_train"] == 2 * n_pos and res["data"]["balanced_negatives"] is True
    assert "val_dice_empty_is_one" in run and run["best_epoch"] in (2, 4)
    subset = json.loads((out / "subsets.json").read_text())["0"]["1"]
    assert len(subset) == 2 * n_pos and any("balance_negatives" in n for n in res["notes"])


def test_segmentation_trains_on_views_whose_masks_moved_alike(world, tmp_path):
    """``seg.augment``: a store of ``tiny-vit-ssr`` views (the authors' ShiftScaleRotate) feeds the
    decoders its views with their moved masks; a store whose views a mask cannot follow is refused,
    naming the command that makes the right one."""
    cache = tmp_path / "cache"
    embed_json(world["table"], cache, "--backbone", "tiny-vit-ssr", "--text-encoder", "none", "--views", "2")
    w = {**world, "cache": cache}
    r, res = evaluate(w, "segmentation", "none", tmp_path / "aug", "-b", "tiny-vit-ssr", "--fraction", "1.0",
                      "--seeds", "1", *FAST_SEG, "seg.augment=true", "seg.augment_p=0.5")
    assert res["data"]["augmented_views"] == {"views": 2, "p": 0.5}
    n_train = res["data"]["splits"]["train"]
    assert f"2 cached shift-scale-rotate views of each of {n_train} training images (0 absent" in r.stderr
    assert res["config"]["seg"]["augment"] is True
    r, _ = evaluate(world, "segmentation", "none", tmp_path / "crop", "-b", "tiny-vit", "--fraction", "1.0",
                    *FAST_SEG, "seg.augment=true", expect=2)
    assert "a crop a mask cannot follow" in r.output and "--backbone tiny-vit-ssr --views 4" in r.output


def test_view_draws_take_tokens_and_mask_from_the_same_view():
    """Each drawn image is its plain row with probability 1 - p, else one of its views, its tokens
    and its mask always from the same one; the draws are seeded."""
    from stages.evaluate.head_bank import Rows
    from stages.evaluate.seg_views import ViewDraw

    n, k = 10, 3
    x = torch.arange(n, dtype=torch.float16).view(n, 1, 1, 1).expand(n, 2, 2, 2).contiguous()
    y = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 4, 4).contiguous()
    tag = (100 + 10 * torch.arange(k).view(k, 1) + torch.arange(n).view(1, n))   # view v of image j: 100 + 10v + j
    xv = tag.to(torch.float16).view(k, n, 1, 1, 1).expand(k, n, 2, 2, 2).contiguous()
    yv = tag.to(torch.uint8).view(k, n, 1, 1).expand(k, n, 4, 4).contiguous()
    sub = np.array([1, 3, 4, 8])
    idx = torch.tensor([0, 1, 2, 3, 3, 2])

    def draw(p: float, seed: int = 0):
        d = ViewDraw(Rows(x).subset(sub), Rows(y).subset(sub), xv, yv, torch.as_tensor(sub), p, seed)
        return [d(idx) for _ in range(20)]

    for xb, yb in draw(0.0):
        assert torch.equal(xb[:, 0, 0, 0], torch.tensor(sub)[idx].float()) and torch.equal(yb[:, 0, 0], xb[:, 0, 0, 0].byte())
    seen = set()
    for xb, yb in draw(1.0):
        assert torch.equal(xb[:, 0, 0, 0].byte(), yb[:, 0, 0])              # tokens and mask of one view
        assert torch.equal(xb[:, 0, 0, 0].long() % 10, torch.tensor(sub)[idx])   # of the image asked for
        seen |= set(((xb[:, 0, 0, 0].long() - 100) // 10).tolist())
    assert seen == set(range(k))
    mixed = torch.cat([xb[:, 0, 0, 0] for xb, _ in draw(0.5)])
    assert 0.3 < (mixed >= 100).float().mean() < 0.7
    assert all(torch.equal(a[0], b[0]) for a, b in zip(draw(0.5, seed=3), draw(0.5, seed=3)))


def test_the_authors_decoder_maps_a_16_grid_to_a_224_mask():
    """``seg.decoder=mgca-vit``: their DINOv2 decoder, 16x16 patches -> a valid conv to 14x14 -> four
    2x upsamplings -> 224x224, exactly, without the final resize; it trains (gradients reach every conv)."""
    from pipeline.models.heads import SEG_DECODERS

    dec = SEG_DECODERS["mgca-vit"](12, 16, 224, [8, 8, 4, 4])
    x = torch.randn(2, 12, 16, 16)
    assert dec.stages(x).shape[-2:] == (224, 224) and dec(x).shape == (2, 224, 224)
    segmentation_loss(dec(x), (torch.rand(2, 224, 224) > 0.7).float()).backward()
    assert all(m.weight.grad is not None and m.bias is not None for m in dec.modules() if isinstance(m, torch.nn.Conv2d))
