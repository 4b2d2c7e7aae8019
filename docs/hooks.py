"""MkDocs hook: the reference pages generated from the code at every build (cli/reference.py),
so the commands, their options and the configuration keys in the site cannot drift from it.

``docs/reference/commands.md`` and ``config.md`` are stubs in the repository (so links to them
resolve there too); the build replaces each one's Markdown with the generated page."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"reference/commands.md": "commands_page", "reference/config.md": "config_page"}


def on_page_markdown(markdown, page, config, files):
    name = PAGES.get(page.file.src_uri)
    if name is None:
        return markdown
    if str(ROOT) not in sys.path:  # build the tree being documented, whatever is installed
        sys.path.insert(0, str(ROOT))
    from cli import reference  # imported here: after the tree is on the path

    return getattr(reference, name)()
