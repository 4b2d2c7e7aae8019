"""The documentation: the site builds strictly and offline, its reference is the code's, it opens
in a browser without an error, the README stays a front door, and no file names a document the
repository does not hold."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli import reference
from pipeline.config_doc import keys
from tests.helpers.browser import INSTALL_HINT, Chromium, find_chromium

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
# Folders that are not the repository's own text: environments, build outputs, run outputs.
SKIP_DIRS = {".git", ".venv", "venv", "site", "build", "dist", "__pycache__", ".pytest_cache", ".pipe-cache",
             "demo-out", "runs", "results", "node_modules"}
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".cfg", ".txt", ".json", ".html", ".sh", ""}
# Markdown files the tools write (outputs, not documents): each must appear in the code that writes it.
OUTPUTS = {"results.md": "stages/evaluate", "table.md": "stages/reproduce", "t.md": "tests/test_evaluate.py"}
DOC_REF = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[\w.-]*[A-Za-z0-9_]\.md)\b")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _repository_files() -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("wt-")
                       and not d.endswith(".egg-info")]
        out += [Path(dirpath) / f for f in filenames if Path(f).suffix in TEXT or f in ("Makefile", "LICENSE", "run")]
    return out


def _resolves(name: str, where: Path) -> bool:
    """A link: the file it points to, relative to the linking file (or the repository's root)."""
    name = name.split("#")[0]
    candidates = [ROOT / name, where.parent / name]
    inside = where.resolve().is_relative_to(ROOT)  # a file of the repository may not link out of it
    return any(c.resolve().is_file() and (c.resolve().is_relative_to(ROOT) or not inside) for c in candidates)


def _held(name: str, held: set[tuple[str, ...]]) -> bool:
    """A name in prose or code (``docs/concepts/method.md``, ``"method.md"``, ``DIR/README.md``): some
    file of the repository ends with it. Leading placeholder segments (``DIR``, ``<run>``) are dropped."""
    parts = tuple(p for p in Path(name.split("#")[0]).parts if p not in (".", ".."))
    while len(parts) > 1 and (parts[0].isupper() or "<" in parts[0]):
        parts = parts[1:]
    return any(f[len(f) - len(parts):] == parts for f in held if len(f) >= len(parts))


def dangling_references(files: list[Path], held: set[tuple[str, ...]] | None = None) -> list[str]:
    """Every `*.md` a file names that no file of the repository is, and every relative Markdown link
    that leads nowhere."""
    held = held if held is not None else {p.relative_to(ROOT).parts for p in _repository_files()}
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            prose = LINK.sub("]", line) if path.suffix == ".md" else line  # a Markdown link is checked as a link
            named = {m.group(1) for m in DOC_REF.finditer(prose)} - {"README.md"}  # a README: the root's, or a card's
            bad = [x for x in named if Path(x).name not in OUTPUTS and not _held(x, held)]
            if path.suffix == ".md":
                links = {m.group(1) for m in LINK.finditer(line) if not re.match(r"[a-z]+:|#|mailto:", m.group(1))}
                bad += [x for x in links if not _resolves(x, path)]
            found += [f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}:{n}: {x}"
                      for x in sorted(set(bad))]
    return found


def test_no_file_names_a_document_the_repository_does_not_hold():
    files = _repository_files()
    assert len(files) > 100 and ROOT / "README.md" in files and DOCS / "concepts" / "method.md" in files
    missing = dangling_references(files)
    assert not missing, "documents named that the repository does not hold:\n" + "\n".join(missing)
    for name, writer in OUTPUTS.items():  # an output's name is let through only where it is written
        hits = [p for p in (ROOT / writer).rglob("*.py")] if (ROOT / writer).is_dir() else [ROOT / writer]
        assert any(name in p.read_text() for p in hits), (name, writer)


def test_the_reference_check_catches_a_missing_document(tmp_path):
    gone, nowhere = "PAPER" + ".md", "docs/nothing" + ".md"  # spelt apart: this file must not name them
    bad = tmp_path / "bad.py"
    bad.write_text(f'"""See {gone} and docs/concepts/method.md, and {nowhere}; results.md is an output."""\n')
    md = tmp_path / ("links" + ".md")
    md.write_text("[a](concepts/method.md) [b](missing" + ".md#x) [c](https://example.org/x.md) [d](#anchor)\n")
    (tmp_path / "concepts").mkdir()
    (tmp_path / "concepts" / "method.md").write_text("# here\n")
    held = {p.relative_to(ROOT).parts for p in _repository_files()}
    found = dangling_references([bad, md], held)
    assert sorted(f.split(": ", 1)[1] for f in found) == sorted([gone, nowhere, "missing" + ".md#x"]), found


# ------------------------------------------------------------------------------ the generated reference
def test_the_commands_page_lists_every_command_and_option():
    page = reference.commands_page()
    walked = list(reference.walk())
    assert {"pipe embed", "pipe train-adaptor", "pipe evaluate", "pipe cache verify", "pipe data splits"} <= {
        p for p, _, _ in walked}
    for path, command, ctx in walked:
        assert f"`{path}`" in page, path
        for kind, name, _ in reference.options(command, ctx):
            assert f"`{name}`" in page, (path, name)


