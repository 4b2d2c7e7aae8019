"""What a trained Adaptor is loaded from: a run folder, a checkpoint file, or an exported package.

All three come down to one :class:`Source`: the weights file, the Adaptor's description
(its config, the image token layout), and per modality the encoder it was trained on,
recorded by name and by the fingerprint of the cache store it read (see
:func:`pipeline.encoders.stored.store_spec`). :func:`load_model` is the one loader of the
Adaptor's module from a source: the API (:func:`pipeline.api.load_adaptor`) and
evaluation (``stages.evaluate.features.FrozenAdaptor``) both use it. Before anything is encoded, each encoder is
resolved offline as the CLI resolves it, and the fingerprint its weights give here is
compared with the recorded one: a different encoder is refused, naming it and both
fingerprints, since the Adaptor's outputs would be meaningless.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.encoders import EncoderConfig, UnknownEncoderError, WeightsNotFoundError, resolve_encoder_name
from pipeline.encoders.stored import store_fingerprint, store_spec
from pipeline.encoders.weights import weights_identity
from core.errors import InputError, MissingFileError, PipeError
from pipeline.models.adaptor import Adaptor, adaptor_config_from_saved
from pipeline.models.checkpoint import load_weights, read_meta, resolve_checkpoint

PACKAGE_FORMAT = "freeze-pipe-adaptor"
PACKAGE_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
PROMPTS_FILE = "prompts.yaml"


class EncoderMismatchError(PipeError):
    """The encoder installed here is not the one the Adaptor was trained on."""


@dataclass(frozen=True)
class EncoderRecord:
    """The encoder one modality of the Adaptor was trained on, as recorded."""

    modality: str
    name: str                      # as given at training (a package records the canonical name)
    fingerprint: str               # of the cache store the Adaptor read
    hub_id: str | None = None
    weights: str | None = None     # the weights' identity (packages record it)
    spec: dict | None = None       # the store's whole fingerprint spec (packages record it)


@dataclass
class Source:
    kind: str                      # "run", "checkpoint" or "package"
    path: Path                     # what was given
    weights: Path                  # the safetensors file with the Adaptor's tensors
    adaptor: dict                  # AdaptorConfig fields
    image_grid: tuple[int, int] | None
    n_prefix: int
    encoders: dict[str, EncoderRecord]
    meta: dict = field(default_factory=dict)      # the checkpoint's metadata, or the package's config.json
    heads: dict[str, Path] = field(default_factory=dict)   # heads shipped in a package, by name
    prompts: Path | None = None    # the zero-shot prompts shipped in a package
    checkpoint_meta: dict = field(default_factory=dict)   # what a checkpoint of it records (a package's, said so)


def is_package(path: Path) -> bool:
    cfg = Path(path) / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("format") == PACKAGE_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def resolve_source(path: str | Path) -> Source:
    """A run folder (its best.safetensors, else last.safetensors), a checkpoint, or a package."""
    p = Path(path).expanduser()
    if p.is_dir() and is_package(p):
        return _package_source(p)
    if p.is_dir() and (p / CONFIG_FILE).is_file() and not any(p.glob("*.safetensors")):
        raise InputError(f"{p} has a config.json but is not a package written by `pipe export` (its format is not "
                         f"{PACKAGE_FORMAT!r}); give a `pipe train-adaptor` run folder or an exported package")
    weights = resolve_checkpoint(p)
    meta = read_meta(weights)
    if meta.get("kind") != "adaptor" or "config" not in meta:
        raise InputError(f"{weights} is not an Adaptor checkpoint from `pipe train-adaptor` (no adaptor metadata)")
    fps = meta.get("fingerprints") or {}
    encoders = {m: EncoderRecord(m, meta.get(k) or "", fps.get(m, ""), _hub_id(meta.get(k), m))
                for m, k in (("image", "backbone"), ("text", "text_encoder"))}
    grid = meta.get("image_grid")
    return Source("run" if p.is_dir() else "checkpoint", p, weights, dict(meta["config"]["adaptor"]),
                  tuple(grid) if grid else None, int(meta.get("n_prefix", 1)), encoders, meta, checkpoint_meta=meta)


def _hub_id(name: str | None, modality: str | None = None) -> str | None:
    try:
        return resolve_encoder_name(name, modality).hub_id if name else None
    except PipeError:  # not resolvable here: the load says so when it needs the encoder
        return None


def _package_source(folder: Path) -> Source:
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if int(cfg.get("format_version", 0)) > PACKAGE_VERSION:
        raise InputError(f"{folder} was exported by a newer freeze-pipe (package format {cfg['format_version']}, "
                         f"this version reads {PACKAGE_VERSION}); upgrade freeze-pipe")
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingFileError(f"{folder} is a package but {WEIGHTS_FILE} is missing; export it again with `pipe export`")
    encoders = {m: EncoderRecord(m, e["name"], e["fingerprint"], e.get("hub_id"), e.get("weights"), e.get("spec"))
                for m, e in cfg["encoders"].items()}
    heads = {name: folder / h["file"] for name, h in (cfg.get("heads") or {}).items()}
    prompts = folder / PROMPTS_FILE if (folder / PROMPTS_FILE).is_file() else None
    grid = cfg.get("image_grid")
    return Source("package", folder, weights, dict(cfg["adaptor"]), tuple(grid) if grid else None,
                  int(cfg.get("n_prefix", 1)), encoders, cfg, heads, prompts, _package_meta(folder, cfg, encoders))


def _package_meta(folder: Path, cfg: dict, encoders: dict[str, EncoderRecord]) -> dict:
    """A package's Adaptor described as a checkpoint's metadata describes one: its encoders and the
    fingerprints of the stores it read are checked against a cache as a run's are."""
    training = cfg.get("training") or {}
    return {"kind": "adaptor", "config": {**(training.get("config") or {}), "adaptor": dict(cfg["adaptor"])},
            "backbone": encoders["image"].name, "text_encoder": encoders["text"].name,
            "fingerprints": {m: e.fingerprint for m, e in encoders.items()}, "image_grid": cfg.get("image_grid"),
            "n_prefix": int(cfg.get("n_prefix", 1)), "epoch": training.get("epoch"),
            "dataset": training.get("dataset"), "package": str(folder)}


