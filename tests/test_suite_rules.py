"""The test suite's own rules, read from its code (ast), so they hold from now on.

1. A test module imports no other test module: what tests share lives in ``tests/helpers/``
   (builders) and ``tests/conftest.py`` (fixtures), and is imported one way,
   ``from tests.helpers... import``.
2. A fixture that ``tests/conftest.py`` shares is defined there only: a module's own fixture of
   the same name would hide it.
3. Tests that need a bucket (the ``bucket`` and ``s3_endpoint`` fixtures, ``cache.objects``)
   live in the storage modules, ``test_object_*.py``; the rest of the suite runs each command
   without asking which backend holds the cache.
4. The fork server (``tests/helpers/forked.py``) has the command line's own modules loaded
   (those ``tests.helpers`` imports: the app, and what it imports at start), so a forked command
   runs their import-time code in the server, not in itself. None of them may read the
   environment at import time (a forked command's settings would be the server's); the one
   exception sets ``OMP_WAIT_POLICY``, a setting the server serves one value of.
"""
from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
HELPERS = {p.stem for p in (TESTS / "helpers").glob("*.py")} - {"__init__"}
BUCKET_FIXTURES = {"bucket", "s3_endpoint"}
ROOT = TESTS.parent
PROJECT = ("core", "cache", "pipeline", "stages", "cli")
AT_IMPORT_ALLOWED = {("cli/__init__.py", "OMP_WAIT_POLICY")}  # a setting the server serves one value of


def _sources() -> dict[str, Path]:
    """Every Python file of the suite, by its path under tests/."""
    return {p.relative_to(TESTS).as_posix(): p for p in sorted(TESTS.rglob("*.py"))}


@functools.cache
def _tree(path: Path) -> ast.AST:
    return ast.parse(path.read_text())


def _imported(tree: ast.AST) -> list[tuple[list[str], int]]:
    """Per import statement: the names it may import (a module, and ``module.name`` for each
    name taken from it), and its line."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [([a.name], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = "." * node.level + (node.module or "")
            out.append(([module, *(f"{module}.{a.name}".replace("..", ".") for a in node.names)], node.lineno))
    return out


def _bad_import(name: str) -> str | None:
    """Why importing ``name`` from a test file breaks the rules, or None."""
    top = name.split(".")[0]
    if name.startswith("."):
        return "a relative import (write `from tests.helpers... import`)"
    if top.startswith("test_") or top == "conftest" or name.startswith(("tests.test_", "tests.conftest")):
        return "imports a test module or the conftest (move what is shared to tests/helpers/ or a fixture)"
    if top in HELPERS or top == "helpers":
        return "a helper imported by its bare name (write `from tests.helpers... import`)"
    return None


def _import_problems(files: dict[str, Path]) -> list[str]:
    found = []
    for rel, path in files.items():
        for names, line in _imported(_tree(path)):
            why = next(((name, w) for name in names for w in [_bad_import(name)] if w), None)
            if why:
                found.append(f"tests/{rel}:{line} {why[0]}: {why[1]}")
    return sorted(found, key=lambda f: (f.split(":")[0], int(f.split(":")[1].split()[0])))


def _fixtures(tree: ast.AST) -> dict[str, int]:
    """Functions decorated as pytest fixtures, with their lines."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                target = d.func if isinstance(d, ast.Call) else d
                if isinstance(target, ast.Attribute) and target.attr == "fixture":
                    out[node.name] = node.lineno
    return out


def _shadowed(files: dict[str, Path]) -> list[str]:
    shared = _fixtures(_tree(files["conftest.py"]))
    return [f"tests/{rel}:{line} redefines the shared fixture {name!r} (tests/conftest.py)"
            for rel, path in files.items() if rel != "conftest.py"
            for name, line in _fixtures(_tree(path)).items() if name in shared]


