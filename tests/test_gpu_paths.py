"""The GPU code paths, checked on the CPU where a stand-in can show what they would do.

No GPU has run this code yet, and the first one may come with minutes to spare: each risk
found by reading the GPU paths has a test here that fails on the code as it was, runs
without CUDA, and leaves the real check to `make gpu-check` (tests/test_gpu.py).
"""
from __future__ import annotations

import contextlib

import torch

from stages.train import step as step_module
from stages.train.step import StepRunner


class _FakeCuda:
    """Records which device each CUDA stream, graph and device context was made for."""

    def __init__(self) -> None:
        self.current = 0
        self.events: list[tuple[str, object]] = []
        fake = self

        class Stream:
            def __init__(self, device=None):
                self.device = torch.device(device) if device is not None else torch.device("cuda", fake.current)
                fake.events.append(("stream", self.device))

            def wait_stream(self, other) -> None:
                pass

        class CUDAGraph:
            def __init__(self):
                fake.events.append(("graph made on current device", fake.current))

            def replay(self):
                fake.events.append(("replay on current device", fake.current))

        self.Stream, self.CUDAGraph = Stream, CUDAGraph

    @contextlib.contextmanager
    def device(self, dev):
        before, self.current = self.current, torch.device(dev).index
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def graph(self, graph, pool=None, stream=None, capture_error_mode="global"):
        self.events.append(("capture stream", None if stream is None else stream.device))
        self.events.append(("capture on current device", self.current))
        yield

    @contextlib.contextmanager
    def stream(self, s):
        yield

    def current_stream(self, device=None):
        return self.Stream(device)


def test_a_cuda_graph_step_on_cuda_1_captures_and_replays_on_device_1(monkeypatch):
    """step=cuda-graph with --device cuda:1: torch.cuda.graph's default capture stream belongs to the
    current device (0 unless set), so the kernels of cuda:1 would run outside the graph and every
    replay would do nothing. The capture must happen with cuda:1 current, on a stream of cuda:1."""
    fake = _FakeCuda()
    for name in ("Stream", "CUDAGraph", "device", "graph", "stream", "current_stream"):
        monkeypatch.setattr(step_module.torch.cuda, name, getattr(fake, name))
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    runner = StepRunner(lambda b: (w * b["x"]).sum(), opt, "cuda-graph", torch.device("cpu"))
    runner.device = torch.device("cuda", 1)  # the CPU stands in for cuda:1's arithmetic
    for _ in range(step_module.WARMUP_STEPS + 2):
        runner({"x": torch.ones(3)})
    assert ("capture stream", torch.device("cuda", 1)) in fake.events
    assert ("capture on current device", 1) in fake.events
    assert ("graph made on current device", 1) in fake.events
    replays = [e for e in fake.events if e[0].startswith("replay")]
    assert replays and all(dev == 1 for _, dev in replays)
    streams = [dev for kind, dev in fake.events if kind == "stream"]
    assert streams and all(dev == torch.device("cuda", 1) for dev in streams), streams
