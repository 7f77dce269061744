"""The model room keeps freed temporary memory for reuse (glibc's mmap and trim thresholds): the second
48 MiB array of a process reuses the first one's pages instead of faulting in fresh ones from the kernel."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the allocator thresholds are glibc's (Linux)",
)

_PROBE = """
import resource
import numpy as np
{prefix}
n = 48 * 2**20 // 8
a = np.ones(n); del a
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = np.ones(n); del a
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults_of_a_second_array(prefix: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "XRFNB_ALLOCATOR")}
    out = subprocess.run([sys.executable, "-c", _PROBE.format(prefix=prefix)], capture_output=True, text=True,
                         env={**clean, "NUMPY_MADVISE_HUGEPAGE": "0", **env}, check=True, timeout=120)
    return int(out.stdout.split()[-1])


def test_importing_the_model_room_keeps_freed_memory_for_reuse():
    plain = _page_faults_of_a_second_array("")
    tuned = _page_faults_of_a_second_array("import xrfnb.model")
    opted_out = _page_faults_of_a_second_array("import xrfnb.model", XRFNB_ALLOCATOR="system")
    # without the thresholds glibc maps a 48 MiB array afresh (above its 32 MiB automatic maximum): a fault
    # per page (12,288 of 4 KiB; numpy is told not to ask for huge pages, which would make it a few dozen);
    # with them the freed pages are reused and none is faulted in
    pages = 48 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    assert plain > pages // 2, plain
    assert opted_out > pages // 2, opted_out
    assert tuned < pages // 100, tuned
