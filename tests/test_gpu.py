"""The GPU code paths, on a CUDA device (every test here is skipped without one).

- `pipe embed` on CUDA (spawned decode processes, pinned non-blocking copies, bf16
  autocast, side-stream device-to-host copies) gives the CPU run's content keys, and its
  tokens within bf16 tolerance; killed with SIGKILL and resumed, it leaves a cache that
  verifies;
- `step=cuda-graph` and `step=compile` train like eager and really replay / compile;
- the GPU-resident loader yields exactly the RAM loader's batches (and the streaming
  loader, through pinned memory, exactly the CPU streaming loader's);
- a one-process nccl torchrun run trains like a plain run;
- the trained-Adaptor API on CUDA encodes new images as `pipe embed` on CUDA does.

`make gpu-check` runs them (`pytest -m gpu tests/test_gpu.py`) before the GPU benchmarks.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests.helpers import SMALL, embed_json, make_table, pipe
from tests.helpers.stores import read_rows, stores_by_modality

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

ROOT = Path(__file__).resolve().parents[1]
NO_DROPOUT = [*SMALL, "adaptor.dropout=0"]  # no dropout: eager, compiled and graph steps draw their masks differently
COMPARED = ["train_loss", "val_loss", "lr", "logit_scale"]
TOKENS = ["adaptor.mode=tokens", "adaptor.grid_pool=7"]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PIPE_NO_PROGRESS": "1",
            "OMP_NUM_THREADS": "1", "COLUMNS": "400"}


def assert_bf16_close(gpu: np.ndarray, cpu: np.ndarray, what: str) -> None:
    """A bf16 forward against a float32 one: close in norm and in direction, row by row."""
    g, c = gpu.astype(np.float64).reshape(len(gpu), -1), cpu.astype(np.float64).reshape(len(cpu), -1)
    rel = np.linalg.norm(g - c) / max(np.linalg.norm(c), 1e-12)
    cos = (g * c).sum(1) / np.maximum(np.linalg.norm(g, axis=1) * np.linalg.norm(c, axis=1), 1e-12)
    assert rel < 0.05 and cos.min() > 0.99, f"{what}: relative error {rel:.4f}, smallest row cosine {cos.min():.5f}"


# ---------------------------------------------------------------- stage one on CUDA
def test_embed_on_cuda_gives_the_cpu_runs_keys_and_tokens_within_bf16(tmp_path):
    table = make_table(tmp_path / "data", 24)
    cpu = embed_json(table, tmp_path / "cpu", "--device", "cpu", "--batch-size", "8")
    gpu = embed_json(table, tmp_path / "gpu", "--device", "cuda", "--batch-size", "8")
    assert cpu["embedded"] == gpu["embedded"] == 48 and gpu["failed"] == 0
    assert gpu.get("gpu_peak_mb", 0) > 0  # the encoders really ran on the GPU
    a, b = stores_by_modality(tmp_path / "cpu"), stores_by_modality(tmp_path / "gpu")
    for modality in ("image", "text"):
        assert set(b[modality].row_index()) == set(a[modality].row_index()), f"{modality}: content keys differ"
        for name in ("tokens", "pooled"):
            ra, rb = read_rows(a[modality], name), read_rows(b[modality], name)
            keys = sorted(ra)
            assert_bf16_close(np.stack([rb[k] for k in keys]), np.stack([ra[k] for k in keys]), f"{modality}/{name}")
    la, lb = read_rows(a["text"], "length"), read_rows(b["text"], "length")
    assert all(int(la[k]) == int(lb[k]) for k in la)


def _embed_cmd(table: Path, cache: Path) -> list[str]:
    return [sys.executable, "-m", "cli", "embed", "--dataset", str(table), "--backbone", "tiny-vit",
            "--text-encoder", "tiny-bert", "--cache", str(cache), "--batch-size", "4", "--shard-mb", "0.25",
            "--device", "cuda", "--json"]


@pytest.mark.slow
def test_embed_killed_on_cuda_resumes_to_a_cache_that_verifies(tmp_path):
    n = 600  # ~40 image shards of 16 rows in batches of 4: the kill lands well before the end
    table = make_table(tmp_path / "data", n)
    clean = subprocess.run(_embed_cmd(table, tmp_path / "clean"), env=env(), capture_output=True, text=True,
                           timeout=240)
    assert clean.returncode == 0, clean.stderr[-3000:]
    cache = tmp_path / "killed"
    # its own session, so the kill takes the decode processes with it, as a crash would
    proc = subprocess.Popen(_embed_cmd(table, cache), env=env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if any(cache.glob("stores/*/*/manifest/part-*.parquet")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before the kill: make the table larger"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    resumed = subprocess.run(_embed_cmd(table, cache), env=env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert out["reused"] > 0 and out["embedded"] > 0 and out["embedded"] + out["reused"] == 2 * n, out
    pipe("cache", "verify", "--cache", str(cache))
    a, b = stores_by_modality(tmp_path / "clean"), stores_by_modality(cache)
    for modality in ("image", "text"):
        assert b[modality].manifest().num_rows == len(set(b[modality].committed_units())) == n
        for name in ("tokens", "pooled"):
            ra, rb = read_rows(a[modality], name), read_rows(b[modality], name)
            assert ra.keys() == rb.keys()
            # same device, same batches: equal up to float16 storage, whatever cuBLAS picks
            worst = max(float(np.abs(ra[k].astype(np.float32) - rb[k].astype(np.float32)).max()) for k in ra)
            scale = max(float(np.abs(ra[k]).max()) for k in ra)
            assert worst <= 2e-3 * scale, f"{modality}/{name} after resume: max difference {worst} (scale {scale})"


# ---------------------------------------------------------------- stage two: how a step runs
def train(cached, out: Path, *overrides: str) -> pd.DataFrame:
    table, cache = cached
    pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
         "--out", str(out), "--device", "cuda", "--json", *NO_DROPOUT, *overrides)
    return pd.read_csv(out / "metrics.csv")


def assert_trains_alike(got: pd.DataFrame, want: pd.DataFrame, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    assert list(got.epoch) == list(want.epoch)
    for col in COMPARED:
        torch.testing.assert_close(torch.tensor(got[col].values), torch.tensor(want[col].values),
                                   rtol=rtol, atol=atol, msg=col)


class GraphCounter:
    """Counts graph captures and real graph launches of the step runner."""

    def __init__(self, monkeypatch):
        from stages.train import step

        self.captures = self.replays = 0
        real_capture, real_replay = step.StepRunner._capture, torch.cuda.CUDAGraph.replay

        def capture(runner, batch):
            self.captures += 1
            return real_capture(runner, batch)

        def replay(graph):
            self.replays += 1
            return real_replay(graph)

        monkeypatch.setattr(step.StepRunner, "_capture", capture)
        monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", replay)


@pytest.mark.parametrize("mode,resident", [("pooled", "auto"), ("tokens", "none")],
                         ids=["pooled-gpu-resident", "tokens-streamed"])
def test_a_cuda_graph_step_trains_like_the_eager_step_and_replays(cached, tmp_path, monkeypatch, mode, resident):
    from stages.train.step import WARMUP_STEPS

    extra = ["epochs=4", "--resident", resident, *(TOKENS if mode == "tokens" else [])]
    eager = train(cached, tmp_path / "eager", *extra)
    counter = GraphCounter(monkeypatch)
    graph = train(cached, tmp_path / "graph", *extra, "step=cuda-graph")
    steps = 4 * 2
    assert counter.captures == 1 and counter.replays == steps - WARMUP_STEPS, vars(counter)
    assert_trains_alike(graph, eager)


def test_an_eager_checkpoint_resumes_with_a_cuda_graph_step(cached, tmp_path, monkeypatch):
    """The step mode may change on resume: the optimizer must then be made capturable again."""
    from stages.train import trainer

    full = train(cached, tmp_path / "full", "epochs=4")
    real_epoch = trainer.Trainer._epoch

    def dies_in_epoch_3(self, epoch, tick):
        if epoch == 3:
            raise RuntimeError("simulated crash")
        return real_epoch(self, epoch, tick)

    monkeypatch.setattr(trainer.Trainer, "_epoch", dies_in_epoch_3)
    table, cache = cached
    r = pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
             "--out", str(tmp_path / "cut"), "--device", "cuda", *NO_DROPOUT, "epochs=4", expect=None)
    assert "simulated crash" in str(r.exception)
    monkeypatch.undo()
    counter = GraphCounter(monkeypatch)
    resumed = train(cached, tmp_path / "cut", "epochs=4", "step=cuda-graph")
    assert counter.captures == 1 and counter.replays >= 1
    assert_trains_alike(resumed, full)


def compile_unavailable() -> str | None:
    """Why torch.compile cannot build GPU kernels here (None when it can): Triton needs a C
    compiler and Python's headers for its launcher, which a bare machine may lack."""
    if not any(shutil.which(cc) for cc in (os.environ.get("CC") or "cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) for torch.compile's Triton kernels"
    try:
        f = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2 + 1)
        f(torch.randn(64, device="cuda"))
        torch.cuda.synchronize()
    except Exception as exc:  # any failure to build: report why and skip
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return f"torch.compile cannot build kernels here: {type(exc).__name__}: {first}"
    return None


@pytest.mark.slow
def test_a_compiled_step_trains_like_the_eager_step(cached, tmp_path):
    why = compile_unavailable()
    if why:
        pytest.skip(why)
    from torch._dynamo.utils import counters

    eager = train(cached, tmp_path / "eager", "epochs=3")
    counters.clear()
    compiled = train(cached, tmp_path / "compiled", "epochs=3", "step=compile")
    assert counters["stats"]["unique_graphs"] >= 1  # the step really went through torch.compile
    # inductor's kernels sum in another order than eager's
    assert_trains_alike(compiled, eager, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------- the loader on the GPU
def _pairs(cached):
    from cache.pairs import load_pairs
    from cache.paths import cache_root
    from pipeline.datasets import open_dataset

    table, cache = cached
    return load_pairs(cache_root(cache), open_dataset(str(table), cache_root(cache)).name, str(table),
                      "tiny-vit", "tiny-bert")


def _assert_same_batches(want_loader, got_loader, device: str) -> None:
    for epoch in (1, 2, None):
        want, got = list(want_loader.batches(epoch)), list(got_loader.batches(epoch))
        assert len(want) == len(got) > 0
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            for k in a:
                assert b[k].device.type == device, (k, b[k].device)
                assert a[k].dtype == b[k].dtype and torch.equal(a[k].cpu(), b[k].cpu()), (epoch, k)


@pytest.mark.parametrize("mode", ["pooled", "tokens"])
def test_the_gpu_resident_loader_yields_exactly_the_ram_loaders_batches(cached, mode):
    from stages.train.loader import PairLoader

    data = _pairs(cached)
    pos = data.split("train")
    ram = PairLoader(data, pos, mode, 8, torch.device("cpu"), "ram", seed=3, drop_last=True)
    gpu = PairLoader(data, pos, mode, 8, torch.device("cuda"), "gpu", seed=3, drop_last=True)
    assert ram.residency == "ram" and gpu.residency == "gpu"
    _assert_same_batches(ram, gpu, "cuda")
    # streamed: pinned host buffers filled by the read-ahead thread, copied without blocking
    cpu_stream = PairLoader(data, pos, mode, 8, torch.device("cpu"), "none", seed=3, drop_last=True)
    gpu_stream = PairLoader(data, pos, mode, 8, torch.device("cuda"), "none", seed=3, drop_last=True)
    assert gpu_stream.residency == "stream"
    _assert_same_batches(cpu_stream, gpu_stream, "cuda")


# ---------------------------------------------------------------- DDP over nccl
@pytest.mark.slow
def test_a_one_process_nccl_torchrun_run_trains_like_a_plain_run(cached, tmp_path):
    table, cache = cached
    plain = train(cached, tmp_path / "plain", "epochs=3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "cli", "train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert",
           "--cache", str(cache), "--out", str(tmp_path / "ddp"), "--device", "cuda", *NO_DROPOUT, "epochs=3"]
    r = subprocess.run(cmd, env={**env(), "NCCL_DEBUG": "INFO"}, cwd=tmp_path, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-4000:]
    assert "NCCL INFO" in r.stdout + r.stderr  # the process group really is nccl
    assert "world size 1" in r.stderr
    ddp = pd.read_csv(tmp_path / "ddp" / "metrics.csv")
    assert_trains_alike(ddp, plain)  # one rank: DDP's all-reduce averages over itself


# ---------------------------------------------------------------- the trained-Adaptor API on CUDA
def test_the_api_on_cuda_encodes_as_pipe_embed_on_cuda(tmp_path):
    """`load_adaptor(..., device="cuda")` runs the encoders in stage one's CUDA arithmetic (bf16
    autocast): a new image through it matches its CUDA-embedded cache row through the same
    Adaptor, and the CPU path reads the same images a bf16 rounding away."""
    from cache.pairs import load_pairs
    from pipeline.api import load_adaptor
    from pipeline.datasets import open_dataset
    from stages.evaluate.features import FrozenAdaptor

    table = make_table(tmp_path / "data", 24)
    cache = tmp_path / "cache"
    embed_json(table, cache, "--device", "cuda", "--batch-size", "8")
    pipe("train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert", "--cache", str(cache),
         "--out", str(tmp_path / "run"), "--device", "cuda", *NO_DROPOUT, "epochs=1")
    data = load_pairs(cache, open_dataset(str(table), cache).name, str(table), "tiny-vit", "tiny-bert")
    model = load_adaptor(tmp_path / "run", device="cuda")
    frozen = FrozenAdaptor.load(tmp_path / "run", torch.device("cuda"), cache)
    images, reports = data.items.image.tolist(), data.items.report.tolist()
    emb = model.encode_images(images, batch_size=8)
    assert_bf16_close(emb, frozen.image_embeddings(data.image, data.image_rows[:, 0]), "API image vs CUDA cache")
    txt = model.encode_texts(reports, batch_size=8)
    assert_bf16_close(txt, frozen.text_embeddings(data.text, data.text_rows), "API text vs CUDA cache")
    on_cpu = load_adaptor(tmp_path / "run", device="cpu")  # trained on CUDA features: accepted on the CPU
    assert_bf16_close(on_cpu.encode_images(images, batch_size=8), emb, "API on CPU vs on CUDA")
