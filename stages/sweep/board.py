"""What people read of a sweep: ``trials.csv`` (and ``trials.json``, what ``--json`` prints), the
earlier ``sweep.csv``, and one progress line per finished trial.

``trials.csv`` has one row per trial of the study (every process's), ranked by the
objective: ``trial``, ``state`` (complete, pruned, failed, running, or interrupted: to be
resumed), ``objective`` (with ``repeats``: the mean, then ``objective_std`` and the values
``objective_runs``), ``seconds``, ``run`` (its folder), one column per searched key under
its dotted name (an encoder pair as ``backbone`` and ``text_encoder``), and ``reason`` (why
it failed, was pruned or interrupted).
"""
from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

from core.atomic import atomic_write_text
from stages.sweep.spec import SweepSpec
from stages.sweep.study import INTERRUPTED, REASON

STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "interrupted"}
FIRST = ("trial", "state", "objective")


def trial_folder(spec: SweepSpec, number: int) -> Path:
    return Path(spec.out) / "trials" / f"{number:04d}"


def trial_rows(spec: SweepSpec, trials: list) -> list[dict]:
    """One row per trial that ran or runs (a waiting trial only once it was interrupted), ranked."""
    rows = [_row(spec, t) for t in trials if t.state.name != "WAITING" or INTERRUPTED in t.system_attrs]
    return rank(rows, spec)


def _row(spec: SweepSpec, t) -> dict:
    state = STATES[t.state.name]
    attrs = t.user_attrs
    seconds = attrs.get("seconds")
    if seconds is None and t.datetime_start is not None and state == "running":
        seconds = round(time.time() - t.datetime_start.timestamp(), 1)
    row = {"trial": t.number, "state": state, "objective": t.value if state == "complete" else None}
    if spec.repeats > 1:
        row["objective_std"] = attrs.get("std")
        row["objective_runs"] = json.dumps(attrs["values"]) if "values" in attrs else None
    settings = spec.settings(t.params) if all(p.key in t.params for p in spec.space) else {}
    row.update({"seconds": seconds, "run": attrs.get("run", str(trial_folder(spec, t.number)))})
    row.update({k: settings.get(k) for k in spec.axes})
    row["reason"] = t.system_attrs.get(REASON) or (t.system_attrs.get(INTERRUPTED) if state == "interrupted" else None)
    row["params"] = dict(t.params)
    row["started"] = t.datetime_start.timestamp() if t.datetime_start else None      # trials.json only
    row["finished"] = t.datetime_complete.timestamp() if t.datetime_complete else None
    return row


def rank(rows: list[dict], spec: SweepSpec) -> list[dict]:
    """Complete trials best first (by the objective's direction), then the others by number."""
    sign = -1.0 if spec.objective.direction == "maximize" else 1.0
    done = sorted((r for r in rows if r["state"] == "complete"), key=lambda r: (sign * r["objective"], r["trial"]))
    return done + sorted((r for r in rows if r["state"] != "complete"), key=lambda r: r["trial"])


def csv_columns(spec: SweepSpec) -> list[str]:
    spread = ["objective_std", "objective_runs"] if spec.repeats > 1 else []
    return [*FIRST, *spread, "seconds", "run", *spec.axes, "reason"]


def write_tables(spec: SweepSpec, rows: list[dict]) -> Path:
    """trials.csv and trials.json in the sweep folder, each replaced whole."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    cols = csv_columns(spec)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows({k: _cell(r.get(k)) for k in cols} for r in rows)
    atomic_write_text(out / "trials.csv", buf.getvalue())
    atomic_write_text(out / "trials.json", json.dumps(as_json(spec, rows), indent=1, default=str))
    return out / "trials.csv"


def _cell(v):
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.6g}"
    return "" if v is None else v


def as_json(spec: SweepSpec, rows: list[dict]) -> dict:
    return {"objective": spec.objective.text, "direction": spec.objective.direction, "trials": spec.trials,
            "search": spec.search, "axes": list(spec.axes), "rows": rows}


def write_legacy(spec: SweepSpec, rows: list[dict]) -> Path:
    """sweep.csv as the earlier `pipe sweep` wrote it: the searched values, each run's last-epoch
    training figures and its folder (``out``), for the trials that trained."""
    out = []
    for r in rows:
        metrics = _last_epoch(Path(r["run"]) if spec.repeats == 1 else Path(r["run"]) / "seed-0")
        if metrics:
            out.append({**{k: r.get(k) for k in spec.axes}, **metrics, "out": r["run"]})
    keys: dict[str, None] = {}
    for r in out:
        keys.update(dict.fromkeys(r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(keys) or ["out"], lineterminator="\n")
    w.writeheader()
    w.writerows(out)
    atomic_write_text(Path(spec.out) / "sweep.csv", buf.getvalue())
    return Path(spec.out) / "sweep.csv"


def _last_epoch(run: Path) -> dict:
    path = run / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return {k: v for k, v in rows[-1].items() if v not in ("", None)} if rows else {}


# ------------------------------------------------------------------ progress
def show_params(spec: SweepSpec, params: dict) -> str:
    settings = spec.settings(params) if params else {}
    return " ".join(f"{k}={_short(settings.get(k))}" for k in spec.axes) or "(no searched key)"


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def progress_line(spec: SweepSpec, number: int, params: dict, outcome: dict, rows: list[dict],
                  capacity: int) -> str:
    """``trial 7 · lr=0.00032 ... · objective 0.8123 · best 0.8234 (trial 3) · 8/20 done · about 4 min left``."""
    state = outcome["state"]
    what = (f"objective {outcome['value']:.4g}" if state == "complete" else
            f"{state}: {(outcome.get('reason') or '').splitlines()[0][:160]}")
    best = next((r for r in rows if r["state"] == "complete"), None)
    best_text = f"best {best['objective']:.4g} (trial {best['trial']})" if best else "no complete trial yet"
    finished = [r for r in rows if r["state"] in ("complete", "pruned", "failed")]
    left = max(0, spec.trials - len(finished))
    secs = [r["seconds"] for r in finished if isinstance(r.get("seconds"), (int, float))]
    eta = (f"about {_duration(left * sum(secs) / len(secs) / max(1, capacity))} left" if secs and left
           else "done" if not left else "")
    return (f"trial {number} · {show_params(spec, params)} · {what} · {best_text} · "
            f"{len(finished)}/{spec.trials} done" + (f" · {eta}" if eta else ""))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