def _uses_a_bucket(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if BUCKET_FIXTURES & {a.arg for a in node.args.args}:
                return True
    return any(name == "cache.objects" or name.startswith("cache.objects.") for names, _ in _imported(tree) for name in names)


def _bucket_tests_elsewhere(files: dict[str, Path]) -> list[str]:
    return [f"tests/{rel}" for rel, path in files.items()
            if rel.startswith("test_") and not rel.startswith("test_object_") and _uses_a_bucket(_tree(path))]


def _environment_read_at_import(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, the setting's name or '?') of each read of the environment in code a module runs when it
    is imported: its top level and class bodies, not its functions."""
    reads, names, todo = set(), {}, list(ast.iter_child_nodes(tree))
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))
        name = node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else None
        if name in ("environ", "getenv", "environb"):
            reads.add(node.lineno)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            names.setdefault(node.lineno, str(node.args[0].value))  # the setting named on that line
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
            names.setdefault(node.lineno, str(node.slice.value))
    return [(line, names.get(line, "?")) for line in sorted(reads)]


def _server_modules() -> dict[str, Path]:
    """The project's modules the fork server has loaded, by path under the repository."""
    code = ("import json, sys; import tests.helpers.forked; "
            f"print(json.dumps([m.__file__ for n, m in list(sys.modules.items()) if n.split('.')[0] in {PROJECT!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return {Path(f).relative_to(ROOT).as_posix(): Path(f) for f in json.loads(done.stdout.strip().splitlines()[-1])}


def _read_at_import(files: dict[str, Path]) -> list[str]:
    return [f"{rel}:{line} reads the environment ({name}) when it is imported"
            for rel, path in sorted(files.items()) for line, name in _environment_read_at_import(_tree(path))
            if (rel, name) not in AT_IMPORT_ALLOWED]


def test_no_module_the_fork_server_loads_reads_the_environment_at_import():
    files = _server_modules()
    assert {"cli/__init__.py", "cli/app.py", "core/forking.py"} <= set(files), sorted(files)
    found = _read_at_import(files)
    assert not found, "\n".join(found)


def test_no_test_module_imports_another_and_helpers_are_imported_one_way():
    problems = _import_problems(_sources())
    assert not problems, "imports that break the suite's rules:\n" + "\n".join(problems)


def test_no_module_redefines_a_fixture_the_conftest_shares():
    shadowed = _shadowed(_sources())
    assert not shadowed, "\n".join(shadowed)


def test_tests_that_need_a_bucket_are_in_the_storage_modules():
    elsewhere = _bucket_tests_elsewhere(_sources())
    assert not elsewhere, f"modules outside test_object_*.py that use a bucket: {elsewhere}"


def test_the_checks_catch_what_they_forbid(tmp_path):
    (tmp_path / "conftest.py").write_text("import pytest\n\n@pytest.fixture(scope='module')\ndef cached():\n    pass\n")
    (tmp_path / "test_a.py").write_text("from tests.test_b import x\nimport helpers\nfrom kills import ENV\n"
                                        "from . import y\nfrom tests.helpers import pipe\n")
    (tmp_path / "test_b.py").write_text("import pytest\nfrom cache.objects import ObjectStorage\n\n"
                                        "@pytest.fixture\ndef cached(tmp_path):\n    pass\n")
    (tmp_path / "test_object_c.py").write_text("def test_x(bucket):\n    pass\n")
    (tmp_path / "test_d.py").write_text("def test_y(tmp_path, s3_endpoint):\n    pass\n")
    files = {p.name: p for p in sorted(tmp_path.glob("*.py"))}
    problems = _import_problems(files)
    assert [p.split(" ", 1)[0] for p in problems] == ["tests/test_a.py:1", "tests/test_a.py:2", "tests/test_a.py:3",
                                                     "tests/test_a.py:4"], problems
    assert _shadowed(files) == ["tests/test_b.py:5 redefines the shared fixture 'cached' (tests/conftest.py)"]
    assert _bucket_tests_elsewhere(files) == ["tests/test_b.py", "tests/test_d.py"]
    with pytest.raises(AssertionError):
        assert not _import_problems({"test_e.py": tmp_path / "test_a.py"})
    (tmp_path / "m.py").write_text("import os\nA = os.environ.get('PIPE_A')\nclass C:\n    B = os.getenv('PIPE_B')\n"
                                   "def f():\n    return os.environ['PIPE_C']\n")
    assert _read_at_import({"m.py": tmp_path / "m.py"}) == [
        "m.py:2 reads the environment (PIPE_A) when it is imported",
        "m.py:4 reads the environment (PIPE_B) when it is imported"]
