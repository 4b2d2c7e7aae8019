"""`pipe export`: a trained Adaptor as a self-contained folder in the Hugging Face layout.

    DIR/config.json          what the Adaptor is, the encoders it reads (ids, weights, fingerprints),
                             its training data and split, the shipped heads
    DIR/model.safetensors    the Adaptor's tensors
    DIR/README.md            the model card (YAML front matter + results, intended use, limitations)
    DIR/prompts.yaml         the zero-shot prompts it was evaluated with
    DIR/heads/*.safetensors  classification heads trained on its features (--heads)

The folder loads with :func:`pipeline.api.load_adaptor` without any cache. It is written
all or nothing: every file goes into a hidden temporary folder beside DIR (each one with
the cache's atomic writes), which then replaces DIR; a folder that is not an earlier
export is never replaced.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from safetensors.torch import save_file

from core.atomic import atomic_write_bytes, atomic_write_with, fsync_path, temp_name
from cache.index import load_index
from cache.paths import cache_root
from pipeline.api.card import model_card
from pipeline.api.model import TrainedAdaptor, load_adaptor
from pipeline.api.source import (CONFIG_FILE, PACKAGE_FORMAT, PACKAGE_VERSION, PROMPTS_FILE,
                                 WEIGHTS_FILE, is_package, resolve_source)
from pipeline.encoders.config import MODALITIES
from pipeline.datasets import open_dataset
from pipeline.encoders.stored import store_fingerprint, store_spec
from pipeline.encoders.weights import weights_identity
from core.errors import InputError, MissingFileError, PipeError
from pipeline.models.checkpoint import checkpoint_hash
from pipeline.models.heads import read_head_meta
from pipeline.prompts import prompt_path
from pipeline.records import EvalRecord, load_results, results_file

TASK_ORDER = ("retrieval", "zero-shot", "classification", "segmentation")
# settings of a training run that describe the machine it ran on, not the model
LOCAL_KEYS = ("cache", "out", "device", "resident", "step", "val_batch_size")


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    results: list[str] = field(default_factory=list)   # evaluation runs whose tables are in the card
    heads: list[str] = field(default_factory=list)


def export_adaptor(run: str | os.PathLike, out: str | os.PathLike, *, heads: Sequence[str | os.PathLike] = (),
                   results: Sequence[str | os.PathLike] = (), prompts: str = "chest_xray", license: str = "other",
                   cache: str | os.PathLike | None = None) -> ExportResult:
    """Export a `pipe train-adaptor` run (its best.safetensors, else last) or checkpoint to ``out``."""
    source = resolve_source(run)
    if source.kind == "package":
        raise InputError(f"{run} is already an exported package; copy the folder to share it")
    out = Path(out).expanduser().resolve()
    check_target(out)
    model = load_adaptor(run, device="cpu")  # the encoders must be here, with the weights it was trained on
    ckpt_hash = checkpoint_hash(source.weights)
    evaluations = find_results(source.weights, ckpt_hash, results)
    shipped = collect_heads(heads, model.weights_hash)
    config = package_config(model, ckpt_hash, shipped, training_info(model, cache))
    state = {k: v.detach().contiguous().cpu() for k, v in model.model.state_dict().items()}
    files: dict[str, bytes | Callable[[Path], None]] = {
        CONFIG_FILE: json.dumps(config, indent=1).encode(),
        WEIGHTS_FILE: lambda p: save_file(state, str(p), metadata={"format": "pt", "freeze_pipe": PACKAGE_FORMAT,
                                                                     "weights_hash": model.weights_hash}),
        PROMPTS_FILE: prompt_path(prompts).read_bytes(),
        "README.md": model_card(config, evaluations, license).encode(),
        **{config["heads"][name]["file"]: path.read_bytes() for name, path in shipped.items()},
    }
    write_package(out, files)
    return ExportResult(out, sorted(files), [str(p) for p, _ in evaluations], list(shipped))


# ----------------------------------------------------------------------------- contents
def encoder_entry(model: TrainedAdaptor, modality: str) -> dict:
    """An encoder as the package records it: ids, the weights' identity, and the store
    fingerprint (with its whole spec) of the embeddings the Adaptor was trained on."""
    cfg, recorded = model.encoder_configs[modality], model.source.encoders[modality].fingerprint
    weights = weights_identity(cfg)
    device = next((d for d in ("cpu", "cuda") if store_fingerprint(cfg, d, weights) == recorded), "cpu")
    return {"name": cfg.name, "hub_id": cfg.hub_id, "revision": cfg.revision, "source": cfg.source,
            "trained": cfg.trained, "dim": cfg.embed_dim, "fingerprint": recorded, "weights": weights,
            "spec": store_spec(cfg, device, weights), "description": cfg.description}


def package_config(model: TrainedAdaptor, ckpt_hash: str, heads: dict[str, Path], training: dict) -> dict:
    src = model.source
    return {
        "format": PACKAGE_FORMAT, "format_version": PACKAGE_VERSION, "model_type": PACKAGE_FORMAT,
        "mode": model.mode.name, "embedding_dim": model.dim, "adaptor": src.adaptor,
        "image_grid": list(src.image_grid) if src.image_grid else None, "n_prefix": src.n_prefix,
        "logit_scale": model.logit_scale, "weights_hash": model.weights_hash,
        "encoders": {m: encoder_entry(model, m) for m in MODALITIES},
        "training": {**training, "checkpoint": src.weights.name, "checkpoint_hash": ckpt_hash},
        "heads": {name: {"file": f"heads/{name}.safetensors", **_head_summary(read_head_meta(p))}
                  for name, p in heads.items()},
        "zero_shot_prompts": PROMPTS_FILE,
        "library": {name: _version(name) for name in ("freeze-pipe", "torch", "transformers")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _head_summary(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("kind", "labels", "label_type", "fraction", "n_train", "dataset", "test")}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def training_info(model: TrainedAdaptor, cache: str | os.PathLike | None) -> dict:
    """The training data and split, from the checkpoint (and the cache's index, when it is here)."""
    meta = model.source.meta
    cfg = dict(meta.get("config") or {})
    info = {"dataset": cfg.get("dataset") or meta.get("dataset"), "train_split": cfg.get("train_split", "train"),
            "val_split": cfg.get("val_split", "valid"), "epoch": meta.get("epoch"), "val_loss": meta.get("val_loss"),
            "config": {k: v for k, v in cfg.items() if k not in LOCAL_KEYS}}
    try:
        root = cache_root(cache) if cache else model.training_cache or cache_root(cfg.get("cache"))
        name = open_dataset(info["dataset"], root, materialise=False, skip_bad_rows=True).name
        counts = load_index(root, name).table["split"].value_counts()
        info["dataset_name"], info["items"] = name, {str(k): int(v) for k, v in sorted(counts.items())}
    except (PipeError, OSError, ValueError, KeyError, TypeError):
        pass  # the cache is not here: the card names the dataset without its counts
    return info


def find_results(weights: Path, ckpt_hash: str, explicit: Sequence[str | os.PathLike]) -> list[tuple[Path, EvalRecord]]:
    """Evaluation runs of this checkpoint: those named, else the run folder's siblings and ./results/*."""
    named = [results_file(p) for p in explicit]
    auto = [*weights.parent.parent.glob("*/results.json"), *Path("results").glob("*/results.json")]
    found: dict[Path, EvalRecord] = {}
    for path in named + ([] if named else auto):
        try:
            res = load_results(path)
        except (InputError, MissingFileError):
            if path in named:
                raise InputError(f"{path} is not a results.json written by `pipe evaluate`") from None
            continue
        if res.checkpoint is not None and res.checkpoint.hash == ckpt_hash:
            found[path.parent.resolve()] = res
        elif path in named:
            raise InputError(f"{path.parent} evaluated another checkpoint than {weights}; its results do not "
                             "describe this Adaptor")
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(found.items(), key=lambda kv: (order.get(kv[1].task, 99), str(kv[0])))


def collect_heads(heads: Sequence[str | os.PathLike], adaptor_weights: str) -> dict[str, Path]:
    """Head files named directly or by their evaluation run's folder, all trained on this Adaptor."""
    files: list[Path] = []
    for h in map(Path, heads):
        files += sorted((h / "heads").glob("*.safetensors")) if h.is_dir() else [h]
        if h.is_dir() and not (h / "heads").is_dir():
            raise InputError(f"{h} has no heads/ folder; heads are saved by `pipe evaluate --task classification`")
    out: dict[str, Path] = {}
    for f in files:
        meta = read_head_meta(f)
        if meta.get("adaptor_weights") != adaptor_weights:
            raise InputError(f"head {f} was trained on the features of another Adaptor; export only the heads of an "
                             "evaluation of this run")
        if f.stem in out:
            raise InputError(f"two heads are named {f.stem!r} ({out[f.stem]} and {f}); export them one at a time")
        out[f.stem] = f
    return out


# ------------------------------------------------------------------------------ writing
def check_target(out: Path) -> None:
    """An export may go to a new or empty folder, or replace an earlier export; nothing else."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} is a file; give a folder for the export")
    if out.is_dir() and any(out.iterdir()) and not is_package(out):
        raise InputError(f"{out} exists and is not a package written by `pipe export` (no config.json of format "
                         f"{PACKAGE_FORMAT!r}); refusing to replace it. Give a new or empty folder.")


def write_package(out: Path, files: dict[str, bytes | Callable[[Path], None]]) -> None:
    """Write every file into a hidden folder beside ``out``, then swap it in: a reader sees the
    old export or the new one, never part of one."""
    tmp = temp_name(out)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if callable(content):
                atomic_write_with(path, content)
            else:
                atomic_write_bytes(path, content)
        for d in {(tmp / rel).parent for rel in files}:
            fsync_path(d)
        old = temp_name(out, ".old")
        if out.exists():
            os.rename(out, old)
        os.rename(tmp, out)
        fsync_path(out.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
