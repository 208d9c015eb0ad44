"""Quantization configs: the config string grammar, nominal bits/param and exact storage.

The config string is the authority (README, "Config strings"):

    {nf|int}{k}-b{B0}-s{fp32|fp16|bf16}            float scales, one per block of B0
    {nf|int}{k}-b{B0}-s{b0}b{B1}[fp16|bf16]        scales quantized to b0 bits in groups
                                                   of B1, one second-level scale per group
                                                   (fp32 unless a suffix says otherwise)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

METHODS = ("nf", "int")
SUPPORTED_BITS = (2, 3, 4, 8)
FLOAT_DTYPE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}
SUPPORTED_SCALE_BITS = (2, 3, 4, 8)

GRAMMAR = (
    "{nf|int}{2|3|4|8}-b{B0}-s{fp32|fp16|bf16} or {nf|int}{2|3|4|8}-b{B0}-s{b0}b{B1}[fp16|bf16], "
    "e.g. nf4-b64-sfp32, nf2-b64-s8b256, int3-b128-s8b64fp16"
)

_CONFIG_RE = re.compile(
    r"^(?P<method>nf|int)(?P<bits>\d+)-b(?P<block>\d+)-s"
    r"(?:(?P<sfloat>fp32|fp16|bf16)|(?P<sbits>\d+)b(?P<sblock>\d+)(?P<second>fp16|bf16|fp32)?)$"
)


@dataclass(frozen=True, order=True)
class QuantConfig:
    """One way to quantize a matrix: codebook, bits, block size and how scales are stored.

    ``scale_bits is None`` means scales are stored as ``scale_dtype`` floats; otherwise
    scales are quantized to ``scale_bits``-bit unsigned codes in groups of
    ``scale_block_size`` with one ``second_level`` float per group.
    """

    method: str = "nf"
    bits: int = 4
    block_size: int = 64
    scale_dtype: str = "fp32"
    scale_bits: int | None = None
    scale_block_size: int | None = None
    second_level: str = "fp32"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}: expected nf or int")
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"unsupported bits {self.bits}: supported are {', '.join(map(str, SUPPORTED_BITS))}"
            )
        if self.block_size < 1:
            raise ValueError(f"block size must be positive, got {self.block_size}")
        if self.scale_bits is None:
            if self.scale_dtype not in FLOAT_DTYPE_BITS:
                raise ValueError(f"unknown scale dtype {self.scale_dtype!r}: fp32, fp16 or bf16")
        else:
            if self.scale_bits not in SUPPORTED_SCALE_BITS:
                raise ValueError(
                    f"unsupported scale bits {self.scale_bits}: supported are "
                    f"{', '.join(map(str, SUPPORTED_SCALE_BITS))}"
                )
            if not self.scale_block_size or self.scale_block_size < 1:
                raise ValueError("quantized scales need a positive scale block size (B1)")
            if self.second_level not in FLOAT_DTYPE_BITS:
                raise ValueError(f"unknown second-level dtype {self.second_level!r}: fp32, fp16 or bf16")

    # ---- parsing and printing -------------------------------------------------------
    @classmethod
    def parse(cls, text: str | QuantConfig) -> QuantConfig:
        """Parse a config string such as ``nf2-b64-s8b256``; ValueError shows the grammar."""
        if isinstance(text, QuantConfig):
            return text
        match = _CONFIG_RE.match(str(text).strip())
        if not match:
            raise ValueError(f"unknown config string {text!r}: expected {GRAMMAR}")
        groups = match.groupdict()
        common = dict(method=groups["method"], bits=int(groups["bits"]), block_size=int(groups["block"]))
        if groups["sfloat"]:
            return cls(**common, scale_dtype=groups["sfloat"])
        return cls(
            **common,
            scale_dtype="fp32",
            scale_bits=int(groups["sbits"]),
            scale_block_size=int(groups["sblock"]),
            second_level=groups["second"] or "fp32",
        )

    def __str__(self) -> str:
        head = f"{self.method}{self.bits}-b{self.block_size}-s"
        if self.scale_bits is None:
            return head + self.scale_dtype
        suffix = "" if self.second_level == "fp32" else self.second_level
        return head + f"{self.scale_bits}b{self.scale_block_size}{suffix}"

    @property
    def name(self) -> str:
        return str(self)

    @property
    def quantized_scales(self) -> bool:
        return self.scale_bits is not None

    # ---- storage -------------------------------------------------------------------
    @property
    def bits_per_param(self) -> float:
        """Nominal bits per parameter, b + b0/B0 + b1/(B0*B1) (display only)."""
        if self.scale_bits is None:
            return self.bits + FLOAT_DTYPE_BITS[self.scale_dtype] / self.block_size
        second = FLOAT_DTYPE_BITS[self.second_level]
        return (
            self.bits + self.scale_bits / self.block_size + second / (self.block_size * self.scale_block_size)
        )

    def num_blocks(self, shape: tuple[int, ...] | list[int]) -> int:
        rows, cols = _matrix_dims(shape)
        return rows * math.ceil(cols / self.block_size)

    def storage_bits(self, shape: tuple[int, ...] | list[int]) -> int:
        """Exact bits written for a matrix of ``shape``: codes (with row padding) + scales."""
        return sum(self.storage_bits_parts(shape).values())

    def storage_bits_parts(self, shape: tuple[int, ...] | list[int]) -> dict[str, int]:
        """Bits of each stored tensor: ``codes``, ``scales`` and (if quantized) ``scales2``."""
        n_blocks = self.num_blocks(shape)
        parts = {"codes": n_blocks * self.block_size * self.bits}
        if self.scale_bits is None:
            parts["scales"] = n_blocks * FLOAT_DTYPE_BITS[self.scale_dtype]
        else:
            n_groups = math.ceil(n_blocks / self.scale_block_size)
            parts["scales"] = n_blocks * self.scale_bits
            parts["scales2"] = n_groups * FLOAT_DTYPE_BITS[self.second_level]
        return parts

    def to_dict(self) -> dict:
        """The plan JSON's per-module description of this config."""
        if self.scale_bits is None:
            scale = {"dtype": self.scale_dtype}
        else:
            scale = {
                "bits": self.scale_bits,
                "block_size": self.scale_block_size,
                "second_level": self.second_level,
            }
        return {
            "config": str(self),
            "method": self.method,
            "bits": self.bits,
            "block_size": self.block_size,
            "scale": scale,
            "bits_per_param": round(self.bits_per_param, 6),
        }


def _matrix_dims(shape: tuple[int, ...] | list[int]) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) != 2 or shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"expected a non-empty 2-D matrix shape, got {shape}")
    return shape


def storage_bits(shape: tuple[int, ...] | list[int], config: str | QuantConfig) -> int:
    """Exact storage in bits of a (out, in) matrix quantized with ``config``."""
    return QuantConfig.parse(config).storage_bits(shape)
