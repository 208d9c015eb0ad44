"""Format families as registered values: the one place a number format is defined.

A config string starts with its family's name (``nf`` in ``nf4-b64-sfp32``, ``uint`` in
``uint4-b128-sfp16-z4``). `QuantConfig` reads the common head ``{name}{bits}-b{B0}-s`` and
asks the family, a `Format` registered under that name, for everything else: the rest of the
string (its grammar piece), which field values it takes, its levels, how blocks are quantized
and dequantized, the exact bits of each stored part and how the parts are packed. Code outside
this package never branches on a family's name; it asks the family (`format_of`).

`Format` implements the standard storage that nf, int and uint share: one scale per block
stored as a float (fp32/fp16/bf16) or as unsigned b0-bit codes in groups of B1 with a float
second-level scale per group, and optionally a zero point per block. A family with another
structure (MX's shared exponents, say) overrides the grammar, `check`, storage and packing
methods; one with the standard structure implements `quantize` and `dequantize` only.
A new family is one module that subclasses `Format` and calls `register_format`.
"""

from __future__ import annotations

import functools
import numbers
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import BitallocError
from .packing import pack_bits, unpack_bits

if TYPE_CHECKING:
    from .config import QuantConfig

PARTS = ("codes", "scales", "scales2", "zeros")  # stored as "<module>.weight.<part>", in this order
SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SUPPORTED_SCALE_BITS = (2, 3, 4, 8)  # scale codes are stored as uint8
SCALE_BLOCK_SIZE_RANGE = (2, 65536)  # B1: scales per second-level group
SEARCH_SUFFIX = "-mse"
GPTQ_SUFFIX = "-gptq"

# What follows "-s" in the standard families: float scales or quantized ones, an optional zero
# point, the optional search suffix and the optional rounding suffix (ASCII digits only: ``\d``
# would take other scripts' digits).
STANDARD_SCALE_PATTERN = (
    r"(?:(?P<sfloat>fp32|fp16|bf16)|(?P<sbits>[0-9]+)b(?P<sblock>[0-9]+)(?P<second>fp16|bf16|fp32)?)"
    r"(?:-z(?P<zero>fp32|fp16|bf16|[0-9]+))?(?P<search>-mse)?(?P<gptq>-gptq)?"
)
_MAX_DIGITS = 9  # no supported field has more digits (leading zeros aside)


@dataclass
class BlockCodes:
    """Unpacked result of quantizing (..., out, in): what gets packed and stored."""

    codes: torch.Tensor  # uint8 (..., out, n_blocks_per_row * B0), padding included
    scales: torch.Tensor  # float32 (..., out, n_blocks_per_row): the dequantized scales
    scale_codes: torch.Tensor | None  # uint8 (..., out * n_blocks_per_row) if scales are quantized
    scales2: torch.Tensor | None  # second-level scales (..., n_groups), in their storage dtype
    stored_scales: torch.Tensor | None  # float scales in their storage dtype (float-scale configs)
    zeros: torch.Tensor | None = None  # asymmetric: (..., out, n_blocks_per_row) uint8 or the float dtype


