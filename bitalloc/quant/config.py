"""Quantization configs: the config string grammar, nominal bits/param and exact storage.

The config string is the authority (README, "Config strings"):

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
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass

from ..errors import BitallocError

METHODS = ("nf", "int", "uint")
SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}
SUPPORTED_SCALE_BITS = (2, 3, 4, 8)  # scale codes are stored as uint8
BLOCK_SIZE_RANGE = (8, 4096)  # B0: elements per block (one scale each)
SCALE_BLOCK_SIZE_RANGE = (2, 65536)  # B1: scales per second-level group

SEARCH_SUFFIX = "-mse"
GRAMMAR = (
    "{nf|int}{2|3|4|8}-b{B0}-s{fp32|fp16|bf16} or {nf|int}{2|3|4|8}-b{B0}-s{2|3|4|8}b{B1}[fp16|bf16] "
    "or uint{k}-b{B0}-s{fp32|fp16|bf16}-z{k|the scale's dtype}, each optionally ending in -mse, "
    "with B0 from 8 to 4096 and B1 from 2 to 65536, e.g. nf4-b64-sfp32, nf2-b64-s8b256, "
    "int3-b128-s8b64fp16, uint4-b128-sfp16-z4, uint2-b64-sfp16-zfp16-mse"
)

# ASCII digits only (``\d`` would also take other scripts' digits)
_CONFIG_RE = re.compile(
    r"(?P<method>nf|int|uint)(?P<bits>[0-9]+)-b(?P<block>[0-9]+)-s"
    r"(?:(?P<sfloat>fp32|fp16|bf16)|(?P<sbits>[0-9]+)b(?P<sblock>[0-9]+)(?P<second>fp16|bf16|fp32)?)"
    r"(?:-z(?P<zero>fp32|fp16|bf16|[0-9]+))?(?P<search>-mse)?"
)
_MAX_DIGITS = 9  # no supported field has more digits (leading zeros aside)


@dataclass(frozen=True, order=True)
class QuantConfig:
    """One way to quantize a matrix: codebook, bits, block size and how scales are stored.

    ``scale_bits is None`` means scales are stored as ``scale_dtype`` floats; otherwise
    scales are quantized to ``scale_bits``-bit unsigned codes in groups of
    ``scale_block_size`` with one ``second_level`` float per group.

    ``method`` "uint" (asymmetric) stores a zero point per block: ``zero`` "int" (a
    ``bits``-bit integer) or the scale's float dtype; the other methods have ``zero`` None.
    ``search`` (the ``-mse`` suffix) searches each block's scale (and zero) for the least
    squared error (`bitalloc.quant.blockwise.block_params`).
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

    def __post_init__(self) -> None:
        """BitallocError (one line, naming the field) unless every field is supported."""
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise BitallocError(
                f"unknown quantization method {_short(self.method)}: expected nf, int or uint"
            )
        self._set_int("bits", "bits")
        if self.bits not in SUPPORTED_BITS:
            raise BitallocError(
                f"unsupported bits {self.bits}: supported are {', '.join(map(str, SUPPORTED_BITS))}"
            )
        self._set_int("block_size", "block size B0")
        _check_range(self.block_size, BLOCK_SIZE_RANGE, "block size B0")
        if self.scale_bits is None:
            if not isinstance(self.scale_dtype, str) or self.scale_dtype not in FLOAT_DTYPE_BITS:
                raise BitallocError(f"unknown scale dtype {_short(self.scale_dtype)}: fp32, fp16 or bf16")
            if self.scale_block_size is not None or self.second_level != "fp32":
                raise BitallocError(
                    "float scales (scale_bits None) take no scale_block_size (B1) and no second_level"
                )
        else:
            self._set_int("scale_bits", "scale bits b0")
            if self.scale_bits not in SUPPORTED_SCALE_BITS:
                raise BitallocError(
                    f"unsupported scale bits b0 {self.scale_bits}: supported are "
                    f"{', '.join(map(str, SUPPORTED_SCALE_BITS))}"
                )
            if self.scale_block_size is None:
                raise BitallocError("quantized scales need a scale block size (B1)")
            self._set_int("scale_block_size", "scale block size B1")
            _check_range(self.scale_block_size, SCALE_BLOCK_SIZE_RANGE, "scale block size B1")
            if not isinstance(self.second_level, str) or self.second_level not in FLOAT_DTYPE_BITS:
                raise BitallocError(
                    f"unknown second-level dtype {_short(self.second_level)}: fp32, fp16 or bf16"
                )
            if self.scale_dtype != "fp32":
                raise BitallocError(
                    f"quantized scales take no scale_dtype (got {_short(self.scale_dtype)}): "
                    "the second level is second_level"
                )
        self._check_zero()
        if not isinstance(self.search, bool):
            raise BitallocError(f"search must be True or False, got {_short(self.search)}")

    def _check_zero(self) -> None:
        """The zero point: required for uint (a bits-wide integer or the scale's float dtype),
        absent for the symmetric codebooks."""
        if self.method != "uint":
            if self.zero is not None:
                raise BitallocError(
                    f"{self.method} configs are symmetric and store no zero point (-z): use uint for "
                    "asymmetric integer groups"
                )
            return
        if self.scale_bits is not None:
            raise BitallocError(
                "uint configs store float scales (-sfp16, -sbf16 or -sfp32), not quantized scales"
            )
        if self.zero is None:
            raise BitallocError(
                f"uint configs store a zero point: add -z{self.bits} (a {self.bits}-bit integer) or "
                f"-z{self.scale_dtype} (a float in the scale's dtype)"
            )
        if self.zero != "int" and self.zero != self.scale_dtype:
            raise BitallocError(
                f"zero point {_short(self.zero)}: a uint config's zero point is 'int' (-z{self.bits}) "
                f"or the scale's dtype {self.scale_dtype} (-z{self.scale_dtype})"
            )

    def _set_int(self, field: str, what: str) -> None:
        """Check that ``field`` holds an integer (not a bool) and store it as a plain int."""
        value = getattr(self, field)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise BitallocError(f"{what} must be an integer, got {_short(value)}")
        object.__setattr__(self, field, int(value))

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
                f"config must be a string such as nf2-b64-s8b256, got {type(text).__name__} {_short(text)}"
            )
        match = _CONFIG_RE.fullmatch(text.strip())
        if not match:
            raise BitallocError(f"unknown config string {_short(text)}: expected {GRAMMAR}")
        groups = match.groupdict()
        try:
            fields = dict(
                method=groups["method"],
                bits=_digits(groups["bits"], "bits"),
                block_size=_digits(groups["block"], "block size B0"),
            )
            if groups["sfloat"]:
                fields["scale_dtype"] = groups["sfloat"]
            else:
                fields["scale_bits"] = _digits(groups["sbits"], "scale bits b0")
                fields["scale_block_size"] = _digits(groups["sblock"], "scale block size B1")
                fields["second_level"] = groups["second"] or "fp32"
            zero = groups["zero"]
            if zero is not None and zero[0].isdigit():
                zero_bits = _digits(zero, "zero point bits")
                if zero_bits != fields["bits"]:
                    raise BitallocError(
                        f"an integer zero point has the codes' {fields['bits']} bits: write "
                        f"-z{fields['bits']}, not -z{zero}"
                    )
                zero = "int"
            fields["zero"] = zero
            fields["search"] = groups["search"] is not None
            return cls(**fields)
        except BitallocError as exc:
            raise BitallocError(f"config {_short(text)}: {exc}") from None

    def __str__(self) -> str:
        return f"{self.method}{self.bits}-b{self.block_size}-s{self.scale_format}{self.tail}"

    @property
    def scale_format(self) -> str:
        """What follows ``-s``: ``fp16``, ``8b256``, ``8b64fp16``."""
        if self.scale_bits is None:
            return self.scale_dtype
        suffix = "" if self.second_level == "fp32" else self.second_level
        return f"{self.scale_bits}b{self.scale_block_size}{suffix}"

    @property
    def tail(self) -> str:
        """The zero point and search suffixes (``-z4``, ``-zfp16``, ``-mse``), or ''."""
        zero = "" if self.zero is None else f"-z{self.bits if self.zero == 'int' else self.zero}"
        return zero + (SEARCH_SUFFIX if self.search else "")

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
        if self.scale_bits is None:
            return self.bits + (FLOAT_DTYPE_BITS[self.scale_dtype] + self.zero_bits) / self.block_size
        second = FLOAT_DTYPE_BITS[self.second_level]
        return (
            self.bits + self.scale_bits / self.block_size + second / (self.block_size * self.scale_block_size)
        )

    def num_blocks(self, shape: tuple[int, ...] | list[int]) -> int:
        rows, cols = _matrix_dims(shape)
        return rows * -(-cols // self.block_size)  # exact integer ceiling, any size

    def storage_bits(self, shape: tuple[int, ...] | list[int]) -> int:
        """Exact bits written for a matrix of ``shape``: codes (with row padding) + scales."""
        return sum(self.storage_bits_parts(shape).values())

    def storage_bits_parts(self, shape: tuple[int, ...] | list[int]) -> dict[str, int]:
        """Bits of each stored tensor: ``codes``, ``scales``, (if quantized) ``scales2`` and
        (if asymmetric) ``zeros``."""
        n_blocks = self.num_blocks(shape)
        parts = {"codes": n_blocks * self.block_size * self.bits}
        if self.scale_bits is None:
            parts["scales"] = n_blocks * FLOAT_DTYPE_BITS[self.scale_dtype]
            if self.zero is not None:
                parts["zeros"] = n_blocks * self.zero_bits
        else:
            n_groups = -(-n_blocks // self.scale_block_size)
            parts["scales"] = n_blocks * self.scale_bits
            parts["scales2"] = n_groups * FLOAT_DTYPE_BITS[self.second_level]
        return parts

    def to_dict(self) -> dict:
        """The plan JSON's per-module description of this config."""
        if self.scale_bits is None:
            scale = {"dtype": self.scale_dtype}
            if self.zero is not None:
                scale["zero"] = self.bits if self.zero == "int" else self.zero
        else:
            scale = {
                "bits": self.scale_bits,
                "block_size": self.scale_block_size,
                "second_level": self.second_level,
            }
        if self.search:
            scale["search"] = SEARCH_SUFFIX[1:]
        return {
            "config": str(self),
            "method": self.method,
            "bits": self.bits,
            "block_size": self.block_size,
            "scale": scale,
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
        raise BitallocError(f"expected a non-empty 2-D matrix shape (rows, cols), got {_short(shape)}")
    return dims


def _check_range(value: int, bounds: tuple[int, int], what: str) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise BitallocError(f"unsupported {what} {_short(value)}: supported are {low} to {high}")


def _digits(text: str, what: str) -> int:
    """A field's ASCII digits as an int; one too long for any supported value is refused
    before conversion (int() of thousands of digits is slow, then refused by Python)."""
    if len(text.lstrip("0")) > _MAX_DIGITS:
        shown = text if len(text) <= 30 else f"{text[:12]}...({len(text)} digits)"
        raise BitallocError(f"unsupported {what} {shown}: far outside the supported values")
    return int(text)


def _short(value: object, limit: int = 60) -> str:
    """repr(value), shortened to one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for printing
        text = f"<{type(value).__name__} of {value.bit_length()} bits>"
    if len(text) > limit:
        text = f"{text[: limit - 20]}...({len(text)} characters)"
    return text


def storage_bits(shape: tuple[int, ...] | list[int], config: str | QuantConfig) -> int:
    """Exact storage in bits of a (out, in) matrix quantized with ``config``."""
    return QuantConfig.parse(config).storage_bits(shape)
