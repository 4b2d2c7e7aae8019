"""``python -m tests.helpers.nocaps MODULE ARGS...``: ``python -m MODULE ARGS...`` bound by file permissions.

Root reads and searches every folder through two capabilities, ``CAP_DAC_OVERRIDE`` and
``CAP_DAC_READ_SEARCH``, so a test of what a command says on an unreadable folder means nothing
as root. This drops both, from the process's effective, permitted and inheritable sets and from
its bounding set (so no program it starts gets them back), then runs the module, as
``setpriv --bounding-set=-dac_override,-dac_read_search python -m MODULE`` does. Unlike
``setpriv``, it needs no program of its own, and it can run in a process forked from the test
fork server (:mod:`tests.helpers.forked`), where torch is already loaded. Linux only; as any
other user it changes nothing (such a process has neither capability).
"""
from __future__ import annotations

import ctypes
import os
import runpy
import sys

CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
_VERSION_3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
_PR_CAPBSET_DROP = 24


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop(caps: tuple[int, ...] = (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH)) -> None:
    """Remove ``caps`` from this process's sets and bounding set (an OSError where the kernel refuses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in caps:  # the bounding set first: dropping from it needs CAP_SETPCAP, still in the effective set
        if libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and os.geteuid() == 0:
            raise OSError(ctypes.get_errno(), f"prctl(PR_CAPBSET_DROP, {cap})")
    header, data = _Header(_VERSION_3, 0), (_Data * 2)()
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    mask = ~sum(1 << cap for cap in caps) & 0xFFFFFFFF  # every capability below 32 is in the first word
    for field in ("effective", "permitted", "inheritable"):
        setattr(data[0], field, getattr(data[0], field) & mask)
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def main(argv: list[str]) -> None:
    drop()
    module, *args = argv
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
