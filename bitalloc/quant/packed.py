"""QuantizedTensor: a matrix stored as packed codes plus (possibly quantized) scales."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import check_matrix, dequantize_codes, quantize
from .config import QuantConfig
from .formats import PARTS, format_of
from .packing import unpack_bits


@dataclass
class QuantizedTensor:
    """The stored form of one (out, in) matrix; its byte size is ``config.storage_bits``.

    ``codes``: uint8, packed ``bits``-bit codes of the zero-padded (out, blocks*B0) matrix.
    ``scales``: float scales (out, blocks) in the config's dtype, or uint8 packed
    ``scale_bits`` codes; ``scales2``: second-level scales (groups,) or None; ``zeros``
    (asymmetric configs): the zero points, uint8 packed ``bits``-bit integers or floats
    (out, blocks) in the scale's dtype. The config's format family packs and reads them
    (`Format.pack`, `Format.scale_values`, `Format.zero_values`).
    """

    config: QuantConfig
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    scales2: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        config: QuantConfig | str,
        column_weights: torch.Tensor | None = None,
        rounded: torch.Tensor | None = None,
    ) -> QuantizedTensor:
        """Quantize and pack one 2-D matrix (``column_weights``, ``rounded``: see `quantize`)."""
        config = QuantConfig.parse(config)
        check_matrix(weight)
        if weight.dim() != 2:
            raise ValueError(f"expected one 2-D matrix, got shape {tuple(weight.shape)}")
        parts = quantize(weight, config, column_weights, rounded)
        return cls.from_block_codes(parts, config, tuple(weight.shape))

    @classmethod
    def from_block_codes(cls, parts, config: QuantConfig, shape: tuple[int, int]) -> QuantizedTensor:
        stored = format_of(config).pack(parts, config, shape[0])
        codes, scales = stored["codes"], stored["scales"]
        return cls(config, shape, codes, scales, stored.get("scales2"), stored.get("zeros"))

    @property
    def blocks_per_row(self) -> int:
        return math.ceil(self.shape[1] / self.config.block_size)

    def scale_values(self) -> torch.Tensor:
        """The dequantized block scales, float32 (out, blocks_per_row)."""
        return format_of(self.config).scale_values(self.tensors(), self.config, self.shape)

    def unpacked_codes(self) -> torch.Tensor:
        rows, padded = self.shape[0], self.blocks_per_row * self.config.block_size
        return unpack_bits(self.codes, self.config.bits, rows * padded).reshape(rows, padded)

    def zero_values(self) -> torch.Tensor | None:
        """The stored zero points (out, blocks_per_row): uint8 integers or floats; None if symmetric."""
        return format_of(self.config).zero_values(self.tensors(), self.config, self.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) matrix Q these codes and scales stand for."""
        values = dequantize_codes(
            self.unpacked_codes(), self.scale_values(), self.config, self.shape[1], self.zero_values()
        )
        return values.to(dtype)

    # ---- storage --------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by suffix (``codes``, ``scales``[, ``scales2``][, ``zeros``])."""
        out = {"codes": self.codes, "scales": self.scales}
        if self.scales2 is not None:
            out["scales2"] = self.scales2
        if self.zeros is not None:
            out["zeros"] = self.zeros
        return out

    @classmethod
    def from_tensors(
        cls, tensors: dict[str, torch.Tensor], config: QuantConfig | str, shape: tuple[int, int]
    ) -> QuantizedTensor:
        """Rebuild from ``tensors()``; ValueError when a tensor has the wrong size or dtype."""
        config = QuantConfig.parse(config)
        shape = (int(shape[0]), int(shape[1]))
        expected = config.storage_bits_parts(shape)
        item = cls(
            config, shape, tensors["codes"], tensors["scales"], tensors.get("scales2"), tensors.get("zeros")
        )
        family = format_of(config)
        for name, tensor in item.tensors().items():
            if name not in expected:
                raise ValueError(f"a {config} matrix stores no {name}")
            want = expected[name]
            got = tensor.numel() * tensor.element_size() * 8
            dtype = family.part_dtype(config, name)
            # uint8 parts are bit-packed: whole bytes; the others hold exactly their bits
            ok = tensor.dtype == dtype and got == (math.ceil(want / 8) * 8 if dtype == torch.uint8 else want)
            if not ok:
                raise ValueError(
                    f"stored {name} of a {shape[0]}x{shape[1]} {config} matrix has "
                    f"{got} bits ({tensor.dtype}), expected {want}"
                )
        missing = [name for name in PARTS if name in expected and name not in item.tensors()]
        if missing:
            raise ValueError(f"{config} needs {missing[0]}")
        return item

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedTensor(
            self.config, self.shape, moved["codes"], moved["scales"], moved.get("scales2"), moved.get("zeros")
        )
