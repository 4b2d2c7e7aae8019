"""`pipe train-adaptor` killed with SIGKILL at seeded random points, resumed each time,
ends exactly where an uninterrupted run ends; and a checkpoint save cut between its
writes never pairs weights with another epoch's optimizer state."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.adaptor import Adaptor, AdaptorConfig
from pipeline.models import checkpoint
from pipeline.models.checkpoint import CheckpointMismatchError, load_checkpoint, read_meta, save_checkpoint
from tests.helpers import forked
from tests.helpers import SMALL

pytestmark = pytest.mark.slow  # subprocesses, kills and process groups: minutes, not seconds

ROOT = Path(__file__).resolve().parents[1]
# 20 epochs leave room for four kills at seeded epochs 2-11 while the reference run trains beside
# them (a process spends more time starting than in an epoch).
EPOCHS, STEPS_PER_EPOCH = 20, 3  # 12 train pairs, batch 4
# Dropout stays on and views are sampled: a resumed epoch must replay both exactly. The image
# tokens are pooled to a 4x4 grid (17 tokens, not 197): the same code path at half the CPU time.
RUN = [*SMALL, "adaptor.mode=tokens", "adaptor.grid_pool=4", "batch_size=4", f"epochs={EPOCHS}", "checkpoint_every=1",
       "--device", "cpu"]
# Timing and memory columns differ between any two runs; everything else must not.
UNSTABLE = {"epoch_seconds", "data_wait_share", "samples_per_s", "cpu_peak_mb", "gpu_peak_mb"}


@pytest.fixture(scope="module")
def small_cache(embedded, tmp_path_factory):
    """24 items with 2 augmented views: 12 training pairs, 3 steps of 4 per epoch."""
    return embedded(24, "--views", "2").copy(tmp_path_factory.mktemp("kill") / "cache")


def start(small_cache, out: Path) -> subprocess.Popen:
    table, cache = small_cache
    cmd = [sys.executable, "-m", "cli", "train-adaptor", "-d", str(table), "-b", "tiny-vit", "-t", "tiny-bert",
           "--cache", str(cache), "--out", str(out), *RUN]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PIPE_NO_PROGRESS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "a") as log:
        return forked.popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, out: Path) -> None:
    assert proc.wait(timeout=120) == 0, (out.parent / f"{out.name}.log").read_text()[-3000:]


def metrics_rows(out: Path) -> int:
    try:
        return max(0, len((out / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def checkpoint_epoch(out: Path) -> int:
    try:
        return int(read_meta(out / "last.safetensors")["epoch"])
    except (FileNotFoundError, OSError):
        return 0


def wait_until(proc: subprocess.Popen, done, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not done():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() - t0 < timeout, "the run made no progress"
        time.sleep(0.002)


def assert_checkpoint_consistent(out: Path) -> int:
    """The weights on disk load with an optimizer state that took exactly their epoch's steps."""
    meta = read_meta(out / "last.safetensors")
    net = Adaptor(AdaptorConfig(**meta["config"]["adaptor"]))
    opt = torch.optim.AdamW(net.parameters())
    load_checkpoint(out / "last.safetensors", net, opt)
    steps = {int(s["step"]) for s in opt.state.values()}
    assert steps == {meta["epoch"] * STEPS_PER_EPOCH}, (meta["epoch"], steps)
    return meta["epoch"]


def stable(out: Path) -> pd.DataFrame:
    rows = pd.read_csv(out / "metrics.csv")
    return rows[[c for c in rows.columns if c not in UNSTABLE]]


