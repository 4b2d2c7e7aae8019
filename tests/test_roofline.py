"""bench/roofline.py: the FLOPs every benchmark's achieved rate is counted from, and its peak."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def _roofline():
    spec = importlib.util.spec_from_file_location("roofline", ROOT / "bench" / "roofline.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


roofline = _roofline()


def test_a_matrix_product_is_2mnk_and_its_backward_is_counted_as_run():
    m, k, n = 8, 12, 20
    layer = torch.nn.Linear(k, n, bias=False)
    x = torch.randn(m, k)
    assert roofline.count_flops(lambda: layer(x)) == 2 * m * n * k
    # the first layer: its input needs no gradient, so the backward is the weight gradient alone
    assert roofline.count_flops(lambda: layer(x).sum().backward()) == 2 * (2 * m * n * k)
    # a layer whose input needs a gradient: input and weight gradients, 3x the forward in all
    assert roofline.count_flops(lambda: layer(x.requires_grad_()).sum().backward()) == 3 * (2 * m * n * k)
    with torch.no_grad():  # a frozen encoder's forward: no backward at all
        assert roofline.count_flops(lambda: layer(x)) == 2 * m * n * k


def test_attention_is_counted_on_the_cpu_whichever_kernel_runs_it():
    """The CPU's fused attention kernel has no formula in torch's counter: without ours, every
    encoder's attention would count 0 on a CPU."""
    b, h, length, e = 2, 3, 10, 8
    q, k, v = (torch.randn(b, h, length, e) for _ in range(3))
    want = 2 * (2 * b * h * length * length * e)  # scores and the weighted sum
    assert roofline.count_flops(lambda: F.scaled_dot_product_attention(q, k, v)) == want
    mha = torch.nn.MultiheadAttention(h * e, h, batch_first=True)
    x = torch.randn(b, length, h * e)
    projections = 2 * b * length * (h * e) * (3 * h * e) + 2 * b * length * (h * e) ** 2
    assert roofline.count_flops(lambda: mha(x, x, x, need_weights=False)) == projections + want


def test_the_peak_and_bandwidth_are_measured_and_the_shares_follow():
    peak = roofline.measure_peak("cpu", torch.float32, threads=1, n=256, reps=2)
    assert math.isfinite(peak) and peak > 0.05
    assert torch.get_num_threads() >= 1  # the thread setting is put back
    assert roofline.measure_bandwidth("cpu", mib=8, reps=2) > 0.05
    assert roofline.roofline(1e9, 50.0, 200.0) == {"gflops": 50.0, "peak_share": 0.25}
