"""Process-group helpers for ``torchrun`` launches (DDP over ranks), a no-op otherwise.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each worker (and
TORCHELASTIC_RUN_ID). Under torchrun, or with WORLD_SIZE > 1, we join the group (nccl on
CUDA, gloo on CPU), pin each worker to the GPU of its LOCAL_RANK, and leave the group at
the end. ``torchrun --nproc-per-node 1`` therefore runs the same DDP code as N processes
(one GPU is enough to check it). A plain ``python`` or ``pipe`` run sees no such
variables and behaves as one process, exactly as before.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pipeline.devices import resolve_device
from core.errors import InputError


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job, and the device it computes on."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # started by torchrun: join the group even with one process

    @property
    def enabled(self) -> bool:
        """Whether this process is part of a DDP job (collectives, a wrapped model)."""
        return self.world_size > 1 or self.launched

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip() else default


def _launched_by_torchrun() -> bool:
    return bool(os.environ.get("TORCHELASTIC_RUN_ID")) and "WORLD_SIZE" in os.environ


def _device_for(requested: str, local_rank: int, joins: bool) -> torch.device:
    device = resolve_device(requested)
    if device.type == "cuda" and joins:  # nccl and DDP need the device's index
        if local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                             "launch at most one process per GPU (torchrun --nproc-per-node <GPUs>)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    return device


@contextmanager
def session(requested_device: str = "auto") -> Iterator[DistContext]:
    """Join the torchrun process group for the duration of a run (if launched that way).

    A group that already exists (a caller set it up) is used and left alone.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    launched = _launched_by_torchrun()
    device = _device_for(requested_device, local_rank, world > 1 or launched)
    ctx = DistContext(device, _env_int("RANK", 0), world, local_rank, _env_int("LOCAL_WORLD_SIZE", 1), launched)
    owned = ctx.enabled and not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, rank=ctx.rank, world_size=world, **kwargs)
    try:
        yield ctx
    except BaseException:
        if owned:  # no barrier: a peer that is still running would wait forever
            dist.destroy_process_group()
        raise
    if owned:
        # gloo aborts a process that tears its group down while a peer still talks
        # to it ("terminate called without an active exception"): leave together.
        barrier(ctx)
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        if ctx.device.type == "cuda":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


@contextmanager
def main_first(ctx: DistContext) -> Iterator[None]:
    """Rank 0 runs the block before the others (e.g. work that may write to a cache)."""
    if not ctx.is_main:
        barrier(ctx)
    try:
        yield
    finally:
        if ctx.is_main:  # also on failure: the others then meet the same error instead of waiting
            barrier(ctx)


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """Is ``flag`` true on any rank? (every rank gets the same answer, so all stop together)"""
    if not ctx.enabled:
        return flag
    return mean_over_ranks(1.0 if flag else 0.0, ctx) > 0


def mean_over_ranks(value: float, ctx: DistContext) -> float:
    """The mean of a per-rank number over all ranks (the number itself on one process)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / ctx.world_size


def wrap_model(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """DistributedDataParallel over the ranks (the model itself on one process)."""
    if not ctx.enabled:
        return model

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)
