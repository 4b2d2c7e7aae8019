"""Training from the cache against end-to-end training with the frozen encoders in the loop.

Same Adaptor (the paper's size), same batch, same optimiser step. The only difference:
  cached: the step reads cached embeddings through the training loader
  e2e:    the step first runs the frozen image and text encoders (no grad) on
          preprocessed pixels and tokenised reports held in memory, as the authors'
          code does every step (image decoding is left out, which flatters e2e)
Encoders are random-init networks the size of DINOv2-S and BERT-base (CPU) or DINOv2-B
and BERT-base in bf16 (CUDA, when present). Reports pooled mode, tokens mode, tokens mode
with the patch grid pooled to 8x8, and the share of a cached step spent waiting for data.
The cached step is train-adaptor's own (pipeline/training/step.py). On CUDA the cache is
GPU-resident and each step mode is timed (eager, compile, cuda-graph); the headline
speedup is the fastest, named in `step_<mode>`. Targets: pooled speedup >= 100x on a CPU
(50x on a GPU); data wait < 10%.

The roofline (bench/roofline.py): each side's FLOPs per sample are counted from the shapes
of one untimed step (2·M·N·K per matrix product; the encoders' forward without gradients,
the Adaptor's forward and backward as executed, about 3x its forward; the optimizer's update
is not arithmetic and is not counted), and the achieved GFLOP/s of each side is given with
its share of the peak of a large matrix product in float32 (CPU) or bf16 (CUDA), same
threads, measured in this run. ``flop_ratio_<mode>`` is the speedup the arithmetic alone
would allow at equal efficiency; the speedup is that ratio times the two sides' shares of
the peak. Pooled mode also reports the optimizer's memory floor: fused AdamW reads and
writes 28 bytes per parameter each step (parameter, gradient and both moments read; the
parameter and moments written), over the copy bandwidth measured in this run.
``--sweep-batches`` times the cached pooled step at ``--batch`` and other batches (the
training items repeated to fill them: the step's arithmetic does not depend on which items)
against the end-to-end rate at ``--batch`` (whose encoders already run matrix products of
``batch x 257`` rows), measured before and after the sweep, and reports the batch where the
speedup peaks.

    python bench/cached_vs_e2e.py [--items 64] [--batch 32] [--modes pooled,tokens,tokens_pooled_grid]
                                  [--steps eager,compile,cuda-graph] [--threads N]
                                  [--sweep-batches 64,128,256] [--workdir DIR] [--out FILE]

The last line of stdout is one JSON object; ``--out`` also writes it to a file, rewritten
after every measurement, so a run that is cut short keeps what it measured. A step mode
that fails is reported as ``error_<mode>_<step>`` and the others still run.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
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

from bench.roofline import count_flops, measure_bandwidth, measure_peak  # noqa: E402
from pipeline.models.adaptor import Adaptor, AdaptorConfig  # noqa: E402
from pipeline.models.loss import clip_loss, itm_loss  # noqa: E402
from stages.train.loader import PairLoader  # noqa: E402
from cache.pairs import load_pairs  # noqa: E402
from stages.train.step import WARMUP_STEPS, StepRunner, optimizer_for  # noqa: E402
from stages import embed  # noqa: E402
from stages.embed.embedder import get_encoder  # noqa: E402
from stages.embed.modality import preprocess_of  # noqa: E402

REPORTS = ["No acute cardiopulmonary abnormality. Heart size is normal. Lungs are clear without focal "
           "consolidation, effusion or pneumothorax.",
           "Moderate left pleural effusion with adjacent atelectasis. Mild cardiomegaly. No pneumothorax.",
           "Right upper lobe consolidation concerning for pneumonia. No effusion. Stable cardiomediastinal "
           "silhouette."]


def _write_pngs(args) -> None:
    folder, start, stop = args
    for i in range(start, stop):
        rng = np.random.default_rng([0, i])
        Image.fromarray((rng.random((256, 256)) * 255).astype(np.uint8)).save(Path(folder) / f"{i}.png")


def make_table(folder: Path, n: int) -> Path:
    """n random 256 px PNGs and reports; kept when ``folder`` already holds this table."""
    table = folder / "pairs.csv"
    if table.exists() and len(pd.read_csv(table)) == n:
        return table
    folder.mkdir(parents=True, exist_ok=True)
    spans = [(str(folder), s, min(n, s + 256)) for s in range(0, n, 256)]
    if len(spans) > 1:  # thousands of images for a GPU run: write them in parallel
        with ProcessPoolExecutor(min(len(spans), os.cpu_count() or 1)) as pool:
            list(pool.map(_write_pngs, spans))
    else:
        _write_pngs(spans[0])
    rows = [{"image": f"{i}.png", "report": f"{REPORTS[i % 3]} Study {i}.", "split": "train"} for i in range(n)]
    pd.DataFrame(rows).to_csv(table, index=False)
    return table


def adaptor_for(mode: str, grid_pool: int, di: int, dt: int, device,
                step: str = "eager") -> tuple[Adaptor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Adaptor(AdaptorConfig(mode=mode, grid_pool=grid_pool, image_dim=di, text_dim=dt)).to(device)
    # the optimizer train-adaptor builds: fused AdamW (capturable, with a device lr, for CUDA graphs)
    return model, optimizer_for(model.parameters(), step, device, lr=2e-5, weight_decay=0.01, betas=(0.9, 0.999))


def loss_of(model, grid, amp):
    """The loss train-adaptor trains on: in tokens mode, CLIP on the unimodal embeddings plus
    the matching loss on each pair and two hard negatives."""
    def loss(batch):
        with amp():
            if model.has_match_head:
                img, txt, match = model(batch, image_grid=grid, n_prefix=1, match=True)
                return clip_loss(img.float(), txt.float(), model.scale(), 0.75) + itm_loss(match)
            img, txt = model(batch, image_grid=grid, n_prefix=1)
            return clip_loss(img.float(), txt.float(), model.scale(), 0.75)
    return loss


def train_step(model, opt, batch, grid, amp) -> None:
    loss = loss_of(model, grid, amp)(batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def cached_rate(data, mode, grid_pool, batch, device, amp, epochs, max_steps=0,
                step: str = "eager", fill: int = 0) -> dict:
    """train-adaptor's step over the cache (GPU-resident on CUDA): ``samples_s``, the data
    wait's share, where the loader held the arrays (``residency``: gpu, ram or stream) and the
    step's ``flops_per_sample`` and parameter count. ``fill``: repeat the training items to at
    least this many (a batch larger than the table)."""
    pos = data.split("train")
    if fill > len(pos):
        pos = np.resize(pos, fill)
    loader = PairLoader(data, pos, mode, batch, device, "auto", views=False, drop_last=True)
    di, dt = data.image.array("pooled").shape[1], data.text.array("pooled").shape[1]
    model, opt = adaptor_for(mode, grid_pool, di, dt, device, step)
    loss = loss_of(model, data.image_grid[0], amp)
    first = next(_cycle(loader))
    flops = count_flops(lambda: loss(first).backward())  # untimed; the runner's steps zero the gradients
    runner = StepRunner(loss, opt, step, device)
    # warm-up: compilation, or the eager steps before capture, the capture and a replay (eager: the allocator)
    for _, b in zip(range(2 if step == "eager" else WARMUP_STEPS + 2), _cycle(loader)):
        runner(b)
    sync(device)
    loader.wait_seconds, n, t = 0.0, 0, time.perf_counter()
    timed = (b for e in range(1, epochs + 1) for b in loader.batches(e))
    for b in itertools.islice(timed, max_steps or None):  # max_steps: steps in all, across epochs
        runner(b)
        n += len(b["index"])
    runner.take_mean_loss()  # waits for the device
    elapsed = time.perf_counter() - t
    return {"samples_s": n / elapsed, "wait": loader.wait_seconds / elapsed, "residency": loader.residency,
            "flops_per_sample": flops / batch, "params": sum(p.numel() for p in model.parameters())}


def _cycle(loader):
    e = 0
    while True:
        yield from loader.batches(e)
        e += 1


def e2e_rate(pixels, texts, img_enc, txt_enc, mode, grid_pool, batch, device, amp, steps) -> tuple[float, float]:
    """Samples/s of the end-to-end step, and its FLOPs per sample (the encoders' forward and the
    Adaptor's step, counted on the warm-up step)."""
    model, opt = adaptor_for(mode, grid_pool, img_enc.config.embed_dim, txt_enc.config.embed_dim, device)
    tok = txt_enc.tokenize(texts[:batch])
    tok = {k: v.to(device) for k, v in tok.items()}
    px = pixels[:batch].to(device)

    def step():
        with torch.no_grad(), amp():
            io, to = img_enc(px), txt_enc(**tok)
        if mode == "pooled":
            b = {"image_pooled": io.pooled.float(), "text_pooled": to.pooled.float()}
        else:
            T = to.tokens.shape[1]
            b = {"image_tokens": io.tokens.float(), "text_tokens": to.tokens.float(),
                 "text_mask": torch.arange(T, device=device)[None] < to.length.to(device)[:, None]}
        train_step(model, opt, b, io.grid, amp)

    flops = count_flops(step)  # the warm-up step, counted
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - t), flops / batch


