"""Zero-shot prompts: YAML files in configs/prompts/, embedded into the text cache like reports.

A prompt is a text, so it goes through stage one's own machinery (``embed_modality``):
it is normalised and keyed by content like every report, embedded once per text encoder
fingerprint into the same store, and read back by row.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from cache.claims import live_run
from cache.index import DatasetIndex
from cache.keys import normalise_report, text_key
from cache.store import Store
from pipeline.config import PRESET_DIR
from pipeline.devices import resolve_device
from pipeline.errors import InputError
from stages.embed.stage import EmbedConfig, embed_modality

PROMPT_DIR = PRESET_DIR / "prompts"


class PromptError(InputError):
    """A prompt file that cannot be used; the message names the file and the fix."""


def prompt_path(name: str) -> Path:
    p = Path(name).expanduser()
    if p.is_file():
        return p
    candidate = PROMPT_DIR / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    have = ", ".join(sorted(q.stem for q in PROMPT_DIR.glob("*.yaml"))) or "none"
    raise PromptError(f"prompts {name!r}: no such file; give a YAML path or one of {PROMPT_DIR}: {have}")


def load_prompts(name: str) -> dict[str, dict[str, list[str]]]:
    """{finding: {"positive": [...], "negative": [...]}}, checked."""
    path = prompt_path(name)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise PromptError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(data, dict) or not data:
        raise PromptError(f"{path}: expected a mapping finding -> {{positive: [...], negative: [...]}}")
    out = {}
    for finding, entry in data.items():
        if not isinstance(entry, dict) or set(entry) != {"positive", "negative"}:
            raise PromptError(f"{path}: {finding!r} needs exactly `positive` and `negative` lists of sentences")
        lists = {k: [normalise_report(t) for t in entry[k] or [] if isinstance(t, str)] for k in entry}
        if not all(lists.values()):
            raise PromptError(f"{path}: {finding!r} needs at least one non-empty positive and negative prompt")
        out[str(finding)] = lists
    return out


def embed_texts(texts: list[str], encoder_name: str, cache_root: Path) -> np.ndarray:
    """Store rows of ``texts`` in the text store of ``encoder_name``, embedding the ones not there yet."""
    return embed_texts_store(texts, encoder_name, cache_root)[1]


def embed_texts_store(texts: list[str], encoder_name: str, cache_root: Path) -> tuple[Store, np.ndarray]:
    norm = [normalise_report(t) for t in texts]
    if not all(norm):
        raise PromptError("an empty prompt cannot be embedded; remove it from the prompt file")
    keys = [text_key(t) for t in norm]
    table = pd.DataFrame({"id": [f"prompt {i}" for i in range(len(norm))], "report": norm, "report_key": keys})
    index = DatasetIndex("prompts", Path(cache_root) / "datasets" / "prompts", table)
    cfg = EmbedConfig(dataset="prompts", backbone=None, text_encoder=encoder_name, cache=str(cache_root))
    run_id = f"prompts-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    with live_run(run_id):  # this run's own claims count as live while it runs
        res, failures = embed_modality("text", encoder_name, index, "prompts", cfg, Path(cache_root),
                                       resolve_device("auto"), run_id)
    if failures:
        raise PromptError(f"could not embed {len(failures)} prompt(s): {failures[0]['reason']}")
    store = Store.open(res.store)
    where = store.row_index()
    return store, np.array([where[(k, 0)] for k in keys], dtype=np.int64)
