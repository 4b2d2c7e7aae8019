"""What `pipe embed` costs on top of the encoder itself.

Runs over the same images, in one process:
  bare:  read + decode + preprocess + forward, with the same decode threads and one-batch
         prefetch as the stage, and nothing else: the overhead baseline
  naive: the same work in a plain sequential loop (what a script would do), for context
  embed: `pipe embed` (the stage's run()), which adds hashing, planning, shard writes,
         fsync and manifest commits, into a fresh cache each time
All use the same encoder object (built once, before timing) and the allocator setting
that `pipe embed` applies (pipeline/allocator.py). Runs are repeated in alternating
order and the median ratio reported. Target: embed / bare <= 1.05 on CPU, for both encoders.

The roofline (bench/roofline.py): the encoder's FLOPs per image are counted from its shapes on
one untimed forward (2·M·N·K per matrix product, the patch embedding's convolution as its
product, attention as its two products), and each loop's achieved GFLOP/s is given with its
share of the peak of a large float32 matrix product with the same threads, measured in the
same process before and after the timed runs (the higher is used).

    python bench/embed_overhead.py [--images 1000] [--vits-images 64] [--reps 5]

The last line of stdout is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PIPE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.roofline import count_flops, measure_peak, roofline  # noqa: E402
from pipeline.allocator import keep_freed_memory  # noqa: E402
from pipeline.imaging import read_and_decode  # noqa: E402
from stages import embed  # noqa: E402
from stages.embed.embedder import get_encoder  # noqa: E402
from stages.embed.modality import preprocess_of  # noqa: E402


def make_images(folder: Path, n: int, size: int) -> Path:
    """Smooth, X-ray-like 8-bit PNGs (PNG decode cost is realistic for smooth images)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        a, b = rng.uniform(2, 6, 2)
        img = 0.5 + 0.25 * np.sin(a * np.pi * xx) * np.cos(b * np.pi * yy) + rng.normal(0, 0.03, (size, size))
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"{i:05d}.png")
        rows.append({"image": f"{i:05d}.png", "report": f"report {i}", "split": "train"})
    table = folder / "pairs.csv"
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def _decode(path: Path, preprocess) -> torch.Tensor:
    return preprocess(read_and_decode(path)[1])


def bare_loop(encoder, preprocess, paths: list[Path], batch: int) -> float:
    """Decode in 2 threads, one batch ahead of the forward; results to host; no cache."""
    batches = [paths[s:s + batch] for s in range(0, len(paths), batch)]
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool, ThreadPoolExecutor(1) as ahead, torch.inference_mode():
        load = lambda b: list(pool.map(_decode, b, [preprocess] * len(b)))  # noqa: E731
        nxt = ahead.submit(load, batches[0])
        for i in range(len(batches)):
            pixels = torch.stack(nxt.result())
            if i + 1 < len(batches):
                nxt = ahead.submit(load, batches[i + 1])
            out = encoder(pixels)
            out.tokens.to(torch.float16).numpy()
            out.pooled.float().numpy()
    return time.perf_counter() - t


def naive_loop(encoder, preprocess, paths: list[Path], batch: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(paths), batch):
            pixels = torch.stack([preprocess(read_and_decode(p)[1]) for p in paths[s:s + batch]])
            out = encoder(pixels)
            out.tokens.to(torch.float16).numpy()  # the bare loop also brings results to host
    return time.perf_counter() - t


def embed_run(table: Path, name: str, batch: int) -> float:
    with tempfile.TemporaryDirectory() as cache:
        cfg = embed.EmbedConfig(dataset=str(table), backbone=name, text_encoder="none", cache=cache,
                                batch_size=batch, device="cpu")
        t = time.perf_counter()
        res = embed.run(cfg)
        elapsed = time.perf_counter() - t
        assert res.embedded == len(pd.read_csv(table)) and res.failed == 0
    return elapsed


def measure(table: Path, name: str, batch: int, reps: int) -> dict:
    from pipeline.encoders import resolve_encoder_name  # lazy: after the benchmark's thread and allocator settings

    keep_freed_memory()  # the allocator setting `pipe embed` applies, for every loop alike
    device = torch.device("cpu")
    encoder = get_encoder(name, device)  # built once, shared by both loops
    preprocess = preprocess_of(resolve_encoder_name(name))
    paths = [table.parent / p for p in pd.read_csv(table).image]
    bare_loop(encoder, preprocess, paths[:batch], batch)  # warm-up: page cache, allocator, kernels
    peaks = [measure_peak("cpu")]
    with torch.inference_mode():
        flops = count_flops(lambda: encoder(torch.stack([_decode(p, preprocess) for p in paths[:batch]])))
    runners = {"bare": lambda: bare_loop(encoder, preprocess, paths, batch),
               "naive": lambda: naive_loop(encoder, preprocess, paths, batch),
               "embed": lambda: embed_run(table, name, batch)}
    times: dict[str, list[float]] = {k: [] for k in runners}
    for r in range(reps):
        for kind in (list(runners) if r % 2 == 0 else list(runners)[::-1]):
            times[kind].append(runners[kind]())
    peaks.append(measure_peak("cpu"))
    ratios = [e / b for e, b in zip(times["embed"], times["bare"])]
    n = len(paths)
    med = {k: statistics.median(v) for k, v in times.items()}
    per_image = flops / min(batch, n)
    roof = {f"{k}_{f}": v for k in ("bare", "embed") for f, v in
            roofline(per_image, n / med[k], max(peaks)).items()}
    return {"ratio": round(statistics.median(ratios), 3), "ratio_vs_naive": round(med["embed"] / med["naive"], 3),
            "bare_img_s": round(n / med["bare"], 1), "naive_img_s": round(n / med["naive"], 1),
            "embed_img_s": round(n / med["embed"], 1), "ratios": [round(x, 3) for x in ratios],
            "gflop_per_image": round(per_image / 1e9, 3), **roof, "peak_gflops": round(max(peaks), 1),
            "peak_gflops_runs": [round(p, 1) for p in peaks], "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000, help="images for tiny-vit")
    ap.add_argument("--vits-images", type=int, default=64, help="images for the DINOv2-S-sized network")
    ap.add_argument("--size", type=int, default=512, help="side of the generated PNGs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--only", choices=["tiny", "vits"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:  # one encoder, in a process of its own
        n = args.images if args.only == "tiny" else args.vits_images
        name = "tiny-vit" if args.only == "tiny" else "random-dinov2-s"
        reps = args.reps if args.only == "tiny" else max(2, args.reps - 1)
        with tempfile.TemporaryDirectory() as d:
            print(json.dumps(measure(make_images(Path(d) / "imgs", n, args.size), name, args.batch, reps)))
        return
    # Each encoder is measured in a fresh process: in one long process, the second
    # encoder's forward was seen to slow down ~15x after the first one's runs.
    res = {}
    for which in ("tiny", "vits"):
        cmd = [sys.executable, __file__, "--only", which, "--images", str(args.images), "--vits-images",
               str(args.vits_images), "--size", str(args.size), "--batch", str(args.batch), "--reps", str(args.reps)]
        res[which] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(f"{which}: {res[which]}", file=sys.stderr)
    print(json.dumps({"bench": "embed_overhead", "ratio_tiny": res["tiny"]["ratio"], "ratio_vits": res["vits"]["ratio"],
                      **{f"{k}_{which}": res[which][k] for which in res for k in
                         ("bare_peak_share", "embed_peak_share", "bare_gflops", "embed_gflops")},
                      "tiny": res["tiny"], "vits": res["vits"], "images": [args.images, args.vits_images],
                      "size": args.size, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
