"""The layout's rules, read from the code itself (ast), so they hold from now on.

The top-level packages are the layers, lowest first; a module may import its own layer
or lower ones, and nothing else. There are no exceptions.

0. ``core/``: what every layer uses (errors, console, atomic files, locks, processes);
1. ``cache/``: everything on disk about the cache;
2. ``pipeline/``: the libraries (config, devices, imaging, encoders, datasets, models, api);
3. ``stages/``: the jobs, in tiers of their own: ``embed``; then ``train`` and
   ``evaluate`` (never each other); then ``report`` (the runs' results gathered); then the
   orchestrations ``sweep``, ``demo`` and ``reproduce`` (never each other);
4. ``cli/``: the command line;
5. ``bench/``: benchmarks, which may use anything and which nothing imports.

Within ``cache/``, only the storage modules (:data:`STORAGE_MODULES`) know which backends
exist (a folder, a bucket): no other module of the code asks which one it has.

An import is a static ``import``/``from`` or a string given to ``importlib.import_module``
or ``__import__`` (an f-string counts by its constant prefix). Also: no import cycle
between modules, and an import inside a function carries a comment saying why it is not
at the top (start-up time, an optional dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "cache", "pipeline", "stages", "cli", "bench")
STAGE_TIERS = {"embed": 0, "train": 1, "evaluate": 1, "report": 2, "sweep": 3, "demo": 3, "reproduce": 3}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in LAYERS:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def layer(module: str) -> tuple[int, int, str]:
    """(layer, tier, room): the top-level package's place, and within ``stages/`` its tier and room."""
    top, _, rest = module.partition(".")
    if top not in LAYERS:
        raise KeyError(f"{module} is in no layer: add its package to LAYERS")
    if top != "stages":
        return LAYERS.index(top), 0, top
    room = rest.split(".")[0]
    if not room:
        return LAYERS.index(top), max(STAGE_TIERS.values()), "stages"
    if room not in STAGE_TIERS:
        raise KeyError(f"stages/{room} has no tier: add it to STAGE_TIERS")
    return LAYERS.index(top), STAGE_TIERS[room], room


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _string_import(node: ast.Call) -> str | None:
    """The module a call to ``importlib.import_module``/``__import__`` names (an f-string: its constant prefix)."""
    fn = node.func
    name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
    if name not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".")
    return None


def _targets(module: str, node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        base = _resolve(module, node)
        return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    if isinstance(node, ast.Call):
        named = _string_import(node)
        return [named] if named else None
    return None


def _imports(module: str) -> list[tuple[str, int, bool, str]]:
    """(imported project module, line, inside a function, source line) for every import."""
    path = MODULES[module]
    source = path.read_text()
    lines = source.splitlines()
    tree = ast.parse(source)
    in_function: set[int] = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(n) for n in ast.walk(fn) if n is not fn)
    out = []
    for node in ast.walk(tree):
        targets = _targets(module, node)
        if targets is None:
            continue
        text = "\n".join(lines[node.lineno - 1: node.end_lineno])
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            # a string import's lazy position is its own business: only real import statements need a comment
            lazy = id(node) in in_function and not isinstance(node, ast.Call)
            out.append((t if t in MODULES else "", node.lineno, lazy, text))
    return out


def test_the_modules_are_found():
    assert {"core.errors", "cache.store", "stages.embed.stage", "stages.train.trainer", "cli", "bench.scale"} <= set(MODULES)
    assert all(module.partition(".")[0] in LAYERS for module in MODULES)


def test_every_top_level_package_is_a_layer():
    """A new top-level package of code must be given its place, or its imports go unchecked."""
    skip = {"tests", "configs", "docs", ".venv", ".git", ".ci"}
    packages = {p.parent.name for p in ROOT.glob("*/*.py") if p.parent.name not in skip and not p.parent.name.startswith(".")}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"


def _upward(module: str) -> list[str]:
    here = layer(module)
    found = []
    for target, line, _, _ in _imports(module):
        if not target:
            continue
        there = layer(target)
        lateral = here[0] == there[0] and here[1] == there[1] and here[2] != there[2] and here[0] == LAYERS.index("stages")
        if there[:2] > here[:2] or lateral:
            found.append(f"{_rel(MODULES[module])}:{line} imports {target} "
                         f"({LAYERS[here[0]]}/{here[2]} -> {LAYERS[there[0]]}/{there[2]})")
    return found


def test_imports_only_go_down():
    upward = [line for module in MODULES for line in _upward(module)]
    assert not upward, "imports that go up or across stages:\n" + "\n".join(upward)


def test_nothing_imports_a_benchmark():
    users = [f"{_rel(MODULES[m])}:{line}" for m in MODULES if not m.startswith("bench")
             for t, line, _, _ in _imports(m) if t.startswith("bench")]
    assert not users, "benchmarks imported by the code:\n" + "\n".join(users)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_no_import_cycles():
    graph = {m: {t for t, _, _, _ in _imports(m) if t and t != m} for m in MODULES}
    cycles = _cycles(graph)
    assert not cycles, "modules that import each other:\n" + "\n".join(", ".join(c) for c in cycles)


