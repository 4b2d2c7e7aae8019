"""core.forking: a forked child that becomes ``python -m MODULE`` as a fresh interpreter would."""
from __future__ import annotations

import atexit
import os
import sys

from core import forking

PROBE = """import atexit, os, sys
atexit.register(lambda: open(os.environ["MARK"] + ".module", "w").write("ran"))
print("argv", sys.argv[1:], os.getcwd() == os.environ["WHERE"], sys.path[0] == os.environ["WHERE"])
sys.exit(3)
"""


def test_a_forked_child_runs_the_module_with_its_own_exit_handlers_only(tmp_path):
    """The child gets the arguments, folder, environment and streams asked for and exits with the
    module's status; at its exit, the handlers the module registered run, the parent's do not (a
    copy of the parent's would, for example, stop servers that the parent still uses)."""
    (tmp_path / "probe_module.py").write_text(PROBE)
    mark = tmp_path / "mark"

    def parents_handler():
        mark.with_suffix(".parent").write_text("ran")

    atexit.register(parents_handler)
    r, w = os.pipe()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover  (the child; it never returns)
            os.close(r)
            forking.become_module("probe_module", ["a", "b"], {"MARK": str(mark), "WHERE": str(tmp_path)},
                                  (None, w, None), cwd=str(tmp_path))
        os.close(w)
        with os.fdopen(r) as out:
            printed = out.read()
        _, status = os.waitpid(pid, 0)
    finally:
        atexit.unregister(parents_handler)
    assert os.WEXITSTATUS(status) == 3 and printed.strip() == "argv ['a', 'b'] True True", printed
    assert mark.with_suffix(".module").read_text() == "ran"
    assert not mark.with_suffix(".parent").exists()
    assert sys.path[0] != str(tmp_path)  # the parent's path is its own
