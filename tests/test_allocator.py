"""The allocator setting of `pipe embed`: freed memory stays in the heap for the next batch."""
from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys, numpy as np
from pipeline.allocator import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()  # set once, idempotent
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
base = rss_mb()
a = np.ones(200 * 2**20, dtype=np.uint8)  # touched: 200 MiB resident
del a
print(round(rss_mb() - base))
"""


def _resident_after_free(mode: str) -> int:
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(r.stdout.strip())


def test_freed_blocks_stay_in_the_heap_only_with_the_setting():
    assert _resident_after_free("default") < 50   # glibc hands the block back to the OS
    assert _resident_after_free("keep") > 150     # kept for the next batch to reuse
