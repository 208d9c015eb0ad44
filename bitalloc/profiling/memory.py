"""Handing freed heap memory back to the operating system between matrices and blocks."""

from __future__ import annotations

import ctypes


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc): without it, the fragments of each
    matrix's temporaries pile up and peak RSS grows with the number of layers."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (glibc only)
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _load_libc()
