"""The layout's rules, read from the code itself (ast), so they hold from now on.

Layers, lowest first (a module may import its own layer or lower ones):

0. ``pipeline/errors.py``, ``pipeline/console.py``: leaves every layer may use;
1. ``cache/``: everything on disk about the cache;
2. ``pipeline/`` parts: config, devices, imaging, encoders, datasets, models, ...;
3. ``stages/embed``;
4. ``stages/train``, ``stages/evaluate`` (never each other);
5. ``stages/sweep``, ``stages/demo``, ``stages/reproduce``: orchestrations; ``stages/report``: the runs' results gathered;
6. ``pipeline/cli``: the command line.

Also: no import cycle between modules, and an import inside a function carries a
comment saying why it is not at the top (start-up time, an optional dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache", "pipeline", "stages")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def layer(module: str) -> tuple[int, str]:
    """(layer, room) of a module; modules of one room at layer 4 may not import another room's."""
    if module in ("pipeline.errors", "pipeline.console"):
        return 0, "leaf"
    if module == "cache" or module.startswith("cache."):
        return 1, "cache"
    if module == "pipeline.cli" or module.startswith("pipeline.cli."):
        return 6, "cli"
    if module.startswith("pipeline"):
        return 2, "pipeline"
    if module == "stages":
        return 5, "stages"
    room = module.split(".")[1]
    return {"embed": 3, "train": 4, "evaluate": 4, "sweep": 5, "demo": 5, "reproduce": 5, "report": 5}[room], room


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


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
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        text = "\n".join(lines[node.lineno - 1: node.end_lineno])
        for t in targets:
            while t and t not in MODULES and "." in t:
                t = t.rsplit(".", 1)[0]
            out.append((t if t in MODULES else "", node.lineno, id(node) in in_function, text))
    return out


def test_the_modules_are_found():
    assert {"cache.store", "stages.embed.stage", "stages.train.trainer", "pipeline.cli"} <= set(MODULES)


def test_imports_only_go_down():
    upward = []
    for module in MODULES:
        here, room = layer(module)
        for target, line, _, _ in _imports(module):
            if not target:
                continue
            there, other = layer(target)
            lateral = here == there == 4 and room != other
            if there > here or lateral:
                upward.append(f"{_rel(MODULES[module])}:{line} imports {target} "
                              f"(layer {here} {room} -> layer {there} {other})")
    assert not upward, "imports that go up or across stages:\n" + "\n".join(upward)


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
    """The checker itself: an upward import, a cycle and a silent lazy import are all found."""
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
