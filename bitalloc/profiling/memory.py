"""Handing freed heap memory back to the operating system between matrices and blocks."""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
# Allocations from this size up get their own mapping, returned to the OS when freed. glibc's
# default threshold moves up to the largest block freed so far (up to 32 MiB), so after one large
# matrix temporaries of every size come from the heap and its high-water mark creeps up with
# depth: the output objective's peak grew 81 MiB over 12 TinyLlama layers with it, 3 MiB with a
# fixed 4 MiB threshold, which also lowered the peak by 15% (docs/benchmarks.md, bench_depth).
MMAP_THRESHOLD = 4 << 20
_BOUNDED = False


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): without it, the fragments of each
    matrix's temporaries pile up and peak RSS grows with the number of layers. The first call
    also fixes glibc's mmap threshold (`MMAP_THRESHOLD`) for the process."""
    global _BOUNDED
    if _LIBC is None:
        return
    if not _BOUNDED:
        _BOUNDED = True
        _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        libc.mallopt  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
