"""Keep freed memory in the process instead of handing it back to the OS after every step.

glibc's malloc serves each block over its mmap threshold (128 KiB, rising to at most 32 MiB) with a
fresh mapping and unmaps it when freed. An attack step at batch 1000 allocates a dozen tensors of
1-50 MB, so every step page-faults them in again, 4 KiB at a time: measured on improved-bn, a
third of a PGD step (405 -> 250 ms at batch 1000, for autograd and the fast path alike). Raising
the thresholds lets malloc reuse the memory, which is what PyTorch's CPU tuning guide gets by
preloading jemalloc or tcmalloc.

`keep_freed_memory()` is called by the attack and training loops when they first run, never at
import. It changes a process-wide setting once and is a no-op off glibc; ADVMNIST_KEEP_MEMORY=0 turns
it off (e.g. to compare).
The cost is resident memory: the process keeps its peak heap instead of returning it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds (once per process); True if they are raised."""
    if os.environ.get("ADVMNIST_KEEP_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # glibc refuses thresholds over half its heap size on some versions: fall back to 32 MiB
    raised = mallopt(_M_MMAP_THRESHOLD, 1 << 30) or mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    return bool(raised and mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1))
