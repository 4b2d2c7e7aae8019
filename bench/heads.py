"""Classification heads at scale: the step cap and the L-BFGS probe against uncapped training.

At 100% of the labels of a large split, the stochastic heads would take ``epochs`` full
passes (13k+ optimiser steps for 35k items at batch 128). `pipe evaluate` caps them at
``heads.max_steps`` (3,000) and offers ``probe``, a linear probe solved full-batch by
L-BFGS. This benchmark shows what the cap and the probe cost in test AUROC, on features
with a planted signal (a nonlinear function of 32 latent factors, seen through a random
384-wide map with noise; two findings at 30% and 20% prevalence) and the evaluation's own
defaults (``HeadsConfig``: batch 128, lr 5e-4, weight decay 1e-4, 50 validations,
patience 10). Every method trains on the same split, in this one process:

    mlp / linear, uncapped   max_steps = 0: every epoch, early stopping on validation
    mlp / linear, capped     max_steps = 3,000 (the default)
    probe                    L-BFGS per L2 strength of the default grid, validation picks

and prints per method the optimiser steps (for the probe: function evaluations), the
seconds, and the test macro AUROC; the capped and probe rows also give the AUROC
difference from the uncapped head of their kind and their time as a ratio of its time.

The roofline (bench/roofline.py): the FLOPs of one training step (forward and backward at the
head's batch), of one L-BFGS function evaluation (the whole training split) and of one
validation pass are counted from the heads' shapes (2·M·N·K per matrix product), then
multiplied by how many of each a method ran (its loss and scoring calls are counted), and each
row gives the achieved GFLOP/s and its share of the peak of a large float32 matrix product
with the same threads, measured in this run. The heads are small (384 -> 512 -> 2), so their
steps are bound by per-step overhead, not arithmetic: the shares show by how much.

    python bench/heads.py [--n 50000] [--seed 0] [--threads 1]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.roofline import count_flops, measure_peak, roofline  # noqa: E402
from pipeline.models.heads import make_head  # noqa: E402
from stages.evaluate import metrics as M  # noqa: E402
from stages.evaluate.head_bank import FitSettings, Head, HeadBank, fit_probes, predict  # noqa: E402
from stages.evaluate.stage import HeadsConfig  # noqa: E402

LATENT, WIDTH = 32, 384


def features(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x [n, 384] float32, y [n, 2] float32): two findings that depend on the latents nonlinearly."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, LATENT))
    mix = rng.normal(size=(LATENT, WIDTH)) / np.sqrt(LATENT)
    x = np.tanh(z @ mix) + 0.5 * rng.normal(size=(n, WIDTH))
    a, b = rng.normal(size=LATENT), rng.normal(size=LATENT)
    s1 = z @ a / np.sqrt(LATENT) + 0.8 * np.abs(z[:, 0]) - 0.5 * z[:, 1] * z[:, 2]
    s2 = z @ b / np.sqrt(LATENT) + 0.6 * np.maximum(z[:, 3], 0) * z[:, 4]
    y = np.stack([s1 + rng.normal(scale=0.7, size=n) > np.quantile(s1, 0.7),
                  s2 + rng.normal(scale=0.7, size=n) > np.quantile(s2, 0.8)], 1)
    return x.astype(np.float32), y.astype(np.float32)


def _loss(logits, y):
    return F.binary_cross_entropy_with_logits(logits, y)


def unit_flops(kind: str, xt: torch.Tensor, yt: torch.Tensor, xv: torch.Tensor) -> tuple[int, int]:
    """FLOPs of one training call of a head (a minibatch step, or an L-BFGS evaluation over the
    whole split for the probe) and of one validation pass, from its shapes."""
    h = HeadsConfig()
    module = make_head(kind, WIDTH, 2, h.hidden, h.dropout)
    if kind == "probe":  # L-BFGS evaluates the standardised split through the linear layer
        train = count_flops(lambda: _loss(module[1](xt), yt).backward())
    else:
        train = count_flops(lambda: _loss(module(xt[:h.batch_size]), yt[:h.batch_size]).backward())
    with torch.no_grad():
        val = count_flops(lambda: module.eval()(xv))
    return train, val


def run(n: int, seed: int) -> dict:
    x, y = features(n, seed)
    cut_tr, cut_va = int(0.7 * n), int(0.8 * n)
    xt, yt = torch.from_numpy(x[:cut_tr]), torch.from_numpy(y[:cut_tr])
    xv, yv = torch.from_numpy(x[cut_tr:cut_va]), torch.from_numpy(y[cut_tr:cut_va])
    x_te, y_te = torch.from_numpy(x[cut_va:]), y[cut_va:]
    h = HeadsConfig()

    calls = {"train": 0, "val": 0}

    def counted_loss(logits, target):
        calls["train"] += 1
        return _loss(logits, target)

    def score(module) -> tuple[float, float]:
        calls["val"] += 1
        logits = predict(module, xv)
        return float(M.macro_auroc(y[cut_tr:cut_va], 1 / (1 + np.exp(-logits)))[0]), float(_loss(torch.from_numpy(logits), yv))

    def test_auroc(module) -> float:
        return float(M.macro_auroc(y_te, 1 / (1 + np.exp(-predict(module, x_te))))[0])

    rows, peaks = [], [measure_peak("cpu")]
    units = {kind: unit_flops(kind, xt, yt, xv) for kind in ("mlp", "linear", "probe")}

    def arithmetic(kind: str) -> float:
        train, val = units[kind]
        flops = calls["train"] * train + calls["val"] * val
        calls.update(train=0, val=0)
        return flops

    for kind in ("mlp", "linear"):
        for label, cap in (("uncapped", 0), ("capped", h.max_steps)):
            torch.manual_seed(seed)
            head = Head(kind, h.lrs[0], make_head(kind, WIDTH, 2, h.hidden, h.dropout))
            settings = FitSettings(h.epochs, h.batch_size, h.weight_decay, h.patience, h.restart_epochs, seed,
                                   h.min_steps, cap)
            t0 = time.perf_counter()
            best = HeadBank([head], counted_loss, score, settings).fit(xt, yt, has_val=True)[kind]
            seconds = time.perf_counter() - t0
            rows.append({"method": f"{kind} {label}", "kind": kind, "steps": head.steps, "best_steps": best.best_steps,
                         "seconds": round(seconds, 2), "test_auroc": round(test_auroc(best.module), 4),
                         "flops": arithmetic(kind)})
            print(f"n={n:,} {kind} {label}: {head.steps:,} steps, {seconds:.1f} s, AUROC {rows[-1]['test_auroc']:.4f}",
                  file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    probe, sweep = fit_probes(lambda: make_head("probe", WIDTH, 2), h.probe_l2s, xt, yt, counted_loss, score,
                              has_val=True)
    seconds = time.perf_counter() - t0
    rows.append({"method": "probe (L-BFGS)", "kind": "probe", "steps": probe.steps, "strengths": len(sweep),
                 "l2": probe.lr, "seconds": round(seconds, 2), "test_auroc": round(test_auroc(probe.module), 4),
                 "flops": arithmetic("probe")})
    print(f"n={n:,} probe: l2 {probe.lr:g}, {seconds:.1f} s, AUROC {rows[-1]['test_auroc']:.4f}", file=sys.stderr)
    peaks.append(measure_peak("cpu"))
    for r in rows:
        r.update(roofline(r.pop("flops"), 1 / r["seconds"], max(peaks)))
    return {"n": n, "n_train": cut_tr, "rows": rows, "comparisons": compare(rows), "peak_gflops": round(max(peaks), 1)}


def compare(rows: list[dict]) -> dict:
    """AUROC difference and time ratio of the capped heads and the probe against the uncapped heads."""
    by = {r["method"]: r for r in rows}
    out = {}
    for method, base in (("mlp capped", "mlp uncapped"), ("linear capped", "linear uncapped"),
                         ("probe (L-BFGS)", "linear uncapped")):
        a, b = by[method], by[base]
        out[f"{method} vs {base}"] = {"auroc_difference": round(a["test_auroc"] - b["test_auroc"], 4),
                                      "time_ratio": round(a["seconds"] / b["seconds"], 3)}
    return out


def table(result: dict) -> str:
    lines = [f"n = {result['n']:,} items ({result['n_train']:,} training)", "",
             "| method | steps | seconds | test macro AUROC | GFLOP/s | share of peak |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['steps']:,} | {r['seconds']:.1f} | {r['test_auroc']:.4f} | "
                     f"{r['gflops']:.2f} | {100 * r['peak_share']:.1f}% |")
    lines += ["", "| comparison | AUROC difference | time ratio |", "|---|---|---|"]
    for name, c in result["comparisons"].items():
        lines.append(f"| {name} | {c['auroc_difference']:+.4f} | {c['time_ratio']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="items in all (70% train, 10% valid, 20% test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: steady on a shared machine)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    result = run(a.n, a.seed)
    print(table(result))
    print(json.dumps({"bench": "heads", "threads": a.threads, **result}))


if __name__ == "__main__":
    main()
