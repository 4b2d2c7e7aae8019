"""How long `pipe evaluate --task segmentation` takes with its defaults, from a measured step.

A decoder step (``SegDecoder``, the default channels, batch ``seg.batch_size``, the focal +
Dice loss, AdamW) is timed on cached-token-shaped input for each backbone's geometry
(DINOv2-S: 384 wide, DINOv2-B: 768 wide; a 16 × 16 patch grid from a 224-pixel crop),
on the CPU and, where there is one, on the GPU. The total for a split then follows from
the evaluation's own plan (``FitSettings.plan`` with ``SegConfig``'s defaults): optimiser
steps per (seed, fraction) for the default fractions 1%, 10%, 100% and 3 seeds, plus one
validation pass per validation round. The figures in `pipe evaluate --help` come from here.

The roofline (bench/roofline.py): a step's FLOPs are counted from its shapes on one untimed
step (each convolution as its product, 2 · output elements · input channels · 9 for a 3x3;
backward as executed; upsampling, norms and the loss are not counted), and each row gives the
achieved GFLOP/s and its share of the peak of a large float32 matrix product on the same
device with the same threads, measured in this run (on a GPU the convolutions may use TF32,
which the float32 peak does not, so a share there can pass 1).

    python bench/seg_steps.py [--train 1400 12000 53000] [--valid 200] [--reps 20] [--threads T] [--device cuda] [--out F]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.roofline import count_flops, measure_peak, roofline  # noqa: E402
from pipeline.models.heads import SegDecoder, segmentation_loss  # noqa: E402
from stages.evaluate.head_bank import FitSettings  # noqa: E402
from stages.evaluate.stage import HeadsConfig, SegConfig  # noqa: E402

GEOMETRY = {"dinov2-s": 384, "dinov2-b": 768}
GRID, SIZE = 16, 224
FRACTIONS, SEEDS = (0.01, 0.1, 1.0), 3


def time_step(width: int, device: torch.device, reps: int) -> tuple[float, float, int]:
    """(seconds per training step, seconds per item of a validation pass, FLOPs of a step) at the defaults."""
    s, h = SegConfig(), HeadsConfig()
    torch.manual_seed(0)
    model = SegDecoder(width, GRID, SIZE, s.channels).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=h.lrs[0], weight_decay=h.weight_decay)
    x = torch.randn(s.batch_size, width, GRID, GRID, device=device)
    y = (torch.rand(s.batch_size, SIZE, SIZE, device=device) > 0.9).float()

    def step() -> None:
        loss = segmentation_loss(model(x), y, s.alpha, s.gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    flops = count_flops(lambda: segmentation_loss(model(x), y, s.alpha, s.gamma).backward())  # untimed
    for _ in range(3):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        step()
    sync()
    train = (time.perf_counter() - t0) / reps
    model.eval()
    with torch.no_grad():
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x)
        sync()
    return train, (time.perf_counter() - t0) / reps / s.batch_size, flops


def plan_seconds(n_train: int, n_valid: int, step_s: float, val_item_s: float) -> dict:
    """Steps and seconds of the defaults (3 seeds x 1%, 10%, 100%) for a split of n_train items."""
    s, h = SegConfig(), HeadsConfig()
    settings = FitSettings(s.epochs, s.batch_size, h.weight_decay, h.patience, h.restart_epochs, 0, s.min_steps,
                           s.max_steps)
    steps = validations = 0
    for f in FRACTIONS:
        total, every, _ = settings.plan(max(1, round(f * n_train)))
        steps += total * SEEDS
        validations += -(-total // every) * SEEDS
    seconds = steps * step_s + validations * n_valid * val_item_s
    return {"n_train": n_train, "steps": steps, "validations": validations, "minutes": round(seconds / 60, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=int, nargs="+", default=[1400, 12000, 53000],
                    help="training split sizes to plan for (the demo's, SIIM's, MIMIC-scale)")
    ap.add_argument("--valid", type=int, default=200, help="validation split size (a validation pass per round)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads on the CPU (default: torch's)")
    ap.add_argument("--device", choices=["cpu", "cuda"], action="append", default=None,
                    help="where to time a step (repeatable; default: the CPU, and the GPU where there is one)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    names = a.device or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    if "cuda" in names and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    devices = [torch.device(n) for n in names]
    rows, peaks = [], {}
    for device in devices:
        peaks[device.type] = round(measure_peak(device), 1)
        for backbone, width in GEOMETRY.items():
            step_s, val_s, flops = time_step(width, device, a.reps if device.type == "cuda" else max(3, a.reps // 4))
            plans = [plan_seconds(n, a.valid, step_s, val_s) for n in a.train]
            rows.append({"device": device.type, "backbone": backbone, "ms_per_step": round(1000 * step_s, 2),
                         "gflop_per_step": round(flops / 1e9, 2), **roofline(flops, 1 / step_s, peaks[device.type]),
                         "plans": plans})
            print(f"{device.type} {backbone}: {1000 * step_s:.1f} ms/step; "
                  + "; ".join(f"{p['n_train']:,} train: {p['minutes']:.0f} min" for p in plans), file=sys.stderr)
    print("| device | backbone | ms / step | " + " | ".join(f"{n:,} train items" for n in a.train) + " |")
    print("|---|---|---|" + "---|" * len(a.train))
    for r in rows:
        cells = [f"{p['steps']:,} steps · {p['minutes']:.0f} min" for p in r["plans"]]
        print(f"| {r['device']} | {r['backbone']} | {r['ms_per_step']:.1f} | " + " | ".join(cells) + " |")
    summary = {"bench": "seg_steps", "threads": torch.get_num_threads(), "peak_gflops": peaks, "peak_dtype": "float32",
               "rows": rows}
    if a.out:
        a.out.write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
