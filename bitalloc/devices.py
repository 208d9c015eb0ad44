"""Devices and CPU threads: the one place that turns "auto"/"cpu"/"cuda:N" into a device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import BitallocError


def resolve_device(
    device: str | torch.device | None = "auto", fallback: torch.device | None = None
) -> torch.device:
    """'auto' (or None without ``fallback``) is CUDA when available, else the CPU; None with
    ``fallback`` is ``fallback``. BitallocError for an unknown name, a device other than
    the CPU and CUDA (``meta`` would compute nothing and write zeros), or CUDA without a GPU."""
    if device is None and fallback is not None:
        return fallback
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BitallocError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if resolved.type not in ("cpu", "cuda"):  # meta computes nothing; others are untested
        raise BitallocError(f"unsupported device {device!r}: use auto, cpu, cuda or cuda:N")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BitallocError(f"device {device} requested but CUDA is not available: use --device cpu")
    return resolved


@contextlib.contextmanager
def one_cpu_thread(device: torch.device | str = "cpu", when: bool = True) -> Iterator[None]:
    """Run the body on one intra-op thread (CPU only, and only ``when``).

    Small and thin work loses to OpenMP spin-waiting on a busy machine; measured figures
    are in docs/benchmarks.md (LoftQ section). torch keeps one intra-op thread count per
    process, so torch work of other threads also runs on one thread while the body runs.
    """
    previous = torch.get_num_threads()
    if not when or torch.device(device).type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
