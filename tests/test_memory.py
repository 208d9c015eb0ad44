"""Freed heap memory goes back to the OS between matrices (glibc): malloc_trim after each one, and
a fixed mmap threshold so that large temporaries are mapped and unmapped instead of raising the
heap's high-water mark with depth (figures: docs/benchmarks.md, bench_depth)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitalloc.profiling import memory

pytestmark = pytest.mark.skipif(memory._LIBC is None, reason="glibc only (malloc_trim, mallopt)")

# After a 24 MiB block is freed, glibc's default threshold serves a 16 MiB block from the heap;
# freed below a live small block, its pages stay resident. With the fixed threshold they do not.
SCRIPT = """
import os, sys, numpy as np
from bitalloc.profiling import memory
if sys.argv[1] == "bounded":
    memory.release_freed_memory()
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
big = np.ones(24 << 20, dtype=np.uint8); del big
before = rss()
block = np.ones(16 << 20, dtype=np.uint8)
keep = [np.ones(64, dtype=np.uint8) for _ in range(1000)]
del block
print((rss() - before) >> 20)
"""


@pytest.mark.parametrize("mode, resident", [("default", (15, 64)), ("bounded", (-64, 2))])
def test_a_freed_large_temporary_leaves_the_process(mode, resident):
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    low, high = resident
    assert low <= int(result.stdout) <= high  # MiB still resident after the 16 MiB block was freed
