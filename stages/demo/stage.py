"""`pipe demo`: the whole pipeline on the built-in phantom data, in minutes on a CPU.

1. embed the demo once (tiny-vit, untrained, + the real all-MiniLM-L6-v2 text encoder);
2. train the Adaptor from the cache (configs/demo.yaml);
3. evaluate from the cache: retrieval, zero-shot, classification at 1/10/100% labels and
   segmentation, each with the Adaptor and without it;
4. gather the tables into demo-out/results.md.
A re-run reuses the cache and the finished steps.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cache.atomic import atomic_write_text
from cache.paths import cache_root
from pipeline.config import load_config
from pipeline.datasets import open_dataset
from pipeline.console import err, escape, section
from stages import embed, evaluate
from stages import train as train_adaptor
from stages.evaluate.tables import merge_tables, to_markdown

PRESET = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "demo-out"
    dataset: str = "demo"
    backbone: str = "tiny-vit"
    text_encoder: str = "minilm"
    cache: str | None = None
    device: str = "auto"
    seeds: int = 3
    segmentation: bool = True


@dataclass
class DemoResult:
    report: Path                  # results.md
    tables: list[dict]            # every results table, as `pipe report` merges them
    runs: list[Path]              # the evaluation run directories
    checkpoint: Path
    seconds: float

    def summary(self) -> dict:
        return {"report": str(self.report), "checkpoint": str(self.checkpoint), "runs": [str(r) for r in self.runs],
                "seconds": round(self.seconds, 1), "tables": self.tables}


def _step(title: str):
    section(title)
    return time.perf_counter()


def run(cfg: DemoConfig) -> DemoResult:
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = _step("1/4 pipe embed: each frozen encoder once over the demo")
    res = embed.run(embed.EmbedConfig(dataset=cfg.dataset, backbone=cfg.backbone, text_encoder=cfg.text_encoder,
                                      cache=cfg.cache, device=cfg.device))
    err.print(f"embedded {res.embedded:,}, reused {res.reused:,}, failed {res.failed} in {res.seconds:.1f} s")
    if cfg.dataset.split("?")[0].split(":")[0] == "demo":  # how far the phantom reports agree with the labels
        err.print(open_dataset(cfg.dataset, cache_root(cfg.cache), materialise=False).description, markup=False)

    _step("2/4 pipe train-adaptor: from the cache only")
    tcfg = load_config(train_adaptor.TrainConfig, PRESET, [
        f"dataset={json.dumps(cfg.dataset)}", f"backbone={json.dumps(cfg.backbone)}",
        f"text_encoder={json.dumps(cfg.text_encoder)}", f"out={json.dumps(str(out / 'adaptor'))}",
        f"device={cfg.device}", *([f"cache={json.dumps(cfg.cache)}"] if cfg.cache else [])])
    trained = train_adaptor.run(tcfg)
    ckpt = str(trained.best or trained.checkpoint)  # chosen on validation loss, when there is a validation split

    _step("3/4 pipe evaluate: heads trained from the cache, with and without the Adaptor")
    runs = []
    tasks = [("retrieval", []), ("zero-shot", []), ("classification", [f"seeds={cfg.seeds}"])]
    if cfg.segmentation:
        # a small decoder and few steps: the GPU-sized defaults take tens of minutes on 2 cores
        tasks.append(("segmentation", ["seeds=1", "fractions=[0.1,1.0]", "seg.target=effusion",
                                       "seg.channels=[32,16,16,8]", "seg.min_steps=200", "seg.epochs=10"]))
    for task, extra in tasks:
        ecfg = load_config(evaluate.EvalConfig, None, [
            f"task={task}", f"dataset={json.dumps(cfg.dataset)}", f"adaptor={json.dumps(ckpt)}", "baseline=true",
            f"out={json.dumps(str(out / task))}", f"device={cfg.device}",
            *([f"cache={json.dumps(cfg.cache)}"] if cfg.cache else []), *extra])
        runs.append(evaluate.run(ecfg).out)

    _step("4/4 results")
    report, tables = write_report(runs, out / "results.md")
    seconds = time.perf_counter() - t0
    err.print(f"done in {seconds:.0f} s · results: {escape(str(report))} · plots: {escape(str(out))}/*/*.png")
    return DemoResult(report, tables, runs, trained.checkpoint, seconds)


def write_report(runs: list[Path], path: Path) -> tuple[Path, list[dict]]:
    loaded = [json.loads((r / "results.json").read_text()) for r in runs]
    tables = merge_tables(loaded, [str(r) for r in runs])
    atomic_write_text(path, "# Demo results\n\n" + "\n".join(to_markdown(t) for t in tables))
    return path, tables
