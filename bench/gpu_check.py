"""`make gpu-check`: the GPU tests, then both GPU benchmarks, as one JSON object.

On a machine with CUDA it runs, each step in its own process and under its own time
limit (so one hang cannot use up the whole budget, which is under 8 minutes in all):

1. ``pytest -m gpu tests/test_gpu.py`` (pass/fail/skip counts, each test's outcome);
2. ``bench/embed_gpu.py`` (`pipe embed` against the bare forward, DINOv2-S and -B sized);
3. ``bench/cached_vs_e2e.py``: pooled mode at batch 32 (the bench's default, as in the
   earlier 14.7x eager figure) and at the paper's batch 1024 (the GPU-resident samples/s
   target), tokens mode with the patch grid pooled to 8x8, and plain tokens mode, each
   in its own process on one shared cache.

It prints one JSON object on its last line (and writes it to ``--out``): the GPU, torch,
CUDA and NCCL versions, the test summary, every benchmark figure, and each target with
its value and whether it passed. A step that fails, times out or is skipped for lack of
time is reported there, never raised. Without a CUDA device it prints
``{"measured": false, "reason": ...}`` at once and exits 0.

A preflight of a few seconds comes first (the driver, CUDA in torch, the packages every step
imports, /dev/shm, the open-file limit): a machine that cannot run the steps is told so before
any of its time goes to them. The result is rewritten to ``--out`` after every step, so a
check that is itself killed keeps what it measured; the GPU tests print each outcome as they
go (``-v``), which is read back when pytest is killed before writing its XML.

    python bench/gpu_check.py [--out gpu-check.json] [--budget 450] [--strict] [--preflight]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 450          # the whole check: under 8 minutes, with time to start, stop a late step and report
MIN_STEP_S = 30         # a step that would get less than this is skipped, not started
GRACE_S = 5             # after SIGTERM, before SIGKILL

# (target, the figure it reads, the threshold it must reach, what it means)
TARGETS = [
    ("embed_dinov2_s", "embed_ratio_dinov2_s", 0.9, "pipe embed / bare forward, DINOv2-S-sized random ViT"),
    ("embed_dinov2_b", "embed_ratio_dinov2_b", 0.9, "pipe embed / bare forward, DINOv2-B-sized random ViT"),
    ("pooled_speedup", "speedup_pooled_b32", 50.0,
     "cached vs end-to-end pooled step, bf16, batch 32 (the earlier eager H200 figure: 14.7x)"),
    ("pooled_gpu_resident_samples_s", "cached_samples_s_pooled_b1024", 200_000.0,
     "pooled training from a GPU-resident cache, batch 1024, fastest step mode"),
    ("tokens_8x8_speedup", "speedup_tokens_pooled_grid", 5.0,
     "cached vs end-to-end tokens step with the patch grid pooled to 8x8"),
    ("embed_bare_peak_share_dinov2_b", "embed_bare_peak_share_dinov2_b", 0.3,
     "the bare bf16 forward of the DINOv2-B-sized ViT at batch 256 as a share of the bf16 matrix-product peak "
     "measured in the same run (below it the forward itself is slow, e.g. autocast off or a slow attention "
     "kernel, and the embed ratio would flatter the stage)"),
]
# Roofline figures (bench/roofline.py) gathered beside the targets: achieved GFLOP/s and share of the peak
# of each benchmark row, so every figure says how far it is from what the GPU can do.
ROOFLINE_KEYS = ("gflops", "peak_share")


@dataclass
class Step:
    name: str
    cmd: list[str]
    cap_s: float                   # its own time limit (the remaining budget may cut it shorter)
    out_file: Path | None = None   # where a benchmark writes its JSON as it goes
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------ what this machine is
def cuda_state() -> tuple[bool, str]:
    """Whether a CUDA device is usable here, and why not when it is not."""
    import torch  # lazy: the module is imported by tests that only parse results

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = torch.cuda.is_available()
    if ok:
        return True, ""
    why = "no CUDA device visible"
    if torch.version.cuda is None:
        why += " (this torch build has no CUDA support)"
    elif caught:
        why += f" ({str(caught[0].message).strip().splitlines()[0][:200]})"
    return False, why


def environment(cuda: bool) -> dict:
    """torch, CUDA, cuDNN and NCCL versions, and the GPU's name, memory and capability."""
    import torch  # lazy: see cuda_state

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "cpus": os.cpu_count(), "gpu": None}
    if not cuda:
        return env
    props = torch.cuda.get_device_properties(0)
    env.update(gpu=props.name, gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1),
               capability=f"{props.major}.{props.minor}", cudnn=torch.backends.cudnn.version())
    try:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
    except Exception as exc:  # reported, not fatal: only the torchrun test needs it
        env["nccl"] = f"unavailable: {exc}"
    env["driver"] = _driver_version()
    return env