def test_the_config_page_lists_every_key_with_type_default_and_help():
    page = reference.config_page()
    for source in reference.config_sources():
        listed = keys(source.cls, reference.option_help(source.command))
        assert len(listed) > 10
        for k in listed:
            assert f"`{k.key}`" in page, k.key
            assert k.help.strip(), f"{source.cls.__name__}.{k.key} has no help: end its field's line with a comment"
    assert "`adaptor.text_to_image_weight` | float | `0.75` |" in page
    assert "`adaptor.image_weight`" in page and "`labels` is `classification.labels`" in page


def test_a_field_comment_is_its_keys_help():
    from pipeline.config_doc import field_comments
    from stages.train.trainer import OptimConfig

    assert field_comments(OptimConfig)["warmup_frac"].startswith("linear warm-up over this share")


# ------------------------------------------------------------------------------ the site
@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built as `make docs` builds it (strict: a broken link, anchor or missing page fails)."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "WARNING" not in r.stderr, r.stderr[-4000:]
    return out


@pytest.mark.slow
def test_the_site_builds_strictly_with_every_section(site):
    for page in ("index.html", "getting-started.html", "concepts/method.html", "concepts/cache.html",
                 "how-to/your-data.html", "reference/commands.html", "reference/config.html", "reference/api.html",
                 "reference/cache-format.html", "benchmarks.html", "changelog.html", "search/search_index.json"):
        assert (site / page).is_file(), page
    api = (site / "reference" / "api.html").read_text()
    assert "load_adaptor" in api and "open_dataset" in api and "load_config" in api
    home = (site / "index.html").read_text()
    assert "fonts.googleapis" not in home and "fonts.gstatic" not in home


@pytest.fixture(scope="module")
def chromium():
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"no Chromium in CI, so the site's browser test cannot run: {INSTALL_HINT}")
        pytest.skip(f"no Chromium on this machine: {INSTALL_HINT}")
    return path


@pytest.fixture(scope="module")
def served(site):
    """The built site on a local web server (127.0.0.1 only), as `python -m http.server -d site` serves it."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


RESULTS = "document.querySelectorAll('.md-search-result__item').length"


def _open(url: str, settle: float = 2.0, wait_for_results: float = 0.0) -> tuple[list[str], list[str], int]:
    """(errors, requests, search results) of a page, after ``settle`` seconds and, with
    ``wait_for_results``, until the search shows a result or that many more seconds passed (the
    search builds its index in a worker: seconds on a loaded machine)."""
    from tests.helpers.browser import _errors

    with Chromium() as b:
        b.open(url)
        b.evaluate("new Promise(r => setTimeout(r, %d))" % int(settle * 1000))
        deadline = time.monotonic() + wait_for_results
        while not b.evaluate(RESULTS) and time.monotonic() < deadline:
            b.evaluate("new Promise(r => setTimeout(r, 250))")
        results = b.evaluate(RESULTS)
        requests = [e["params"]["request"]["url"] for e in b.events if e["method"] == "Network.requestWillBeSent"]
        return _errors(b.events), requests, results


@pytest.mark.slow
def test_the_home_page_and_the_search_open_in_a_browser_without_an_error(served, chromium):
    errors, requests, _ = _open(served + "index.html")
    assert errors == []
    assert requests and all(u.startswith((served, "data:")) for u in requests), requests  # nothing from elsewhere
    errors, requests, results = _open(served + "index.html?q=adaptor", wait_for_results=30)  # a search
    assert errors == []
    assert all(u.startswith((served, "data:")) for u in requests), requests
    assert any("search_index.json" in u for u in requests) and results > 0


# ------------------------------------------------------------------------------ the README, the front door
def test_the_readme_is_a_front_door_and_what_it_dropped_is_in_the_site():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for must in ("make demo", "make test", "docs/report.png", "## Using it on your data"):
        assert must in readme, must
    site = {p.relative_to(DOCS).as_posix(): p.read_text() for p in DOCS.rglob("*.md")}
    kept = {  # a sentence or figure of each section the README used to hold, and the page that holds it now
        "concepts/cache.md": "the part file *is* the commit",
        "concepts/reliability.md": "21 SIGKILLs survived",
        "concepts/design.md": "**One object per choice.**",
        "concepts/adaptor.md": "12,207,617 trainable parameters",
        "concepts/evaluation.md": "What the ± and the brackets cover",
        "how-to/paper-tables.md": "pipe reproduce classification --plan",
        "how-to/cluster.md": "torchrun --nproc-per-node 4",
        "how-to/large-tables.md": "### Capacity plan".replace("### ", "## "),
        "how-to/use-a-model.md": "pipe export demo-out/adaptor-pooled",
        "benchmarks.md": "bench/embed_overhead.py",
        "demo.md": "**17.1** [13.9, 21.3]",
        "limitations.md": "not bit-reproducible",
    }
    for page, text in kept.items():
        assert text in site.get(page, ""), (page, text)
