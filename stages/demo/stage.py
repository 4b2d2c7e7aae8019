"""`pipe demo`: the whole pipeline on the built-in phantom data, in minutes on a CPU.

1. embed the demo once with a real pretrained image encoder (DINOv2-S derived, shipped
   in a pip package) and the real all-MiniLM-L6-v2 text encoder;
2. train two Adaptors from the cache: the paper's pooled mode (configs/demo.yaml) and
   tokens mode, our fix of flaw 1 (configs/demo_tokens.yaml);
3. evaluate from the cache: retrieval, zero-shot, classification at 1/10/100% labels
   and segmentation, with each Adaptor, without one, and (retrieval, zero-shot) with the
   training-free least-squares map;
4. gather the tables into demo-out/results.md, and everything (tables, training curves,
   ROC and calibration, overlays, retrieval examples, data card, provenance) into one
   self-contained page, demo-out/report.html.

A re-run reuses the cache (no encoder runs again); `pipe demo -b tiny-vit` runs the same
steps on the untrained test ViT in a fraction of the time.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from core.atomic import atomic_write_text
from cache.paths import cache_root
from pipeline.config import load_config
from core.console import err, escape, section
from pipeline.datasets import READERS, open_dataset
from pipeline.datasets.demo import DemoSpec
from pipeline.datasets.spec import parse_dataset_spec
from stages import embed, evaluate
from stages import train as train_adaptor
from pipeline.records import load_results
from pipeline.tables import Table, merge_tables, to_markdown
from stages.report import load_runs, write_page

PRESETS = {"pooled": "demo", "tokens": "demo_tokens"}  # configs/<name>.yaml
# A small decoder and few steps: the GPU-sized segmentation defaults take tens of minutes on 2 cores.
SEGMENTATION = ["seeds=1", "fractions=[0.1,1.0]", "seg.target=effusion", "seg.channels=[32,16,16,8]",
                "seg.min_steps=150", "seg.epochs=6"]


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    dataset: str = "demo"
    backbone: str = "dinov2-s-derived"
    text_encoder: str = "minilm"
    cache: str | None = None
    device: str = "auto"
    seeds: int = 3
    segmentation: bool = True
    tokens: bool = True            # also train and evaluate a tokens-mode Adaptor


@dataclass
class DemoResult:
    report: Path                  # results.md
    tables: list[Table]           # every results table, as `pipe report` merges them
    runs: list[Path]              # the evaluation run directories
    checkpoint: Path              # the pooled Adaptor's (best.safetensors when validation chose it)
    seconds: float
    checkpoints: dict[str, Path] | None = None   # every Adaptor trained, by mode
    timings: dict[str, float] | None = None      # seconds per step
    page: Path | None = None                     # report.html: everything on one page

    def summary(self) -> dict:
        return {"report": str(self.report), "page": str(self.page) if self.page else None,
                "checkpoint": str(self.checkpoint), "runs": [str(r) for r in self.runs],
                "checkpoints": {k: str(v) for k, v in (self.checkpoints or {}).items()},
                "seconds": round(self.seconds, 1), "timings": self.timings or {},
                "tables": [t.to_dict() for t in self.tables]}


def _common(cfg: DemoConfig) -> list[str]:
    return [f"dataset={json.dumps(cfg.dataset)}", f"device={json.dumps(cfg.device)}",
            *([f"cache={json.dumps(cfg.cache)}"] if cfg.cache else [])]


def _embed(cfg: DemoConfig) -> None:
    res = embed.run(embed.EmbedConfig(dataset=cfg.dataset, backbone=cfg.backbone, text_encoder=cfg.text_encoder,
                                      cache=cfg.cache, device=cfg.device))
    err.print(f"embedded {res.embedded:,}, reused {res.reused:,}, failed {res.failed} in {res.seconds:.1f} s")
    if cfg.dataset.split("?")[0].split(":")[0] == "demo":  # how far the phantom reports agree with the labels
        err.print(open_dataset(cfg.dataset, cache_root(cfg.cache), materialise=False).description, markup=False)


def _train(cfg: DemoConfig, mode: str, out: Path) -> Path:
    tcfg = load_config(train_adaptor.TrainConfig, PRESETS[mode], [
        *_common(cfg), f"backbone={json.dumps(cfg.backbone)}", f"text_encoder={json.dumps(cfg.text_encoder)}",
        f"out={json.dumps(str(out / f'adaptor-{mode}'))}"])
    trained = train_adaptor.run(tcfg)
    return trained.best or trained.checkpoint  # chosen on validation loss, when there is a validation split


def _fractions(cfg: DemoConfig) -> list[float]:
    """The paper's label fractions that leave at least 10 training items (a small --n drops 1%)."""
    parsed = parse_dataset_spec(cfg.dataset, READERS)
    n = int(parsed.options.get("n", DemoSpec.n)) if parsed is not None and parsed.reader == "demo" else 2000
    train = 0.7 * n
    return [f for f in (0.01, 0.1, 1.0) if f * train >= 10]


