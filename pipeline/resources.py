"""The files the commands read at run time, found through the installed ``configs`` package.

Presets (``configs/*.yaml``), zero-shot prompts (``configs/prompts/``), the paper's tables
and their recipes (``configs/paper/``) and the sweep example ship as package data of the
``configs`` package, so a wheel installed anywhere finds them through
:mod:`importlib.resources`, never through a path next to a source tree.

A name is looked up in one folder of the package (``""`` for the top, ``"prompts"``,
``"paper"``), with or without ``.yaml``; ``configs/paper/x.yaml`` (a path written from a
clone's root) and ``paper/x`` are names too. :data:`ALIASES` gives short names to presets
whose file names say more (``paper`` is ``adaptor_paper``).
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path, PurePosixPath

from core.errors import InputError, PipeError

PACKAGE = "configs"
ALIASES = {"paper": "adaptor_paper", "tokens": "adaptor_tokens"}  # short preset name -> file name
REINSTALL = ("reinstall it: `pip install --force-reinstall freeze-pipe` (from a clone: `pip install -e .` "
             "in the clone)")


class BrokenInstallError(PipeError):
    """The installed package lacks the data files every command may read: a broken install."""


def data_root() -> Path:
    """The ``configs`` package's folder; a missing or empty package is a broken install."""
    try:
        root = importlib.resources.files(PACKAGE)
    except ModuleNotFoundError:
        raise BrokenInstallError(f"the freeze-pipe installation has no `{PACKAGE}` package (presets, prompts, the "
                                 f"paper's tables): it is incomplete; {REINSTALL}") from None
    path = Path(str(root))
    if not isinstance(root, Path) or not any(path.glob("*.yaml")):
        raise BrokenInstallError(f"the freeze-pipe installation's `{PACKAGE}` package ({root}) holds no presets: "
                                 f"its data files are missing; {REINSTALL}")
    return path


def folder(sub: str = "") -> Path:
    """A folder of the package (``""``, ``"prompts"``, ``"paper"``)."""
    path = data_root() / sub if sub else data_root()
    if not any(path.glob("*.yaml")):
        raise BrokenInstallError(f"the freeze-pipe installation's `{PACKAGE}/{sub}` folder ({path}) holds no YAML "
                                 f"files: its data files are missing; {REINSTALL}")
    return path


def names(sub: str = "") -> list[str]:
    """The names of the YAML files in a folder of the package, sorted."""
    return sorted(p.stem for p in folder(sub).glob("*.yaml"))


def find(name: str, sub: str = "") -> Path | None:
    """The packaged file a name means, or None (see the module's docstring for the forms)."""
    pure = PurePosixPath(str(name).replace("\\", "/"))
    parts = list(pure.parts)
    if parts[:1] == [PACKAGE]:
        parts = parts[1:]  # configs/paper/x.yaml, as written from a clone's root
    if not parts or any(p in ("", ".", "..") for p in parts) or pure.is_absolute():
        return None
    *inner, last = parts
    last = ALIASES.get(last, last) if not inner and not sub else last
    stem = last[: -len(".yaml")] if last.endswith(".yaml") else last
    candidate = folder(sub).joinpath(*inner, f"{stem}.yaml")
    return candidate if candidate.is_file() else None


def resolve(name_or_path: str | Path, sub: str, what: str) -> Path:
    """A YAML file given as a path (which wins when it exists) or as a packaged name; else one
    error that lists the names the installed package holds."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    found = find(str(name_or_path), sub)
    if found is not None:
        return found
    raise InputError(f"{what} {str(name_or_path)!r}: no such file, and no such name in the installed package; "
                     f"give a YAML path or one of: {', '.join(listing(sub))}")


def listing(sub: str = "") -> list[str]:
    """The names a user may give, each alias beside the name it stands for."""
    short = {v: k for k, v in ALIASES.items()} if not sub else {}
    return [f"{n} (or {short[n]})" if n in short else n for n in names(sub)]
