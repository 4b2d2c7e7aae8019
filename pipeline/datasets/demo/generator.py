"""Writing a demo dataset: every study's image, masks and report, then pairs.csv and
demo.json, into a temporary folder that is moved into place at the end."""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from core.processes import process_alive, this_process
from pipeline.datasets.demo.anatomy import PatientAnatomy
from pipeline.datasets.demo.findings import FINDINGS, MASKED_FINDINGS
from pipeline.datasets.demo.iu import load_iu_bank
from pipeline.datasets.demo.plan import Case, plan
from pipeline.datasets.demo.render import render_case
from pipeline.datasets.demo.reports import Report, agreement_line, compose_report, measure_agreement
from pipeline.datasets.demo.spec import FORMAT_VERSION, DemoSpec
from core.errors import PipeError


def _expected_meta(spec: DemoSpec) -> dict:
    return {"format_version": FORMAT_VERSION, "spec": spec.to_dict()}


def _is_complete(root: Path, spec: DemoSpec) -> bool:
    meta_path = root / "demo.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    want = _expected_meta(spec)
    if any(meta.get(k) != v for k, v in want.items()):
        return False
    if not (root / "pairs.csv").is_file() or not (root / "mentions.csv").is_file():
        return False
    for i in range(spec.n):
        name = f"{i:06d}.png"
        if not (root / "images" / name).is_file():
            return False
        for f in MASKED_FINDINGS:
            if not (root / "masks" / f / name).is_file():
                return False
    return True


def _partial_prefix(root: Path) -> str:
    """The temporary folder's name records its writer (pid and start time), for _clean_stale."""
    me = this_process()
    return f".{root.name}.partial-{me['pid']}-{me['start']}-"


def _clean_stale(root: Path) -> None:
    """Remove partial outputs left by generations that were killed (a reused pid does not count as alive)."""
    prefix = f".{root.name}.partial-"
    for p in root.parent.glob(prefix + "*"):
        pid, _, rest = p.name[len(prefix):].partition("-")
        start = rest.partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        if not process_alive({"host": socket.gethostname(), "pid": int(pid), "start": start}):
            shutil.rmtree(p, ignore_errors=True)