def _tasks(cfg: DemoConfig, mode: str) -> list[tuple[str, list[str]]]:
    """What each Adaptor is evaluated on; the no-Adaptor rows come with the pooled one."""
    tasks = [("retrieval", []), ("zero-shot", []),
             ("classification", [f"seeds={cfg.seeds}", f"fractions={json.dumps(_fractions(cfg))}"])]
    if cfg.segmentation:
        tasks.append(("segmentation", SEGMENTATION))
    if mode == "pooled":
        return [(t, [*extra, "baseline=true"]) for t, extra in tasks]
    # tokens mode: its per-token outputs are on the pooled 4x4 grid, too coarse to segment
    return [(t, extra) for t, extra in tasks if t != "segmentation"]


def _evaluate(cfg: DemoConfig, mode: str, ckpt: Path, out: Path) -> list[Path]:
    runs = []
    for task, extra in _tasks(cfg, mode):
        ecfg = load_config(evaluate.EvalConfig, None, [
            *_common(cfg), f"task={task}", f"adaptor={json.dumps(str(ckpt))}",
            f"out={json.dumps(str(out / f'{task}-{mode}'))}", *extra])
        runs.append(evaluate.run(ecfg).out)
    return runs


def run(cfg: DemoConfig) -> DemoResult:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    modes = ["pooled", "tokens"] if cfg.tokens else ["pooled"]
    timings, t0 = {}, time.perf_counter()

    def step(name: str, title: str, fn):
        section(title)
        t = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        return value

    step("embed", "1/4 pipe embed: each frozen encoder once over the demo", lambda: _embed(cfg))
    ckpts = {m: step(f"train_{m}", f"2/4 pipe train-adaptor ({m} mode): from the cache only",
                     lambda m=m: _train(cfg, m, out)) for m in modes}
    runs = [r for m in modes for r in step(f"evaluate_{m}", f"3/4 pipe evaluate ({m} Adaptor): heads from the "
                                           "cache, with and without an Adaptor", lambda m=m: _evaluate(cfg, m, ckpts[m], out))]
    section("4/4 results")
    report, tables = write_report(runs, out / "results.md")
    page = write_page(load_runs(runs), out / "report.html", title="freeze-pipe demo")
    seconds = time.perf_counter() - t0
    err.print(f"done in {seconds:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}) · results: "
              f"{escape(str(report))} · plots: {escape(str(out))}/*/*.png")
    err.print(f"everything on one page: {escape(str(page))} (open it in a browser)")
    run_dir = escape(str(ckpts["pooled"].parent))
    err.print(f"use it on new images: pipe predict IMAGE... --adaptor {run_dir} · as a package: pipe export "
              f"{run_dir} --out DIR (README: Using a trained Adaptor)")
    err.print(f"the cache (embeddings, the phantom images): {escape(str(cache_root(cfg.cache)))}"
              + ("" if cfg.cache else " (the default location: `pipe` and the Python API find it without --cache)"),
              soft_wrap=True)
    return DemoResult(report, tables, runs, ckpts["pooled"], seconds, ckpts, timings, page)


def write_report(runs: list[Path], path: Path) -> tuple[Path, list[Table]]:
    records = [load_results(r) for r in runs]
    tables = merge_tables([(r.dataset_label, r.tables) for r in records], [str(r) for r in runs])
    atomic_write_text(path, "# Demo results\n\n" + "\n".join(to_markdown(t) for t in tables))
    return path, tables
