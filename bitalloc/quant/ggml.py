"""llama.cpp's ggml tensor types as a format family (``ggml``): a plan's bits are the GGUF file's bits.

Config strings ``ggml{bits}-b{block}-s{variant}`` name one ggml type: the code width, ggml's block
and the suffix of its name, so ``ggml4-b32-s0`` is q4_0 and ``ggml5-b32-s1`` is q5_1 (`TYPES`).
Each block is quantized as ggml's reference quantizer does (``quantize_row_*_ref`` in
ggml-quants.c, which ``llama-quantize`` runs when no importance matrix is given): for q4_0 ...
q8_0 the same scale (and min), computed in float32 from the block's values, the same rounding of
each code, stored as fp16 (the ``gguf`` Python package's quantizers, the same bytes); for
iq4_nl (``ggml4-b32-snl``, a 16-value non-linear codebook) the search over 16 scales per block of
``quantize_iq4_nl``, and for iq4_xs (``ggml4-b256-sxs``) the same per sub-block of 32 with 6-bit
sub-block scales; for the k-quants q2_K ... q6_K (super-blocks of 256, ``-sk``)
llama.cpp's search for each sub-block's scale (and min) and the quantization of those to 4-, 6- or
8-bit codes under an fp16 super-block scale. The searches run in float32 with C's order of
operations (sums element by element, divisions correctly rounded), so the bytes are those of a C
build without FMA contraction. The stored
parts hold exactly ggml's bits (q4_0 is 18 bytes per 32 weights, 4.5 bits per weight; q4_K 144
bytes per 256); `to_ggml_bytes` lays them out as ggml's blocks and `from_ggml_bytes` reads them.

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
from .packing import pack_bits, unpack_bits

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
    sub: int = 0  # k-quants: weights per sub-block (each with its own scale code); 0: one scale per block
    scale_bits: int = 0  # k-quants: bits of a sub-block's scale (and min) code

    @property
    def config(self) -> str:
        return f"ggml{self.bits}-b{self.block}-s{self.variant}"

    @property
    def has_min(self) -> bool:
        return self.offset is None

    @property
    def k_quant(self) -> bool:
        return self.sub > 0

    @property
    def codebook(self) -> bool:
        """A non-linear type (iq4_nl): codes index `IQ4_NL_VALUES`, w = value·d."""
        return self.name.startswith("iq")

    @property
    def group(self) -> int:
        """Weights per stored scale: the sub-block of a k-quant, else the block."""
        return self.sub or self.block


# ggml's legacy block-32 types (ggml/src/ggml-common.h block_q4_0 ... block_q8_0)
TYPES = {
    t.config: t
    for t in (
        GgmlType("q4_0", 4, 32, "0", 18, 8),
        GgmlType("q4_1", 4, 32, "1", 20, None),
        GgmlType("q5_0", 5, 32, "0", 22, 16),
        GgmlType("q5_1", 5, 32, "1", 24, None),
        GgmlType("q8_0", 8, 32, "0", 34, 128),
        GgmlType("iq4_nl", 4, 32, "nl", 18, 0),  # a 16-value non-linear codebook, one fp16 scale
        GgmlType("iq4_xs", 4, 256, "xs", 136, 0, sub=32, scale_bits=6),  # the same, 6-bit sub-scales
        # k-quants (block_q4_K ... block_q6_K): super-blocks of 256, a scale code per sub-block
        GgmlType("q2_K", 2, 256, "k", 84, None, sub=16, scale_bits=4),
        GgmlType("q3_K", 3, 256, "k", 110, 4, sub=16, scale_bits=6),
        GgmlType("q4_K", 4, 256, "k", 144, None, sub=32, scale_bits=6),
        GgmlType("q5_K", 5, 256, "k", 176, None, sub=32, scale_bits=6),
        GgmlType("q6_K", 6, 256, "k", 210, 32, sub=16, scale_bits=8),
    )
}
BY_NAME = {t.name: t for t in TYPES.values()}
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_WITH_MIN = {(t.bits, t.variant) for t in TYPES.values() if t.has_min}  # (bits, variant) names one type


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
        return {"scale_dtype": variant, "zero": "fp16" if (bits, variant) in _WITH_MIN else None}

    def check(self, config):
        ggml = TYPES.get(_key(config))
        if ggml is None:
            raise BitallocError(
                f"no ggml type is {_key(config)}: the ggml configs are {', '.join(TYPES)} "
                f"({', '.join(t.name for t in TYPES.values())})"
            )
        if (
            config.scale_bits is not None
            or config.scale_block_size is not None
            or config.search
            or config.gptq
        ):
            raise BitallocError(
                f"{ggml.config} ({ggml.name}) is ggml's own block: no scale codes, -mse or -gptq"
            )
        if config.zero != ("fp16" if ggml.has_min else None):
            want = "a min per block (zero='fp16')" if ggml.has_min else "no zero point"
            raise BitallocError(f"{ggml.config} ({ggml.name}) stores {want}, got zero={short(config.zero)}")

    def scale_format(self, config):
        return config.scale_dtype

    def tail(self, config):
        return ""

    def grid_config(self, bits, block_size, scale):
        """A grid point of the ggml family: the first type in `TYPES` with ``bits`` and ``block_size``
        (q4_0 before q4_1 and iq4_nl, iq4_xs before q4_K); the scale of the grid does not apply."""
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
        """ggml's block bytes, by part: codes; one fp16 scale d per block and, for q4_1/q5_1, one
        fp16 min m; for a k-quant a scale code (and a min code) per sub-block as ``scales`` (and
        ``zeros``) and the super-block's fp16 d (and dmin) as ``scales2``."""
        ggml = ggml_type(config)
        parts = {"codes": n_blocks * ggml.block * ggml.bits}
        if not ggml.k_quant:
            parts["scales"] = n_blocks * FP16_BITS
            if ggml.has_min:
                parts["zeros"] = n_blocks * FP16_BITS
            return parts
        codes = n_blocks * (ggml.block // ggml.sub) * ggml.scale_bits
        parts["scales"] = codes
        parts["scales2"] = n_blocks * FP16_BITS * (2 if ggml.has_min else 1)
        if ggml.has_min:
            parts["zeros"] = codes
        return parts

    def part_dtype(self, config, part):
        if part == "codes" or ggml_type(config).k_quant and part != "scales2":
            return torch.uint8  # bit-packed codes
        return torch.float16

    # ---- tensors -------------------------------------------------------------------------
    def quantize(self, blocks, config, weights):
        """ggml's reference quantizer on float32 blocks (..., out, n_blocks, B0); ``weights`` unused."""
        ggml = ggml_type(config)
        if ggml.k_quant:
            return _k_quantize(blocks, ggml).block_codes()
        if ggml.name == "q8_0":
            return _quantize_q8_0(blocks)
        if ggml.codebook:
            return _quantize_iq4_nl(blocks)
        return _quantize_min(blocks, ggml) if ggml.has_min else _quantize_symmetric(blocks, ggml)

    def fake_quantize(self, blocks, config, weights):
        ggml = ggml_type(config)
        if not ggml.k_quant:
            return super().fake_quantize(blocks, config, weights)
        k = _k_quantize(blocks, ggml)
        codes = k.codes.reshape(*k.codes.shape[:-3], -1)
        return self.dequantize(codes, k.scale_values(), k.min_values(), config)

    def dequantize(self, codes, scales, zeros, config):
        """ggml's dequantization in float32 per scale group: (q - offset)·d, q·d + m (q4_1, q5_1),
        or q·d - m (k-quants, d and m the sub-block's scale and min)."""
        ggml = ggml_type(config)
        q = codes.reshape(*scales.shape, ggml.group).float()
        if ggml.codebook:
            table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=codes.device)
            values = table[codes.reshape(*scales.shape, ggml.group).long()] * scales.unsqueeze(-1)
        elif not ggml.has_min:
            values = (q - ggml.offset) * scales.unsqueeze(-1)
        elif ggml.k_quant:
            values = (scales.unsqueeze(-1) * q) - zeros.float().unsqueeze(-1)
        else:
            values = (q * scales.unsqueeze(-1)) + zeros.float().unsqueeze(-1)
        return values.reshape(*values.shape[:-2], -1)

    def pack(self, parts, config, rows):
        ggml = ggml_type(config)
        if not ggml.k_quant:
            return super().pack(parts, config, rows)
        out = {"codes": pack_bits(parts.codes, ggml.bits)}
        out["scales"] = pack_bits(parts.scale_codes, ggml.scale_bits)
        out["scales2"] = parts.scales2.reshape(-1).clone()
        if ggml.has_min:
            out["zeros"] = pack_bits(parts.zeros, ggml.scale_bits)
        return out

    def scale_values(self, stored, config, shape):
        """float32 (out, scale groups per row): d, or for a k-quant d·(its scale code)."""
        ggml = ggml_type(config)
        if not ggml.k_quant:
            return super().scale_values(stored, config, shape)
        return _k_stored(stored, ggml, shape).scale_values().reshape(shape[0], -1)

    def zero_values(self, stored, config, shape):
        """fp16 m (out, blocks) of q4_1/q5_1; float32 dmin·(min code) of a k-quant; None without a min."""
        ggml = ggml_type(config)
        if not ggml.k_quant or not ggml.has_min:
            return super().zero_values(stored, config, shape)
        return _k_stored(stored, ggml, shape).min_values().reshape(shape[0], -1)


