"""Checkpoints as safetensors, carrying the config and the cache fingerprints they came from."""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.atomic import atomic_write_with, fsync_path, temp_owner
from core.processes import pid_running
from core.errors import InputError, MissingFileError, PipeError


class CheckpointMismatchError(PipeError):
    """A checkpoint used against caches (or a config) it was not trained on."""


def optimizer_path(path: Path) -> Path:
    """The sibling file that holds a checkpoint's optimizer state."""
    path = Path(path)
    return path.with_name(path.stem + ".optim.safetensors")


def _staged(opt_path: Path) -> Path:
    return opt_path.with_name(opt_path.name + ".next")


def _remove_stale_temps(path: Path) -> None:
    """Temporary files of writers that were killed mid-write: never read, only wasted space.

    Only those of processes that are gone (or of this one): a live writer's temp file is
    never pulled from under it. (The run folder's lock, :func:`core.locks.owned_folder`,
    already keeps a second run out of the folder; this holds for library callers too.)
    """
    for p in (path, optimizer_path(path), _staged(optimizer_path(path))):
        for tmp in p.parent.glob(f".{p.name}.*.tmp"):
            pid = temp_owner(tmp.name)
            if pid is not None and (pid == os.getpid() or not pid_running(pid)):
                tmp.unlink(missing_ok=True)


def _pair_tag(state: dict[str, torch.Tensor], epoch) -> str:
    """Names one (weights, optimizer state) pair: a hash of the weights and the epoch."""
    h = xxhash.xxh3_128(json.dumps(epoch).encode())
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Model weights in ``path`` (+ optimizer state in a sibling file), metadata as JSON strings.

    Each file is written to a temporary name and renamed into place, so none is ever
    half-written. The two files are paired by a tag (a hash of the weights and the epoch)
    that both record, and the new optimizer state is staged beside the current one until
    the weights file has been replaced. A kill between any two steps therefore leaves a
    weights file whose own optimizer state is on disk, and ``load_checkpoint`` picks that
    one: weights and optimizer state of different epochs are never paired.
    """
    path = Path(path)
    _remove_stale_temps(path)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    if optimizer is not None:
        tag = _pair_tag(state, meta.get("epoch"))
        tensors, layout = _flatten_optimizer(optimizer)
        opt_meta = {"layout": json.dumps(layout), "pair": tag, "epoch": json.dumps(meta.get("epoch"))}
        atomic_write_with(_staged(optimizer_path(path)), lambda p: save_file(tensors, str(p), metadata=opt_meta))
        metadata["optimizer_pair"] = json.dumps(tag)
    atomic_write_with(path, lambda p: save_file(state, str(p), metadata=metadata))
    if optimizer is not None:
        os.replace(_staged(optimizer_path(path)), optimizer_path(path))
        fsync_path(path.parent)


def read_meta(path: Path) -> dict:
    """The metadata of a checkpoint; a file that is not one is a clear error, not a traceback."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
    except FileNotFoundError:
        raise MissingFileError(f"checkpoint {path} does not exist; train one with `pipe train-adaptor`") from None
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        if isinstance(e, PipeError):
            raise
        raise InputError(f"{path} is not a checkpoint written by `pipe train-adaptor` (safetensors could not read "
                         f"it: {str(e).splitlines()[0][:120]}). Give the last.safetensors (or best.safetensors) of "
                         "a run, or its run directory.") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory: its ``best.safetensors`` (chosen on validation
    loss) when training had a validation split, else its ``last.safetensors``."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "best.safetensors" if (p / "best.safetensors").is_file() else p / "last.safetensors"
    if not p.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; give a .safetensors file or a "
                               "`pipe train-adaptor` run directory, or --adaptor none for the no-Adaptor baseline")
    return p