def load_model(source: Source, device: torch.device | str) -> Adaptor:
    """The Adaptor of a source, its weights loaded, on ``device``, in eval mode."""
    model = Adaptor(adaptor_config_from_saved(source.adaptor))  # old runs: the loss weight renamed
    load_weights(source.weights, model)
    return model.to(device).eval()


def resolve_encoder(record: EncoderRecord, override: str | None = None) -> EncoderConfig:
    """The encoder a record names, found offline as the CLI finds it (``override``: another name
    or a local directory for the same weights)."""
    names = [override] if override else [n for n in (record.name, record.hub_id) if n]
    if not names:
        raise InputError(f"the Adaptor records no {record.modality} encoder; pass one "
                         f"({record.modality}_encoder=NAME, or --{record.modality}-encoder)")
    for i, name in enumerate(names):
        try:
            cfg = resolve_encoder_name(name, record.modality)
            break
        except (UnknownEncoderError, WeightsNotFoundError):
            if i == len(names) - 1:
                raise
    if cfg.modality != record.modality:
        raise InputError(f"{cfg.name!r} is a {cfg.modality} encoder, but the Adaptor's {record.modality} encoder is "
                         f"asked for (trained with {record.name!r})")
    return cfg


def check_encoder(record: EncoderRecord, cfg: EncoderConfig, device: torch.device) -> str:
    """The fingerprint the weights installed here give on ``device``; refuses weights other
    than the recorded ones. Either arithmetic (CPU float32, CUDA bf16) is accepted as the
    same weights: the Adaptor then reads features a rounding apart from its training's."""
    weights = weights_identity(cfg)  # WeightsNotFoundError, with how to get them, when missing
    here = store_fingerprint(cfg, device, weights)
    if not record.fingerprint:
        return here
    other = torch.device("cpu") if device.type == "cuda" else torch.device("cuda")
    if record.fingerprint in (here, store_fingerprint(cfg, other, weights)):
        return here
    raise EncoderMismatchError(_mismatch_message(record, cfg, device, weights, here))


def _mismatch_message(record: EncoderRecord, cfg: EncoderConfig, device: torch.device, weights: str,
                      here: str) -> str:
    differs = ""
    if record.spec:
        spec = store_spec(cfg, device, weights)
        keys = sorted(k for k in set(spec) | set(record.spec) if k != "compute" and spec.get(k) != record.spec.get(k))
        shown = [f"weights {record.spec.get('weights')!r} there, {weights!r} here" if k == "weights" else k
                 for k in keys]
        differs = f" They differ in: {'; '.join(shown)}." if shown else ""
    get = f" (`hf download {record.hub_id}`)" if record.hub_id else ""
    return (f"the {record.modality} encoder {cfg.name!r} installed here is not the one this Adaptor was trained "
            f"with: it was trained on fingerprint {record.fingerprint}, the weights here give {here}.{differs} "
            f"Install the weights it was trained with{get}, or pass the matching encoder "
            f"({record.modality}_encoder=... in Python, --{record.modality}-encoder on the command line).")
