"""Codebooks: NormalFloat (QLoRA/LoftQ) and uniform INT levels, sorted ascending in [-1, 1]."""

from __future__ import annotations

from functools import cache

import torch

NF_OFFSET = 0.9677083


@cache
def _codebook_cpu(method: str, bits: int) -> torch.Tensor:
    levels = 2**bits
    if method == "int":
        return torch.linspace(-1.0, 1.0, levels, dtype=torch.float64).float()
    if method != "nf":
        raise ValueError(f"unknown codebook {method!r}: expected nf or int")
    half = levels // 2
    positive = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = torch.sort(values / values.max()).values
    return values.float()


def codebook(method: str, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2**bits levels of ``method`` ('nf' or 'int'), ascending, float32."""
    table = _codebook_cpu(method, int(bits))
    return table if device is None else table.to(device)


def nearest_index(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """int32 index of the nearest level for each value, by binary search on the midpoints.

    Memory is O(numel), not O(numel x levels): a 4096^2 matrix at 8 bits needs ~17 GB
    with a dense argmin, and ~34 MB here.
    """
    midpoints = (levels[1:] + levels[:-1]) * 0.5
    if values.device.type == "cpu" and levels.numel() <= 16:
        # counting the midpoints below each value (one compare-and-add pass per midpoint)
        # beats torch.bucketize's binary search on a CPU for <= 4 bits (docs/benchmarks.md)
        index = torch.zeros(values.shape, dtype=torch.uint8)
        for midpoint in midpoints.tolist():
            index += values > midpoint
        return index.int()
    return torch.bucketize(values, midpoints, out_int32=True)


def nearest_code(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``nearest_index`` as uint8 codes (at most 8 bits)."""
    return nearest_index(values, levels).to(torch.uint8)