def _save_png(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


class DemoTargetError(PipeError, FileExistsError):
    """The demo's folder holds something the generator did not write: it is never replaced."""


_GENERATOR = "pipeline.datasets.demo"
_STUDY_PNG = re.compile(r"^\d{6}\.png$")
_TOP = {"demo.json", "pairs.csv", "mentions.csv", "images", "masks"}


def _foreign(root: Path) -> list[str]:
    """What in ``root`` the generator did not write (relative paths; [] for a folder it generated).

    A generated folder holds its ``demo.json`` (naming this generator), ``pairs.csv``,
    ``mentions.csv``, ``images/<6 digits>.png`` and ``masks/<finding>/<6 digits>.png``, as
    plain files and folders (no symbolic links), and nothing else.
    """
    try:
        meta = json.loads((root / "demo.json").read_text())
        ours = isinstance(meta, dict) and (meta.get("generator") == _GENERATOR or {"format_version", "spec"} <= meta.keys())
    except (OSError, ValueError):
        ours = False
    out = [] if ours else ["demo.json (not one this generator wrote)"]
    for p in sorted(root.iterdir()):
        if p.is_symlink() or p.name not in _TOP or p.is_dir() != (p.name in ("images", "masks")):
            out.append(p.name)
        elif p.name == "images":
            out += [f"images/{q.name}" for q in sorted(p.iterdir())
                    if q.is_symlink() or not q.is_file() or not _STUDY_PNG.match(q.name)]
        elif p.name == "masks":
            for d in sorted(p.iterdir()):
                if d.is_symlink() or not d.is_dir() or not re.fullmatch(r"[a-z_]+", d.name):
                    out.append(f"masks/{d.name}")
                    continue
                out += [f"masks/{d.name}/{q.name}" for q in sorted(d.iterdir())
                        if q.is_symlink() or not q.is_file() or not _STUDY_PNG.match(q.name)]
    return out


def _refuse_unless_generated(root: Path) -> None:
    """Stop unless ``root`` is missing, empty, or a folder this generator wrote that holds nothing else."""
    if not root.exists() and not root.is_symlink():
        return
    if root.is_symlink() or not root.is_dir():
        raise DemoTargetError(f"demo: {root} exists and is not a folder; refusing to replace it. Choose another "
                              "folder or remove it.")
    if not any(root.iterdir()):
        return
    if not (root / "demo.json").is_file():
        raise DemoTargetError(f"demo: {root} exists and is not a demo dataset; refusing to replace it")
    foreign = _foreign(root)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise DemoTargetError(f"demo: {root} holds a demo.json but also files the demo generator did not write "
                              f"({', '.join(foreign[:3])}{more}); refusing to replace it, so nothing in it was "
                              "changed. Move your files elsewhere, or generate the demo into another folder.")


def _install(tmp: Path, root: Path, spec: DemoSpec) -> None:
    """Move a finished dataset from ``tmp`` to ``root``."""
    if root.exists():
        _refuse_unless_generated(root)  # checked again: the folder may have changed while generating
        if root.is_dir() and not any(root.iterdir()):
            root.rmdir()
        elif (root / "demo.json").is_file():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{os.getpid()}-", dir=root.parent))
            os.rename(root, old / "data")
            try:
                os.rename(tmp, root)
            finally:
                shutil.rmtree(old, ignore_errors=True)
            return
        else:
            raise DemoTargetError(f"demo: {root} exists and is not a demo dataset; refusing to replace it")
    try:
        os.rename(tmp, root)
    except OSError:
        if _is_complete(root, spec):  # another process finished the same dataset first
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def case_report(spec: DemoSpec, case: Case, bank=None) -> Report:
    """The report of one study: wording from the stream (seed, 3, i), noise decisions
    from the stream (seed, 5, i), so turning the noise off leaves the wording stream alone."""
    return compose_report(np.random.default_rng([spec.seed, 3, case.index]), case.findings, bank,
                          spec.report_noise(), np.random.default_rng([spec.seed, 5, case.index]))


def _write_case(tmp: Path, spec: DemoSpec, patients: list[PatientAnatomy], bank, case: Case) -> tuple[dict, dict]:
    """Write one study's files; return its pairs.csv row and what its report mentions."""
    rng = np.random.default_rng([spec.seed, 2, case.index])
    img, masks = render_case(rng, spec.size, patients[case.patient], case.findings)
    report = case_report(spec, case, bank)
    name = f"{case.id}.png"
    _save_png(img, tmp / "images" / name)
    for f in MASKED_FINDINGS:
        _save_png(masks[f].astype(np.uint8) * 255, tmp / "masks" / f / name)
    row = {"id": case.id, "image": f"images/{name}", "report": report.text,
           "patient_id": case.patient_id, "split": case.split}
    for f in FINDINGS:
        row[f] = int(f in case.findings)
    row["normal"] = int(not case.findings)
    for f in MASKED_FINDINGS:
        row[f"mask_{f}"] = f"masks/{f}/{name}"
    return row, {"id": case.id, **report.mentions}


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _check_target(root: Path) -> None:
    _refuse_unless_generated(root)


def _write_all(work: Callable[[Case], tuple[dict, dict]], cases: list[Case], workers: int,
               progress: Callable[[int], None] | None) -> list[tuple[dict, dict]]:
    """(pairs.csv row, report mentions) of every case in case order, written by ``workers`` threads."""
    rows: list[tuple[dict, dict]] = []
    if workers <= 1 or len(cases) < 32:
        for case in cases:
            rows.append(work(case))
            if progress is not None:
                progress(len(rows))
        return rows
    # numpy and zlib release the GIL for most of the work, so threads give a real
    # speed-up without the hazards of forking a process that may hold torch.
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="demo")
    try:
        for row in pool.map(work, cases):
            rows.append(row)
            if progress is not None:
                progress(len(rows))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return rows


