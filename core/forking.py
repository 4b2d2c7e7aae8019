"""``python -m MODULE`` in a child forked from a process that has already imported the heavy libraries.

A fresh interpreter spends seconds importing torch, transformers and the rest before a `pipe`
command does anything. A process that runs many commands (the test suite's fork server, the
scale benchmark's ``--fork``) imports them once (:func:`preload`) and forks a child per command
that becomes ``python -m MODULE ARGS`` (:func:`become_module`). A module of the project that the
parent has not imported runs its import-time code in the child, as in a fresh interpreter; the
callers import little of it (the scale benchmark only this module; the test suite's server the
command line's own modules, none of which reads the environment when it is imported).
"""
from __future__ import annotations

import atexit
import importlib
import io
import os
import signal
import sys
import threading
import traceback
from typing import NoReturn

# What a `pipe` command imports before or during its work with the test encoders: the arrays and
# formats, torch, the encoders' model modules (transformers loads torch._dynamo,
# torch.distributed.tensor and scipy with them, ~4 s), torch's optimiser (torch._dynamo) and the
# plots (matplotlib, with the Agg backend the project selects).
LIBRARIES = ("numpy", "pandas", "pyarrow.parquet", "PIL.Image", "torch", "torch.nn.functional", "timm",
             "transformers", "zarr", "numcodecs", "xxhash", "typer", "rich.console", "yaml", "safetensors.torch",
             "transformers.models.dinov2.modeling_dinov2", "transformers.models.bert.modeling_bert",
             "torch._dynamo", "torch.optim", "matplotlib.pyplot")


def preload(names: tuple[str, ...] = LIBRARIES) -> None:
    """Import ``names`` into this process, so that a child forked later starts with them loaded."""
    import matplotlib  # lazy: only a process that forks commands preloads

    matplotlib.use("Agg")  # as every plot of the project selects it, before pyplot is imported
    for name in names:
        importlib.import_module(name)


def become_module(module: str, args: list[str], env: dict, fds: tuple, *, cwd: str | None = None,
                  path: str | None = None, unbuffered: bool = False) -> NoReturn:
    """In a forked child: run as ``python [-u] -m MODULE ARGS`` would, then exit with its status.

    ``fds`` are the child's standard input, output and error (None keeps one); ``env`` replaces
    the environment; ``cwd`` (when given) becomes the working folder and ``path`` (else ``cwd``, else
    the present folder) the first entry of ``sys.path``, as ``python -m`` puts the folder there.
    """
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            if fd is not None:
                os.dup2(fd, target)
        for fd in {fd for fd in fds if fd is not None and fd > 2}:
            os.close(fd)
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=unbuffered,
                                      line_buffering=False)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        if cwd is not None:
            os.chdir(cwd)
        atexit._clear()  # the parent's exit handlers are the parent's: only those the module registers run
        os.environ.clear()
        os.environ.update(env)
        sys.path[0] = path or cwd or os.getcwd()
        sys.argv = ["-m", *args]
        code = _run_as_main(module)
        threading._shutdown()  # non-daemon threads finish, as at an interpreter's exit
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def _run_as_main(module: str) -> int:
    """The exit status ``python -m MODULE`` would have, printing what an interpreter prints."""
    import runpy  # lazy: in a forked child only

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return 130
    except BaseException:  # noqa: BLE001  (what an interpreter prints for an uncaught exception)
        traceback.print_exc()
        return 1
