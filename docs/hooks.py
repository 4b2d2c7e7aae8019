"""MkDocs hook: the reference pages generated from the code at every build (cli/reference.py),
so the commands, their options and the configuration keys in the site cannot drift from it."""
from __future__ import annotations

import sys
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"reference/commands.md": "commands_page", "reference/config.md": "config_page"}


def on_files(files, config):
    if str(ROOT) not in sys.path:  # build the tree being documented, whatever is installed
        sys.path.insert(0, str(ROOT))
    from cli import reference  # imported here: after the tree is on the path

    for path, page in PAGES.items():
        files.append(File.generated(config, path, content=getattr(reference, page)()))
    return files