MODES = {"pooled": ("pooled", 0), "tokens": ("tokens", 0), "tokens_pooled_grid": ("tokens", 8)}
STEPS = ("eager", "cuda-graph", "compile")  # compile last: a cold torch.compile may overrun the step's time cap


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--e2e-steps", type=int, default=2)
    ap.add_argument("--tokens-batch", type=int, default=0,
                    help="batch for tokens mode (default: --batch on CUDA, 8 on CPU, where the paper-sized "
                         "Adaptor over whole token sequences makes a step slow)")
    ap.add_argument("--tokens-steps", type=int, default=0,
                    help="cached tokens-mode steps timed per step mode (default: one epoch on CUDA, 2 on CPU)")
    ap.add_argument("--epochs", type=int, default=20, help="epochs of cached pooled steps timed per step mode")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ", ".join(MODES))
    ap.add_argument("--steps", default=None,
                    help="comma-separated step modes to time (default: all three on CUDA, eager on CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads for every step (default: torch's own)")
    ap.add_argument("--sweep-batches", default="",
                    help="comma-separated batches at which to also time the cached pooled step (e.g. 64,128,256)")
    ap.add_argument("--sweep-steps", type=int, default=6, help="timed steps per batch of the sweep")
    ap.add_argument("--workdir", default=None,
                    help="keep the table and the cache here (a second run with the same --items reuses them)")
    ap.add_argument("--out", default=None, help="also write the JSON object to this file, after every measurement")
    args = ap.parse_args()
    args.sweep_batches = [int(b) for b in args.sweep_batches.split(",") if b.strip()]
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {unknown}; use {', '.join(MODES)}")
    return args