def _over(numerator: float, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, correctly rounded as C's float division (torch computes a Python
    number over a tensor as its reciprocal times the number: two roundings)."""
    return torch.tensor(numerator, dtype=denominator.dtype, device=denominator.device) / denominator


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1/d, and 0 where d is 0 (ggml: ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), _over(1.0, torch.where(d == 0, torch.ones_like(d), d)))


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


def _best_index(values: torch.Tensor) -> torch.Tensor:
    """best_index_int8 over `IQ4_NL_VALUES`: the nearest value's index, the upper one on a tie
    (2x >= v[i-1] + v[i], with integer sums: exact)."""
    sums = [float(low + high) for low, high in zip(IQ4_NL_VALUES[:-1], IQ4_NL_VALUES[1:], strict=True)]
    boundaries = torch.tensor(sums, dtype=values.dtype, device=values.device)
    return torch.bucketize(values + values, boundaries, right=True)  # how many sums are <= 2x


def _quantize_iq4_nl(blocks: torch.Tensor) -> BlockCodes:
    """quantize_iq4_nl without an importance matrix (what llama-quantize runs, ntry = 7): per block
    of 32 the scale of least x²-weighted error among 16 grids (`_iq4_scales`), stored as fp16;
    codes the nearest values of x/d."""
    x = blocks.movedim(-1, 0).contiguous()
    d = _iq4_scales(x)
    inverse = torch.where(d != 0, _over(1.0, torch.where(d != 0, d, torch.ones_like(d))), 0.0)
    return _block_codes(_best_index(inverse * x).movedim(0, -1), d)


def _iq4_scales(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_iq4_nl_impl's search on groups x (32, ...), elements first: from d = max/127,
    16 candidate grids, each refitted by x²-weighted least squares; the best scale per group."""
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32, device=x.device)
    w = x * x
    largest = _signed_max(x, 0)
    empty = largest.abs() < GROUP_MAX_EPS
    safe = torch.where(empty, torch.ones_like(largest), largest)

    def attempt(inverse):
        q = table[_best_index(inverse * x)]
        return _seq_sum(w * q * x), _seq_sum(w * q * q)

    sumqx, sumq2 = attempt(_over(1.0, -safe / IQ4_NL_VALUES[0]))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for itry in range(-7, 8):
        sqx, sq2 = attempt(_over(float(itry + IQ4_NL_VALUES[0]), safe))
        better = (sq2 > 0) & (sqx * sqx > best * sq2)
        d = torch.where(better, sqx / sq2, d)
        best = torch.where(better, d * sqx, best)
    return torch.where(empty, torch.zeros_like(d), d)