@pytest.mark.timeout(240)
def test_sigkill_at_random_points_then_resume_matches_an_uninterrupted_run(small_cache, tmp_path):
    reference = start(small_cache, tmp_path / "full")
    rng = np.random.default_rng(20240101)
    out, kills = tmp_path / "killed", []
    targets = sorted(rng.choice(np.arange(2, EPOCHS - 8), size=4, replace=False))
    for i, target in enumerate(targets):
        # Alternate the trigger: a few ms after a new metrics row lands inside that epoch's
        # checkpoint write (it follows the row); up to an epoch after a new checkpoint lands
        # anywhere in the next epoch.
        by_checkpoint = i % 2 == 1
        delay = float(rng.uniform(0, 0.1) if by_checkpoint else rng.uniform(0, 0.004))
        target = max(int(target), metrics_rows(out) + 1, checkpoint_epoch(out) + 1)  # progress of this process
        proc = start(small_cache, out)
        progress = (lambda: checkpoint_epoch(out) >= target) if by_checkpoint else (lambda: metrics_rows(out) >= target)
        wait_until(proc, progress)
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before the kill"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
        leftovers = sorted(p.name for p in out.iterdir() if p.name.endswith((".tmp", ".next")))
        kills.append((target, "checkpoint" if by_checkpoint else "metrics", round(delay, 4), metrics_rows(out),
                      leftovers, assert_checkpoint_consistent(out)))
    assert len(kills) == 4 and all(k[-1] >= 1 for k in kills), kills
    finish(start(small_cache, out), out)  # the last resume runs to the end
    finish(reference, tmp_path / "full")

    assert "resuming" in (tmp_path / "killed.log").read_text()
    a, b = stable(tmp_path / "full"), stable(out)
    assert list(b.epoch) == list(range(1, EPOCHS + 1))
    pd.testing.assert_frame_equal(b, a, check_exact=True)
    wa, wb = load_file(str(tmp_path / "full" / "last.safetensors")), load_file(str(out / "last.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    oa = load_file(str(tmp_path / "full" / "last.optim.safetensors"))
    ob = load_file(str(out / "last.optim.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)


# ------------------------------------------------------------------ a save cut between writes
class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def _train_step(net: Adaptor, opt: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    img, txt = net({"image_pooled": torch.randn(4, 6, generator=g), "text_pooled": torch.randn(4, 5, generator=g)})
    opt.zero_grad()
    (img - txt).pow(2).sum().backward()
    opt.step()


def _model() -> tuple[Adaptor, torch.optim.Optimizer]:
    torch.manual_seed(0)
    net = Adaptor(AdaptorConfig(image_dim=6, text_dim=5, d_model=8, n_heads=2, ffn_dim=8, dropout=0.0))
    return net, torch.optim.AdamW(net.parameters(), lr=1e-2)


def _snapshot(net: Adaptor) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("killed_at_rename", [1, 2, 3, None])
def test_a_save_killed_between_its_writes_never_pairs_two_epochs(tmp_path, monkeypatch, killed_at_rename):
    path = tmp_path / "last.safetensors"
    net, opt = _model()
    weights = {}
    for epoch in (1, 2):
        _train_step(net, opt, epoch)
        save_checkpoint(path, net, {"epoch": epoch}, opt)
        weights[epoch] = _snapshot(net)
    _train_step(net, opt, 3)
    weights[3] = _snapshot(net)

    renames, real_replace = [], os.replace

    def replace(src, dst):  # the kill lands just before the n-th rename of the epoch-3 save
        renames.append(Path(dst).name)
        if len(renames) == killed_at_rename:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    if killed_at_rename is None:
        save_checkpoint(path, net, {"epoch": 3}, opt)
    else:
        with pytest.raises(Killed):
            save_checkpoint(path, net, {"epoch": 3}, opt)
    monkeypatch.undo()
    assert renames[:3] == ["last.optim.safetensors.next", "last.safetensors", "last.optim.safetensors"][:len(renames)]

    fresh, fresh_opt = _model()
    epoch = load_checkpoint(path, fresh, fresh_opt)["epoch"]
    assert epoch == (3 if killed_at_rename in (None, 3) else 2)
    assert all(torch.equal(v, weights[epoch][k]) for k, v in _snapshot(fresh).items())
    assert {int(s["step"]) for s in fresh_opt.state.values()} == {epoch}  # the optimizer of the same epoch
    save_checkpoint(path, fresh, {"epoch": epoch}, fresh_opt)  # the next save cleans up after the kill
    assert not list(tmp_path.glob(".*.tmp"))


def test_an_optimizer_file_from_another_epoch_is_refused(tmp_path):
    path = tmp_path / "last.safetensors"
    net, opt = _model()
    _train_step(net, opt, 1)
    save_checkpoint(path, net, {"epoch": 1}, opt)
    old = (tmp_path / "last.optim.safetensors").read_bytes()
    _train_step(net, opt, 2)
    save_checkpoint(path, net, {"epoch": 2}, opt)
    (tmp_path / "last.optim.safetensors").write_bytes(old)
    with pytest.raises(CheckpointMismatchError, match="no matching optimizer state"):
        load_checkpoint(path, *_model())
    load_checkpoint(path, _model()[0])  # the weights alone still load (e.g. for evaluation)


def test_weights_of_another_adaptor_layout_are_one_message(tmp_path):
    """A checkpoint whose tensors do not fit the Adaptor (for example a tokens-mode run from
    before the matching head) is refused with the fix, not torch's key listing."""
    path = tmp_path / "last.safetensors"
    net, _ = _model()
    save_checkpoint(path, net, {"epoch": 1})
    tokens = Adaptor(AdaptorConfig(mode="tokens", image_dim=6, text_dim=5, d_model=8, n_heads=2, ffn_dim=8,
                                   dropout=0.0, fusion_layers=1))
    with pytest.raises(CheckpointMismatchError, match=r"missing \d+ tensors .*retrain it with `pipe train-adaptor`"):
        load_checkpoint(path, tokens)
