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


def _units(folder, n: int, bad: int | None = None):
    """n PNG units (their real content keys); unit ``bad`` points at a file that is not an image."""
    import xxhash

    from cache.index import Unit
    from tests.helpers import write_png

    units = []
    for i in range(n):
        path = write_png(folder / f"{i}.png", seed=i, size=40)
        if i == bad:
            path.write_bytes(b"not an image")
        units.append(Unit(xxhash.xxh3_128_hexdigest(path.read_bytes()), 0, str(path)))
    return units


def test_decode_processes_return_each_share_of_a_batch_as_one_tensor(tmp_path):
    """A GPU embed decodes in spawned processes. Each returned tensor costs a shared-memory segment and
    two file descriptors (about 300 MB of /dev/shm at batch 256 when each image came back alone, more
    than a container's default 64 MB): each process returns its share of the batch stacked, so a
    batch costs one segment per process, and the images, failures included, come back in order."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.encoders import resolve_encoder_name
    from stages.embed.modality import ImageLoader, decode_pool, load_image, preprocess_of

    pre = preprocess_of(resolve_encoder_name("tiny-vit"))
    units = _units(tmp_path, 7, bad=3)
    pool = decode_pool(2, 2, torch.device("cpu"))
    assert isinstance(pool, ProcessPoolExecutor)
    loader = ImageLoader(pre, pool)
    shares = []
    submit = pool.submit
    pool.submit = lambda fn, share, *a: shares.append(len(share)) or submit(fn, share, *a)
    try:
        got = loader.load(units)
    finally:
        loader.close()
    assert shares == [3, 4]  # two processes, two shares, not seven tensors
    want = [load_image(u, pre) for u in units]
    assert isinstance(got[3], Exception) and isinstance(want[3], Exception)
    for i in (0, 1, 2, 4, 5, 6):
        assert torch.equal(got[i], want[i])


def test_a_daemonic_process_decodes_in_threads_instead_of_failing(monkeypatch):
    """Python refuses children to a daemonic process (a Dask worker whose nanny starts daemons): there
    the decode pool falls back to threads, with a note, instead of failing on the first batch."""
    from concurrent.futures import ThreadPoolExecutor

    from stages.embed import modality

    class Daemon:
        daemon = True

    monkeypatch.setattr(modality.multiprocessing, "current_process", lambda: Daemon())
    pool = modality.decode_pool(2, 2, torch.device("cpu"))
    assert isinstance(pool, ThreadPoolExecutor)
    pool.shutdown()


def test_a_local_dask_cluster_starts_workers_that_may_have_children(monkeypatch):
    """`pipe embed --workers N --device cuda` decodes in processes inside each Dask worker: the local
    cluster is started with non-daemonic workers."""
    import dask

    from stages.embed import runners

    seen = {}

    class Cluster:
        def __init__(self, **kw):
            seen["daemon"] = dask.config.get("distributed.worker.daemon")

        def close(self):
            pass

    import distributed
    monkeypatch.setattr(distributed, "LocalCluster", Cluster)
    monkeypatch.setattr(distributed, "Client", lambda cluster: None)

    class Cfg:
        scheduler, workers = None, 2

    runners._dask_client(Cfg())
    assert seen["daemon"] is False


def _zero_shot_ctx(device: str, compute):
    from types import SimpleNamespace

    text = SimpleNamespace(attrs={"spec": {"compute": compute}})
    return SimpleNamespace(device=torch.device(device), data=SimpleNamespace(text=text), dataset_name="demo")


def test_zero_shot_prompts_are_encoded_on_the_evaluations_device():
    """Prompts join the reports' store, so they are encoded in its arithmetic: on CUDA for reports
    embedded there, on the device the evaluation was given (cuda:1 stays cuda:1, where they all used
    to go to `cuda`), and never on a GPU the user did not ask for."""
    from stages.evaluate.prompts import PromptError
    from stages.evaluate.zeroshot import prompt_device

    bf16 = {"autocast": "bfloat16"}
    assert prompt_device(_zero_shot_ctx("cpu", None)) == "cpu"
    assert prompt_device(_zero_shot_ctx("cuda:1", bf16)) == "cuda:1"
    assert prompt_device(_zero_shot_ctx("cuda", bf16)) == "cuda"
    try:
        prompt_device(_zero_shot_ctx("cpu", bf16))
    except PromptError as e:
        assert "--device cuda" in str(e) and "demo" in str(e)
    else:
        raise AssertionError("CUDA-embedded reports evaluated on the CPU must be refused with the flag to pass")


def test_the_loaders_of_a_run_share_one_gpu_budget(monkeypatch):
    """The training and validation loaders used to take 80% of the free GPU memory each in turn (the
    second 80% of what the first left), leaving training 4% of the card; they now share one budget,
    a fixed share of the memory free at the start."""
    from stages.train import loader as L

    monkeypatch.setattr(L.torch.cuda, "mem_get_info", lambda device=None: (10 * 2**30, 80 * 2**30))
    budget = L.GpuBudget(torch.device("cuda", 0))
    assert budget.left == int(L.GPU_CACHE_SHARE * 10 * 2**30)
    assert budget.fits(5 * 2**30)
    budget.take(5 * 2**30)
    assert not budget.fits(2 * 2**30)  # under per-loader 80%s the second would have taken 4 of the 5 GiB left
    assert L.GpuBudget(torch.device("cpu")).left == 0
