"""`pipe embed` on a GPU against the bare forward pass of the same network.

  bare:  random pixels already on the GPU, bf16 autocast, inference mode: images/s of
         the forward alone, the ceiling
  embed: `pipe embed` over PNG files (decode in spawned processes, pinned non-blocking
         copies, bf16, device-to-host copies and shard writes behind the forward)
for random-init networks the size of DINOv2-S and DINOv2-B at 224 px.
The embed rate is the steady state: the images of the table's second half over the seconds
they add to a run of the first half alone (:func:`embed_rate`), so start-up and the last
commit, which do not grow with the table, do not count against the forward.
Target: embed >= 0.9x bare. Needs CUDA; without it, prints why and exits 0.

The roofline (bench/roofline.py): the network's FLOPs per image are counted from its shapes on
one untimed bf16 forward (2·M·N·K per matrix product, the patch embedding as its product,
attention as its two products), and both rates are given as GFLOP/s with their share of the
peak of a large bf16 matrix product on the same GPU, measured in this run
(``bare_peak_share_<encoder>``, ``embed_peak_share_<encoder>``; target: bare >= 0.4).

    python bench/embed_gpu.py [--images 16384] [--batch 256] [--workdir DIR] [--out FILE]

The last line of stdout is one JSON object with ratio_dinov2_s, ratio_dinov2_b and gpu
(``--out`` also writes it to a file after each encoder). An encoder whose run fails is
reported as ``error_<encoder>`` and the other is still measured.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("PIPE_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.roofline import count_flops, measure_peak, roofline  # noqa: E402
from stages import embed  # noqa: E402
from stages.embed.embedder import get_encoder  # noqa: E402


def _write(args) -> None:
    folder, start, stop = args
    rng = np.random.default_rng(start)
    for i in range(start, stop):
        Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(Path(folder) / f"{i:06d}.png")


def make_images(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    step = 512
    with ProcessPoolExecutor() as pool:
        list(pool.map(_write, [(str(folder), s, min(n, s + step)) for s in range(0, n, step)]))
    table = pd.DataFrame({"image": [f"{i:06d}.png" for i in range(n)], "report": ["x"] * n})
    table.to_csv(folder / "pairs.csv", index=False)
    table.iloc[: n // 2].to_csv(folder / "half.csv", index=False)
    return folder / "pairs.csv"


@torch.inference_mode()
def flops_per_image(name: str, device: str = "cuda", batch: int = 8) -> float:
    """The network's forward FLOPs per 224 px image, by its shapes (one untimed bf16 forward)."""
    enc = get_encoder(name, torch.device(device))
    x = torch.randn(batch, 3, 224, 224, device=device)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        return count_flops(lambda: enc(x)) / batch


@torch.inference_mode()
def bare_rate(name: str, batch: int, steps: int) -> float:
    enc = get_encoder(name, torch.device("cuda"))
    x = torch.randn(batch, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            enc(x)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(steps):
            enc(x)
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t)


def embed_seconds(table: Path, name: str, batch: int, cache: Path, device: str = "cuda") -> tuple[float, int]:
    """One `pipe embed` (the stage's run()) into a fresh cache: seconds and images embedded."""
    cfg = embed.EmbedConfig(dataset=str(table), backbone=name, text_encoder="none", cache=str(cache),
                            batch_size=batch, device=device, shard_mb=256)
    t = time.perf_counter()
    res = embed.run(cfg)
    assert res.failed == 0, res.failures[:3]
    return time.perf_counter() - t, res.embedded


def embed_rate(table: Path, half: Path, name: str, batch: int, work: Path, device: str = "cuda") -> float:
    """The steady-state rate of `pipe embed`: the images of the second half over the time they add.

    A whole run also pays for things that do not grow with the table (starting the decode
    processes, opening the store, the last shard's fsync and commit): seconds, against a bare
    forward of a few seconds, so the ratio of whole runs would mostly measure them. Embedding
    the first half alone, then the whole table (each into a fresh cache, the encoder already
    built), and dividing the difference in images by the difference in seconds cancels them.
    """
    embed_seconds(half, name, batch, work / "warm", device)  # builds the encoder and warms the page cache
    t_half, n_half = embed_seconds(half, name, batch, work / "half", device)
    t_all, n_all = embed_seconds(table, name, batch, work / "all", device)
    assert (n_half, n_all) == (len(pd.read_csv(half)), len(pd.read_csv(table))), (n_half, n_all)
    return (n_all - n_half) / max(t_all - t_half, 1e-9)


def report(out: dict, path: str | None) -> dict:
    first = ["bench", "ratio_dinov2_s", "ratio_dinov2_b", "gpu"]
    out = {**{k: out[k] for k in first if k in out}, **{k: v for k, v in out.items() if k not in first}}
    if path:
        Path(f"{path}.tmp").write_text(json.dumps(out) + "\n")
        os.replace(f"{path}.tmp", path)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workdir", default=None, help="where to put images and caches (needs ~10 GB)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this benchmark needs one", file=sys.stderr)
        print(json.dumps(report({"bench": "embed_gpu", "gpu": None, "skipped": "no CUDA device"}, args.out)))
        return
    out = {"bench": "embed_gpu", "gpu": torch.cuda.get_device_name(), "images": args.images, "batch": args.batch,
           "peak_gflops": round(measure_peak("cuda", torch.bfloat16), 1), "peak_dtype": "bfloat16"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as d:
        table = make_images(Path(d) / "imgs", args.images)
        for name, key in (("random-dinov2-s", "dinov2_s"), ("random-dinov2-b", "dinov2_b")):
            try:
                bare = bare_rate(name, args.batch, steps=max(10, args.images // args.batch))
                emb = embed_rate(table, table.with_name("half.csv"), name, args.batch, Path(d) / f"cache-{key}")
            except Exception as exc:  # the other encoder is still measured
                out[f"error_{key}"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
                print(f"{name}: failed: {out[f'error_{key}']}", file=sys.stderr)
                report(out, args.out)
                continue
            per_image = flops_per_image(name)
            out.update({f"ratio_{key}": round(emb / bare, 3), f"bare_img_s_{key}": round(bare),
                        f"embed_img_s_{key}": round(emb), f"gflop_per_image_{key}": round(per_image / 1e9, 2),
                        **{f"{side}_{k}_{key}": v for side, rate in (("bare", bare), ("embed", emb))
                           for k, v in roofline(per_image, rate, out["peak_gflops"]).items()}})
            print(f"{name}: bare {bare:,.0f} img/s, pipe embed {emb:,.0f} img/s ({emb / bare:.2f}x)", file=sys.stderr)
            report(out, args.out)
    print(json.dumps(report(out, args.out)))


if __name__ == "__main__":
    main()
