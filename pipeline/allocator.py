"""Keep freed memory in the process heap during batch inference on CPU (glibc only).

A CPU forward pass allocates and frees the same large activation buffers every batch.
glibc serves big blocks with ``mmap`` and trims the top of the heap when they are freed,
so each batch page-faults its memory back in from the kernel. For ``pipe embed`` with
``tiny-vit`` that cost 5-10% of throughput and was most of the run-to-run variance
(``bench/embed_overhead.py``). With both thresholds raised, freed blocks stay in the heap
and the next batch reuses them. The price: the process keeps its peak heap until it ends,
which suits a batch job. Other C libraries are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: bool | None = None


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """Raise glibc's mmap and trim thresholds once per process; True if they are set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    # some glibc versions cap the mmap threshold at 32 MiB: fall back to that
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1 or libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20) == 1
    _done = bool(mmap_ok and libc.mallopt(_M_TRIM_THRESHOLD, threshold) == 1)
    return _done