def test_imports_inside_functions_say_why():
    silent = [f"{_rel(MODULES[m])}:{line}: {text.strip()}"
              for m in MODULES for _, line, inside, text in _imports(m) if inside and "#" not in text]
    assert not silent, "imports inside functions without a comment saying why:\n" + "\n".join(sorted(set(silent)))


# ------------------------------------------------------------------------------ one algorithm per job, whatever the backend
STORAGE_MODULES = {"cache.storage", "cache.objects", "cache.mirror"}
BACKEND_QUESTIONS = {"remote_root", "storage_of", "url_scheme", "parse_s3"}  # "where does this cache live?"
BACKEND_CLASSES = ("LocalStorage", "ObjectStorage")


def _asks_the_backend(module: str) -> list[str]:
    """Where ``module`` asks which backend it has: a call that tells a bucket from a folder, an
    ``isinstance`` against a backend class, or a test of a URL's scheme (``== "s3"``, ``.startswith("s3:")``)."""
    found = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        what = None
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            arg = node.args[0] if node.args else None
            if name in BACKEND_QUESTIONS:
                what = f"calls {name}()"
            elif name == "isinstance" and len(node.args) == 2 and any(c in ast.unparse(node.args[1]) for c in BACKEND_CLASSES):
                what = f"isinstance(..., {ast.unparse(node.args[1])})"
            elif name == "startswith" and isinstance(arg, ast.Constant) and str(arg.value).lower().startswith("s3"):
                what = f"tests a URL scheme: .startswith({arg.value!r})"
        elif isinstance(node, ast.Compare):
            if any(isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.lower().rstrip(":/") == "s3"
                   for c in [node.left, *node.comparators]):
                what = "compares with the 's3' scheme"
        if what:
            found.append(f"{_rel(MODULES[module])}:{node.lineno} {what}")
    return found


def test_no_module_above_the_storage_asks_which_backend_it_has():
    """gc, rm, verify and everything else go through cache.storage.Storage: a backend's
    difference is a method of the storage, never a branch in the code that uses it."""
    asking = [line for m in MODULES if m.partition(".")[0] not in ("bench",) and m not in STORAGE_MODULES
              for line in _asks_the_backend(m)]
    assert not asking, "modules that ask which storage backend they have:\n" + "\n".join(asking)
    assert all(m in MODULES for m in STORAGE_MODULES)


def test_the_backend_check_finds_what_it_forbids(tmp_path, monkeypatch):
    bad = tmp_path / "bad.py"
    bad.write_text("def f(s, x, u):\n    if isinstance(s, ObjectStorage) or remote_root(x) or u == 's3':\n"
                   "        return u.startswith('s3://')\n")
    monkeypatch.setitem(MODULES, "cache.bad", bad)
    assert len(_asks_the_backend("cache.bad")) == 4
    with pytest.raises(AssertionError, match="cache.bad|bad.py"):
        test_no_module_above_the_storage_asks_which_backend_it_has()


def _functions():
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{_rel(path)}:{node.lineno} {node.name}", node.end_lineno - node.lineno + 1


@pytest.mark.parametrize("limit", [60])
def test_no_function_is_very_long(limit):
    long = [f"{where} ({n} lines)" for where, n in _functions() if n > limit]
    assert not long, f"functions over {limit} lines:\n" + "\n".join(long)


def test_the_checks_catch_what_they_forbid(tmp_path, monkeypatch):
    """The checker itself: upward, lateral and string imports, a cycle and a silent lazy import are all found."""
    cache_mod = tmp_path / "cache_bad.py"
    cache_mod.write_text("from stages.embed.stage import run\n\ndef f():\n    import json\n")
    monkeypatch.setitem(MODULES, "cache.bad", cache_mod)
    targets = _imports("cache.bad")
    assert ("stages.embed.stage", 1, False, "from stages.embed.stage import run") in targets
    assert layer("stages.embed.stage")[0] > layer("cache.bad")[0]
    assert any(inside and "#" not in text for _, _, inside, text in targets)
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    with pytest.raises(AssertionError, match="imports stages.embed.stage"):
        test_imports_only_go_down()
    strings = tmp_path / "strings.py"
    strings.write_text("import importlib\n\ndef f(x):\n    return importlib.import_module(f'cli.{x}'), __import__('stages.train')\n")
    monkeypatch.setitem(MODULES, "pipeline.strings", strings)
    assert [t for t, *_ in _imports("pipeline.strings") if t] == ["cli", "stages.train"]
    assert len(_upward("pipeline.strings")) == 2
    lateral = tmp_path / "lateral.py"
    lateral.write_text("from stages.evaluate.stage import run\n")
    monkeypatch.setitem(MODULES, "stages.train.lateral", lateral)
    assert _upward("stages.train.lateral") and not _upward("stages.sweep.stage")
    bench_user = tmp_path / "bench_user.py"
    bench_user.write_text("from bench.scale import main\n")
    monkeypatch.setitem(MODULES, "core.bench_user", bench_user)
    with pytest.raises(AssertionError, match="core.bench_user|bench_user"):
        test_nothing_imports_a_benchmark()
