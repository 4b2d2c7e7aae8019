"""What the fault suite shares: comparing caches file for file, running `pipe` in its own
process (or its own UTS and pid namespace), and killing it with SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from core.atomic import is_temp_name
from cache.shards import partial_of
from cache.store import find_stores
from tests.helpers import forked

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PIPE_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "HF_HUB_OFFLINE": "1"}


def cache_files(cache: Path) -> dict[str, object]:
    """What makes two caches equal: every shard file and manifest part (bytes), and the
    metadata (parsed; the group's creation time left out). Locks, claims, failure tables,
    quarantined parts and the temporary files of killed writers (which nothing reads) do
    not count."""
    out: dict[str, object] = {}
    for store in find_stores(cache):
        for p in sorted(store.rglob("*")):
            rel = p.relative_to(cache).as_posix()
            if p.is_dir() or p.name in (".lock", ".inuse") or is_temp_name(p.name) or partial_of(p.name) or \
                    any(f"/{d}/" in rel for d in ("failures", "quarantine", "claims")):
                continue
            if p.name == "zarr.json":
                meta = json.loads(p.read_text())
                meta.get("attributes", {}).pop("created", None)
                out[rel] = meta
            else:
                out[rel] = p.read_bytes()
    return out


def committed(cache: Path) -> dict[str, bytes]:
    """The committed files of every store now: manifest parts, and the shard files they commit."""
    out = {}
    for store in find_stores(cache):
        for part in sorted((store / "manifest").glob("part-*.parquet")):
            shard = int(part.name.split("-")[1])
            out[part.relative_to(cache).as_posix()] = part.read_bytes()
            for c in sorted((store / "embeddings.zarr").glob(f"*/c/{shard}")):
                files = [c] if c.is_file() else sorted(f for f in c.rglob("*") if f.is_file())
                out.update({f.relative_to(cache).as_posix(): f.read_bytes() for f in files})
    return out


def assert_nothing_lost(before: dict[str, bytes], cache: Path) -> int:
    """Every file committed before (a kill) is still there, byte for byte; returns how many."""
    now = committed(cache)
    lost = sorted(k for k in before if k not in now)
    changed = sorted(k for k in before if k in now and now[k] != before[k])
    assert not lost and not changed, f"lost {lost[:3]}, changed {changed[:3]}"
    return len(before)


def claim_records(cache: Path) -> list[dict]:
    """Every claim in the cache now (one removed or replaced while being read is left out)."""
    out = []
    for p in cache.glob("stores/*/*/claims/*.json"):
        try:
            out.append(json.loads(p.read_text()))
        except (OSError, ValueError):
            pass
    return out


def pipe_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def embed_args(table: Path, cache: Path, *extra: str) -> list[str]:
    return ["embed", "--dataset", str(table), "--backbone", "tiny-vit", "--text-encoder", "tiny-bert",
            "--cache", str(cache), "--batch-size", "4", "--json", *extra]


# ------------------------------------------------------------------------------ namespaces
def namespaces_work() -> str | None:
    """None if this machine lets us start a process in its own UTS and pid namespace, else why not."""
    try:
        done = subprocess.run(["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c",
                               "hostname ns-probe && test $$ -eq 1 && hostname"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare cannot run here: {e}"
    if done.returncode != 0 or done.stdout.strip() != "ns-probe":
        return f"the kernel refuses new UTS/pid namespaces (unshare exit {done.returncode}: {done.stderr.strip()})"
    return None


def in_namespace(cmd: list[str], hostname: str | None = None) -> list[str]:
    """``cmd`` as pid 1 of a new pid namespace (with its own /proc), and with ``hostname``
    in a new UTS namespace: what a container, or another machine, looks like from here."""
    if hostname is None:
        return ["unshare", "--pid", "--fork", "--mount-proc", *cmd]
    return ["unshare", "--uts", "--pid", "--fork", "--mount-proc", "sh", "-c", 'hostname "$0" && exec "$@"',
            hostname, *cmd]


def start(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")
    return forked.popen(cmd, env={**ENV, **(env or {})}, stdout=out, stderr=out, cwd=ROOT)


def namespace_init(proc: subprocess.Popen, timeout: float = 10) -> int:
    """The pid (as seen here) of pid 1 of the namespace that ``unshare --fork`` started."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        except OSError:
            kids = []
        if kids:
            return int(kids[0])
        time.sleep(0.01)
    raise AssertionError("unshare started no process")


def wait_until(proc: subprocess.Popen, done: Callable[[], bool], log: Path, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not done():
        assert proc.poll() is None, f"the run ended before the kill point:\n{log.read_text()[-3000:]}"
        assert time.monotonic() - t0 < timeout, "the run made no progress"
        time.sleep(0.01)


def sigkill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


def skip_without_namespaces() -> None:
    why = namespaces_work()
    if why:
        pytest.skip(why)
