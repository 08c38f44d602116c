"""Keeping freed CPU memory in the process for timing loops (Linux, glibc).

glibc's malloc serves large requests with fresh mmaps and, once enough memory at the top of its
heap is free, returns it to the OS; its thresholds adapt to the allocation history. A CPU op whose
output and temporaries are a few MB can then re-fault every page on every call: 4096 first-touch
faults for 16 MB take several milliseconds, more than the op's arithmetic, and whether a given call
pays them depends on what ran before. A side-by-side timing then measures the allocator's state
rather than the kernels (the main command's fused_add_rmsnorm at 2048x1024 read 0.92x to 3.24x
eager over seven runs on a 2-core VM, 2.2x to 3.9x with freed memory kept). Keeping freed memory
makes every provider reuse its pages.
"""

from __future__ import annotations

import ctypes
import sys

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
_kept = False


def keep_freed_cpu_memory() -> bool:
    """Stops glibc from returning freed memory to the OS for the rest of the process (no mmap for
    large blocks, no trimming of the heap). Returns whether that is in effect; False off glibc."""
    global _kept
    if _kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (raises AttributeError off glibc, e.g. musl)
    except (OSError, AttributeError):
        return False
    _kept = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _kept