def load_checkpoint(path: Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint {path} does not exist; train one with `pipe train-adaptor`")
    meta = read_meta(path)
    if model is not None:
        load_weights(path, model)
    if optimizer is not None:
        opt_path = _paired_optimizer_file(path, meta)
        layout = json.loads(_raw_meta(opt_path)["layout"])
        _unflatten_optimizer(optimizer, load_file(str(opt_path)), layout)
    return meta


def load_weights(path: Path, model: torch.nn.Module) -> None:
    """Load the weights (whatever the file's metadata), or say in one message why this model cannot take them."""
    try:
        weights = load_file(str(path))
    except FileNotFoundError:
        raise MissingFileError(f"weights file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own error types for a file that is not one
        raise CheckpointMismatchError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                                      "damaged or was cut short: copy it again, or export/train it again") from None
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        want, have = set(model.state_dict()), set(weights)
        missing, extra = sorted(want - have), sorted(have - want)
        detail = "; ".join(x for x in (
            f"missing {len(missing)} tensors (e.g. {missing[0]})" if missing else "",
            f"{len(extra)} unexpected (e.g. {extra[0]})" if extra else "") if x) or str(e).splitlines()[0][:160]
        raise CheckpointMismatchError(
            f"{path} does not fit the Adaptor its own config describes ({detail}). It was most likely written by "
            "an earlier version of this Adaptor (tokens-mode checkpoints from before the matching-head design do "
            "not load); retrain it with `pipe train-adaptor` and the run's config.yaml.") from None


def _raw_meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _paired_optimizer_file(path: Path, meta: dict) -> Path:
    """The optimizer file written with these weights: the current one, or the staged one
    when a save was cut between replacing the weights and renaming the staged file."""
    opt_path = optimizer_path(path)
    tag = meta.get("optimizer_pair")
    if tag is None:  # a checkpoint from before pairing was recorded
        return opt_path
    for candidate in (opt_path, _staged(opt_path)):
        if candidate.exists() and _raw_meta(candidate).get("pair") == tag:
            return candidate
    raise CheckpointMismatchError(
        f"{path} (epoch {meta.get('epoch')}) has no matching optimizer state beside it ({opt_path.name} is "
        "missing or belongs to other weights). Delete the run folder to start over, or pass another --out.")


def checkpoint_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def weights_hash(state: Mapping[str, torch.Tensor]) -> str:
    """A hash of a model's tensors (names, dtypes, shapes and values), not of the file they
    are in: an exported package's weights hash to the same value as the run's checkpoint,
    and a head trained on an Adaptor's features records the Adaptor by it."""
    h = xxhash.xxh3_128()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_fingerprints(meta: dict, actual: dict[str, str], what: str) -> None:
    """Refuse a checkpoint whose training caches differ from the caches at hand."""
    trained = meta.get("fingerprints", {})
    bad = [f"{m}: trained on {trained.get(m, '?')[:16]}, the cache has {fp[:16]}"
           for m, fp in actual.items() if m in trained and trained[m] != fp]
    if bad:
        raise CheckpointMismatchError(
            f"{what} was trained on other embeddings than the cache you point at ({'; '.join(bad)}). "
            "Use the same --backbone/--text-encoder and preprocessing as in training "
            f"({meta.get('backbone')}, {meta.get('text_encoder')}), or train a new Adaptor on this cache.")


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    # learning rates are device tensors under CUDA graphs; the layout is JSON, so store numbers
    groups = [{k: (float(v) if torch.is_tensor(v) else v) for k, v in g.items()} for g in sd["param_groups"]]
    tensors, layout = {}, {"param_groups": groups, "state": {}}
    for pid, st in sd["state"].items():
        layout["state"][str(pid)] = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
                layout["state"][str(pid)][k] = "tensor"
            else:
                layout["state"][str(pid)][k] = v
    return tensors, layout


def _unflatten_optimizer(opt: torch.optim.Optimizer, tensors: dict, layout: dict) -> None:
    state = {}
    for pid, st in layout["state"].items():
        state[int(pid)] = {k: tensors[f"{pid}.{k}"] if v == "tensor" else v for k, v in st.items()}
    opt.load_state_dict({"param_groups": layout["param_groups"], "state": state})