def _driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=15)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# ------------------------------------------------------------------ the preflight
SHM_MIN_MB = 1024   # decode processes hand batches over in /dev/shm: ~150 MB a batch of 256 at 224 px, 2 in flight
NOFILE_MIN = 4096   # shard files, decode processes' descriptors, Dask
NEEDED = ("zarr", "numcodecs", "google_crc32c", "dask", "distributed", "pyarrow", "pandas", "xxhash", "pydicom",
          "obstore", "typer", "rich", "yaml", "timm", "transformers", "safetensors", "PIL", "matplotlib", "pytest")


def preflight() -> dict:
    """What the check needs of this machine, found in a few seconds, before any step starts:
    the driver, CUDA in torch, the packages the steps import, /dev/shm and the open-file limit.
    ``problems`` stop the check (nothing would be measured); ``warnings`` are reported with it."""
    import importlib.util  # lazy: only the preflight looks packages up
    import resource  # lazy: POSIX only, and only the preflight reads the open-file limit

    t0 = time.monotonic()
    problems, warnings_ = [], []
    found = {"driver": _driver_version()}
    if found["driver"] is None:
        warnings_.append("nvidia-smi gave no driver version (not on PATH, or it failed)")
    cuda, why = cuda_state()
    found["cuda_available"] = cuda
    if not cuda:
        problems.append(why)
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    found["missing_packages"] = missing
    if missing:
        problems.append(f"packages missing for {sys.executable}: {', '.join(missing)}. Install the project "
                        "(`pip install -e .[dev]`), or, on a machine without internet, bring wheels: "
                        "`pip download -d wheels <packages>` where there is internet, then `pip install --no-index "
                        "--find-links wheels <packages>` here")
    try:
        st = os.statvfs("/dev/shm")
        found["shm_mb"] = round(st.f_frsize * st.f_blocks / 2**20)
        if found["shm_mb"] < SHM_MIN_MB:
            warnings_.append(f"/dev/shm holds {found['shm_mb']} MB (< {SHM_MIN_MB}): decode processes hand batches "
                             "over there; give the container more (docker --shm-size=2g) or embed with "
                             "decode_processes=0 or a smaller --batch-size")
    except OSError:
        found["shm_mb"] = None
        warnings_.append("/dev/shm is missing: decode processes cannot hand batches over")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < NOFILE_MIN and hard > soft:  # raise our own soft limit as far as allowed, for every step
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(NOFILE_MIN, soft))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    found["open_files"] = soft
    if soft != resource.RLIM_INFINITY and soft < NOFILE_MIN:
        warnings_.append(f"open-file limit {soft} (< {NOFILE_MIN}): raise it with `ulimit -n {NOFILE_MIN}`")
    return {**found, "problems": problems, "warnings": warnings_, "seconds": round(time.monotonic() - t0, 2)}


