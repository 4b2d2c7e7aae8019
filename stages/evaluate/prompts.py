"""Zero-shot prompts: YAML files in configs/prompts/ (read by :mod:`pipeline.prompts`),
embedded into the text cache like reports.

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

from cache.claims import live_run
from cache.index import DatasetIndex
from cache.keys import normalise_report, text_key
from cache.store import Store
from pipeline.devices import resolve_device
from pipeline.prompts import PromptError, load_prompts, prompt_path
from stages.embed.stage import EmbedConfig, embed_modality

__all__ = ["PromptError", "embed_texts", "embed_texts_store", "load_prompts", "prompt_path"]


def embed_texts(texts: list[str], encoder_name: str, cache_root: Path, device: str = "auto") -> np.ndarray:
    """Store rows of ``texts`` in the text store of ``encoder_name``, embedding the ones not there yet."""
    return embed_texts_store(texts, encoder_name, cache_root, device)[1]


def embed_texts_store(texts: list[str], encoder_name: str, cache_root: Path,
                      device: str = "auto") -> tuple[Store, np.ndarray]:
    """The text store and rows of ``texts``; ``device`` decides the store (CUDA's arithmetic is its own)."""
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
                                       resolve_device(device), run_id)
    if failures:
        raise PromptError(f"could not embed {len(failures)} prompt(s): {failures[0]['reason']}")
    store = Store.open(res.store)
    where = store.row_index()
    return store, np.array([where[(k, 0)] for k in keys], dtype=np.int64)
