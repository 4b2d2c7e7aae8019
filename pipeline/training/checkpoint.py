"""Checkpoints as safetensors, carrying the config and the cache fingerprints they came from."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import xxhash
from safetensors.torch import load_file, save_file


class CheckpointMismatchError(RuntimeError):
    """A checkpoint used against caches (or a config) it was not trained on."""


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict,
                    optimizer: torch.optim.Optimizer | None = None) -> None:
    """Model weights (+ optimizer state in a sibling file), metadata as JSON strings.

    The optimizer file is written first and the model file last, so a checkpoint whose
    model file exists is always complete.
    """
    path = Path(path)
    if optimizer is not None:
        opt_path = path.with_name(path.stem + ".optim.safetensors")
        tensors, layout = _flatten_optimizer(optimizer)
        _atomic(opt_path, lambda p: save_file(tensors, str(p), metadata={"layout": json.dumps(layout)}))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {k: json.dumps(v) for k, v in meta.items()}
    _atomic(path, lambda p: save_file(state, str(p), metadata=metadata))


def read_meta(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


def load_checkpoint(path: Path, model: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train one with `pipe train-adaptor`")
    meta = read_meta(path)
    if model is not None:
        model.load_state_dict(load_file(str(path)))
    if optimizer is not None:
        opt_path = path.with_name(path.stem + ".optim.safetensors")
        from safetensors import safe_open

        with safe_open(str(opt_path), framework="pt") as f:
            layout = json.loads(f.metadata()["layout"])
        _unflatten_optimizer(optimizer, load_file(str(opt_path)), layout)
    return meta


def checkpoint_hash(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
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
    tensors, layout = {}, {"param_groups": sd["param_groups"], "state": {}}
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
