"""Block-wise quantization along the input dimension, with float or quantized scales.

Tensors in, tensors out; every function accepts a batch of same-shaped matrices
(..., out, in) and computes in float32 on the input's device.

Symmetric codebooks (nf, int) store one scale per block: the block's absmax, or with the
``-mse`` search the scale of least squared error (see `search_scales`). Asymmetric integer
blocks (uint) store a scale s and a zero point z; a code q stands for (q - z)·s, computed
exactly in float32 for an integer z, and in the scale's dtype (as HQQ does) for a float z.
"""

from __future__ import annotations

import math

import torch

from ..errors import BitallocError
from .codebooks import codebook, nearest_index
from .config import QuantConfig
from .formats import TORCH_DTYPES, BlockCodes, format_of


def check_tensor(value: object, what: str) -> torch.Tensor:
    """``value`` if it is a tensor with values (not on the meta device) of a real
    floating-point dtype, else BitallocError."""
    if not isinstance(value, torch.Tensor):
        raise BitallocError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_meta:
        raise BitallocError(f"{what} is on the meta device (it has no values): load the weights first")
    if not value.is_floating_point():
        raise BitallocError(f"{what} must hold real floating-point values, got {value.dtype}")
    return value


def check_matrix(weight: torch.Tensor, what: str = "weight") -> None:
    """BitallocError (a ValueError) for what cannot be quantized: not a real floating-point
    2-D tensor, empty, NaN or Inf."""
    check_tensor(weight, what)
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


# The scale search's candidate clips (the standard families' ``search_clips``), by bits, in
# units of the block's RMS: each candidate clips the block's range (absmax, or half the min-max
# range) to ratio = min(1, κ·rms / range); the ratio 1 (no clipping) is always a candidate. κ
# minimize the error of Gaussian blocks of 64 with the ratio 1 beside them (a grid of κ; more
# candidates gained < 4% and cost a pass over the matrix each; bench_formats.py measures it).
SEARCH_CLIPS = {
    "nf": {2: (1.40,), 3: (2.00,), 4: (2.20,), 8: ()},
    "int": {2: (1.50,), 3: (2.00,), 4: (2.35,), 8: ()},
}