def ordered(out: dict) -> dict:
    order = ["bench", "speedup_pooled", "speedup_tokens", "speedup_tokens_pooled_grid", "data_wait_share"]
    return {**{k: out[k] for k in order if k in out}, **{k: v for k, v in out.items() if k not in order}}


def report(out: dict, path: str | None) -> None:
    """Write the figures so far to ``--out`` (atomically: a reader never sees half a file)."""
    if path:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(ordered(out)) + "\n")
        os.replace(tmp, path)


def measure_mode(key, inputs, args, device, amp, steps, out) -> None:
    """One Adaptor mode: the end-to-end step, then the cached step in each step mode."""
    mode, gp = MODES[key]
    cuda = device.type == "cuda"
    bs = args.batch if mode == "pooled" else out["tokens_batch"]
    pixels, texts, img_enc, txt_enc, data = inputs
    try:
        e, e_flops = e2e_rate(pixels, texts, img_enc, txt_enc, mode, gp, bs, device, amp,
                              args.e2e_steps if mode == "pooled" else 1)
    except Exception as exc:  # without the end-to-end figure there is no speedup to report
        failed(out, f"{key}_e2e", exc, args.out)
        return
    out[f"e2e_samples_s_{key}"] = round(e, 2)
    out[f"flops_per_sample_e2e_{key}"] = round(e_flops)
    out.update(shares(out, f"e2e_{key}", e_flops * e / 1e9))
    tokens_steps = args.tokens_steps or (0 if cuda else 2)  # a CPU manages a step or two in the time budget
    best = None
    for step in steps:
        try:
            c = cached_rate(data, mode, gp, bs, device, amp, args.epochs if mode == "pooled" else 1,
                            max_steps=0 if mode == "pooled" else tokens_steps, step=step)
        except Exception as exc:  # one failing step mode must not cost the others' figures
            failed(out, f"{key}_{step}", exc, args.out)
            continue
        out[f"cached_samples_s_{key}_{step}"] = round(c["samples_s"], 1)
        out[f"residency_{key}"] = c["residency"]
        print(f"{key} [{step}]: cached {c['samples_s']:,.1f}/s ({c['residency']}, data wait {100 * c['wait']:.1f}%), "
              f"e2e {e:,.2f}/s, speedup {c['samples_s'] / e:,.1f}x", file=sys.stderr)
        if best is None or c["samples_s"] > best["samples_s"]:
            best = {**c, "step": step}
            headline(out, key, e, e_flops, best)
        report(out, args.out)  # the best so far is on disk before the next step mode starts


