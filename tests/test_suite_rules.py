"""The test suite's own rules, read from its code (ast), so they hold from now on.

1. A test module imports no other test module: what tests share lives in ``tests/helpers/``
   (builders) and ``tests/conftest.py`` (fixtures), and is imported one way,
   ``from tests.helpers... import``.
2. A fixture that ``tests/conftest.py`` shares is defined there only: a module's own fixture of
   the same name would hide it.
3. Tests that need a bucket (the ``bucket`` and ``s3_endpoint`` fixtures, ``cache.objects``)
   live in the storage modules, ``test_object_*.py``; the rest of the suite runs each command
   without asking which backend holds the cache.
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
HELPERS = {p.stem for p in (TESTS / "helpers").glob("*.py")} - {"__init__"}
BUCKET_FIXTURES = {"bucket", "s3_endpoint"}


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
