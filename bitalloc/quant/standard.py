"""The built-in format families: NormalFloat (nf), uniform integers (int), asymmetric integers (uint).

nf and int are symmetric codebooks, one absmax (or searched) scale per block; uint stores a
scale and a zero point per block, w = (q - z)·s (GPTQ, compressed-tensors, torchao; HQQ with a
float zero). All three use the standard storage of `Format`; the numerics are in `blockwise`.
"""

from __future__ import annotations

import torch

from ..errors import BitallocError
from .blockwise import (
    SEARCH_CLIPS,
    affine_codes,
    affine_nearest,
    affine_values,
    symmetric_codes,
    symmetric_fake_quantize,
    symmetric_nearest,
    symmetric_values,
)
from .codebooks import normal_float_levels, uniform_levels
from .config import QuantConfig
from .formats import BlockCodes, Format, register_format, short


class SymmetricCodebook(Format):
    """Levels in [-1, 1] times one scale per block (absmax, or searched with ``-mse``)."""

    def quantize(self, blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None) -> BlockCodes:
        return symmetric_codes(blocks, config, weights)

    def dequantize(self, codes, scales, zeros, config: QuantConfig) -> torch.Tensor:
        return symmetric_values(codes, scales, config)

    def nearest(self, values, scales, zeros, config: QuantConfig, dequantize: bool = True, inverse=None):
        return symmetric_nearest(values, scales, config, dequantize, inverse)

    def fake_quantize(self, blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None):
        return symmetric_fake_quantize(blocks, config, weights)


class NormalFloat(SymmetricCodebook):
    """NF-k: the NormalFloat codebook of QLoRA/LoftQ."""

    name = "nf"
    uniform = False
    search_clips = SEARCH_CLIPS["nf"]

    def levels(self, bits: int) -> torch.Tensor:
        return normal_float_levels(bits)


class UniformInt(SymmetricCodebook):
    """INT-k: ``linspace(-1, 1, 2**k)``, LoftQ's uniform codebook."""

    name = "int"
    search_clips = SEARCH_CLIPS["int"]

    def levels(self, bits: int) -> torch.Tensor:
        return uniform_levels(bits)


class AffineInt(Format):
    """uint-k: unsigned k-bit codes, a float scale and a zero point per block (an integer of k
    bits, or a float in the scale's dtype); float scales only."""

    name = "uint"
    search_clips = SEARCH_CLIPS["int"]

    def check_zero(self, config: QuantConfig) -> None:
        """Required: a bits-wide integer or the scale's float dtype; the scales are floats."""
        if config.scale_bits is not None:
            raise BitallocError(
                "uint configs store float scales (-sfp16, -sbf16 or -sfp32), not quantized scales"
            )
        if config.zero is None:
            raise BitallocError(
                f"uint configs store a zero point: add -z{config.bits} (a {config.bits}-bit integer) or "
                f"-z{config.scale_dtype} (a float in the scale's dtype)"
            )
        if config.zero != "int" and config.zero != config.scale_dtype:
            raise BitallocError(
                f"zero point {short(config.zero)}: a uint config's zero point is 'int' (-z{config.bits}) "
                f"or the scale's dtype {config.scale_dtype} (-z{config.scale_dtype})"
            )

    def grid_config(self, bits: int, block_size: int, scale: str) -> str:
        """Grid points store a bits-wide integer zero point."""
        return f"{super().grid_config(bits, block_size, scale)}-z{bits}"

    def quantize(self, blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None) -> BlockCodes:
        return affine_codes(blocks, config, weights)

    def dequantize(self, codes, scales, zeros, config: QuantConfig) -> torch.Tensor:
        return affine_values(codes, scales, zeros, config)

    def nearest(self, values, scales, zeros, config: QuantConfig, dequantize: bool = True, inverse=None):
        return affine_nearest(values, scales, zeros, config, dequantize, inverse)


NF = register_format(NormalFloat())
INT = register_format(UniformInt())
UINT = register_format(AffineInt())
