"""The exact grid of an integer-group target: which uint configs it stores as bitalloc writes them.

GPTQModel, AutoRound, compressed-tensors, torchao and HQQ store asymmetric integer groups: unsigned
(or offset signed) b-bit codes q, one scale s and one zero point z per group along the input
dimension, w = (q - z)·s. bitalloc's ``uint{b}-b{G}-s{dtype}-z...`` configs are that format, and
their dequantization equals each target's own bit for bit on the same codes (`tests/test_formats.py`),
when the scale is stored in the dtype the target stores and the zero point the way it does (an
integer for GPTQ, compressed-tensors and torchao; a float in the scale's dtype for HQQ). Each target
module declares an `IntegerGroups` with its rules and its own storage accounting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import BitallocError
from ..quant import QuantConfig
from ._common import Matrix
from ._plan import Shape, TargetFormat

EXACT_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class IntegerGroups(TargetFormat):
    """A target that stores uint configs: b-bit codes, a ``scale_dtypes`` scale and a zero point per
    group (``float_zero``: a float in the scale's dtype, else a b-bit integer), groups that divide
    the row (no partial group), from ``group_sizes`` (None: any) and multiples of ``group_multiple``;
    ``storage(matrix)`` is the bits the target writes. Any of them may carry ``-mse`` (the search
    chooses the scale and zero) and ``-gptq`` (error feedback chooses the codes): the target stores
    whatever was chosen."""

    name: str
    storage: Callable[[Matrix], int]
    scale_dtypes: tuple[str, ...] = ("fp16",)
    float_zero: bool = False
    group_sizes: tuple[int, ...] | None = None
    group_multiple: int = 1
    bits: tuple[int, ...] = EXACT_BITS
    scale_follows_model: bool = False  # scales stored in the model's dtype (one per model), not a fixed one
    dims_multiple: int = 1  # rows and columns must be multiples of this (GPTQ's int32 packing of both)

    @property
    def groups_text(self) -> str:
        """The group sizes it takes, in words."""
        if self.group_sizes:
            return f"group sizes {', '.join(map(str, self.group_sizes))}"
        multiple = f" that is a multiple of {self.group_multiple}" if self.group_multiple > 1 else ""
        return f"any group size{multiple}"

    @property
    def description(self) -> str:  # type: ignore[override]
        zero = "a float zero point in the scale's dtype (-z<dtype>)" if self.float_zero else "-z<bits>"
        bits = ",".join(map(str, self.bits))
        return (
            f"uint{{{bits}}}-b<group>-s{{{'|'.join(self.scale_dtypes)}}} with {zero}, "
            f"{self.groups_text} dividing the row, optionally -mse and -gptq"
        )

    def why_not(self, config: QuantConfig, shape: Shape | None = None) -> str | None:
        """None if stored exactly (on ``shape``, or on some shape when None), else why not."""
        if config.method != "uint":
            return f"{self.name} stores asymmetric integer groups (uint), not {config.method} levels"
        if config.bits not in self.bits:
            return f"{config.bits} bits; {self.name} stores {', '.join(map(str, self.bits))}"
        if config.scale_dtype not in self.scale_dtypes:
            return f"{config.scale_dtype} scales; {self.name} stores {' or '.join(self.scale_dtypes)} scales"
        if self.float_zero != (config.zero != "int"):
            want = (
                f"a float zero point (-z{config.scale_dtype})" if self.float_zero
                else f"an integer zero point (-z{config.bits})"
            )  # fmt: skip
            return f"its zero point; {self.name} stores {want}"
        group = config.block_size
        if (self.group_sizes and group not in self.group_sizes) or group % self.group_multiple:
            return f"group size {group}; {self.name} takes {self.groups_text}"
        if shape is not None and shape[1] % group:
            return f"{shape[1]} columns are not a multiple of the group size {group}"
        if shape is not None and (shape[0] % self.dims_multiple or shape[1] % self.dims_multiple):
            return f"{self.name} packs both dimensions in int32 words: multiples of {self.dims_multiple}"
        return None

    def plan_why_not(self, configs: Sequence[QuantConfig]) -> str | None:
        dtypes = sorted({config.scale_dtype for config in configs})
        if self.scale_follows_model and len(dtypes) > 1:
            return (
                f"scales in {' and '.join(dtypes)}: {self.name} stores every scale in the model's one dtype"
            )
        return None

    def conditions(self, configs: Sequence[QuantConfig]) -> str | None:
        dtypes = sorted({config.scale_dtype for config in configs})
        if self.scale_follows_model and len(dtypes) == 1:
            return f"{self.name} stores scales in the model's dtype: run the model in {dtypes[0]}"
        return None

    def storage_bits(self, config: QuantConfig, shape: Shape) -> int:
        rows, columns = shape
        return self.storage(Matrix("", config, rows, columns, 0))

    def grid(self, bits: Sequence[int], block_sizes: Sequence[int]) -> list[str]:
        """``uint{b}-b{B}-s{dtype}-z...-mse`` for each bits and block size, the first scale dtype.

        Only the searched configs: the search changes the scale and zero, not the storage, and is
        never worse per block than the range's (`tests/test_formats.py`), so a plain config is at
        the same storage with at least the error and the planner would drop it; profiling both
        doubles the time for nothing."""
        dtype = self.scale_dtypes[0]
        configs = []
        for b in bits:
            for block in block_sizes:
                zero = dtype if self.float_zero else str(b)
                text = f"uint{b}-b{block}-s{dtype}-z{zero}-mse"
                try:
                    why = self.why_not(QuantConfig.parse(text))
                except BitallocError as exc:
                    why = str(exc)
                if why is not None:
                    raise BitallocError(f"--target {self.name}: {why} (bits {b}, block size {block})")
                configs.append(text)
        return configs