def failed(out: dict, what: str, exc: Exception, path: str | None) -> None:
    out[f"error_{what}"] = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    print(f"{what.replace('_', ' [', 1)}]: failed: {out[f'error_{what}']}", file=sys.stderr)
    report(out, path)


def shares(out: dict, side: str, gflops: float) -> dict:
    """A side's roofline figures: achieved GFLOP/s and its share of this run's peak."""
    return {f"gflops_{side}": round(gflops, 2), f"peak_share_{side}": round(gflops / out["peak_gflops"], 4)}


def headline(out: dict, key: str, e2e: float, e2e_flops: float, best: dict) -> None:
    """A mode's headline figures from its fastest step mode so far, with their roofline."""
    cached, flops = best["samples_s"], best["flops_per_sample"]
    out.update({f"speedup_{key}": round(cached / e2e, 1), f"step_{key}": best["step"],
                f"cached_samples_s_{key}": round(cached, 1), f"data_wait_share_{key}": round(best["wait"], 4),
                f"flops_per_sample_cached_{key}": round(flops), f"flop_ratio_{key}": round(e2e_flops / flops, 1),
                **shares(out, f"cached_{key}", flops * cached / 1e9)})
    if key == "pooled":
        out["data_wait_share"] = out["data_wait_share_pooled"]
        out.update(optimizer_floor(out, best["params"], 1000 * out["batch"] / cached))


def optimizer_floor(out: dict, params: int, step_ms: float) -> dict:
    """Fused AdamW's memory traffic per step (28 bytes per parameter) over the measured copy
    bandwidth: the time no faster arithmetic can take from a step."""
    floor_ms = 28 * params / (out["bandwidth_gbs"] * 1e9) * 1000
    return {"adaptor_params": params, "step_ms_pooled": round(step_ms, 2), "optimizer_floor_ms": round(floor_ms, 2),
            "optimizer_floor_share": round(floor_ms / step_ms, 3)}


def sweep_batches(args, inputs, device, amp, out) -> None:
    """The cached pooled step at ``--batch`` and each of ``--sweep-batches`` (eager), then the
    end-to-end step at ``--batch`` once more: each batch's speedup is over the mean of the two
    end-to-end rates (the one before the cached runs, the one after), so load that changes
    during the sweep moves both sides. ``peak_batch_pooled`` is where the speedup is highest."""
    if not out.get("e2e_samples_s_pooled"):
        return
    pixels, texts, img_enc, txt_enc, data = inputs
    rates = {}
    for b in [out["batch"], *args.sweep_batches]:
        c = cached_rate(data, "pooled", 0, b, device, amp, epochs=1000, max_steps=args.sweep_steps,
                        fill=b * args.sweep_steps)
        rates[b] = (c["samples_s"], c["flops_per_sample"])
        print(f"pooled batch {b}: cached {c['samples_s']:,.1f}/s", file=sys.stderr)
    again, _ = e2e_rate(pixels, texts, img_enc, txt_enc, "pooled", 0, out["batch"], device, amp, args.e2e_steps)
    e2e = [out["e2e_samples_s_pooled"], round(again, 2)]
    out["sweep_e2e_samples_s_pooled"] = e2e
    out["sweep_pooled"] = {str(b): {"cached_samples_s": round(r, 1), "speedup": round(2 * r / sum(e2e), 1),
                                    **{k.replace("_sweep", ""): v for k, v in
                                       shares(out, "sweep", flops * r / 1e9).items()}}
                           for b, (r, flops) in rates.items()}
    out["peak_batch_pooled"] = int(max(out["sweep_pooled"], key=lambda k: out["sweep_pooled"][k]["speedup"]))
    report(out, args.out)