def _write_tables(tmp: Path, spec: DemoSpec, rows: list[tuple[dict, dict]], n_patients: int) -> dict:
    """Write pairs.csv, mentions.csv and demo.json; return the label-report agreement."""
    import pandas as pd  # lazy: only for writing the table; the demo package stays light to import

    df = pd.DataFrame([row for row, _ in rows])
    df.to_csv(tmp / "pairs.csv", index=False)
    mentions = pd.DataFrame([m for _, m in rows], columns=["id", *FINDINGS])
    mentions.to_csv(tmp / "mentions.csv", index=False)
    agreement = measure_agreement(df[list(FINDINGS)].to_dict("records"), mentions.fillna("").to_dict("records"))
    meta = _expected_meta(spec) | {
        "generator": "pipeline.datasets.demo",
        "findings": list(FINDINGS),
        "masked_findings": list(MASKED_FINDINGS),
        "n_patients": n_patients,
        "prevalence": {f: round(float(df[f].mean()), 4) for f in FINDINGS + ("normal",)},
        "orientation": "PA view: the patient's left is on the image right",
        "reports_license": "CC BY-NC-ND 4.0 (Indiana University chest X-ray reports)"
        if spec.reports == "iu" else "synthetic",
        "report_agreement": agreement,
    }
    (tmp / "demo.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return agreement


def read_agreement(root: Path) -> dict | None:
    """The label-report agreement recorded in ``root``/demo.json (None when absent)."""
    try:
        return json.loads((Path(root) / "demo.json").read_text()).get("report_agreement")
    except (OSError, ValueError):
        return None


def generate(
    root: Path,
    spec: DemoSpec = DemoSpec(),
    progress: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> Path:
    """Write the demo dataset to ``root`` and return the path of ``pairs.csv``.

    Returns at once when ``root`` already holds a complete dataset of the same spec.
    Files are written to a temporary folder beside ``root`` and moved into place at the
    end, so an interrupted run never leaves a complete-looking dataset. ``progress`` is
    called with the number of studies written so far. ``workers`` threads render in
    parallel (default: the usable CPUs, at most 8); the output does not depend on it.
    """
    root = Path(root)
    if _is_complete(root, spec):
        return root / "pairs.csv"
    _check_target(root)
    bank = load_iu_bank() if spec.reports == "iu" else None
    cases, patients = plan(spec)
    workers = _default_workers() if workers is None else max(1, int(workers))

    root.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(root), dir=root.parent))
    try:
        (tmp / "images").mkdir()
        for f in MASKED_FINDINGS:
            (tmp / "masks" / f).mkdir(parents=True)
        rows = _write_all(partial(_write_case, tmp, spec, patients, bank), cases, workers, progress)
        _write_tables(tmp, spec, rows, len(patients))
        _install(tmp, root, spec)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / "pairs.csv"


def ensure_demo(root: Path, spec: DemoSpec = DemoSpec(), say: Callable[[str], None] | None = None) -> Path:
    """Generate the demo dataset at ``root`` unless it is already there (``say`` is told when it is
    not, with where it goes and about how large it is); return pairs.csv."""
    if say is not None and not _is_complete(Path(root), spec):
        mb = spec.n * BYTES_PER_STUDY_224 * (spec.size / 224) ** 2 / 1e6
        say(f"generating the demo's {spec.n:,} phantom studies into {root} (about {mb:,.0f} MB, once per cache)")
    return generate(Path(root), spec)


BYTES_PER_STUDY_224 = 80_500  # the default demo: 2,000 studies at 224 px took 161 MB (image, masks, tables)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Generate the phantom chest X-ray demo dataset.")
    ap.add_argument("root", type=Path)
    ap.add_argument("--n", type=int, default=DemoSpec.n)
    ap.add_argument("--size", type=int, default=DemoSpec.size)
    ap.add_argument("--seed", type=int, default=DemoSpec.seed)
    ap.add_argument("--reports", choices=("synthetic", "iu"), default=DemoSpec.reports)
    ap.add_argument("--noise", type=int, choices=(0, 1), default=DemoSpec.noise,
                    help="1: reports disagree with the labels as real ones do; 0: they agree exactly")
    ap.add_argument("--omit", type=float, default=DemoSpec.omit)
    ap.add_argument("--uncertain", type=float, default=DemoSpec.uncertain)
    ap.add_argument("--spurious", type=float, default=DemoSpec.spurious)
    a = ap.parse_args(argv)
    spec = DemoSpec(a.n, a.size, a.seed, a.reports, a.noise, a.omit, a.uncertain, a.spurious)
    try:
        csv = generate(a.root, spec)
    except PipeError as e:
        raise SystemExit(f"error: {e}") from None
    print(csv)
    agreement = read_agreement(csv.parent)
    if agreement:
        print(agreement_line(agreement))
