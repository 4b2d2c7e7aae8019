"""Where the cache lives: --cache, else $PIPE_CACHE, else ~/.cache/freeze-pipe."""
from __future__ import annotations

import os
from pathlib import Path

DEFAULT_CACHE = Path("~/.cache/freeze-pipe")


def cache_root(explicit: str | os.PathLike | None = None) -> Path:
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("PIPE_CACHE")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) / "freeze-pipe" if xdg else DEFAULT_CACHE.expanduser()).resolve()
