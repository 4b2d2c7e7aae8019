"""A capacity plan: disk, embedding time, training time and loader choice at MIMIC scale and beyond.

From figures measured on this project's machines, never from a vendor's:

- bytes per stored item: each encoder's registered geometry (float16 tokens, float32
  pooled vector: ``stages/reproduce/steps.py:row_bytes``, what `pipe reproduce --plan` uses);
- embedding on a CPU: `pipe embed`'s measured DINOv2-S rate on 2 cores
  (``EMBED_DINOV2S_PER_S``, bench/embed_overhead.py), other encoders scaled by
  the forward cost per item each encoder's config carries (``card.gflops``, `pipe encoders`:
  an assumption about speed, said so);
- decoding a full-size radiograph (a 2,544 × 3,056 JPEG, MIMIC-CXR-JPG's usual size) and
  preprocessing it to the encoder's input, timed here on one core: on a GPU host the
  forward pass is rarely the limit, decoding is, so this gives the least wall time of an
  embedding run on a host with ``--host-cores`` cores;
- pooled Adaptor training on a CPU: the measured cached step rate (``TRAIN_POOLED_PER_S``);
- the loaders' switch (``stages/train/loader.py``, ``--resident auto``): the arrays a mode
  reads (pooled vectors, or token arrays) stay resident while they need at most half the
  free RAM (on a GPU: 80% of its free memory), else they stream from the shards; the
  table gives the number of images where each switches.

    python bench/capacity.py [--ram-gib 24] [--host-cores 16] [--reps 5] [--backbones dinov2-s rad-dino ...]

Prints a Markdown table and one JSON object on its last line. GPU forward rates are not
in it until `make gpu-check` has measured them on a GPU.
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.encoders import resolve_encoder_name  # noqa: E402
from pipeline.imaging import Preprocess, read_and_decode  # noqa: E402
from stages.reproduce.steps import EMBED_DINOV2S_PER_S, TRAIN_POOLED_PER_S, embed_rate, row_bytes  # noqa: E402

# (name, images, reports): MIMIC-CXR (all views, v2.0.0) and two larger archives with its ratio
SCENARIOS = [("MIMIC-CXR", 377_110, 227_827), ("1M images", 1_000_000, 604_000), ("10M images", 10_000_000, 6_040_000)]
BACKBONES = ("dinov2-s", "dinov2-b")
TEXT = "bert"
GIB = 2**30


def decode_seconds(reps: int) -> float:
    """Seconds to read, decode and preprocess one full-size chest radiograph JPEG, on one core."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 255, (318, 382), dtype=np.uint8)
    img = Image.fromarray(small).resize((3056, 2544), Image.BILINEAR)   # smooth, like a radiograph
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "cxr.jpg"
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=95)
        path.write_bytes(buf.getvalue())
        pre = Preprocess(resize_size=256, input_size=224, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
        pre(read_and_decode(path)[1])                                      # warm up
        t0 = time.perf_counter()
        for _ in range(reps):
            pre(read_and_decode(path)[1])
        return (time.perf_counter() - t0) / reps


def plan(name: str, images: int, reports: int, backbone: str, ram_gib: float, decode_s: float,
         host_cores: int) -> dict:
    img, txt = resolve_encoder_name(backbone, "image"), resolve_encoder_name(TEXT, "text")
    disk = images * row_bytes(img) + reports * row_bytes(txt)
    pooled = images * img.embed_dim * 4 + reports * txt.embed_dim * 4
    tokens = images * (row_bytes(img) - img.embed_dim * 4) + reports * (row_bytes(txt) - txt.embed_dim * 4)
    cpu_rate, text_rate = embed_rate(backbone, "image"), embed_rate(TEXT, "text")
    return {"scenario": name, "images": images, "reports": reports, "backbone": backbone,
            "disk_gib": round(disk / GIB, 1),
            "embed_cpu_hours_2cores": round((images / cpu_rate + reports / text_rate) / 3600, 1),
            "decode_bound_hours": round(images * decode_s / host_cores / 3600, 2),
            "pooled_resident_gib": round(pooled / GIB, 2),
            "tokens_arrays_gib": round(tokens / GIB, 1),
            "tokens_loader": "resident" if tokens <= 0.5 * ram_gib * GIB else "streaming",
            "pooled_loader": "resident" if pooled <= 0.5 * ram_gib * GIB else "streaming",
            "pooled_epoch_cpu_minutes": round(images / TRAIN_POOLED_PER_S / 60, 1)}


def switch_points(ram_gib: float, backbones: tuple[str, ...] = BACKBONES) -> dict:
    """Images (with MIMIC's reports per image) above which each mode's arrays stream, per backbone."""
    ratio = SCENARIOS[0][2] / SCENARIOS[0][1]
    txt = resolve_encoder_name(TEXT, "text")
    out = {}
    for backbone in backbones:
        img = resolve_encoder_name(backbone, "image")
        pooled = img.embed_dim * 4 + ratio * txt.embed_dim * 4
        tokens = (row_bytes(img) - img.embed_dim * 4) + ratio * (row_bytes(txt) - txt.embed_dim * 4)
        out[backbone] = {"pooled_streams_above": int(0.5 * ram_gib * GIB / pooled),
                         "tokens_stream_above": int(0.5 * ram_gib * GIB / tokens)}
    return out


def table(rows: list[dict], ram_gib: float, host_cores: int) -> str:
    lines = ["| data | backbone | cache on disk | embed, 2-core CPU | decoding alone, "
             f"{host_cores}-core host | pooled arrays | token arrays | loaders at {ram_gib:g} GiB free (pooled / tokens) "
             "| pooled epoch, 2-core CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['scenario']} ({r['images']:,} images, {r['reports']:,} reports) | {r['backbone']} | "
                     f"{r['disk_gib']:,.0f} GiB | {r['embed_cpu_hours_2cores']:,.0f} h | {r['decode_bound_hours']:.1f} h | "
                     f"{r['pooled_resident_gib']:.1f} GiB | {r['tokens_arrays_gib']:,.0f} GiB | "
                     f"{r['pooled_loader']} / {r['tokens_loader']} | "
                     f"{r['pooled_epoch_cpu_minutes']:,.0f} min |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ram-gib", type=float, default=24.0, help="free RAM of the training machine")
    ap.add_argument("--host-cores", type=int, default=16, help="CPU cores of an embedding host (decode threads)")
    ap.add_argument("--reps", type=int, default=5, help="decodes timed")
    ap.add_argument("--backbones", nargs="+", default=list(BACKBONES),
                    help="image encoders to plan for (any registered name: rad-dino, medsiglip, ...)")
    a = ap.parse_args()
    import torch  # lazy: only to pin the thread count before timing
    torch.set_num_threads(1)
    decode_s = decode_seconds(a.reps)
    rows = [plan(name, n_img, n_rep, b, a.ram_gib, decode_s, a.host_cores)
            for name, n_img, n_rep in SCENARIOS for b in a.backbones]
    print(f"decode + preprocess of a 2,544 x 3,056 JPEG: {1000 * decode_s:.0f} ms on one core")
    print(table(rows, a.ram_gib, a.host_cores))
    switch = switch_points(a.ram_gib, tuple(a.backbones))
    for backbone, p in switch.items():
        print(f"{backbone}, {a.ram_gib:g} GiB free: token arrays stream above {p['tokens_stream_above']:,} images, "
              f"pooled vectors above {p['pooled_streams_above']:,}")
    print(json.dumps({"switch": switch, "bench": "capacity", "decode_ms": round(1000 * decode_s, 1), "ram_gib": a.ram_gib,
                      "host_cores": a.host_cores, "embed_dinov2s_per_s": EMBED_DINOV2S_PER_S,
                      "train_pooled_per_s": TRAIN_POOLED_PER_S, "rows": rows}))


if __name__ == "__main__":
    main()
