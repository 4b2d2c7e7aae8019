"""What a table's plan lacks here, said before anything runs.

Four things stop a table part-way when nobody checks them first: an encoder whose weights
are not on this machine (nothing is downloaded implicitly), a dataset whose folder was not
given or does not exist, a cache without room for the embeddings, and a flag a step needs
(``--trust-remote-code`` for an encoder that runs its hub repository's code). ``pipe
reproduce --plan`` lists them under the steps; a run refuses the ones that would certainly
stop it (weights, folders, flags) before its first step, and warns about the disk (its
figure is an estimate).
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.datasets import READERS
from pipeline.datasets.spec import parse_dataset_spec
from pipeline.encoders import resolve_encoder_name
from pipeline.encoders.remote import ENV, FLAG, remote_code_allowed, runs_remote_code
from pipeline.encoders.weights import locate_weights
from stages.reproduce.steps import Context, Step


@dataclass(frozen=True)
class Missing:
    kind: str          # weights | data | disk | flag
    message: str       # what is missing and what to do
    blocks: bool = True  # a run cannot get through without it (the disk figure is an estimate: it only warns)

    def summary(self) -> dict:
        return {"kind": self.kind, "message": self.message, "blocks": self.blocks}


def missing(ctx: Context, steps: list[Step]) -> list[Missing]:
    """Everything the steps still to run need and this machine lacks, in the order to fix it."""
    todo = [s for s in steps if not s.done]
    return [*_weights(todo), *_datasets(ctx, todo), *_disk(ctx, todo), *_flags(todo)]


def _encoders(todo: list[Step]) -> dict[tuple[str, str], list[str]]:
    """The (encoder, modality) the embed steps to run use, with those steps' ids (ids:
    embed/<data>/<modality>/<encoder>; a family's towers share a name)."""
    out: dict[tuple[str, str], list[str]] = {}
    for s in todo:
        if s.kind == "embed":
            _, _, modality, name = s.id.split("/", 3)
            out.setdefault((name, modality), []).append(s.id)
    return out


def _weights(todo: list[Step]) -> list[Missing]:
    found = []
    for (name, modality), ids in _encoders(todo).items():
        loc = locate_weights(resolve_encoder_name(name, modality))
        if not loc.found:
            found.append(Missing("weights", f"weights of {name} are not here ({loc.where}), needed by {_steps(ids)}. "
                                             f"To get them: {loc.hint or loc.advice}; `pipe encoders` lists what is "
                                             "here."))
    return found


def _datasets(ctx: Context, todo: list[Step]) -> list[Missing]:
    needed = sorted({s.id.split("/")[1] for s in todo if s.kind == "embed"})
    found = []
    for key in needed:
        spec = ctx.data.get(key)
        if spec is None:
            found.append(Missing("data", f"dataset {key}: no folder given; pass --data {key}=FOLDER (or --only the "
                                         "cells of the datasets you have)."))
            continue
        parsed = parse_dataset_spec(spec, READERS)
        root = Path(parsed.root).expanduser() if parsed is not None and parsed.root else None
        if root is not None and not root.is_dir():
            found.append(Missing("data", f"dataset {key}: the folder {root} does not exist (from --data {key}=...); "
                                         "give the folder the dataset was unpacked into."))
    return found


def _disk(ctx: Context, todo: list[Step]) -> list[Missing]:
    need = sum(s.disk for s in todo)
    where = Path(ctx.root)
    while not where.exists() and where != where.parent:  # the cache may not exist yet: its disk does
        where = where.parent
    free = shutil.disk_usage(where).free
    if need <= free:
        return []
    return [Missing("disk", f"disk: the steps to run add about {_gib(need)} to the cache at {ctx.root}, whose disk has "
                            f"{_gib(free)} free; free space, or put the cache on a larger disk (--cache DIR).",
                    blocks=False)]


def _flags(todo: list[Step]) -> list[Missing]:
    if remote_code_allowed():
        return []
    return [Missing("flag", f"{name} runs Python code from its hub repository, so {_steps(ids)} need(s) {FLAG} on "
                            f"`pipe reproduce` (or {ENV}=1); read the repository's .py files in your Hugging Face "
                            "cache first.")
            for (name, modality), ids in _encoders(todo).items()
            if runs_remote_code(resolve_encoder_name(name, modality))]


def _steps(ids: list[str]) -> str:
    return ids[0] if len(ids) == 1 else f"{len(ids)} steps ({ids[0]}, ...)"


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
