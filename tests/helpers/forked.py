"""`pipe` commands (and any ``python -m MODULE``) in processes of their own, forked from a parent
that has already loaded the heavy libraries.

A fresh ``python -m cli`` spends 4-6 CPU seconds importing torch, timm and transformers before
it does anything, and the tests that kill commands, run two writers or resume a run start
hundreds of them: on 2 cores that was a third of the suite's time. Here one server process per
test process (started on first use) imports those libraries once; each command is a fork of it
that runs ``cli`` exactly as ``python -m cli`` does (or any module, as ``python [-u] -m MODULE``
does: a Dask scheduler or worker, torchrun, a test's helper), with the test's arguments, environment,
working folder and standard streams. The child is a real process: its own pid (what a claim
records, what a SIGKILL hits), its own exit status. The server has the third-party libraries
loaded, and of the project only the command line's modules that ``tests.helpers`` imports (the
app, and what it imports at start); every other module of the project runs its import-time code
in the child, as in a fresh interpreter. None of the preloaded ones reads the environment when
it is imported (``tests/test_suite_rules.py`` keeps it so), so a command sees its own settings.

A server serves one set of the settings that libraries read when they are imported (``HF_*``,
``TRANSFORMERS_*``, ``TORCH*``, ``OMP_*``, ``PYTHON*``, ``HOME``...): a command with other values
gets a server of its own (up to two per test process; an idle one makes room), or, when both are
busy, a plain subprocess. Any command that is not ``python [-u] -m MODULE`` is a plain subprocess.

    popen(cmd, env=..., stdout=..., stderr=..., cwd=...)   # a subprocess.Popen look-alike
    run(cmd, env=..., capture_output=True, text=True)      # a subprocess.run look-alike
    launcher_entry(env)                                    # torchrun's entry point: its ranks forked too
"""
from __future__ import annotations

import atexit
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from core import forking

ROOT = Path(__file__).resolve().parents[2]
# What a command imports (core.forking.LIBRARIES), and what sweeps and --workers runs add: Dask's
# distributed and Optuna; pydicom for DICOM tables.
PRELOAD = (*forking.LIBRARIES, "distributed", "optuna", "pydicom")
# Settings that libraries read when they are imported (so the server's values hold in its children);
# the compiler's cache folder is read when a function is compiled, in the child.
IMPORT_TIME = re.compile(r"^(?!TORCHINDUCTOR_CACHE_DIR$)(HF_|HUGGINGFACE|TRANSFORMERS|TORCH|PYTORCH|OMP_|MKL_|OPENBLAS|CUDA|NVIDIA|PYTHON|TIMM|DASK_|MPL|OPTUNA|"
                         r"TOKENIZERS|HOME$|XDG_|TMPDIR$|LD_|PATH$)")
OFF = os.environ.get("PIPE_TEST_NO_FORK") == "1"  # every command a plain subprocess (to compare, or to debug)


# ---------------------------------------------------------------------------------- the server
def _serve(path: str) -> None:
    forking.preload(PRELOAD)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(path)
    srv.listen(64)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    while True:
        conn, _ = srv.accept()
        try:
            msg, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
        except OSError:
            conn.close()
            continue
        if not msg:
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            srv.close()
            conn.close()
            _child(json.loads(msg), fds)  # never returns
        for fd in fds:
            os.close(fd)
        conn.send(json.dumps({"pid": pid}).encode())
        threading.Thread(target=_reap, args=(conn, pid), daemon=True).start()