# ------------------------------------------------------------------ running one step
def run_step(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in its own process group for at most ``timeout`` seconds.

    stdout and stderr go to ``log``.{out,err}; on timeout the whole group (the step and
    anything it started: decode processes, torchrun workers) is stopped. Never raises.
    """
    t0 = time.monotonic()
    out, err = log.with_suffix(".out"), log.with_suffix(".err")
    try:
        with open(out, "w") as so, open(err, "w") as se:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=so, stderr=se, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = _stop_group(proc)
    except OSError as exc:
        return {"ok": False, "rc": None, "timed_out": False, "seconds": round(time.monotonic() - t0, 1),
                "error": f"could not start {cmd[0]}: {exc}", "stdout": "", "stderr_tail": ""}
    res = {"ok": rc == 0 and not timed_out, "rc": rc, "timed_out": timed_out,
           "seconds": round(time.monotonic() - t0, 1), "stdout": out.read_text(errors="replace"),
           "stderr_tail": _tail(err.read_text(errors="replace"))}
    if timed_out:
        res["error"] = f"timed out after {timeout:.0f} s"
    elif rc != 0:
        res["error"] = f"exit code {rc}"
    return res


def _stop_group(proc: subprocess.Popen) -> int | None:
    """SIGTERM to the step's own process group (it was started in a new session), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def _tail(text: str, lines: int = 25, chars: int = 3000) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def last_json(text: str) -> dict | None:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


# ------------------------------------------------------------------ reading the tests' results
def parse_junit(path: Path) -> dict | None:
    """Counts and each test's outcome from pytest's JUnit XML (None when there is none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    cases, counts = {}, {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        name = case.get("name", "?")
        outcome, message = "passed", ""
        for tag, kind in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            node = case.find(tag)
            if node is not None:
                outcome, message = kind, (node.get("message") or node.text or "").strip()
                break
        counts[outcome] += 1
        cases[name] = outcome if not message else f"{outcome}: {message.splitlines()[0][:300]}"
    return {**counts, "total": sum(counts.values()), "cases": cases}


_VERBOSE = re.compile(r"^\S+::(\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_OUTCOME = {"PASSED": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped", "XFAIL": "skipped",
            "XPASS": "passed"}


def parse_pytest_summary(text: str) -> dict:
    """Counts and each test's outcome from pytest's ``-v`` lines, as far as they got: a run killed
    before it wrote its XML (or its summary line) still tells what each finished test did."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    cases = {}
    for name, word in _VERBOSE.findall(text):
        cases[name] = _OUTCOME[word]
    for outcome in cases.values():
        counts[outcome] += 1
    if not cases:  # no -v lines: the summary line's counts
        for n, word in re.findall(r"(\d+) (passed|failed|errors?|skipped)", text):
            counts["errors" if word.startswith("error") else word] = int(n)
    return {**counts, "total": sum(counts.values()), "cases": cases}


def test_summary(res: dict, junit: Path) -> dict:
    parsed = parse_junit(junit) or parse_pytest_summary(res.get("stdout", ""))
    # a run where every test was skipped measured nothing: that is not a pass
    ok = res["ok"] and parsed["failed"] == 0 and parsed["errors"] == 0 and parsed["passed"] > 0
    summary = {"ok": ok, "seconds": res["seconds"], **parsed}
    if not res["ok"] or not ok:
        why = res.get("error") or ("every test was skipped" if parsed["total"] and not parsed["passed"]
                                   else "tests failed" if parsed["total"] else "no test ran")
        summary.update(error=why, output_tail=_tail(res.get("stdout", ""), 40, 6000))
    return summary


# ------------------------------------------------------------------ figures and targets
def bench_result(res: dict, out_file: Path | None) -> dict:
    """What a benchmark step measured: its --out file (kept even when it was cut short), else
    the last JSON line of its stdout."""
    result = None
    if out_file is not None and out_file.exists():
        try:
            result = json.loads(out_file.read_text())
        except ValueError:
            result = None
    result = result or last_json(res.get("stdout", ""))
    entry = {"ok": res["ok"], "seconds": res["seconds"], "result": result}
    if not res["ok"]:
        entry.update(error=res.get("error"), stderr_tail=res.get("stderr_tail", ""))
    if "skipped" in res:
        entry["skipped"] = res["skipped"]
    return entry


def figures(benches: dict) -> dict:
    """The figures the targets read, flattened, from each benchmark's JSON."""
    fig: dict = {}
    emb = (benches.get("embed_gpu") or {}).get("result") or {}
    for key in ("ratio_dinov2_s", "ratio_dinov2_b", "bare_img_s_dinov2_s", "embed_img_s_dinov2_s",
                "bare_img_s_dinov2_b", "embed_img_s_dinov2_b", "peak_gflops",
                *(f"{side}_{k}_{enc}" for side in ("bare", "embed") for k in ROOFLINE_KEYS
                  for enc in ("dinov2_s", "dinov2_b"))):
        if key in emb:
            fig[f"embed_{key}"] = emb[key]
    for step_name, suffix in (("cached_vs_e2e_pooled_b32", "_b32"), ("cached_vs_e2e_pooled_b1024", "_b1024")):
        r = (benches.get(step_name) or {}).get("result") or {}
        for key in ("speedup_pooled", "cached_samples_s_pooled", "e2e_samples_s_pooled", "step_pooled",
                    "residency_pooled", "data_wait_share_pooled", "peak_gflops", "flop_ratio_pooled",
                    *(f"{k}_{side}_pooled" for k in ROOFLINE_KEYS for side in ("cached", "e2e"))):
            if key in r:
                fig[key + suffix] = r[key]
        for step in ("eager", "compile", "cuda-graph"):
            if f"cached_samples_s_pooled_{step}" in r:
                fig[f"cached_samples_s_pooled_{step}{suffix}"] = r[f"cached_samples_s_pooled_{step}"]
    for key in ("tokens_pooled_grid", "tokens"):
        r = (benches.get(f"cached_vs_e2e_{key}") or {}).get("result") or {}
        for name in (f"speedup_{key}", f"cached_samples_s_{key}", f"e2e_samples_s_{key}", f"step_{key}",
                     f"residency_{key}", f"flop_ratio_{key}",
                     *(f"{k}_{side}_{key}" for k in ROOFLINE_KEYS for side in ("cached", "e2e"))):
            if name in r:
                fig[name] = r[name]
    for row in ((benches.get("seg_steps") or {}).get("result") or {}).get("rows", []):
        fig[f"seg_ms_per_step_{row['backbone'].replace('-', '_')}"] = row["ms_per_step"]
        for k in ROOFLINE_KEYS:
            if k in row:
                fig[f"seg_{k}_{row['backbone'].replace('-', '_')}"] = row[k]
        fig[f"seg_default_minutes_{row['backbone'].replace('-', '_')}"] = [p["minutes"] for p in row["plans"]]
    if fig.get("residency_pooled_b1024") not in (None, "gpu"):  # the target is about a GPU-resident cache
        fig["cached_samples_s_pooled_b1024_note"] = f"the cache was not GPU-resident ({fig['residency_pooled_b1024']})"
    return fig


def targets(fig: dict) -> dict:
    out = {}
    for name, key, threshold, what in TARGETS:
        value = fig.get(key)
        ok = None if value is None else bool(value >= threshold)
        if key == "cached_samples_s_pooled_b1024" and fig.get("residency_pooled_b1024") not in (None, "gpu"):
            ok = False
        out[name] = {"figure": key, "value": value, "target": f">= {threshold:g}", "pass": ok, "what": what}
    return out


def not_measured(reason: str, env: dict) -> dict:
    return {"check": "gpu-check", "measured": False, "reason": reason, **env, "tests": None, "benches": {},
            "figures": {}, "targets": targets({}), "passed": None}


# ------------------------------------------------------------------ the check
def steps(py: str, work: Path) -> list[Step]:
    """The steps in order, their caps adding up to less than :data:`BUDGET_S` (the start, the
    preflight and the report need the rest). The GPU tests marked slow (a kill and resume, a
    compile, torchrun) are left to a full `pytest -m gpu`: they alone would take the budget."""
    tests = Step("tests", [py, "-m", "pytest", "-m", "gpu and not slow", "tests/test_gpu.py", "-v", "-rs", "-p",
                           "no:cacheprovider", "--timeout", "100", "--junitxml", str(work / "tests.xml")], cap_s=110)
    embed = Step("embed_gpu", [py, "bench/embed_gpu.py", "--images", "8192", "--batch", "256", "--workdir", str(work),
                               "--out", str(work / "embed_gpu.json")], cap_s=80, out_file=work / "embed_gpu.json")
    # one table and cache shared by the four runs (the first one writes and embeds it)
    common = [py, "bench/cached_vs_e2e.py", "--items", "4096", "--workdir", str(work / "cached"), "--e2e-steps", "3"]
    runs = [("pooled_b32", ["--modes", "pooled", "--batch", "32", "--epochs", "2"], 60),  # also embeds the cache
            ("pooled_b1024", ["--modes", "pooled", "--batch", "1024", "--epochs", "50"], 50),
            ("tokens_pooled_grid", ["--modes", "tokens_pooled_grid", "--batch", "1024", "--tokens-batch", "128",
                                    "--tokens-steps", "16"], 45),
            ("tokens", ["--modes", "tokens", "--batch", "1024", "--tokens-batch", "128", "--tokens-steps", "16"], 40)]
    cached = [Step(f"cached_vs_e2e_{name}", [*common, *extra, "--out", str(work / f"{name}.json")], cap_s=cap,
                   out_file=work / f"{name}.json") for name, extra, cap in runs]
    seg = Step("seg_steps", [py, "bench/seg_steps.py", "--device", "cuda", "--reps", "30", "--out",
                             str(work / "seg_steps.json")], cap_s=35, out_file=work / "seg_steps.json")
    return [tests, embed, seg, *cached]  # the segmentation step is short: before the steps the budget may cut


def run_check(budget: float, work: Path, env: dict, partial: str | None = None) -> dict:
    t0 = time.monotonic()
    deadline = t0 + budget
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PIPE_NO_PROGRESS": "1",
                 "TOKENIZERS_PARALLELISM": "false",
                 "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    result = {"check": "gpu-check", "measured": True, **env, "budget_s": budget, "tests": None, "benches": {}}
    for step in steps(sys.executable, work):
        left = deadline - time.monotonic()
        if left < MIN_STEP_S:
            res = {"ok": False, "seconds": 0.0, "skipped": f"out of time ({left:.0f} s of the budget left)",
                   "error": "not run: out of time"}
        else:
            timeout = min(step.cap_s, left - 2)
            print(f"gpu-check: {step.name} (at most {timeout:.0f} s)", file=sys.stderr, flush=True)
            res = run_step(step.cmd, timeout, work / step.name, child_env)
            print(f"gpu-check: {step.name}: {'ok' if res['ok'] else res.get('error')} in {res['seconds']} s",
                  file=sys.stderr, flush=True)
        if step.name == "tests":
            result["tests"] = test_summary(res, work / "tests.xml") if "skipped" not in res else \
                {"ok": False, "error": res["skipped"]}
        else:
            result["benches"][step.name] = bench_result(res, step.out_file)
        if partial is not None:  # what is measured so far is on disk if the check itself is killed
            write({**result, "partial": True, "figures": figures(result["benches"])}, partial, echo=False)
    result["figures"] = figures(result["benches"])
    result["targets"] = targets(result["figures"])
    result["passed"] = bool(result["tests"] and result["tests"]["ok"]
                            and all(t["pass"] for t in result["targets"].values()))
    result["seconds"] = round(time.monotonic() - t0, 1)
    return result


def write(result: dict, out: str | None, echo: bool = True) -> None:
    """The result to ``out`` (atomically: a reader never sees half a file) and, with ``echo``, stdout."""
    text = json.dumps(result)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(f"{out}.tmp").write_text(text + "\n")
        os.replace(f"{out}.tmp", out)
    if echo:
        print(text, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="also write the JSON object to this file")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole check (default %(default)s)")
    ap.add_argument("--workdir", default=None, help="where the steps put images, caches and logs (default: a "
                                                    "temporary folder in the repository, removed at the end)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs of every step)")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every test passed and every target was met")
    ap.add_argument("--preflight", action="store_true", help="only the preflight (a few seconds), then exit")
    args = ap.parse_args(argv)
    pre = preflight()
    for line in pre["warnings"]:
        print(f"gpu-check: warning: {line}", file=sys.stderr)
    env = {**environment(pre["cuda_available"]), "preflight": pre}
    if pre["problems"] or args.preflight:
        why = "; ".join(pre["problems"]) or "preflight only (--preflight)"
        print(f"gpu-check: nothing was measured: {why}", file=sys.stderr)
        write(not_measured(why, env), args.out)
        return 1 if args.strict and pre["problems"] else 0
    work = Path(tempfile.mkdtemp(prefix=".gpu-check-", dir=args.workdir or ROOT))
    try:
        result = run_check(args.budget, work, env, partial=args.out)
        if args.keep:
            result["workdir"] = str(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    write(result, args.out)
    return 1 if args.strict and not result["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