def search_ratios(blocks: torch.Tensor, half_range: torch.Tensor, config: QuantConfig) -> list:
    """The candidate clipping ratios of each block: 1, then min(1, κ·rms/half_range) per κ
    (κ: the family's ``search_clips`` for the config's bits)."""
    clips = format_of(config).search_clips.get(config.bits, ())
    if not clips:
        return [1.0]
    rms = torch.linalg.vector_norm(blocks, dim=-1).mul_(blocks.shape[-1] ** -0.5)
    relative = torch.where(half_range > 0, rms / half_range.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return [1.0, *((relative * kappa).clamp_(max=1.0) for kappa in clips)]


def element_weights(column_weights: torch.Tensor | None, weight: torch.Tensor, block_size: int):
    """Per-column weights h (``(in,)`` or ``(..., in)`` matching the batch) as a tensor that
    broadcasts over the blocks ``(..., 1, n_blocks, B0)``, zero on the padding; None for None."""
    if column_weights is None:
        return None
    cols = weight.shape[-1]
    h = torch.as_tensor(column_weights).to(device=weight.device, dtype=torch.float32)
    if h.dim() < 1 or h.shape[-1] != cols or h.dim() > weight.dim() - 1:
        raise BitallocError(f"column weights must have {cols} values per matrix, got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()) or bool((h < 0).any()):
        raise BitallocError("column weights must be finite and >= 0")
    return _blocks(h, block_size).unsqueeze(-3)


SEARCH_TABLE = 4096  # the search reads NF levels from a table over [-1, 1] in this many steps


def _nearest_values(values: torch.Tensor, levels: torch.Tensor, uniform: bool) -> torch.Tensor:
    """The nearest level's value for each entry: exact for the uniform INT levels (rounding);
    for NF read from a table of the nearest level at ``SEARCH_TABLE`` + 1 points of [-1, 1]
    (off by at most one level within 1/``SEARCH_TABLE`` of a midpoint). Only the scale search
    uses it; the stored codes come from `nearest_index`."""
    if uniform:  # linspace(-1, 1, K): rounding, no search over levels
        half = (levels.numel() - 1) / 2
        return values.mul(half).add_(half).round_().clamp_(0, 2 * half).mul_(1 / half).sub_(1)
    half = SEARCH_TABLE / 2
    grid = torch.linspace(-1.0, 1.0, SEARCH_TABLE + 1, device=values.device)
    table = levels.index_select(0, nearest_index(grid, levels).reshape(-1))
    index = values.mul(half).add_(half).round_().clamp_(0, SEARCH_TABLE).to(torch.int32)
    return table.index_select(0, index.reshape(-1)).reshape(values.shape)


def _table_values(blocks: torch.Tensor, inverse: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """`_nearest_values` of blocks·inverse for NF, with the scaling fused into one pass."""
    half = SEARCH_TABLE / 2
    grid = torch.linspace(-1.0, 1.0, SEARCH_TABLE + 1, device=blocks.device)
    table = levels.index_select(0, nearest_index(grid, levels).reshape(-1))
    start = torch.full((), half, device=blocks.device)
    index = torch.addcmul(start, blocks, (inverse * half).unsqueeze(-1)).round_().clamp_(0, SEARCH_TABLE)
    return table.index_select(0, index.to(torch.int32).reshape(-1)).reshape(blocks.shape)


def search_scales(
    blocks: torch.Tensor, absmax: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Per block, the scale of least (weighted) squared error among the candidates.

    Each candidate clips the range to ratio·absmax (`search_ratios`), takes the nearest
    codes c there, and refits the scale on them by least squares, s = Σhxc / Σhc², whose
    error is Σhx² - (Σhxc)²/Σhc²; the block keeps the best. The ratio 1 is a candidate, so
    the error is never above absmax's before the scale is stored (for NF, up to the level
    table of `_nearest_values`: measured ≤ 0.07% on rare blocks). ``weights`` h broadcast
    over ``blocks`` (None: 1). One pass over the matrix per candidate, no loop over blocks.
    """
    levels = codebook(config.method, config.bits, blocks.device)
    weighted = blocks if weights is None else blocks * weights
    best_gain = torch.zeros_like(absmax)
    best = absmax.clone()
    tiny = torch.finfo(torch.float32).tiny
    half = (levels.numel() - 1) / 2
    for ratio in search_ratios(blocks, absmax, config):
        scale = absmax * ratio
        inverse = torch.where(scale > 0, 1.0 / scale.clamp_min(tiny), 0.0)
        if format_of(config).uniform:
            # codes c' = half·c, integers (half-integers for even K) from one rounding: two passes
            # fewer than level values; the refit is s = half·Σhxc'/Σhc'²
            unit = half
            start = torch.full((), half, device=blocks.device)
            codes = torch.addcmul(start, blocks, (inverse * half).unsqueeze(-1)).round_().clamp_(0, 2 * half)
            codes.sub_(half)
        else:
            unit = 1.0
            codes = _table_values(blocks, inverse, levels)
        cross = (weighted * codes).sum(-1)
        squares = codes.square_() if weights is None else codes.square_().mul_(weights)
        norm = squares.sum(-1)
        ok = (cross > 0) & (norm > 0)
        gain = torch.where(ok, cross * cross / norm.clamp_min(tiny), 0.0)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best = torch.where(better, cross / norm.clamp_min(tiny) * unit, best)
    return best


def block_scales(blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None = None):
    """The raw (unstored) float32 scale of each block of a symmetric config."""
    low, high = torch.aminmax(blocks, dim=-1)  # one pass, no |blocks| temporary
    absmax = torch.maximum(high, low.neg_())
    if config.search:
        return search_scales(blocks, absmax, config, weights)
    return absmax


def affine_params(
    blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw float32 (scale, zero) of each block of an asymmetric (uint) config.

    From the range, kept around 0 as GPTQ does (lo = min(min, 0), hi = max(max, 0), so a zero
    point lies in [0, 2^k - 1] and a constant block is exact): s = (hi - lo)/(2^k - 1),
    z = -lo/s, rounded for an integer zero. With the search, candidate ranges shrink by
    `search_ratios` (toward 0 for an integer zero, toward the middle for a float one) and each
    is refitted by least squares on its codes: the scale alone for an integer zero, scale and
    zero (a line fit of x on q) for a float one.
    """
    top = 2**config.bits - 1
    tiny = torch.finfo(torch.float32).tiny
    low, high = torch.aminmax(blocks, dim=-1)
    low, high = low.clamp(max=0), high.clamp(min=0)
    integer = config.zero == "int"
    center = torch.zeros_like(low) if integer else (low + high) * 0.5

    def candidate(ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = center + (low - center) * ratio, center + (high - center) * ratio
        scale = (hi - lo) / top
        inverse = torch.where(scale > 0, 1.0 / scale.clamp_min(tiny), 0.0)
        zero = -lo * inverse
        return scale, (zero.round().clamp_(0, top) if integer else zero)

    scale, zero = candidate(1.0)
    if not config.search:
        return scale, zero
    h = weights if weights is not None else torch.ones((), device=blocks.device)
    weighted = blocks if weights is None else blocks * h
    total = torch.full_like(low, blocks.shape[-1]) if weights is None else h.sum(-1).expand_as(low)
    sum_x = weighted.sum(-1)
    best_gain = torch.zeros_like(low)
    for ratio in search_ratios(blocks, (high - low) * 0.5, config):
        s, z = candidate(ratio)
        inverse = torch.where(s > 0, 1.0 / s.clamp_min(tiny), 0.0)
        q = (blocks * inverse.unsqueeze(-1)).add_(z.unsqueeze(-1)).round_().clamp_(0, top)
        if integer:
            q.sub_(z.unsqueeze(-1))  # q - z
            cross = (weighted * q).sum(-1)
            norm = (q.square_() if weights is None else q.square_().mul_(h)).sum(-1)
            ok = (cross > 0) & (norm > 0)
            gain = torch.where(ok, cross * cross / norm.clamp_min(tiny), 0.0)
            fit_scale, fit_zero = cross / norm.clamp_min(tiny), z
        else:
            sum_q = (q if weights is None else q * h).sum(-1)
            cross = (weighted * q).sum(-1) - sum_q * sum_x / total
            var = (q.square_() if weights is None else q.square_().mul_(h)).sum(-1) - sum_q * sum_q / total
            fit_scale = cross / var.clamp_min(tiny)
            offset = (sum_x - fit_scale * sum_q) / total
            fit_zero = -offset / fit_scale.clamp_min(tiny)
            # a zero point far outside the codes' range would not survive fp16 storage
            ok = (cross > 0) & (var > 0) & (fit_zero.abs() <= 4 * top)
            gain = torch.where(ok, cross * cross / var.clamp_min(tiny), 0.0)
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        scale = torch.where(better, fit_scale, scale)
        zero = torch.where(better, fit_zero, zero)
    return scale, zero


def affine_codes(blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None) -> BlockCodes:
    """Codes, stored scales and stored zero points of an asymmetric (uint) config."""
    dtype = TORCH_DTYPES[config.scale_dtype]
    scale, zero = affine_params(blocks, config, weights)
    top = 2**config.bits - 1
    stored = scale.to(dtype)
    scales = stored.float()
    if config.zero == "int":
        zeros = zero.round().clamp_(0, top).to(torch.uint8)
    else:
        zeros = zero.to(dtype)
    codes = affine_nearest(blocks, scales.unsqueeze(-1), zeros.unsqueeze(-1), config, dequantize=False)[0]
    codes = codes.reshape(*codes.shape[:-2], -1)
    return BlockCodes(codes, scales, None, None, stored, zeros)


def inverse_scales(scales: torch.Tensor) -> torch.Tensor:
    """1/s, and 0 where s is 0 (a zero block)."""
    return torch.where(scales > 0, 1.0 / scales.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def affine_nearest(
    values: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    config: QuantConfig,
    dequantize: bool = True,
    inverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The nearest code (uint8) of each value under its block's dequantized scale and stored zero
    point (both broadcast against ``values``), and (``dequantize``) the value the code stands for.
    ``inverse``: `inverse_scales` of ``scales`` when already computed."""
    top = 2**config.bits - 1
    inverse = inverse_scales(scales) if inverse is None else inverse
    codes = (values * inverse).add_(zeros.float()).round_().clamp_(0, top)
    return codes.to(torch.uint8), _affine(codes, scales, zeros, config) if dequantize else None


def _affine(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """(q - z)·s elementwise (broadcast): in float32 for an integer z, in the scale's dtype for a float z."""
    if config.zero == "int":
        return (q.float() - zeros.float()).mul_(scales)
    dtype = TORCH_DTYPES[config.scale_dtype]
    return ((q.to(dtype) - zeros.to(dtype)) * scales.to(dtype)).float()


def symmetric_nearest(
    values: torch.Tensor,
    scales: torch.Tensor,
    config: QuantConfig,
    dequantize: bool = True,
    inverse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The nearest level's code (uint8) of each value under its block's dequantized scale
    (broadcast against ``values``), and (``dequantize``) level·scale, the value it stands for.
    ``inverse``: `inverse_scales` of ``scales`` when already computed."""
    levels = codebook(config.method, config.bits, values.device)
    inverse = inverse_scales(scales) if inverse is None else inverse
    index = nearest_index((values * inverse).clamp_(-1.0, 1.0), levels)
    if not dequantize:
        return index.to(torch.uint8), None
    return index.to(torch.uint8), levels.index_select(0, index.reshape(-1)).reshape(index.shape) * scales


def quantize(
    weight: torch.Tensor,
    config: QuantConfig | str,
    column_weights: torch.Tensor | None = None,
    rounded: torch.Tensor | None = None,
) -> BlockCodes:
    """Quantize (..., out, in) block-wise with the config's family; codes are chosen against
    the stored scales.

    ``column_weights`` h (per input column) weight the ``-mse`` search's error; ignored otherwise.
    ``rounded``: values already on the stored grid (``-gptq`` rounding's Q, `bitalloc.quant.rounding`):
    the scales come from ``weight`` as always, the codes are those of ``rounded``'s values."""
    config = QuantConfig.parse(config)
    blocks = _blocks(weight, config.block_size)
    weights = element_weights(column_weights, weight, config.block_size) if config.search else None
    family = format_of(config)
    parts = family.quantize(blocks, config, weights)
    if rounded is not None:
        zeros = None if parts.zeros is None else parts.zeros.unsqueeze(-1)
        codes = family.nearest(_blocks(rounded, config.block_size), parts.scales.unsqueeze(-1), zeros,
                               config, dequantize=False)[0]  # fmt: skip
        parts.codes = codes.reshape(*codes.shape[:-2], -1)
    return parts


def symmetric_codes(blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None) -> BlockCodes:
    """Codes and scales of a symmetric codebook family (nf, int): one absmax (or searched) scale
    per block, stored as the config says, and the nearest level of each scaled element."""
    if config.search:
        raw = block_scales(blocks, config, weights)
    else:
        raw = blocks.abs().amax(dim=-1)
    scales, scale_codes, scales2, stored = quantize_scales(raw, config)
    codes = symmetric_nearest(blocks, scales.unsqueeze(-1), config, dequantize=False)[0]
    codes = codes.reshape(*codes.shape[:-2], -1)
    return BlockCodes(codes, scales, scale_codes, scales2, stored)


def dequantize_codes(
    codes: torch.Tensor,
    scales: torch.Tensor,
    config: QuantConfig,
    cols: int,
    zeros: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 (..., out, cols) from unpacked codes (..., out, padded) and dequantized scales
    (and, for uint, the stored zero points), by the config's family."""
    return format_of(config).dequantize(codes, scales, zeros, config)[..., :cols]


def symmetric_values(codes: torch.Tensor, scales: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """level[code]·scale of a symmetric codebook family: float32 (..., out, padded)."""
    levels = codebook(config.method, config.bits, codes.device)
    values = levels.index_select(0, codes.reshape(-1).int())
    values = values.reshape(*scales.shape, config.block_size)
    values = values * scales.unsqueeze(-1)
    return values.reshape(*values.shape[:-2], -1)


def affine_values(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, config: QuantConfig):
    """(q - z)·s: exact in float32 for an integer z; in the scale's dtype for a float z (HQQ)."""
    q = codes.reshape(*scales.shape, config.block_size)
    values = _affine(q, scales.unsqueeze(-1), zeros.unsqueeze(-1), config)
    return values.reshape(*values.shape[:-2], -1)


def fake_quantize(
    weight: torch.Tensor, config: QuantConfig | str, column_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize (..., out, in): the Q that LoftQ iterates on, float32.

    ``column_weights`` h (per input column) weight the ``-mse`` search's error; ignored otherwise."""
    config = QuantConfig.parse(config)
    cols = weight.shape[-1]
    blocks = _blocks(weight, config.block_size)
    weights = element_weights(column_weights, weight, config.block_size) if config.search else None
    return format_of(config).fake_quantize(blocks, config, weights)[..., :cols]


def symmetric_fake_quantize(
    blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None
) -> torch.Tensor:
    """`fake_quantize` of a symmetric codebook family on blocks: float32 (..., out, padded)."""
    scales = quantize_scales(block_scales(blocks, config, weights), config)[0]
    levels = codebook(config.method, config.bits, blocks.device)
    inverse = torch.where(scales > 0, 1.0 / scales.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    # no clamp to [-1, 1]: the binary search already sends |x| > 1 to the end levels
    index = nearest_index(blocks * inverse.unsqueeze(-1), levels)
    values = levels.index_select(0, index.reshape(-1)).reshape(index.shape)
    values.mul_(scales.unsqueeze(-1))
    return values.reshape(*values.shape[:-2], -1)
