"""How one optimisation step runs: eagerly, compiled, or replayed from a CUDA graph.

A cached training step is tiny (an Adaptor over a batch of vectors), so on a GPU it is
bound by kernel launches and host work, not by FLOPs. Three ways to run it:

``eager``
    forward, loss, backward and a fused AdamW step, launched op by op.
``compile``
    the forward and the loss go through ``torch.compile`` (TorchInductor fuses the
    element-wise work; the backward is compiled with it). Works on CPU and GPU, and
    under DDP.
``cuda-graph``
    the whole step — forward, loss, backward, optimizer update and the running loss sum —
    is captured once into a CUDA graph and then replayed: one launch per step. It needs a
    single process on a CUDA device and a fixed batch shape (training drops the last
    short batch). The first ``WARMUP_STEPS`` batches run eagerly on a side stream (as
    capture requires), and are real training steps.

Every mode keeps the running loss on the device and reads it once per epoch, so the
host never waits for the GPU inside an epoch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from core.errors import InputError

WARMUP_STEPS = 3


class StepError(InputError):
    """A step mode that cannot run here; the message says what to use instead."""


@dataclass(frozen=True)
class StepMode:
    """One way to run a step: the ``step`` setting names it."""

    name: str
    summary: str
    compiled: bool = False     # the forward and the loss go through torch.compile
    graph: bool = False        # the whole step is captured into a CUDA graph and replayed

    def check(self, device: torch.device, ddp: bool) -> None:
        """Refuse to run where this mode cannot (``ddp``: the model is wrapped for torchrun)."""
        if not self.graph:
            return
        if device.type != "cuda":
            raise StepError(f"step={self.name} needs a CUDA device, and this run is on {device.type}; "
                            "use step=compile or step=eager")
        if ddp:
            raise StepError(f"step={self.name} runs one process, outside torchrun (DDP's gradient all-reduce is "
                            "not captured); under torchrun use step=compile")


STEP_MODES: dict[str, StepMode] = {m.name: m for m in (
    StepMode("eager", "forward, loss, backward and a fused AdamW step, launched op by op"),
    StepMode("compile", "the forward and the loss through torch.compile", compiled=True),
    StepMode("cuda-graph", "the whole step captured once into a CUDA graph, then replayed", graph=True),
)}


def step_mode(mode: str | StepMode) -> StepMode:
    if isinstance(mode, StepMode):
        return mode
    if mode not in STEP_MODES:
        raise StepError(f"step={mode!r} is not a step mode; use one of {', '.join(STEP_MODES)}")
    return STEP_MODES[mode]


def check_step_mode(mode: str | StepMode, device: torch.device, ddp: bool) -> None:
    """Refuse a step mode that cannot run here (``ddp``: the model is wrapped for torchrun)."""
    step_mode(mode).check(device, ddp)


def optimizer_for(params, mode: str | StepMode, device: torch.device, *, lr: float, weight_decay: float,
                  betas: tuple[float, float]) -> torch.optim.AdamW:
    """Fused AdamW (one kernel for all parameters where the device has one).

    For CUDA graphs it is also ``capturable`` (its step counters live on the device) and
    its learning rate is a device tensor, which the schedule updates in place, so the
    replayed update reads the current rate.
    """
    if step_mode(mode).graph:
        return torch.optim.AdamW(params, lr=torch.tensor(lr, device=device), weight_decay=weight_decay,
                                 betas=betas, fused=True, capturable=True)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, fused=True)


def restore_step_settings(opt: torch.optim.Optimizer, mode: str | StepMode, device: torch.device) -> None:
    """After loading a state dict: this run's step mode's optimizer settings, not the saved run's.

    Loading brings back the saved param groups whole, and a run may resume another run's
    checkpoint in a different step mode. Learning rates come back as plain floats, and
    ``capturable`` as the saved run had it (an eager run's checkpoint resumed with
    step=cuda-graph would otherwise fail at capture); graphs need both set.
    """
    graph = step_mode(mode).graph
    for group in opt.param_groups:
        group["capturable"] = graph
        if graph and not torch.is_tensor(group["lr"]):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)


class StepRunner:
    """Runs training steps of ``loss_fn(batch) -> scalar loss`` and sums their losses."""

    def __init__(self, loss_fn: Callable[[dict], Tensor], opt: torch.optim.Optimizer, mode: str | StepMode,
                 device: torch.device):
        self.opt, self.mode, self.device = opt, step_mode(mode), device
        self.loss_fn = torch.compile(loss_fn, dynamic=False) if self.mode.compiled else loss_fn
        self._sum = torch.zeros((), device=device)
        self._steps = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: dict[str, Tensor] = {}
        self._warm = 0
        self.captured_at: int | None = None  # the step at which the graph was captured

    # -- running -------------------------------------------------------------------------
    def __call__(self, batch: dict) -> None:
        if not self.mode.graph:
            self._eager(batch)
        elif self._graph is not None:
            self._replay(batch)
        elif self._warm < WARMUP_STEPS:
            self._warm_up(batch)
        else:
            self._capture(batch)
            self._replay(batch)
        self._steps += 1

    def _eager(self, batch: dict) -> None:
        loss = self.loss_fn(batch)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self._sum += loss.detach()

    def _warm_up(self, batch: dict) -> None:
        """Eager steps on a side stream: capture needs allocator and library state settled."""
        with torch.cuda.device(self.device):  # cuda:N: the side stream and its kernels on device N
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                self._eager(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
        self._warm += 1

    def _capture(self, batch: dict) -> None:
        self._static = {k: v.detach().clone() for k, v in _tensors(batch).items()}
        self.opt.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
        # The capture stream must belong to the step's device: torch.cuda.graph's own default
        # stream is made on the *current* device (0 unless set), and kernels of cuda:N launched
        # while it captures would run on device N's stream, outside the graph, so every replay
        # would do nothing. Hence the device made current and a stream of the step's device.
        with torch.cuda.device(self.device):
            graph = torch.cuda.CUDAGraph()
            # "thread_local": the streaming loader's prefetch thread keeps allocating pinned memory
            # and copying the next batch while we capture; under the default "global" mode any such
            # call from another thread invalidates the capture.
            with torch.cuda.graph(graph, stream=torch.cuda.Stream(self.device), capture_error_mode="thread_local"):
                loss = self.loss_fn({**batch, **self._static})
                loss.backward()
                self.opt.step()
                self._sum += loss.detach()
        self._graph = graph
        self.captured_at = self._steps + 1

    def _replay(self, batch: dict) -> None:
        for k, v in _tensors(batch).items():
            static = self._static.get(k)
            if static is None or static.shape != v.shape:
                raise StepError(f"step=cuda-graph replays fixed shapes: batch tensor {k!r} is {tuple(v.shape)}, "
                                f"the graph was captured with {None if static is None else tuple(static.shape)}")
            static.copy_(v, non_blocking=True)
        with torch.cuda.device(self.device):
            self._graph.replay()

    # -- reading -------------------------------------------------------------------------
    def take_mean_loss(self) -> float:
        """The mean loss of the steps since the last call (one device sync), then reset."""
        mean = float(self._sum) / max(1, self._steps)
        self._sum.zero_()
        self._steps = 0
        return mean


def _tensors(batch: dict) -> dict[str, Tensor]:
    """The batch entries the loss reads from the device (the item index stays out)."""
    return {k: v for k, v in batch.items() if torch.is_tensor(v) and k != "index"}
