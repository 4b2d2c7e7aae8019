"""What every test shares: the environment, one thread per process, caches embedded once per
session, and the local S3 server.

Fixtures (ask for them by name; none needs an import):

- ``embedded(n, *options)``: a table of ``n`` items (:func:`tests.helpers.make_table`) embedded
  with the tiny encoders and the given ``pipe embed`` options, built once per session, whichever
  xdist worker asks first (the others wait for it). Returns an :class:`Embedded`; read it only,
  or write into ``.copy(dest)``.
- ``cached``: ``(table, cache)``, a module's own copy of 40 items embedded with 2 augmented
  views on the CPU (20 training pairs: 2 steps of 8 per epoch); the module's tests may write
  into it, other modules never see it.
- ``s3_endpoint`` (session) and ``bucket`` (a fresh bucket, and the environment that points the
  AWS chain at it).

Run in parallel (``make test``: ``pytest -n 4 --dist loadgroup``), the tests of a module that
defines its own module-scoped fixture (an embedded demo, trained Adaptors) run on one worker,
which builds it once; every other test goes wherever a worker is free. Modules with tests marked
``slow`` start first, then the modules run whole, so that the last tests to finish are small.
A module's tests stay in their order.
"""
from __future__ import annotations

import ast
import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

# Tests must never reach a model hub: missing weights must fail fast instead.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# As `import pipeline` does, before a test module imports torch: idle OpenMP threads sleep, not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# One thread per process, set before torch loads: the tests' models are tiny, the suite runs in
# several processes at once (`make test`), and the `pipe` commands the tests start (in this
# process or in their own) follow $OMP_NUM_THREADS (pipeline/threads.py). Tests of the thread
# plan itself unset it.
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["OPENBLAS_NUM_THREADS"] = "1"
# Help pages are rendered at a fixed width (logs and tables off a terminal are never wrapped).
os.environ["COLUMNS"] = "160"

from tests.helpers import embed_json, make_table  # noqa: E402  (after the environment is set)
from tests.helpers.s3server import ACCESS, make_bucket, moto_server  # noqa: E402

pytest_plugins = ("tests.helpers.cputime",)  # `--cpu-times`: each test's CPU seconds


def pytest_collection_modifyitems(config, items):
    """The largest pieces of work first, so that the last to finish are small: the tests marked slow
    and the modules that hold one (a module that builds its own module fixture runs whole, on one
    worker), then the other such modules, then the rest, test by test. A module's tests stay
    together and in order."""
    slow = {item.nodeid.split("::")[0] for item in items if item.get_closest_marker("slow")}

    def rank(item) -> int:
        if _defines_a_module_fixture(item.path):
            return 0 if item.nodeid.split("::")[0] in slow else 1
        return 0 if item.get_closest_marker("slow") else 2

    items.sort(key=rank)


@functools.cache
def _defines_a_module_fixture(path: Path) -> bool:
    """Whether a test module defines a fixture of module or class scope."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "fixture" and any(
                k.arg == "scope" and getattr(k.value, "value", None) in ("module", "class") for k in node.keywords):
            return True
    return False


@pytest.hookimpl(optionalhook=True)  # a pytest-xdist hook: called only under -n
def pytest_xdist_make_scheduler(config, log):
    """Under ``--dist loadgroup``, a module that defines its own module fixture is one work unit,
    every other test a unit of its own. (pytest-xdist's own ``xdist_group`` marks cannot group
    tests under pytest 9, whose node ids are read-only.)"""
    if config.getoption("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling  # lazy: pytest-xdist is there only when -n is

    grouped = {p.relative_to(config.rootpath).as_posix() for p in Path(__file__).parent.glob("test_*.py")
               if _defines_a_module_fixture(p)}

    class ModuleFixtureScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if module in grouped else nodeid

    return ModuleFixtureScheduling(config, log)


@pytest.fixture(autouse=True)
def one_thread():
    """torch's intra-op threads back at one before each test (a test of the thread plan may change
    them; before torch is loaded, $OMP_NUM_THREADS does it)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# ------------------------------------------------------------------------------ caches
@dataclass(frozen=True)
class Embedded:
    table: Path
    cache: Path
    summary: dict  # `pipe embed --json`'s last line

    def copy(self, dest: Path) -> tuple[Path, Path]:
        """(table, a copy of the cache at ``dest``): the copy is a whole cache (it records the data's
        paths, not its own), and the table stays where the cache's dataset name says it is."""
        shutil.copytree(self.cache, dest, symlinks=True)
        return self.table, dest


def _shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this run sees (each worker's own temp folder lies in it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def _build_once(root: Path, build) -> None:
    """``build(root)`` unless a finished build is there; under a lock, so one process builds and
    the others wait. A build cut short leaves no done-marker and is started again."""
    root.parent.mkdir(parents=True, exist_ok=True)
    done = root / ".built"
    with open(root.parent / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(root, ignore_errors=True)
            build(root)
            done.touch()


@pytest.fixture(scope="session")
def embedded(tmp_path_factory):
    made: dict[tuple, Embedded] = {}

    def get(n: int, *options: str) -> Embedded:
        if (n, options) not in made:
            key = hashlib.sha256(json.dumps([n, *options]).encode()).hexdigest()[:12]
            root = _shared_dir(tmp_path_factory) / "embedded" / f"{n}-{key}"

            def build(root: Path) -> None:
                summary = embed_json(make_table(root / "data", n), root / "cache", *options)
                (root / "summary.json").write_text(json.dumps(summary))

            _build_once(root, build)
            made[n, options] = Embedded(root / "data" / "pairs.csv", root / "cache",
                                        json.loads((root / "summary.json").read_text()))
        return made[n, options]

    return get


@pytest.fixture(scope="module")
def cached(embedded, tmp_path_factory):
    return embedded(40, "--views", "2", "--device", "cpu").copy(tmp_path_factory.mktemp("cached") / "cache")


# ------------------------------------------------------------------------------ a bucket
@pytest.fixture(scope="session")
def s3_endpoint():
    """The endpoint of an S3 server started for this test session (moto in server mode)."""
    with moto_server() as url:
        yield url


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, request):
    """A fresh bucket on the server, and the environment that points the AWS chain at it."""
    for k, v in {**ACCESS, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return make_bucket(s3_endpoint, request.node.name)
