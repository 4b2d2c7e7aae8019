"""Zero-shot prompts and scores: the pure part that `pipe evaluate` and the trained-Adaptor API share.

Prompt files are YAML, named (``chest_xray``: ``configs/prompts/`` of the installed package) or any path: finding -> positive and negative
sentences, normalised like reports. An image's score for a finding is its mean cosine
similarity to the finding's positive prompts minus its mean similarity to the negative
ones; :func:`zero_shot_probability` reads that difference as a two-way softmax at the
Adaptor's logit scale (the same ranking, so the same AUROC).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from cache.keys import normalise_report
from core.errors import InputError
from pipeline import resources

PROMPTS = "prompts"  # the package folder of the named prompt files

Prompts = dict[str, dict[str, list[str]]]


class PromptError(InputError):
    """A prompt file that cannot be used; the message names the file and the fix."""


def prompt_path(name: str) -> Path:
    """A prompt file: a YAML path, or a name the installed package holds (``chest_xray``)."""
    try:
        return resources.resolve(name, PROMPTS, "prompts")
    except InputError as e:
        raise PromptError(str(e)) from None


def load_prompts(name: str) -> Prompts:
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


def prompt_layout(prompts: Prompts, findings: list[str]) -> tuple[list[str], dict[str, dict[str, np.ndarray]]]:
    """Every prompt text of ``findings`` in one list, and per finding the positions of its
    positive and negative prompts in that list."""
    texts, where = [], {}
    for f in findings:
        where[f] = {}
        for side in ("positive", "negative"):
            where[f][side] = np.arange(len(texts), len(texts) + len(prompts[f][side]))
            texts += prompts[f][side]
    return texts, where


def finding_scores(sim: np.ndarray, where: dict) -> dict[str, np.ndarray]:
    """Per finding: mean similarity to its positive prompts minus the mean to its negative ones."""
    return {f: sim[:, w["positive"]].mean(1) - sim[:, w["negative"]].mean(1) for f, w in where.items()}


def zero_shot_probability(score: np.ndarray, logit_scale: float) -> np.ndarray:
    """The score as a probability: a softmax over (positive, negative) at the Adaptor's logit
    scale, as CLIP reads its similarities. Monotone in the score, so rankings are unchanged."""
    z = np.asarray(score, dtype=np.float64) * float(logit_scale)
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # sigmoid, without overflow for large |z|