def _reap(conn: socket.socket, pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    try:
        conn.send(json.dumps({"returncode": code}).encode())
    except OSError:
        pass
    conn.close()


def _child(req: dict, fds: list[int]) -> None:
    """Become ``python [-u] -m MODULE ARGS``: the streams, folder, environment and argv of the request."""
    forking.become_module(req["module"], req["args"], req["env"], tuple(fds), cwd=req["cwd"],
                          unbuffered=req["unbuffered"])


# ---------------------------------------------------------------------------------- the client
def _settings(env: dict) -> tuple:
    """The settings of ``env`` that libraries read when they are imported: a server serves one set."""
    return tuple(sorted((k, v) for k, v in env.items() if IMPORT_TIME.match(k) and k != "PYTHONPATH"))


class _Server:
    def __init__(self, env: dict) -> None:
        self.folder = tempfile.mkdtemp(prefix="pipe-fork-")
        self.path = os.path.join(self.folder, "s")
        self.settings, self.live = _settings(env), set()  # the pids it forked whose end no client has seen
        self.owner = os.getpid()  # a forked copy of this process must not stop it (its exit handlers are ours)
        self.proc = subprocess.Popen([sys.executable, "-c", "import sys; from tests.helpers.forked import _serve; "
                                      "_serve(sys.argv[1])", self.path], cwd=ROOT, stdout=subprocess.PIPE,
                                     env={**env, "PYTHONPATH": str(ROOT)})
        line = self.proc.stdout.readline()
        _log({"server": self.proc.pid, "by": os.getpid(), "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
              "settings": dict(self.settings)})
        if line.strip() != b"ready":
            raise RuntimeError(f"the fork server did not start (exit {self.proc.wait()})")
        atexit.register(self.stop)

    def stop(self) -> None:
        if os.getpid() != self.owner:
            return
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        try:
            os.unlink(self.path)
            os.rmdir(self.folder)
        except OSError:
            pass


MAX_SERVERS = 2  # per test process (each holds ~0.6 GB); an idle one makes room for an environment not served
_servers: dict[tuple, _Server] = {}  # by their settings, least recently used first
_lock = threading.Lock()


def _log(record: dict) -> None:
    """One JSON line in $PIPE_TEST_FORK_LOG, where it is set: the commands and the server starts of a run."""
    if os.environ.get("PIPE_TEST_FORK_LOG"):
        with open(os.environ["PIPE_TEST_FORK_LOG"], "a") as f:
            f.write(json.dumps(record) + "\n")


def _serving(env: dict) -> _Server | None:
    """The server for a command with ``env``; None where forking is off or ``env`` puts another tree on the path."""
    return None if OFF or env.get("PYTHONPATH") not in (None, "", str(ROOT)) else _server_for(env)


def _server_for(env: dict) -> _Server | None:
    """The server of ``env``'s import-time settings: started (in place of an idle one) when there is none;
    None when every server is busy with commands of other settings."""
    key = _settings(env)
    with _lock:
        server = _servers.pop(key, None)
        if server is None or server.proc.poll() is not None:
            idle = [k for k, s in _servers.items() if not s.live or s.proc.poll() is not None]
            while len(_servers) >= MAX_SERVERS and idle:
                _servers.pop(idle.pop(0)).stop()
            if len(_servers) >= MAX_SERVERS:
                return None
            server = _Server(env)
        _servers[key] = server  # the most recently used, last
        return server


SHIM = Path(__file__).with_name("forkshim.py")


def launcher_entry(env: dict, module: str = "cli") -> tuple[list[str], dict]:
    """What a launcher that starts its own interpreters (torchrun) runs for ``python -u -m MODULE``, and
    the environment to give it: each of its children is then a fork of the server that serves ``env``
    (``torchrun --no-python python forkshim.py -u -m MODULE ...``; see tests/helpers/forkshim.py).
    Where no server can serve ``env``, torchrun's own ``-m MODULE`` (fresh interpreters)."""
    server = _serving(env)
    if server is None:
        return ["-m", module], env
    return ["--no-python", sys.executable, str(SHIM), "-u", "-m", module], {**env, "PIPE_TEST_FORK_SERVER": server.path}


class Forked:
    """What ``subprocess.Popen`` gives, for a command the fork server started."""

    def __init__(self, args: list[str], conn: socket.socket, pid: int, stdout, stderr, server: _Server):
        self.args, self.pid, self.returncode, self._server = args, pid, None, server
        self._conn, self.stdout, self.stderr, self.stdin = conn, stdout, stderr, None

    def _status(self, timeout: float | None) -> int | None:
        if self.returncode is not None:
            return self.returncode
        ready, _, _ = select.select([self._conn], [], [], timeout)
        if not ready:
            return None
        msg = self._conn.recv(1 << 16)
        self._conn.close()
        self.returncode = json.loads(msg)["returncode"] if msg else -signal.SIGKILL
        self._server.live.discard(self.pid)
        return self.returncode

    def poll(self) -> int | None:
        return self._status(0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._status(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return code

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def communicate(self, input=None, timeout: float | None = None):  # noqa: A002
        out: dict[str, object] = {}
        readers = [threading.Thread(target=lambda n=n, s=s: out.__setitem__(n, s.read()), daemon=True)
                   for n, s in (("out", self.stdout), ("err", self.stderr)) if s is not None]
        for t in readers:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.close()
        return out.get("out"), out.get("err")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for s in (self.stdout, self.stderr):
            if s is not None:
                s.close()
        self.wait()


def _module(cmd) -> tuple[str, bool, list[str]] | None:
    """(module, unbuffered, its arguments) of ``python [-u] -m MODULE ARGS...`` (this interpreter), else None."""
    if not isinstance(cmd, (list, tuple)) or not cmd or cmd[0] != sys.executable:
        return None
    unbuffered = len(cmd) > 1 and cmd[1] == "-u"
    rest = list(cmd[2 if unbuffered else 1:])
    if len(rest) < 2 or rest[0] != "-m":
        return None
    return rest[1], unbuffered, rest[2:]


def _fd(spec, default_devnull: bool, for_read: bool = False):
    """The descriptor a child's stream gets, and the parent's end of a pipe (or None)."""
    if spec is None:
        return os.open(os.devnull, os.O_RDONLY if for_read else os.O_WRONLY) if default_devnull else None, None
    if spec == subprocess.DEVNULL:
        return os.open(os.devnull, os.O_RDONLY if for_read else os.O_WRONLY), None
    if spec == subprocess.PIPE:
        r, w = os.pipe()
        return w, r
    if spec == subprocess.STDOUT:
        return "stdout", None
    return os.dup(spec if isinstance(spec, int) else spec.fileno()), None


def popen(cmd, *, env: dict | None = None, cwd=None, stdin=None, stdout=None, stderr=None, text: bool = False,
          **kw):
    """``subprocess.Popen(cmd, ...)``, forked from the server when ``cmd`` is ``python [-u] -m MODULE ...``."""
    env = dict(os.environ if env is None else env)
    module = _module(cmd)
    if OFF or kw or stdin not in (None, subprocess.DEVNULL) or module is None:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text, **kw)
    server = _serving(env)
    _log({"cmd": [module[0], *module[2][:2]], "forked": server is not None, "servers": len(_servers),
          "settings": dict(_settings(env))})
    if server is None:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=stdout, stderr=stderr, text=text)
    fin, _ = _fd(stdin, True, for_read=True)
    fout, rout = _fd(stdout, False)
    ferr, rerr = _fd(stderr, False)
    fout = os.dup(1) if fout is None else fout
    ferr = os.dup(fout) if ferr == "stdout" else (os.dup(2) if ferr is None else ferr)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(server.path)
    req = {"module": module[0], "unbuffered": module[1], "args": module[2], "env": env, "cwd": str(cwd or os.getcwd())}
    socket.send_fds(conn, [json.dumps(req).encode()], [fin, fout, ferr])
    for fd in (fin, fout, ferr):
        os.close(fd)
    pid = json.loads(conn.recv(1 << 16))["pid"]
    server.live.add(pid)

    def reader(fd):
        if fd is None:
            return None
        return os.fdopen(fd, "r" if text else "rb")

    return Forked(list(cmd), conn, pid, reader(rout), reader(rerr), server)


def run(cmd, *, env: dict | None = None, cwd=None, capture_output: bool = False, text: bool = False,
        timeout: float | None = None, stdout=None, stderr=None, check: bool = False, **kw):
    """``subprocess.run(cmd, ...)``, forked from the server when ``cmd`` is ``python [-u] -m MODULE ...``."""
    if kw or OFF or _module(cmd) is None:
        return subprocess.run(cmd, env=env, cwd=cwd, capture_output=capture_output, text=text, timeout=timeout,
                              stdout=stdout, stderr=stderr, check=check, **kw)
    if capture_output:
        stdout = stderr = subprocess.PIPE
    proc = popen(cmd, env=env, cwd=cwd, stdout=stdout, stderr=stderr, text=text, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check:
        done.check_returncode()
    return done
