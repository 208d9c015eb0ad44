"""Block-wise quantization along the input dimension, with float or quantized scales.

Tensors in, tensors out; every function accepts a batch of same-shaped matrices
(..., out, in) and computes in float32 on the input's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..errors import BitallocError
from .codebooks import codebook, nearest_code, nearest_index
from .config import QuantConfig

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class BlockCodes:
    """Unpacked result of quantizing (..., out, in): what gets packed and stored."""

    codes: torch.Tensor  # uint8 (..., out, n_blocks_per_row * B0), padding included
    scales: torch.Tensor  # float32 (..., out, n_blocks_per_row): the dequantized scales
    scale_codes: torch.Tensor | None  # uint8 (..., out * n_blocks_per_row) if scales are quantized
    scales2: torch.Tensor | None  # second-level scales (..., n_groups), in their storage dtype
    stored_scales: torch.Tensor | None  # float scales in their storage dtype (float-scale configs)


def check_matrix(weight: torch.Tensor, what: str = "weight") -> None:
    """BitallocError (a ValueError) for what cannot be quantized: not a real floating-point
    2-D tensor, empty, NaN or Inf."""
    if not isinstance(weight, torch.Tensor):
        raise BitallocError(f"{what} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.is_meta:
        raise BitallocError(f"{what} is on the meta device (it has no values): load the weights first")
    if not weight.is_floating_point():
        raise BitallocError(f"{what} must hold real floating-point values, got {weight.dtype}")
    if weight.dim() < 2:
        raise BitallocError(f"{what} must be a 2-D matrix (out, in), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise BitallocError(f"{what} is empty (shape {tuple(weight.shape)})")
    if not bool(torch.isfinite(weight).all()):
        raise BitallocError(f"{what} contains NaN or Inf values")


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., out, in) float32 -> (..., out, n_blocks, B0), zero-padding the last block."""
    cols = weight.shape[-1]
    padded = math.ceil(cols / block_size) * block_size
    weight = weight.float()
    if padded != cols:
        weight = torch.nn.functional.pad(weight, (0, padded - cols))
    return weight.reshape(*weight.shape[:-1], padded // block_size, block_size)


def quantize_scales(
    absmax: torch.Tensor, config: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Store block scales as the config says; returns (dequantized, codes, scales2, stored).

    Quantized scales: unsigned ``scale_bits`` codes over [0, group max] in groups of
    ``scale_block_size`` consecutive scales (row-major); a nonzero scale never gets code 0.
    """
    if not config.quantized_scales:
        stored = absmax.to(TORCH_DTYPES[config.scale_dtype])
        return stored.float(), None, None, stored
    lead = absmax.shape[:-2]
    flat = absmax.reshape(*lead, -1)
    n = flat.shape[-1]
    group = config.scale_block_size
    n_groups = math.ceil(n / group)
    grouped = torch.nn.functional.pad(flat, (0, n_groups * group - n)).reshape(*lead, n_groups, group)
    scales2 = grouped.amax(dim=-1).to(TORCH_DTYPES[config.second_level])
    top = scales2.float().unsqueeze(-1)
    max_code = 2**config.scale_bits - 1
    ratio = torch.where(top > 0, grouped / top.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    codes = torch.round(ratio * max_code).clamp_(0, max_code)
    codes = torch.where((grouped > 0) & (codes == 0), torch.ones_like(codes), codes)
    dequant = (codes / max_code * top).reshape(*lead, -1)[..., :n].reshape(absmax.shape)
    codes = codes.to(torch.uint8).reshape(*lead, -1)[..., :n]
    return dequant, codes, scales2, None


def quantize(weight: torch.Tensor, config: QuantConfig | str) -> BlockCodes:
    """Quantize (..., out, in) block-wise; codes are chosen against the stored scales."""
    config = QuantConfig.parse(config)
    blocks = _blocks(weight, config.block_size)
    absmax = blocks.abs().amax(dim=-1)
    scales, scale_codes, scales2, stored = quantize_scales(absmax, config)
    levels = codebook(config.method, config.bits, blocks.device)
    inverse = torch.where(scales > 0, 1.0 / scales.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    normalized = (blocks * inverse.unsqueeze(-1)).clamp_(-1.0, 1.0)
    codes = nearest_code(normalized, levels)
    codes = codes.reshape(*codes.shape[:-2], -1)
    return BlockCodes(codes, scales, scale_codes, scales2, stored)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, config: QuantConfig, cols: int
) -> torch.Tensor:
    """float32 (..., out, cols) from unpacked codes (..., out, padded) and dequantized scales."""
    levels = codebook(config.method, config.bits, codes.device)
    values = levels.index_select(0, codes.reshape(-1).int())
    values = values.reshape(*scales.shape, config.block_size)
    values = values * scales.unsqueeze(-1)
    return values.reshape(*values.shape[:-2], -1)[..., :cols]


def fake_quantize(weight: torch.Tensor, config: QuantConfig | str) -> torch.Tensor:
    """Quantize then dequantize (..., out, in): the Q that LoftQ iterates on, float32."""
    config = QuantConfig.parse(config)
    cols = weight.shape[-1]
    blocks = _blocks(weight, config.block_size)
    low, high = torch.aminmax(blocks, dim=-1)  # one pass, no |blocks| temporary
    scales = quantize_scales(torch.maximum(high, low.neg_()), config)[0]
    levels = codebook(config.method, config.bits, blocks.device)
    inverse = torch.where(scales > 0, 1.0 / scales.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    # no clamp to [-1, 1]: the binary search already sends |x| > 1 to the end levels
    index = nearest_index(blocks * inverse.unsqueeze(-1), levels)
    values = levels.index_select(0, index.reshape(-1)).reshape(index.shape)
    values.mul_(scales.unsqueeze(-1))
    return values.reshape(*values.shape[:-2], -1)[..., :cols]
