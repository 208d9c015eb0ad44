"""Quantization configs: the config string grammar, nominal bits/param and exact storage.

The config string is the authority (README, "Config strings"). Every string starts
``{family}{bits}-b{B0}-s``; the family (a registered `formats.Format`) reads the rest, checks
the fields and says what is stored. The built-in families take:

    {nf|int}{k}-b{B0}-s{fp32|fp16|bf16}            float scales, one per block of B0
    {nf|int}{k}-b{B0}-s{b0}b{B1}[fp16|bf16]        scales quantized to b0 bits in groups
                                                   of B1, one second-level scale per group
                                                   (fp32 unless a suffix says otherwise)
    uint{k}-b{B0}-s{fp32|fp16|bf16}-z{k}           asymmetric: unsigned k-bit codes q, a float
                                                   scale s and a k-bit integer zero point z per
                                                   block, w = (q - z)·s (GPTQ, compressed-tensors,
                                                   torchao)
    uint{k}-b{B0}-s{dtype}-z{dtype}                the same with a float zero point in the scale's
                                                   dtype, computed in that dtype (HQQ)

Any of them may end in ``-mse``: each block's scale (and zero) is searched for the least
(weighted) squared error instead of taken from the block's range; the storage is the same.
And in ``-gptq`` (after ``-mse`` when both): the codes are chosen column by column with GPTQ's
error feedback through the layer's input covariance (`bitalloc.quant.rounding`), for the output
objective; without a full covariance (the weight and activation objectives) it is nearest
rounding. The storage is the same.

llama.cpp's types (`bitalloc.quant.ggml`), each ggml's block and bytes exactly:

    ggml{bits}-b{block}-s{variant}                 the ggml type q{bits}_{variant}: ggml4-b32-s0
                                                   (q4_0), ggml4-b32-s1 (q4_1), ggml5-b32-s0,
                                                   ggml5-b32-s1, ggml8-b32-s0 (q8_0),
                                                   ggml4-b32-snl (iq4_nl), ggml4-b256-sxs
                                                   (iq4_xs), and the
                                                   k-quants ggml{2|3|4|5|6}-b256-sk (q2_K, q3_K,
                                                   q4_K, q5_K, q6_K)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import BitallocError
from .formats import (
    FLOAT_DTYPE_BITS,
    GPTQ_SUFFIX,
    SCALE_BLOCK_SIZE_RANGE,
    SEARCH_SUFFIX,
    SUPPORTED_BITS,
    SUPPORTED_SCALE_BITS,
    check_range,
    format_names,
    format_of,
    get_format,
    parse_digits,
    scale_regex,
    set_int,
    short,
)

__all__ = [
    "BLOCK_SIZE_RANGE",
    "FLOAT_DTYPE_BITS",
    "GPTQ_SUFFIX",
    "GRAMMAR",
    "METHODS",
    "SCALE_BLOCK_SIZE_RANGE",
    "SEARCH_SUFFIX",
    "SUPPORTED_BITS",
    "SUPPORTED_SCALE_BITS",
    "QuantConfig",
    "grammar",
    "storage_bits",
]

BLOCK_SIZE_RANGE = (8, 4096)  # B0: elements per block (one scale each)
METHODS = ("nf", "int", "uint")  # the built-in families (`standard`); format_names(): all registered

GRAMMAR = (
    "{nf|int}{2|3|4|8}-b{B0}-s{fp32|fp16|bf16} or {nf|int}{2|3|4|8}-b{B0}-s{2|3|4|8}b{B1}[fp16|bf16] "
    "or uint{k}-b{B0}-s{fp32|fp16|bf16}-z{k|the scale's dtype}, each optionally ending in [-mse][-gptq], "
    "with B0 from 8 to 4096 and B1 from 2 to 65536, e.g. nf4-b64-sfp32, nf2-b64-s8b256-mse-gptq, "
    "uint4-b128-sfp16-z4, uint2-b64-sfp16-zfp16-mse"
)

# The head every family shares; the family's own `scale_pattern` reads the rest (ASCII only).
_HEAD_RE = re.compile(r"(?P<method>[a-z]+)(?P<bits>[0-9]+)-b(?P<block>[0-9]+)-s(?P<rest>.*)")


def grammar() -> str:
    """The config grammar: the built-in families' (`GRAMMAR`), then each registered family's piece."""
    pieces = [get_format(name).grammar for name in format_names()]
    return "; ".join([GRAMMAR, *(piece for piece in pieces if piece)])


def _expected(head: re.Match | None) -> str:
    """The grammar a bad config string is told: its family's piece when the head names a family
    that has one, else the built-in families' and the other families' names (one short line)."""
    if head and head["method"] in format_names() and get_format(head["method"]).grammar:
        return get_format(head["method"]).grammar
    others = [name for name in format_names() if get_format(name).grammar]
    return GRAMMAR + (f"; also {', '.join(others)}" if others else "")


@dataclass(frozen=True, order=True)
class QuantConfig:
    """One way to quantize a matrix: format family, bits, block size and how scales are stored.

    ``method`` names the family (`bitalloc.quant.formats`), which says what the other fields
    may hold. In the standard families: ``scale_bits is None`` means scales are stored as
    ``scale_dtype`` floats; otherwise scales are quantized to ``scale_bits``-bit unsigned codes
    in groups of ``scale_block_size`` with one ``second_level`` float per group.

    ``method`` "uint" (asymmetric) stores a zero point per block: ``zero`` "int" (a
    ``bits``-bit integer) or the scale's float dtype; the other methods have ``zero`` None.
    ``search`` (the ``-mse`` suffix) searches each block's scale (and zero) for the least
    squared error (`bitalloc.quant.blockwise.search_scales`, `affine_params`). ``gptq`` (the ``-gptq`` suffix)
    chooses the codes with error feedback through the input covariance (`bitalloc.quant.rounding`).
    """

    method: str = "nf"
    bits: int = 4
    block_size: int = 64
    scale_dtype: str = "fp32"
    scale_bits: int | None = None
    scale_block_size: int | None = None
    second_level: str = "fp32"
    zero: str | None = None
    search: bool = False
    gptq: bool = False

    def __post_init__(self) -> None:
        """BitallocError (one line, naming the field) unless every field is supported."""
        family = get_format(self.method)
        set_int(self, "bits", "bits")
        if self.bits not in family.bits:
            raise BitallocError(
                f"unsupported bits {self.bits}: supported are {', '.join(map(str, family.bits))}"
            )
        set_int(self, "block_size", "block size B0")
        check_range(self.block_size, BLOCK_SIZE_RANGE, "block size B0")
        family.check(self)
        if not isinstance(self.search, bool):
            raise BitallocError(f"search must be True or False, got {short(self.search)}")
        if not isinstance(self.gptq, bool):
            raise BitallocError(f"gptq must be True or False, got {short(self.gptq)}")

    # ---- parsing and printing -------------------------------------------------------
    @classmethod
    def parse(cls, text: str | QuantConfig) -> QuantConfig:
        """Parse a config string such as ``nf2-b64-s8b256``.

        BitallocError (a ValueError) for anything else, on one line: the grammar for a
        string that does not match it, the field and its supported values for one that does.
        """
        if isinstance(text, QuantConfig):
            return text
        if not isinstance(text, str):
            raise BitallocError(
                f"config must be a string such as nf2-b64-s8b256, got {type(text).__name__} {short(text)}"
            )
        head = _HEAD_RE.fullmatch(text.strip())
        rest = None
        if head and head["method"] in format_names():
            rest = scale_regex(head["method"]).fullmatch(head["rest"])
        if rest is None:
            raise BitallocError(f"unknown config string {short(text)}: expected {_expected(head)}")
        try:
            bits = parse_digits(head["bits"], "bits")
            block_size = parse_digits(head["block"], "block size B0")
            fields = dict(method=head["method"], bits=bits, block_size=block_size)
            fields.update(get_format(head["method"]).fields(rest.groupdict(), bits))
            return cls(**fields)
        except BitallocError as exc:
            raise BitallocError(f"config {short(text)}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.method}{self.bits}-b{self.block_size}-s{self.scale_format}{self.tail}"

    @property
    def scale_format(self) -> str:
        """What follows ``-s``: ``fp16``, ``8b256``, ``8b64fp16`` (the family's grammar piece)."""
        return format_of(self).scale_format(self)

    @property
    def tail(self) -> str:
        """The zero point, search and rounding suffixes (``-z4``, ``-zfp16``, ``-mse``, ``-gptq``), or ''."""
        return format_of(self).tail(self)

    @property
    def asymmetric(self) -> bool:
        """Whether blocks store a zero point (method uint)."""
        return self.zero is not None

    @property
    def zero_bits(self) -> int:
        """Bits of one stored zero point (0 for the symmetric codebooks)."""
        if self.zero is None:
            return 0
        return self.bits if self.zero == "int" else FLOAT_DTYPE_BITS[self.zero]

    @property
    def name(self) -> str:
        return str(self)

    @property
    def quantized_scales(self) -> bool:
        return self.scale_bits is not None

    # ---- storage -------------------------------------------------------------------
    @property
    def bits_per_param(self) -> float:
        """Nominal bits per parameter, b + b0/B0 + b1/(B0*B1) (+ zero bits/B0) (display only)."""
        return format_of(self).bits_per_param(self)

    def num_blocks(self, shape: tuple[int, ...] | list[int]) -> int:
        rows, cols = _matrix_dims(shape)
        return rows * -(-cols // self.block_size)  # exact integer ceiling, any size

    def fits(self, shape: tuple[int, ...] | list[int]) -> bool:
        """Whether this config is a candidate for a matrix of ``shape`` (its family says:
        `Format.fits`; the standard families pad rows and fit every shape, ggml types need rows
        that are whole blocks)."""
        return format_of(self).fits(self, _matrix_dims(shape)[1])

    def storage_bits(self, shape: tuple[int, ...] | list[int]) -> int:
        """Exact bits written for a matrix of ``shape``: codes (with row padding) + scales."""
        return sum(self.storage_bits_parts(shape).values())

    def storage_bits_parts(self, shape: tuple[int, ...] | list[int]) -> dict[str, int]:
        """Bits of each stored tensor: ``codes``, ``scales``, (if quantized) ``scales2`` and
        (if asymmetric) ``zeros`` in the standard families; the family says (`Format.storage_parts`)."""
        return format_of(self).storage_parts(self, self.num_blocks(shape))

    def to_dict(self) -> dict:
        """The plan JSON's per-module description of this config."""
        return {
            "config": str(self),
            "method": self.method,
            "bits": self.bits,
            "block_size": self.block_size,
            "scale": format_of(self).scale_dict(self),
            "bits_per_param": round(self.bits_per_param, 6),
        }


def _matrix_dims(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    """(rows, cols) as ints; BitallocError for anything but two positive integers."""
    try:
        dims = tuple(int(s) for s in shape)
        exact = len(dims) == len(shape) and all(
            not isinstance(s, bool) and d == s for d, s in zip(dims, shape, strict=True)
        )
    except (TypeError, ValueError, OverflowError):
        exact = False
    if not exact or len(dims) != 2 or dims[0] < 1 or dims[1] < 1:
        raise BitallocError(f"expected a non-empty 2-D matrix shape (rows, cols), got {short(shape)}")
    return dims


def storage_bits(shape: tuple[int, ...] | list[int], config: str | QuantConfig) -> int:
    """Exact storage in bits of a (out, in) matrix quantized with ``config``."""
    return QuantConfig.parse(config).storage_bits(shape)
