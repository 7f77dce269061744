"""The C allocator's thresholds for freed memory (glibc on Linux), set when the model room is imported.

Identifying a batch of spectra makes tens of megabytes of temporary arrays (the rebinned counts, the
network's layers, the out-of-distribution terms) and frees them again, thousands of times per scan. glibc
serves allocations above its mmap threshold (128 KiB at start, raised automatically up to 32 MiB as mapped
blocks are freed) with fresh pages from the kernel and returns memory above its trim threshold at the top of
the heap to the kernel on every free, so each batch pays for page faults and for zeroing the pages again.
Until the automatic thresholds have grown past those arrays (two or three whole maps into a process) that
cost a third of the mapping time on the two-core project machine: ``map_pigments`` straight from a
512 x 512 ``.bcf`` ran at about 15,000 spectra/s in the first maps of a process and 20,000-23,000 later.
:func:`keep_freed_memory` sets the mmap threshold to 64 MiB and the trim threshold to 256 MiB from the start
(``mallopt``), so freed temporaries are reused: the first map runs as fast as the later ones, with the same
peak memory (``benchmarks/bench_bcf.py``: about 700 MB either way). It does nothing where the C library
is not glibc, or where the environment already sets the allocator (``GLIBC_TUNABLES``,
``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), or where ``XRFNB_ALLOCATOR=system``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

#: allocations at least this large get pages of their own from the kernel (glibc's M_MMAP_THRESHOLD)
MMAP_THRESHOLD_BYTES = 64 * 2**20
#: free memory at the top of the heap above this is returned to the kernel (glibc's M_TRIM_THRESHOLD)
TRIM_THRESHOLD_BYTES = 256 * 2**20
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ENV = ("GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds (module docstring); True where they were set."""
    if not sys.platform.startswith("linux") or os.environ.get("XRFNB_ALLOCATOR", "") == "system":
        return False
    if any(name in os.environ for name in _ENV):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries without mallopt
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok_mmap = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    ok_trim = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return bool(ok_mmap and ok_trim)