def _iq4_xs(x: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """quantize_iq4_xs without an importance matrix on (32, ..., super, 8): each sub-block's scale
    from `_iq4_scales`, quantized to a signed 6-bit code against -max/32 (stored + 32); codes the
    nearest codebook values of x over d·(scale code), d in float32 as C has it before storing."""
    scales = _iq4_scales(x)
    largest = _signed_max(scales, -1)
    largest = torch.where(largest.abs() > 0, largest, 0.0)  # C's max starts at +0
    d = -largest / 32
    inverse = torch.where(d != 0, _over(1.0, torch.where(d != 0, d, torch.ones_like(d))), 0.0)
    sc = torch.round(inverse.unsqueeze(-1) * scales).clamp_(-32, 31)
    step = d.unsqueeze(-1) * sc
    istep = torch.where(step != 0, _over(1.0, torch.where(step != 0, step, torch.ones_like(step))), 0.0)
    return _KBlocks(_best_index(istep * x), sc, None, d.to(torch.float16), None, _SCALE_BIAS["iq4_xs"])


# ---- k-quants: llama.cpp's reference quantizer (quantize_row_q{4,5,6}_K_ref), in torch ------------
# Vectorized over every sub-block; each sum over a sub-block's weights runs in C's order (one
# element at a time), each candidate scale in C's order, ties resolved as C's comparisons do.
GROUP_MAX_EPS = 1e-15  # ggml's threshold for an all-zero group
# make_qkx2_quants's search per type: (rmin, rdelta, nstep)
_SCALE_BIAS = {"q3_K": 32, "iq4_xs": 32}  # 6-bit codes of signed sub-block scales
_QKX2_SEARCH = {"q2_K": (-0.5, 0.1, 15), "q4_K": (-1.0, 0.1, 20), "q5_K": (-0.5, 0.1, 15)}


@dataclass
class _KBlocks:
    """A k-quant's blocks: codes (..., super, sub-blocks, sub) or None, integer scale codes and
    min codes (..., super, sub-blocks) as float32, the super-blocks' fp16 d and dmin (..., super)."""

    codes: torch.Tensor | None
    sc: torch.Tensor
    mc: torch.Tensor | None
    d: torch.Tensor
    dmin: torch.Tensor | None
    bias: int = 0  # the stored code of a scale of 0 (q3_K: 32); q6_K stores int8 bytes

    def scale_values(self) -> torch.Tensor:
        values = self.d.float().unsqueeze(-1) * self.sc
        return values.reshape(*values.shape[:-2], -1)

    def min_values(self) -> torch.Tensor | None:
        if self.mc is None:
            return None
        values = self.dmin.float().unsqueeze(-1) * self.mc
        return values.reshape(*values.shape[:-2], -1)

    def block_codes(self) -> BlockCodes:
        codes = self.codes.to(torch.uint8).reshape(*self.codes.shape[:-3], -1)
        sc = torch.remainder(self.sc + self.bias, 256).to(torch.uint8)  # q6_K: int8 scales as bytes
        sc = sc.reshape(*sc.shape[:-2], -1)
        halves = [self.d] if self.dmin is None else [self.d, self.dmin]
        mc = None if self.mc is None else self.mc.to(torch.uint8).reshape(*self.mc.shape[:-2], -1)
        return BlockCodes(codes, self.scale_values(), sc, torch.stack(halves, dim=-1), None, mc)


def _k_stored(stored: dict, ggml: GgmlType, shape) -> _KBlocks:
    """The scale and min codes and the super-blocks' d (dmin) of a packed k-quant matrix."""
    rows, n_super = shape[0], -(-shape[1] // ggml.block)
    per = ggml.block // ggml.sub
    count = rows * n_super * per
    sc = unpack_bits(stored["scales"], ggml.scale_bits, count)
    bias = _SCALE_BIAS.get(ggml.name, 0)
    sc = (sc.view(torch.int8) if ggml.scale_bits == 8 else sc).float().sub_(bias).reshape(rows, n_super, per)
    halves = stored["scales2"].reshape(rows, n_super, -1)
    mc = None
    if ggml.has_min:
        mc = unpack_bits(stored["zeros"], ggml.scale_bits, count).float().reshape(rows, n_super, per)
    return _KBlocks(None, sc, mc, halves[..., 0], halves[..., 1] if ggml.has_min else None, bias)


def _k_quantize(blocks: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """A k-quant of float32 super-blocks (..., out, n_super, 256). The sub-blocks' elements go
    first, (sub, ..., n_super, sub-blocks): each of C's per-element steps is then one pass over
    contiguous memory for every group at once."""
    sub = blocks.reshape(*blocks.shape[:-1], ggml.block // ggml.sub, ggml.sub)
    x = sub.movedim(-1, 0).contiguous()
    k = {"q2_K": _q2_k, "q3_K": _q3_k, "q6_K": _q6_k, "iq4_xs": _iq4_xs}.get(ggml.name, _q45_k)(x, ggml)
    k.codes = k.codes.movedim(0, -1)
    return k


def _seq_sum(terms: torch.Tensor) -> torch.Tensor:
    """Sum over the first dimension one element at a time, in order (C's loop, not a tree)."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _signed_max(values: torch.Tensor, dim: int) -> torch.Tensor:
    """The value of largest magnitude along ``dim``, the first one on ties."""
    return values.gather(dim, values.abs().argmax(dim=dim, keepdim=True)).squeeze(dim)


def _make_qx_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, NULL) on groups x (n, ...): (codes L + nmax,
    scale), the scale of least x²-weighted error among 19 candidate grids."""
    largest = _signed_max(x, 0)
    w = x * x

    def attempt(iscale):
        levels = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
        return levels, _seq_sum(w * x * levels), _seq_sum(w * levels * levels)

    levels, sumlx, suml2 = attempt(_over(-nmax, largest))
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    tenth = torch.tensor(0.1, dtype=torch.float32)
    for step in [*range(-9, 0), *range(1, 10)]:
        candidate, slx, sl2 = attempt(-(nmax + tenth * step) / largest)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, candidate, levels)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    zero = largest.abs() < GROUP_MAX_EPS
    codes = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def _q6_k(x: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """quantize_row_q6_K_ref on (16, ..., super, 16): int8 sub-block scales against -128/max."""
    codes, scales = _make_qx_quants(x, 32)
    largest = _signed_max(scales, -1)
    empty = largest.abs() < GROUP_MAX_EPS
    iscale = _over(-128.0, torch.where(empty, torch.ones_like(largest), largest))
    d = _over(1.0, iscale).to(torch.float16)
    sc = torch.round(iscale.unsqueeze(-1) * scales).clamp_(max=127)
    step = d.float().unsqueeze(-1) * sc
    requantized = torch.round(x / step).clamp_(-32, 31) + 32
    codes = torch.where(step != 0, requantized, codes)
    zero = empty.unsqueeze(-1)
    codes = torch.where(zero, torch.zeros_like(codes), codes)
    sc = torch.where(zero, torch.zeros_like(sc), sc)
    return _KBlocks(codes, sc, None, torch.where(empty, torch.zeros_like(d), d), None)


# shape: make_qkx2_quants's state (codes, scale, min, error) updated per candidate, as in C
def _make_qkx2_quants(x: torch.Tensor, w: torch.Tensor, nmax: int, search: tuple, mad: bool = False):
    """make_qkx2_quants(n, nmax, x, weights, ..., use_mad) on groups x (n, ...): (codes, scale,
    -min), an affine grid q·scale + min (min <= 0) refitted by weighted least squares; the grid
    of least weighted squared (``mad``: absolute) error wins."""
    rmin, rdelta, nstep = search

    def loss(diff):
        return diff.abs() if mad else diff * diff

    low = x.amin(0).clamp(max=0)
    high = x.amax(0)
    sum_w, sum_x = _seq_sum(w), _seq_sum(w * x)
    span = high - low
    flat = high == low
    span = torch.where(flat, torch.ones_like(span), span)
    iscale = _over(nmax, span)
    codes = torch.round(iscale * (x - low)).clamp_(0, nmax)
    scale = _over(1.0, iscale)
    best = _seq_sum(w * loss(scale * codes + low - x))
    delta = torch.tensor(rdelta, dtype=torch.float32)
    for step in range(nstep + 1):
        iscale = (rmin + delta * step + nmax) / (high - low)
        levels = torch.round(iscale * (x - low)).clamp_(0, nmax)
        weighted = w * levels
        sum_l, sum_l2, sum_xl = _seq_sum(weighted), _seq_sum(weighted * levels), _seq_sum(weighted * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        error = _seq_sum(w * loss(this_scale * levels + this_min - x))
        better = (det > 0) & (error < best) & ~flat
        codes = torch.where(better, levels, codes)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    codes = torch.where(flat, torch.zeros_like(codes), codes)
    return codes, torch.where(flat, torch.zeros_like(scale), scale), -low


def _q45_k(x: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """quantize_row_q4_K_ref / q5_K_ref on (32, ..., super, 8): 6-bit scale and min codes."""
    nmax = 2**ggml.bits - 1
    # sqrtf is correctly rounded; torch's float32 sqrt can be one ulp off: through float64 it is exact
    av_x = torch.sqrt((_seq_sum(x * x) / 32).double()).float()
    codes, scales, mins = _make_qkx2_quants(x, av_x + x.abs(), nmax, _QKX2_SEARCH[ggml.name])
    # C starts its maxima at +0 (a -0 min, from -(+0), must not make dmin -0 in fp16)
    max_scale, max_min = (torch.where(v > 0, v, 0.0) for v in (scales.amax(-1), mins.amax(-1)))

    def code(values, top):  # uint8_t ls = nearest_int(63/top·v), then MIN(63, ls)
        inverse = torch.where(top > 0, _over(63.0, torch.where(top > 0, top, torch.ones_like(top))), 0.0)
        return torch.remainder(torch.round(inverse.unsqueeze(-1) * values), 256).clamp_(max=63)

    sc, mc = code(scales, max_scale), code(mins, max_min)
    d, dmin = (max_scale / 63.0).to(torch.float16), (max_min / 63.0).to(torch.float16)
    step = d.float().unsqueeze(-1) * sc
    shift = dmin.float().unsqueeze(-1) * mc
    requantized = torch.round((x + shift) / step).clamp_(0, nmax)
    codes = torch.where(step != 0, requantized, codes)
    return _KBlocks(codes, sc, mc, d, dmin)


# shape: make_q3_quants's coordinate descent, one element at a time as in C
def _make_q3_quants(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) on groups x (n, ...): (codes L + nmax, scale).
    From the grid of the largest value, each element in turn moves to the level that most lowers
    the x²-weighted error of the least-squares scale, for 5 passes (a pass that changes nothing
    changes nothing again: C's early stop gives the same result)."""
    largest = _signed_max(x, 0)
    zero = largest.abs() < GROUP_MAX_EPS
    iscale = _over(float(-nmax), torch.where(zero, torch.ones_like(largest), largest))
    levels = torch.round(iscale * x).clamp_(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx, suml2 = _seq_sum(wx * levels), _seq_sum(w * levels * levels)
    rows = list(levels.unbind(0))
    for _ in range(5):
        for i, level in enumerate(rows):
            slx = sumlx - wx[i] * level
            sl2 = suml2 - w[i] * level * level
            new = torch.round(x[i] * sl2 / slx).clamp_(-nmax, nmax - 1)
            slx_new = slx + wx[i] * new
            sl2_new = sl2 + w[i] * new * new
            take = (slx > 0) & (new != level) & (sl2_new > 0)
            take &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
            rows[i] = torch.where(take, new, level)
            sumlx = torch.where(take, slx_new, sumlx)
            suml2 = torch.where(take, sl2_new, suml2)
    levels = torch.stack(rows)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    codes = torch.where(zero, torch.zeros_like(levels), levels + nmax)
    return codes, torch.where(zero, torch.zeros_like(scale), scale)


def _q3_k(x: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """quantize_row_q3_K_ref on (16, ..., super, 16): signed 6-bit sub-block scales against
    -32/max (stored + 32), codes q + 4 of 3 bits."""
    codes, scales = _make_q3_quants(x, 4)
    largest = _signed_max(scales, -1)
    empty = largest == 0
    iscale = _over(-32.0, torch.where(empty, torch.ones_like(largest), largest))
    sc = torch.round(iscale.unsqueeze(-1) * scales).clamp_(-32, 31)
    sc = torch.where(empty.unsqueeze(-1), torch.full_like(sc, -32.0), sc)  # all codes 0: scale -32
    d = torch.where(empty, torch.zeros_like(iscale), _over(1.0, iscale)).to(torch.float16)
    step = d.float().unsqueeze(-1) * sc
    requantized = torch.round(x / step).clamp_(-4, 3) + 4
    codes = torch.where(step != 0, requantized, codes)
    return _KBlocks(codes, sc, None, d, None, _SCALE_BIAS["q3_K"])


def _q2_k(x: torch.Tensor, ggml: GgmlType) -> _KBlocks:
    """quantize_row_q2_K_ref on (16, ..., super, 16): 4-bit scale and min codes, one byte each
    sub-block (scale | min << 4), against the super-block's largest scale and min over 15."""
    codes, scales, mins = _make_qkx2_quants(x, x.abs(), 3, _QKX2_SEARCH["q2_K"], mad=True)
    max_scale, max_min = (torch.where(v > 0, v, 0.0) for v in (scales.amax(-1), mins.amax(-1)))

    def code(values, top):  # nearest_int(15/top·v) as C stores it: a byte, the min shifted by 4
        inverse = torch.where(top > 0, _over(15.0, torch.where(top > 0, top, torch.ones_like(top))), 0.0)
        return torch.round(inverse.unsqueeze(-1) * values).to(torch.int32)

    byte = (code(scales, max_scale) | (code(mins, max_min) << 4)) & 0xFF
    sc, mc = (byte & 15).float(), (byte >> 4).float()
    d, dmin = (max_scale / 15.0).to(torch.float16), (max_min / 15.0).to(torch.float16)
    step = d.float().unsqueeze(-1) * sc
    shift = dmin.float().unsqueeze(-1) * mc
    requantized = torch.round((x + shift) / step).clamp_(0, 3)
    codes = torch.where(step != 0, requantized, codes)
    return _KBlocks(codes, sc, mc, d, dmin)


# ---- ggml's block layout ------------------------------------------------------------------------
def to_ggml_bytes(quantized) -> torch.Tensor:
    """The matrix as ggml stores it: uint8 (rows, blocks per row · block bytes), each block laid
    out as ggml's ``block_q*`` struct (fp16 d[, fp16 m][, high bits qh], low bits qs), equal to
    ``gguf.quants.quantize``'s bytes. ``quantized``: a `QuantizedTensor` of a ggml config (on any
    device; the bytes are on the CPU)."""
    quantized = quantized.to("cpu")
    ggml = ggml_type(quantized.config)
    rows = quantized.shape[0]
    codes = quantized.unpacked_codes().reshape(rows, -1, ggml.block)
    if ggml.k_quant:
        return _k_bytes(codes, _k_stored(quantized.tensors(), ggml, quantized.shape), ggml).reshape(rows, -1)
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


def _k_bytes(codes: torch.Tensor, k: _KBlocks, ggml: GgmlType) -> torch.Tensor:
    """block_q4_K / q5_K (d, dmin, 12 bytes of 6-bit scales and mins[, qh], qs) or block_q6_K
    (ql, qh, int8 scales, d) for codes (rows, super, 256): uint8 (rows, super, block bytes)."""
    as_bytes = [h.contiguous().reshape(*h.shape, 1).view(torch.uint8) for h in (k.d, k.dmin) if h is not None]
    if ggml.name == "q6_K":
        quarters = codes.reshape(*codes.shape[:-1], 2, 4, 32)  # two halves of 128: four runs of 32
        low, high = quarters & 0x0F, quarters >> 4
        ql = torch.cat([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], -1)
        qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
        sc = torch.remainder(k.sc, 256).to(torch.uint8)
        return torch.cat([ql.flatten(-2), qh.flatten(-2), sc, as_bytes[0]], dim=-1)
    if ggml.name == "iq4_xs":  # d, scales_h (uint16: 2 high bits each), scales_l (4: nibbles), qs (128)
        c = torch.remainder(k.sc + k.bias, 256).to(torch.int32)
        high = ((c >> 4) << (2 * torch.arange(8, dtype=torch.int32))).sum(-1)
        scales_l = (c[..., 0::2] & 15) | ((c[..., 1::2] & 15) << 4)
        halves = codes.reshape(*codes.shape[:-1], 8, 2, 16)
        qs = (halves[..., 0, :] | (halves[..., 1, :] << 4)).flatten(-2)
        return torch.cat([*as_bytes, _le_bytes(high, 2), scales_l.to(torch.uint8), qs], dim=-1)
    if ggml.name == "q3_K":  # hmask (32: bit b of byte m is code 32b + m > 3), qs (64), scales (12), d
        runs = codes.reshape(*codes.shape[:-1], 8, 32)
        hmask = ((runs >> 2) << torch.arange(8, dtype=torch.uint8).reshape(8, 1)).sum(-2, dtype=torch.uint8)
        quarters = (codes & 3).reshape(*codes.shape[:-1], 2, 4, 32)
        qs = (
            quarters[..., 0, :]
            | (quarters[..., 1, :] << 2)
            | (quarters[..., 2, :] << 4)
            | (quarters[..., 3, :] << 6)
        )
        c = torch.remainder(k.sc + k.bias, 256).to(torch.uint8)
        high = (c >> 4).reshape(*c.shape[:-1], 4, 4) << (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1)
        scales = torch.cat(
            [(c[..., :8] & 15) | ((c[..., 8:] & 15) << 4), high.sum(-2, dtype=torch.uint8)], -1
        )
        return torch.cat([hmask, qs.flatten(-2), scales, *as_bytes], dim=-1)
    ls, lm = k.sc.to(torch.uint8), k.mc.to(torch.uint8)
    if ggml.name == "q2_K":  # scales (16), qs (64: four 2-bit codes per byte), d, dmin
        quarters = codes.reshape(*codes.shape[:-1], 2, 4, 32)
        qs = (
            quarters[..., 0, :]
            | (quarters[..., 1, :] << 2)
            | (quarters[..., 2, :] << 4)
            | (quarters[..., 3, :] << 6)
        )
        return torch.cat([ls | (lm << 4), qs.flatten(-2), *as_bytes], dim=-1)
    scales = torch.cat(
        [
            ls[..., :4] | ((ls[..., 4:] >> 4) << 6),
            lm[..., :4] | ((lm[..., 4:] >> 4) << 6),
            (ls[..., 4:] & 0x0F) | ((lm[..., 4:] & 0x0F) << 4),
        ],
        dim=-1,
    )
    pairs = codes.reshape(*codes.shape[:-1], 4, 2, 32)  # four runs of 64: low and high 32
    qs = ((pairs[..., 0, :] & 0x0F) | ((pairs[..., 1, :] & 0x0F) << 4)).flatten(-2)
    fields = [*as_bytes, scales]
    if ggml.bits == 5:
        bits = (pairs >> 4).to(torch.uint8)  # (..., 4, 2, 32): bit 2·run + half of qh[j]
        shifts = torch.arange(8, dtype=torch.uint8).reshape(4, 2, 1)
        fields.append((bits << shifts).sum(dim=(-3, -2), dtype=torch.uint8))
    return torch.cat([*fields, qs], dim=-1)


def from_ggml_bytes(data, config: QuantConfig | str, shape: tuple[int, int]):
    """A `QuantizedTensor` from ggml's blocks (the inverse of `to_ggml_bytes`): uint8 (rows, row bytes)."""
    from .packed import QuantizedTensor

    config = QuantConfig.parse(config)
    ggml = ggml_type(config)
    rows, cols = int(shape[0]), int(shape[1])
    if cols % ggml.block:
        raise BitallocError(f"rows of {cols} are not whole {ggml.name} blocks of {ggml.block}")
    blocks = torch.as_tensor(data, dtype=torch.uint8).reshape(rows, cols // ggml.block, ggml.block_bytes)
    if ggml.k_quant:
        return QuantizedTensor.from_tensors(_k_parts(blocks, ggml), config, (rows, cols))
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


def _half(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 value at byte ``start`` of each block (rows, super)."""
    return blocks[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1)


def _k_parts(blocks: torch.Tensor, ggml: GgmlType) -> dict[str, torch.Tensor]:
    """The stored parts of a k-quant matrix from its blocks (rows, super, block bytes)."""
    lead = blocks.shape[:-1]
    if ggml.name == "q6_K":  # ql: per half of 128, runs 0|2 and 1|3 as low|high nibbles; qh: 2 bits each
        ql = blocks[..., :128].reshape(*lead, 2, 2, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
        qh = blocks[..., 128:192].reshape(*lead, 2, 1, 32) >> shifts
        low = torch.stack(
            [ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], -2
        )
        codes = low | ((qh & 3) << 4)
        parts = {"codes": pack_bits(codes, 6), "scales": pack_bits(blocks[..., 192:208], 8)}
        return {**parts, "scales2": _half(blocks, 208).reshape(-1).clone()}
    if ggml.name == "iq4_xs":
        high = blocks[..., 2].to(torch.int32) | (blocks[..., 3].to(torch.int32) << 8)
        high = (high.unsqueeze(-1) >> (2 * torch.arange(8, dtype=torch.int32))) & 3
        low = torch.stack([blocks[..., 4:8] & 15, blocks[..., 4:8] >> 4], dim=-1).flatten(-2)
        qs = blocks[..., 8:].reshape(*lead, 8, 1, 16)
        codes = torch.cat([qs & 15, qs >> 4], dim=-2)
        c = low.to(torch.int32) | (high << 4)
        return {
            "codes": pack_bits(codes, 4),
            "scales": pack_bits(c, 6),
            "scales2": _half(blocks, 0).reshape(-1).clone(),
        }
    if ggml.name == "q3_K":
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).reshape(4, 1)
        low = (blocks[..., 32:96].reshape(*lead, 2, 1, 32) >> shifts) & 3
        bits = torch.arange(8, dtype=torch.uint8).reshape(8, 1)
        high = ((blocks[..., :32].unsqueeze(-2) >> bits) & 1).reshape(*lead, 2, 4, 32)
        packed = blocks[..., 96:108]
        high_scale = (
            packed[..., 8:].unsqueeze(-2) >> (2 * torch.arange(4, dtype=torch.uint8)).reshape(4, 1)
        ) & 3
        c = torch.cat([packed[..., :8] & 15, packed[..., :8] >> 4], -1) | (high_scale.flatten(-2) << 4)
        return {
            "codes": pack_bits(low | (high << 2), 3),
            "scales": pack_bits(c, 6),
            "scales2": _half(blocks, 108).reshape(-1).clone(),
        }
    return _k_parts_with_min(blocks, ggml)


def _k_parts_with_min(blocks: torch.Tensor, ggml: GgmlType) -> dict[str, torch.Tensor]:
    """`_k_parts` of q2_K, q4_K and q5_K (scale and min codes, d and dmin)."""
    lead = blocks.shape[:-1]
    if ggml.name == "q2_K":
        quarters = blocks[..., 16:80].reshape(*lead, 2, 1, 32) >> torch.tensor(
            [0, 2, 4, 6], dtype=torch.uint8
        ).reshape(4, 1)
        byte = blocks[..., :16]
        return {
            "codes": pack_bits(quarters & 3, 2),
            "scales": pack_bits(byte & 15, 4),
            "scales2": torch.stack([_half(blocks, 80), _half(blocks, 82)], dim=-1).reshape(-1).clone(),
            "zeros": pack_bits(byte >> 4, 4),
        }
    packed = blocks[..., 4:16]
    ls = torch.cat([packed[..., :4] & 63, (packed[..., 8:] & 0x0F) | ((packed[..., :4] >> 6) << 4)], -1)
    lm = torch.cat([packed[..., 4:8] & 63, (packed[..., 8:] >> 4) | ((packed[..., 4:8] >> 6) << 4)], -1)
    qs = blocks[..., -128:].reshape(*lead, 4, 1, 32)
    codes = torch.cat([qs & 0x0F, qs >> 4], dim=-2)  # (..., 4 runs, low/high 32, 32)
    if ggml.bits == 5:
        shifts = torch.arange(8, dtype=torch.uint8).reshape(4, 2, 1)
        codes = codes | (((blocks[..., 16:48].unsqueeze(-2).unsqueeze(-2) >> shifts) & 1) << 4)
    halves = torch.stack([_half(blocks, 0), _half(blocks, 2)], dim=-1)
    return {
        "codes": pack_bits(codes, ggml.bits),
        "scales": pack_bits(ls, 6),
        "scales2": halves.reshape(-1).clone(),
        "zeros": pack_bits(lm, 6),
    }


def _le_bytes(words: torch.Tensor, count: int) -> torch.Tensor:
    """int64 words (...) as ``count`` little-endian bytes (..., count), uint8."""
    shifts = torch.arange(count, dtype=torch.int64) * 8
    return ((words.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8)


GGML = register_format(GgmlFamily())
