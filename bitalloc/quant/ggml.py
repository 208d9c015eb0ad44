"""llama.cpp's ggml tensor types as a format family (``ggml``): a plan's bits are the GGUF file's bits.

Config strings ``ggml{bits}-b{block}-s{variant}`` name one ggml type: the code width, ggml's block
and the suffix of its name, so ``ggml4-b32-s0`` is q4_0 and ``ggml5-b32-s1`` is q5_1 (`TYPES`).
Each block is quantized as ggml's reference quantizer does (``quantize_row_*_ref`` in
ggml-quants.c, which ``llama-quantize`` runs when no importance matrix is given, and which the
``gguf`` Python package reproduces): the same scale (and min), computed in float32 from the
block's values, the same rounding of each code, and the scale (and min) stored as fp16. The
stored parts hold exactly ggml's bits (codes, fp16 scales, fp16 mins: q4_0 is 18 bytes per 32
weights, 4.5 bits per weight); `to_ggml_bytes` lays them out as ggml's blocks, byte for byte.

ggml quantizes along rows and a block never spans two rows, so a type is a candidate only for
matrices whose rows are a multiple of its block (`Format.fits`); on other rows bitalloc's own
storage would pad, but no GGUF could hold the matrix in that type. The reference quantizer has
no scale search: ``-mse`` is refused, and a data-aware profile weights the LoftQ correction and
the measured error but not the quantizer (as llama-quantize without ``--imatrix``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitallocError
from . import standard  # noqa: F401  (the built-in families register first)
from .config import QuantConfig
from .formats import BlockCodes, Format, register_format, short

FP16_BITS = 16


@dataclass(frozen=True)
class GgmlType:
    """One ggml type: its name, code width, block, config suffix and bytes per block; ``offset``
    is the code of 0 for the symmetric types (w = (q - offset)·d), None for the ones that store a
    min (w = q·d + m)."""

    name: str
    bits: int
    block: int
    variant: str
    block_bytes: int
    offset: int | None

    @property
    def config(self) -> str:
        return f"ggml{self.bits}-b{self.block}-s{self.variant}"

    @property
    def has_min(self) -> bool:
        return self.offset is None


# ggml's legacy block-32 types (ggml/src/ggml-common.h block_q4_0 ... block_q8_0)
TYPES = {
    t.config: t
    for t in (
        GgmlType("q4_0", 4, 32, "0", 18, 8),
        GgmlType("q4_1", 4, 32, "1", 20, None),
        GgmlType("q5_0", 5, 32, "0", 22, 16),
        GgmlType("q5_1", 5, 32, "1", 24, None),
        GgmlType("q8_0", 8, 32, "0", 34, 128),
    )
}
BY_NAME = {t.name: t for t in TYPES.values()}


def ggml_type(config: QuantConfig | str) -> GgmlType:
    """The ggml type of a ``ggml`` config (BitallocError for another family)."""
    config = QuantConfig.parse(config)
    if config.method != GgmlFamily.name:
        raise BitallocError(f"{config} is not a ggml type: ggml configs are {', '.join(TYPES)}")
    return TYPES[_key(config)]


def configs_for(columns: int) -> list[str]:
    """The ggml configs a matrix with rows of ``columns`` weights can take (the block divides the row)."""
    return [text for text, t in TYPES.items() if columns % t.block == 0]


def _key(config: QuantConfig) -> str:
    return f"ggml{config.bits}-b{config.block_size}-s{config.scale_dtype}"


class GgmlFamily(Format):
    """``ggml{bits}-b{block}-s{variant}``: one of `TYPES`. The variant is kept in ``scale_dtype``
    (what follows ``-s``); the types with a min also have ``zero`` "fp16" (an fp16 offset per block)."""

    name = "ggml"
    bits = tuple(sorted({t.bits for t in TYPES.values()}))
    grammar = "ggml{bits}-b{block}-s{variant}, llama.cpp's types: " + ", ".join(
        f"{text} ({t.name})" for text, t in TYPES.items()
    )
    scale_pattern = r"(?P<variant>[0-9]+|[a-z]+)"

    # ---- the config string ---------------------------------------------------------------
    def fields(self, groups, bits):
        variant = groups["variant"]
        return {"scale_dtype": variant, "zero": "fp16" if variant == "1" else None}

    def check(self, config):
        ggml = TYPES.get(_key(config))
        if ggml is None:
            raise BitallocError(
                f"no ggml type is {_key(config)}: the ggml configs are {', '.join(TYPES)} "
                f"({', '.join(t.name for t in TYPES.values())})"
            )
        if config.scale_bits is not None or config.scale_block_size is not None or config.search:
            raise BitallocError(f"{ggml.config} ({ggml.name}) is ggml's own block: no scale codes or -mse")
        if config.zero != ("fp16" if ggml.has_min else None):
            want = "an fp16 min per block (zero='fp16')" if ggml.has_min else "no zero point"
            raise BitallocError(f"{ggml.config} ({ggml.name}) stores {want}, got zero={short(config.zero)}")

    def scale_format(self, config):
        return config.scale_dtype

    def tail(self, config):
        return ""

    def grid_config(self, bits, block_size, scale):
        """A grid point of the ggml family: the type with ``bits`` and ``block_size`` (the symmetric
        one when two have them); the scale of the grid does not apply."""
        for text, t in TYPES.items():
            if (t.bits, t.block) == (bits, block_size):
                return text
        return f"ggml{bits}-b{block_size}-s{scale}"  # no such type: the parse says which exist

    def scale_dict(self, config):
        return {"ggml_type": ggml_type(config).name}

    def fits(self, config, columns):
        return columns % config.block_size == 0

    # ---- storage -------------------------------------------------------------------------
    def bits_per_param(self, config):
        ggml = ggml_type(config)
        return ggml.block_bytes * 8 / ggml.block

    def storage_parts(self, config, n_blocks):
        """Codes, one fp16 scale d per block and, for q4_1/q5_1, one fp16 min m: ggml's block size."""
        parts = {"codes": n_blocks * config.block_size * config.bits, "scales": n_blocks * FP16_BITS}
        if config.zero is not None:
            parts["zeros"] = n_blocks * FP16_BITS
        return parts

    def part_dtype(self, config, part):
        return torch.uint8 if part == "codes" else torch.float16

    # ---- tensors -------------------------------------------------------------------------
    def quantize(self, blocks, config, weights):
        """ggml's reference quantizer on float32 blocks (..., out, n_blocks, B0); ``weights`` unused."""
        ggml = ggml_type(config)
        if ggml.name == "q8_0":
            return _quantize_q8_0(blocks)
        return _quantize_min(blocks, ggml) if ggml.has_min else _quantize_symmetric(blocks, ggml)

    def dequantize(self, codes, scales, zeros, config):
        """ggml's dequantization in float32: (q - offset)·d, or q·d + m."""
        ggml = ggml_type(config)
        q = codes.reshape(*scales.shape, config.block_size).float()
        if ggml.has_min:
            values = (q * scales.unsqueeze(-1)) + zeros.float().unsqueeze(-1)
        else:
            values = (q - ggml.offset) * scales.unsqueeze(-1)
        return values.reshape(*values.shape[:-2], -1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (ggml: ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / torch.where(d == 0, torch.ones_like(d), d))


def _block_codes(codes: torch.Tensor, d: torch.Tensor, m: torch.Tensor | None = None) -> BlockCodes:
    stored = d.to(torch.float16)
    zeros = None if m is None else m.to(torch.float16)
    codes = codes.to(torch.uint8).reshape(*codes.shape[:-2], -1)
    return BlockCodes(codes, stored.float(), None, None, stored, zeros)


def _quantize_symmetric(blocks: torch.Tensor, ggml: GgmlType) -> BlockCodes:
    """q4_0/q5_0: d = max / -half, with max the block's value of largest magnitude (the first
    one on ties, sign kept), q = min(top, (int)(x/d + half + 0.5))."""
    half, top = ggml.offset, 2**ggml.bits - 1
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    largest = blocks.gather(-1, index).squeeze(-1)
    d = largest / -half
    inverse = _inverse(d).unsqueeze(-1)
    codes = (blocks * inverse + (half + 0.5)).trunc_().clamp_(0, top)
    return _block_codes(codes, d)


def _quantize_min(blocks: torch.Tensor, ggml: GgmlType) -> BlockCodes:
    """q4_1/q5_1: d = (max - min) / top, m = min, q = min(top, (int)((x - min)/d + 0.5))."""
    top = 2**ggml.bits - 1
    low, high = torch.aminmax(blocks, dim=-1)
    d = (high - low) / top
    inverse = _inverse(d).unsqueeze(-1)
    codes = ((blocks - low.unsqueeze(-1)) * inverse + 0.5).trunc_().clamp_(0, top)
    return _block_codes(codes, d, low)


def _quantize_q8_0(blocks: torch.Tensor) -> BlockCodes:
    """q8_0: d = absmax / 127, q = roundf(x/d) (halves away from zero), stored as q + 128."""
    d = blocks.abs().amax(dim=-1) / 127
    scaled = blocks * _inverse(d).unsqueeze(-1)
    size = scaled.abs()
    whole = size.floor()
    rounded = (whole + (2 * (size - whole)).floor_()) * scaled.sign()  # roundf, exactly
    return _block_codes(rounded + 128, d)


# ---- ggml's block layout ------------------------------------------------------------------------
def to_ggml_bytes(quantized) -> torch.Tensor:
    """The matrix as ggml stores it: uint8 (rows, blocks per row · block bytes), each block laid
    out as ggml's ``block_q*`` struct (fp16 d[, fp16 m][, high bits qh], low bits qs), equal to
    ``gguf.quants.quantize``'s bytes. ``quantized``: a `QuantizedTensor` of a ggml config."""
    ggml = ggml_type(quantized.config)
    rows = quantized.shape[0]
    codes = quantized.unpacked_codes().reshape(rows, -1, ggml.block)
    fields = [quantized.scales.to(torch.float16).reshape(rows, -1, 1).view(torch.uint8)]
    if ggml.has_min:
        fields.append(quantized.zeros.to(torch.float16).reshape(rows, -1, 1).view(torch.uint8))
    if ggml.bits == 8:
        fields.append(codes ^ 0x80)  # int8 q, two's complement
    else:
        if ggml.bits == 5:
            high = (codes >> 4).to(torch.int64) << torch.arange(32, dtype=torch.int64)
            fields.append(_le_bytes(high.sum(-1), 4))
        low = codes & 0x0F
        fields.append(low[..., :16] | (low[..., 16:] << 4))
    return torch.cat(fields, dim=-1).reshape(rows, -1)


def from_ggml_bytes(data, config: QuantConfig | str, shape: tuple[int, int]):
    """A `QuantizedTensor` from ggml's blocks (the inverse of `to_ggml_bytes`): uint8 (rows, row bytes)."""
    from .packed import QuantizedTensor
    from .packing import pack_bits

    config = QuantConfig.parse(config)
    ggml = ggml_type(config)
    rows, cols = int(shape[0]), int(shape[1])
    if cols % ggml.block:
        raise BitallocError(f"rows of {cols} are not whole {ggml.name} blocks of {ggml.block}")
    blocks = torch.as_tensor(data, dtype=torch.uint8).reshape(rows, cols // ggml.block, ggml.block_bytes)
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(rows, -1)
    start = 2
    m = None
    if ggml.has_min:
        m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(rows, -1)
        start = 4
    if ggml.bits == 8:
        codes = blocks[..., start:] ^ 0x80
    else:
        high = torch.zeros(*blocks.shape[:-1], 32, dtype=torch.uint8)
        if ggml.bits == 5:
            word = blocks[..., start : start + 4].to(torch.int64) << torch.tensor([0, 8, 16, 24])
            high = ((word.sum(-1, keepdim=True) >> torch.arange(32)) & 1).to(torch.uint8) << 4
            start += 4
        qs = blocks[..., start:]
        codes = torch.cat([qs & 0x0F, qs >> 4], dim=-1) | high
    parts = {"codes": pack_bits(codes, ggml.bits), "scales": d.clone()}
    if m is not None:
        parts["zeros"] = m.clone()
    return QuantizedTensor.from_tensors(parts, config, (rows, cols))


def _le_bytes(words: torch.Tensor, count: int) -> torch.Tensor:
    """int64 words (...) as ``count`` little-endian bytes (..., count), uint8."""
    shifts = torch.arange(count, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


GGML = register_format(GgmlFamily())