def prepare(args, root: Path, device, backbone: str, n_pixels: int):
    """The table, its cache (embedded by `pipe embed`), the encoders and the e2e inputs."""
    table = make_table(root / "data", args.items)
    res = embed.run(embed.EmbedConfig(dataset=str(table), backbone=backbone, text_encoder="random-bert",
                                      cache=str(root / "cache"), batch_size=args.batch, device=device.type))
    from pipeline.datasets import open_dataset  # lazy: after the benchmark's thread and allocator settings
    from pipeline.encoders import create_encoder, resolve_encoder_name  # lazy: after the benchmark's thread and allocator settings
    from pipeline.imaging import read_and_decode  # lazy: after the benchmark's thread and allocator settings

    data = load_pairs(root / "cache", open_dataset(str(table), root / "cache").name, str(table),
                      backbone, "random-bert")
    img_enc = get_encoder(backbone, device)
    txt_enc = create_encoder("random-bert", device=str(device))
    pre = preprocess_of(resolve_encoder_name(backbone))
    pixels = torch.stack([pre(read_and_decode(root / "data" / f"{i}.png")[1]) for i in range(n_pixels)])
    texts = list(pd.read_csv(table).report)
    return res, (pixels, texts, img_enc, txt_enc, data)


def measure_machine(out: dict, device: torch.device, dtype: torch.dtype) -> None:
    """This run's peak (the best of its measurements so far) and copy bandwidth; every share of
    the peak is brought up to date with it."""
    runs = [*out.get("peak_gflops_runs", []), round(measure_peak(device, dtype), 1)]
    out.update(peak_gflops_runs=runs, peak_gflops=max(runs), peak_dtype=str(dtype).split(".")[-1],
               threads=torch.get_num_threads())
    out.setdefault("bandwidth_gbs", round(measure_bandwidth(device), 1))
    for figures in (out, *out.get("sweep_pooled", {}).values()):
        for k in [k for k in figures if k.startswith("gflops")]:
            figures["peak_share" + k[len("gflops"):]] = round(figures[k] / out["peak_gflops"], 4)


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["PIPE_THREADS"] = str(args.threads)  # pipe embed's own thread plan follows it
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    backbone = "random-dinov2-b" if cuda else "random-dinov2-s"
    # no autocast weight cache: CUDA graph capture needs it off
    amp = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)) if cuda
           else (lambda: torch.autocast("cpu", enabled=False)))
    steps = args.steps.split(",") if args.steps else (STEPS if cuda else ("eager",))
    tb = args.tokens_batch or (args.batch if cuda else 8)
    n_pixels = max([args.batch if MODES[k][0] == "pooled" else tb for k in args.modes] or [1])
    out = {"bench": "cached_vs_e2e", "device": torch.cuda.get_device_name() if cuda else "cpu",
           "backbone": backbone, "text_encoder": "random-bert", "batch": args.batch, "tokens_batch": tb,
           "items": args.items, "modes": args.modes, "steps": list(steps)}
    with contextlib.ExitStack() as stack:
        root = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        res, inputs = prepare(args, root, device, backbone, n_pixels)
        out["embed_seconds"] = round(res.seconds, 1)
        measure_machine(out, device, torch.bfloat16 if cuda else torch.float32)
        report(out, args.out)
        for key in args.modes:
            measure_mode(key, inputs, args, device, amp, steps, out)
        if args.sweep_batches and "pooled" in args.modes:
            sweep_batches(args, inputs, device, amp, out)
        measure_machine(out, device, torch.bfloat16 if cuda else torch.float32)  # and once more at the end
        report(out, args.out)
    print(json.dumps(ordered(out)))


if __name__ == "__main__":
    main()
