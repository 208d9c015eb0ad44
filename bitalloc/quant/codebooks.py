"""Codebooks: NormalFloat (QLoRA/LoftQ) and uniform INT levels, sorted ascending in [-1, 1].

`codebook(method, bits)` asks the registered format family for its levels (`Format.levels`).
"""

from __future__ import annotations

from functools import cache

import torch

from .formats import get_format

NF_OFFSET = 0.9677083


@cache
def uniform_levels(bits: int) -> torch.Tensor:
    """``linspace(-1, 1, 2**bits)`` (LoftQ's uniform codebook), float32."""
    return torch.linspace(-1.0, 1.0, 2**bits, dtype=torch.float64).float()


@cache
def normal_float_levels(bits: int) -> torch.Tensor:
    """The NormalFloat codebook of QLoRA/LoftQ with 2**bits levels, float32."""
    levels = 2**bits
    half = levels // 2
    positive = torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(NF_OFFSET, 0.5, half, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative])
    values = torch.sort(values / values.max()).values
    return values.float()


def codebook(method: str, bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The 2**bits levels of the family ``method`` ('nf', 'int'...), ascending, float32;
    ValueError for a family without a codebook (uint: affine integers)."""
    table = get_format(method).levels(int(bits))
    if table is None:
        raise ValueError(f"{method} has no codebook: its levels are affine integers per block")
    return table if device is None else table.to(device)


COUNTING_ELEMENTS = 1 << 12  # below this many values, one bucketize call beats the counting passes


def nearest_index(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """int32 index of the nearest level for each value, by binary search on the midpoints.

    Memory is O(numel), not O(numel x levels): a 4096^2 matrix at 8 bits needs ~17 GB
    with a dense argmin, and ~34 MB here.
    """
    midpoints = (levels[1:] + levels[:-1]) * 0.5
    if values.device.type == "cpu" and levels.numel() <= 16 and values.numel() >= COUNTING_ELEMENTS:
        # counting the midpoints below each value (one compare-and-add pass per midpoint)
        # beats torch.bucketize's binary search on a CPU for <= 4 bits (docs/benchmarks.md),
        # except on a few values (GPTQ's one column at a time), where one call beats 2·K - 1
        index = torch.zeros(values.shape, dtype=torch.uint8)
        for midpoint in midpoints.tolist():
            index += values > midpoint
        return index.int()
    return torch.bucketize(values, midpoints, out_int32=True)


def nearest_code(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """``nearest_index`` as uint8 codes (at most 8 bits)."""
    return nearest_index(values, levels).to(torch.uint8)
