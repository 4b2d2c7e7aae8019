"""``python forkshim.py [-u] -m MODULE ARGS...``: run that command as a fork of the test process's
fork server (``$PIPE_TEST_FORK_SERVER``, see ``tests/helpers/forked.py``), in this process's stead.

A launcher that starts its own processes (torchrun starts one interpreter per rank) can start
this script instead (``torchrun --no-python python forkshim.py -u -m cli ...``): it loads nothing
but the standard library, hands its standard streams, folder and environment to a child forked
from the server, forwards the signals a launcher sends to stop its workers, and exits with the
child's status, so the launcher sees what it would see of the command itself.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys


def main(argv: list[str]) -> int:
    unbuffered = argv[:1] == ["-u"]
    args = argv[1:] if unbuffered else argv
    if len(args) < 2 or args[0] != "-m":
        print("usage: forkshim.py [-u] -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.connect(os.environ["PIPE_TEST_FORK_SERVER"])
    req = {"module": args[1], "unbuffered": unbuffered, "args": args[2:], "env": dict(os.environ),
           "cwd": os.getcwd()}
    socket.send_fds(conn, [json.dumps(req).encode()], [0, 1, 2])
    pid = json.loads(conn.recv(1 << 16))["pid"]

    def forward(sig, _frame):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, forward)
    msg = conn.recv(1 << 16)  # the child's end (retried by Python when a forwarded signal interrupts it)
    code = json.loads(msg)["returncode"] if msg else -signal.SIGKILL
    if code < 0:  # end as the child ended: by the same signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
