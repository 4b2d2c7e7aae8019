"""Typed records between the stages: what an evaluation run leaves in ``results.json``, read back.

Evaluation (stages/evaluate) builds an :class:`EvalRecord` and writes its ``to_dict``; the
report page, `pipe report`, the demo's table, `pipe reproduce`, the model card of `pipe
export` and the sweep read runs with :func:`load_results`, which reads every format this
version knows (older ones through :mod:`pipeline.records.legacy`). The format is described
in docs/reference/results-format.md.
"""
from __future__ import annotations

import json
from pathlib import Path

from core.errors import InputError, MissingFileError
from pipeline.records.keys import DATA_FILES, overlay_keys, prediction_key
from pipeline.records.legacy import upgrade
from pipeline.records.record import (DIRECTIONS, Candidate, CheckpointInfo, DataCard, EvalRecord, Examples,
                                     FailureReason, Failures, HeadCell, MethodResult, Overlays, Prevalence, Provenance,
                                     Query, RESULTS_FORMAT)

__all__ = ["Candidate", "CheckpointInfo", "DATA_FILES", "DIRECTIONS", "DataCard", "EvalRecord", "Examples",
           "FailureReason", "Failures", "HeadCell", "MethodResult", "Overlays", "Prevalence", "Provenance", "Query",
           "RESULTS_FORMAT", "load_results", "overlay_keys", "prediction_key", "record_from_dict", "results_file"]


def results_file(path: str | Path) -> Path:
    """The ``results.json`` of a run folder (or the file itself)."""
    p = Path(path)
    return p / "results.json" if p.is_dir() else p


def load_results(path: str | Path) -> EvalRecord:
    """The records of one evaluation run: its folder (or its ``results.json``), of any format."""
    file = results_file(path)
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"{file} does not exist: give the run folder of `pipe evaluate` (it writes "
                               "results.json there)") from None
    except (UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{file} is not a results.json written by `pipe evaluate` (not JSON: {e}); run the "
                         "evaluation again") from None
    return record_from_dict(data, str(file))


def record_from_dict(data, where: str = "results") -> EvalRecord:
    """The records of a results dict of any format (``where`` names it in an error)."""
    if not isinstance(data, dict) or "task" not in data or not isinstance(data.get("tables"), list):
        raise InputError(f"{where} is not a results.json written by `pipe evaluate` (it has no task and tables); "
                         "give the run folder of an evaluation")
    version = data.get("format", 1)
    if not isinstance(version, int) or version > RESULTS_FORMAT:
        raise InputError(f"{where} is in results format {version!r}, newer than this version reads "
                         f"({RESULTS_FORMAT}); upgrade freeze-pipe")
    try:
        return EvalRecord.from_dict(upgrade(data) if version < RESULTS_FORMAT else data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise InputError(f"{where} is not a complete results.json of `pipe evaluate` ({type(e).__name__}: {e}); "
                         "run the evaluation again") from None