class Format:
    """A format family. Subclasses set ``name`` and implement `quantize` and `dequantize`;
    the rest defaults to the standard storage (see the module docstring)."""

    name: ClassVar[str] = ""  # lowercase ASCII letters: the config string's prefix
    bits: ClassVar[tuple[int, ...]] = SUPPORTED_BITS  # code widths the family takes
    grammar: ClassVar[str] = ""  # its config strings, for the parse error (built-ins: `config.GRAMMAR`)
    uniform: ClassVar[bool] = True  # evenly spaced integer levels (False: a codebook such as NF)
    scale_pattern: ClassVar[str] = STANDARD_SCALE_PATTERN  # regex for what follows "-s"
    search_clips: ClassVar[dict[int, tuple[float, ...]]] = {}  # the -mse search's clips by bits

    # ---- the config string ---------------------------------------------------------------
    def fields(self, groups: dict[str, str | None], bits: int) -> dict:
        """QuantConfig fields from the named groups of ``scale_pattern`` (``bits`` parsed); a
        family with its own ``scale_pattern`` overrides this, `scale_format` and `tail`."""
        fields: dict = {}
        if groups["sfloat"]:
            fields["scale_dtype"] = groups["sfloat"]
        else:
            fields["scale_bits"] = parse_digits(groups["sbits"], "scale bits b0")
            fields["scale_block_size"] = parse_digits(groups["sblock"], "scale block size B1")
            fields["second_level"] = groups["second"] or "fp32"
        zero = groups["zero"]
        if zero is not None and zero[0].isdigit():
            zero_bits = parse_digits(zero, "zero point bits")
            if zero_bits != bits:
                raise BitallocError(
                    f"an integer zero point has the codes' {bits} bits: write -z{bits}, not -z{zero}"
                )
            zero = "int"
        fields["zero"] = zero
        fields["search"] = groups["search"] is not None
        fields["gptq"] = groups["gptq"] is not None
        return fields

    def scale_format(self, config: QuantConfig) -> str:
        """What follows ``-s``: ``fp16``, ``8b256``, ``8b64fp16``."""
        if config.scale_bits is None:
            return config.scale_dtype
        suffix = "" if config.second_level == "fp32" else config.second_level
        return f"{config.scale_bits}b{config.scale_block_size}{suffix}"

    def tail(self, config: QuantConfig) -> str:
        """The zero point, search and rounding suffixes (``-z4``, ``-zfp16``, ``-mse``, ``-gptq``), or ''."""
        zero = "" if config.zero is None else f"-z{config.bits if config.zero == 'int' else config.zero}"
        return zero + (SEARCH_SUFFIX if config.search else "") + (GPTQ_SUFFIX if config.gptq else "")

    def grid_config(self, bits: int, block_size: int, scale: str) -> str:
        """The config string of a profile grid point (``scale``: what follows ``-s``)."""
        return f"{self.name}{bits}-b{block_size}-s{scale}"

    def check(self, config: QuantConfig) -> None:
        """BitallocError (one line, naming the field) unless the scale fields are supported;
        then `check_zero`."""
        if config.scale_bits is None:
            if not isinstance(config.scale_dtype, str) or config.scale_dtype not in FLOAT_DTYPE_BITS:
                raise BitallocError(f"unknown scale dtype {short(config.scale_dtype)}: fp32, fp16 or bf16")
            if config.scale_block_size is not None or config.second_level != "fp32":
                raise BitallocError(
                    "float scales (scale_bits None) take no scale_block_size (B1) and no second_level"
                )
        else:
            set_int(config, "scale_bits", "scale bits b0")
            if config.scale_bits not in SUPPORTED_SCALE_BITS:
                raise BitallocError(
                    f"unsupported scale bits b0 {config.scale_bits}: supported are "
                    f"{', '.join(map(str, SUPPORTED_SCALE_BITS))}"
                )
            if config.scale_block_size is None:
                raise BitallocError("quantized scales need a scale block size (B1)")
            set_int(config, "scale_block_size", "scale block size B1")
            check_range(config.scale_block_size, SCALE_BLOCK_SIZE_RANGE, "scale block size B1")
            if not isinstance(config.second_level, str) or config.second_level not in FLOAT_DTYPE_BITS:
                raise BitallocError(
                    f"unknown second-level dtype {short(config.second_level)}: fp32, fp16 or bf16"
                )
            if config.scale_dtype != "fp32":
                raise BitallocError(
                    f"quantized scales take no scale_dtype (got {short(config.scale_dtype)}): "
                    "the second level is second_level"
                )
        self.check_zero(config)

    def fits(self, config: QuantConfig, columns: int) -> bool:
        """Whether ``config`` is a candidate for matrices with rows of ``columns`` weights. The
        standard families pad a row's last block (counted in storage): every row fits. A family
        whose target cannot pad (ggml: blocks never span or pad rows) says False where its block
        does not divide the row, and the profile measures no such (matrix, config)."""
        return True

    def check_zero(self, config: QuantConfig) -> None:
        """The default family is symmetric: no zero point."""
        if config.zero is not None:
            raise BitallocError(
                f"{config.method} configs are symmetric and store no zero point (-z): use uint for "
                "asymmetric integer groups"
            )

    def scale_dict(self, config: QuantConfig) -> dict:
        """The plan JSON's ``scale`` entry for ``config``."""
        if config.scale_bits is None:
            scale: dict = {"dtype": config.scale_dtype}
            if config.zero is not None:
                scale["zero"] = config.bits if config.zero == "int" else config.zero
        else:
            scale = {
                "bits": config.scale_bits,
                "block_size": config.scale_block_size,
                "second_level": config.second_level,
            }
        if config.search:
            scale["search"] = SEARCH_SUFFIX[1:]
        if config.gptq:
            scale["rounding"] = GPTQ_SUFFIX[1:]
        return scale

    # ---- storage --------------------------------------------------------------------------
    def bits_per_param(self, config: QuantConfig) -> float:
        """Nominal bits per parameter, b + b0/B0 + b1/(B0*B1) (+ zero bits/B0) (display only)."""
        if config.scale_bits is None:
            return config.bits + (FLOAT_DTYPE_BITS[config.scale_dtype] + config.zero_bits) / config.block_size
        second = FLOAT_DTYPE_BITS[config.second_level]
        return (
            config.bits
            + config.scale_bits / config.block_size
            + second / (config.block_size * config.scale_block_size)
        )

    def storage_parts(self, config: QuantConfig, n_blocks: int) -> dict[str, int]:
        """Exact bits of each stored part (names from `PARTS`) for ``n_blocks`` blocks, padding
        included: ``codes``, ``scales``, (if quantized) ``scales2``, (if asymmetric) ``zeros``."""
        parts = {"codes": n_blocks * config.block_size * config.bits}
        if config.scale_bits is None:
            parts["scales"] = n_blocks * FLOAT_DTYPE_BITS[config.scale_dtype]
            if config.zero is not None:
                parts["zeros"] = n_blocks * config.zero_bits
        else:
            n_groups = -(-n_blocks // config.scale_block_size)
            parts["scales"] = n_blocks * config.scale_bits
            parts["scales2"] = n_groups * FLOAT_DTYPE_BITS[config.second_level]
        return parts

    def part_dtype(self, config: QuantConfig, part: str) -> torch.dtype:
        """The dtype a stored part is kept in; uint8 parts are bit-packed (their bytes are the
        ceiling of their bits / 8), the others hold exactly their bits."""
        if part == "codes" or (part == "scales" and config.scale_bits is not None):
            return torch.uint8
        if part == "zeros":
            return torch.uint8 if config.zero == "int" else TORCH_DTYPES[config.zero]
        return TORCH_DTYPES[config.second_level if part == "scales2" else config.scale_dtype]

    # ---- tensors --------------------------------------------------------------------------
    def levels(self, bits: int) -> torch.Tensor | None:
        """The 2**bits levels in [-1, 1], ascending, float32 (CPU), or None (no codebook)."""
        return None

    def quantize(self, blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None) -> BlockCodes:
        """Codes and scales of float32 blocks (..., out, n_blocks, B0), zero-padded; ``weights``
        (per element, broadcast over the blocks) weight a scale search's error, or None."""
        raise NotImplementedError

    def dequantize(
        self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, config: QuantConfig
    ) -> torch.Tensor:
        """float32 (..., out, n_blocks·B0) from codes (..., out, n_blocks·B0), the dequantized
        scales (..., out, n_blocks) and the stored zero points (or None)."""
        raise NotImplementedError

    def nearest(
        self,
        values: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor | None,
        config: QuantConfig,
        dequantize: bool = True,
        inverse: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The nearest code (uint8) of each value under given dequantized block scales and stored
        zero points (broadcast against ``values``) and (``dequantize``) the float32 value the code
        stands for: what ``-gptq`` rounding (`bitalloc.quant.rounding`) asks of a family.
        ``inverse``: 1/scales (0 for a zero scale) when the caller has it already."""
        raise BitallocError(f"{self.name} configs cannot be rounded against given scales (no -gptq)")

    def fake_quantize(
        self, blocks: torch.Tensor, config: QuantConfig, weights: torch.Tensor | None
    ) -> torch.Tensor:
        """Quantize then dequantize: float32 (..., out, n_blocks·B0). Families may fuse it."""
        parts = self.quantize(blocks, config, weights)
        return self.dequantize(parts.codes, parts.scales, parts.zeros, config)

    def pack(self, parts: BlockCodes, config: QuantConfig, rows: int) -> dict[str, torch.Tensor]:
        """The stored tensors of one matrix's `BlockCodes`, by part name."""
        out = {"codes": pack_bits(parts.codes, config.bits)}
        if config.scale_bits is not None:
            out["scales"] = pack_bits(parts.scale_codes, config.scale_bits)
            out["scales2"] = parts.scales2.reshape(-1).clone()
            return out
        out["scales"] = parts.stored_scales.reshape(rows, -1).clone()
        if config.zero is not None:
            zeros = parts.zeros.reshape(rows, -1)
            out["zeros"] = pack_bits(zeros, config.bits) if config.zero == "int" else zeros.clone()
        return out

    def scale_values(self, stored: dict[str, torch.Tensor], config: QuantConfig, shape) -> torch.Tensor:
        """The dequantized block scales, float32 (out, blocks_per_row), from the stored parts."""
        rows, per_row = shape[0], -(-shape[1] // config.block_size)
        if config.scale_bits is None:
            return stored["scales"].float().reshape(rows, per_row)
        n = rows * per_row
        group, scales2 = config.scale_block_size, stored["scales2"]
        codes = unpack_bits(stored["scales"], config.scale_bits, n).float()
        codes = torch.nn.functional.pad(codes, (0, scales2.numel() * group - n))
        top = scales2.float().unsqueeze(-1)
        values = codes.reshape(-1, group) / (2**config.scale_bits - 1) * top
        return values.reshape(-1)[:n].reshape(rows, per_row)

    def zero_values(self, stored: dict[str, torch.Tensor], config: QuantConfig, shape) -> torch.Tensor | None:
        """The stored zero points (out, blocks_per_row): uint8 integers or floats; None if none."""
        if config.zero is None:
            return None
        rows, per_row = shape[0], -(-shape[1] // config.block_size)
        if config.zero == "int":
            return unpack_bits(stored["zeros"], config.bits, rows * per_row).reshape(rows, per_row)
        return stored["zeros"].reshape(rows, per_row)


_FORMATS: dict[str, Format] = {}
_NAME = re.compile(r"[a-z]+")


def register_format(family: Format) -> Format:
    """Make ``family`` parse, quantize, store and plan under its name; BitallocError if the
    name is not lowercase ASCII letters or is taken. Returns ``family``."""
    if not isinstance(family, Format):
        raise BitallocError(f"a format family is a bitalloc.quant.Format, got {type(family).__name__}")
    name = family.name
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name in _FORMATS:
        raise BitallocError(f"cannot register format {short(name)}: a new name of lowercase letters needed")
    _FORMATS[name] = family
    _scale_regex.cache_clear()
    return family


def format_names() -> tuple[str, ...]:
    """The registered family names, in registration order (nf, int, uint, then added ones)."""
    return tuple(_FORMATS)


def get_format(name: object) -> Format:
    """The family registered as ``name``; BitallocError naming the known ones otherwise."""
    family = _FORMATS.get(name) if isinstance(name, str) else None
    if family is None:
        names = list(_FORMATS)
        known = f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)
        raise BitallocError(f"unknown quantization method {short(name)}: expected {known}")
    return family


def format_of(config: QuantConfig) -> Format:
    """The family of a parsed config."""
    return _FORMATS[config.method]


@functools.cache
def _scale_regex(name: str) -> re.Pattern:
    return re.compile(_FORMATS[name].scale_pattern)


def scale_regex(name: str) -> re.Pattern:
    """The compiled grammar piece (what follows ``-s``) of a registered family."""
    return _scale_regex(name)


# ---- field helpers shared by `QuantConfig` and the families ----------------------------------
def set_int(config: QuantConfig, field: str, what: str) -> None:
    """Check that ``field`` holds an integer (not a bool) and store it as a plain int."""
    value = getattr(config, field)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise BitallocError(f"{what} must be an integer, got {short(value)}")
    object.__setattr__(config, field, int(value))


def check_range(value: int, bounds: tuple[int, int], what: str) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise BitallocError(f"unsupported {what} {short(value)}: supported are {low} to {high}")


def parse_digits(text: str, what: str) -> int:
    """A field's ASCII digits as an int; one too long for any supported value is refused
    before conversion (int() of thousands of digits is slow, then refused by Python)."""
    if len(text.lstrip("0")) > _MAX_DIGITS:
        shown = text if len(text) <= 30 else f"{text[:12]}...({len(text)} digits)"
        raise BitallocError(f"unsupported {what} {shown}: far outside the supported values")
    return int(text)


def short(value: object, limit: int = 60) -> str:
    """repr(value), shortened to one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for printing
        text = f"<{type(value).__name__} of {value.bit_length()} bits>"
    if len(text) > limit:
        text = f"{text[: limit - 20]}...({len(text)} characters)"
    return text
