"""How far a benchmark's arithmetic is from what this machine can do: its roofline figures.

Every benchmark in ``bench/`` that times arithmetic imports this module (nothing in the
package does) and reports, beside its rate, two figures:

``gflops``
    the achieved rate: FLOPs per item (or step) times items (steps) per second. FLOPs are
    counted from the model's shapes by running one untimed step under
    ``torch.utils.flop_counter.FlopCounterMode`` (:func:`count_flops`):

    - 2·M·N·K per matrix product (``mm``, ``addmm``, ``bmm``, so every ``Linear``);
      convolutions as the product they amount to (2 · output elements · input channels
      per group · kernel size);
    - attention as its two products, 2·B·H·L·S·(E + Ev), whichever kernel runs it (the CPU
      flash kernel, which the counter does not know, is counted here the same way; its
      backward as the five products of a flash backward that recomputes the scores);
    - the backward pass as executed: for a layer whose input needs a gradient that is 2x
      its forward (input and weight gradients), for the first layer 1x, for a frozen
      encoder run without gradients 0 — so a training step is about 3x its forward;
    - not counted: element-wise work, norms, softmax, dropout, the optimizer's update,
      copies. They move memory rather than multiply; a step that spends its time there
      shows as a small share of the peak, and :func:`measure_bandwidth` sizes them.

``peak_share``
    that rate over the machine's peak for the same arithmetic: the best rate of a large
    square matrix product (2·n³ FLOPs, :func:`measure_peak`) in the benchmark's dtype, on
    its device, with its thread count, measured in the same run, so load from other work
    that slows the benchmark slows its peak too.

Benchmarks that time no arithmetic (``loader.py`` and ``object_store.py`` read bytes;
``scale.py`` and ``threads.py`` time whole commands; ``capacity.py`` plans from measured
rates) report no FLOP rate; ``loader.py`` reports its bytes per second against
:func:`measure_bandwidth`, the memory roofline.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

# The default sizes of the peak's square product: large enough for the BLAS to reach its
# best rate, small enough to time in a second or two on a loaded 2-core machine.
PEAK_N = {"cpu": 1536, "cuda": 8192}


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _extra_formulas() -> dict:
    """Kernels the counter has no formula for, by their shapes (the CPU's fused attention)."""
    aten, extra = torch.ops.aten, {}
    for name, formula in (("_scaled_dot_product_flash_attention_for_cpu", _cpu_flash),
                          ("_scaled_dot_product_flash_attention_for_cpu_backward", _cpu_flash_backward)):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = formula
    return extra


def count_flops(step: Callable[[], object]) -> int:
    """The FLOPs of one call of ``step`` (forward, and backward if it runs one), by the shapes
    of the products it dispatches; the call runs once, untimed."""
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        step()
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def _threads(threads: int | None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 threads: int | None = None, n: int | None = None, reps: int = 5) -> float:
    """GFLOP/s of the best of ``reps`` timed ``n x n @ n x n`` products (2·n³ FLOPs each), in
    ``dtype`` on ``device`` with ``threads`` threads (default: the process's current setting)."""
    device = torch.device(device)
    n = n or PEAK_N.get(device.type, 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    with _threads(threads), torch.inference_mode():
        a @ b  # warm-up: the BLAS's buffers and threads
        _sync(device)
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def measure_bandwidth(device: torch.device | str = "cpu", mib: int = 256, reps: int = 5,
                      threads: int | None = None) -> float:
    """GB/s moved by the best of ``reps`` copies of a ``mib`` MiB buffer (bytes read + bytes
    written): the memory roofline, for work that moves bytes rather than multiplies."""
    device = torch.device(device)
    src = torch.ones(mib << 18, dtype=torch.float32, device=device)  # mib MiB of float32
    dst = torch.empty_like(src)
    best = float("inf")
    with _threads(threads):
        dst.copy_(src)
        _sync(device)
        for _ in range(reps):
            t = time.perf_counter()
            dst.copy_(src)
            _sync(device)
            best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * src.element_size() / best / 1e9


def roofline(flops_per_item: float, items_per_s: float, peak_gflops: float) -> dict:
    """The two figures: achieved GFLOP/s and its share of the peak."""
    achieved = flops_per_item * items_per_s / 1e9
    return {"gflops": round(achieved, 2), "peak_share": round(achieved / peak_gflops, 4) if peak_gflops else None}

