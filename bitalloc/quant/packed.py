"""QuantizedTensor: a matrix stored as packed codes plus (possibly quantized) scales."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .blockwise import TORCH_DTYPES, check_matrix, dequantize_codes, quantize
from .config import QuantConfig
from .packing import pack_bits, unpack_bits


@dataclass
class QuantizedTensor:
    """The stored form of one (out, in) matrix; its byte size is ``config.storage_bits``.

    ``codes``: uint8, packed ``bits``-bit codes of the zero-padded (out, blocks*B0) matrix.
    ``scales``: float scales (out, blocks) in the config's dtype, or uint8 packed
    ``scale_bits`` codes; ``scales2``: second-level scales (groups,) or None; ``zeros``
    (asymmetric configs): the zero points, uint8 packed ``bits``-bit integers or floats
    (out, blocks) in the scale's dtype.
    """

    config: QuantConfig
    shape: tuple[int, int]
    codes: torch.Tensor
    scales: torch.Tensor
    scales2: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    @classmethod
    def from_weight(
        cls, weight: torch.Tensor, config: QuantConfig | str, column_weights: torch.Tensor | None = None
    ) -> QuantizedTensor:
        """Quantize and pack one 2-D matrix (``column_weights``: see `quantize`)."""
        config = QuantConfig.parse(config)
        check_matrix(weight)
        if weight.dim() != 2:
            raise ValueError(f"expected one 2-D matrix, got shape {tuple(weight.shape)}")
        parts = quantize(weight, config, column_weights)
        return cls.from_block_codes(parts, config, tuple(weight.shape))

    @classmethod
    def from_block_codes(cls, parts, config: QuantConfig, shape: tuple[int, int]) -> QuantizedTensor:
        codes = pack_bits(parts.codes, config.bits)
        if config.quantized_scales:
            scales = pack_bits(parts.scale_codes, config.scale_bits)
            return cls(config, shape, codes, scales, parts.scales2.reshape(-1).clone())
        zeros = None
        if config.asymmetric:
            zeros = parts.zeros.reshape(shape[0], -1)
            zeros = pack_bits(zeros, config.bits) if config.zero == "int" else zeros.clone()
        return cls(config, shape, codes, parts.stored_scales.reshape(shape[0], -1).clone(), None, zeros)

    @property
    def blocks_per_row(self) -> int:
        return math.ceil(self.shape[1] / self.config.block_size)

    def scale_values(self) -> torch.Tensor:
        """The dequantized block scales, float32 (out, blocks_per_row)."""
        rows, per_row = self.shape[0], self.blocks_per_row
        if not self.config.quantized_scales:
            return self.scales.float().reshape(rows, per_row)
        n = rows * per_row
        group = self.config.scale_block_size
        codes = unpack_bits(self.scales, self.config.scale_bits, n).float()
        codes = torch.nn.functional.pad(codes, (0, self.scales2.numel() * group - n))
        top = self.scales2.float().unsqueeze(-1)
        values = codes.reshape(-1, group) / (2**self.config.scale_bits - 1) * top
        return values.reshape(-1)[:n].reshape(rows, per_row)

    def unpacked_codes(self) -> torch.Tensor:
        rows, padded = self.shape[0], self.blocks_per_row * self.config.block_size
        return unpack_bits(self.codes, self.config.bits, rows * padded).reshape(rows, padded)

    def zero_values(self) -> torch.Tensor | None:
        """The stored zero points (out, blocks_per_row): uint8 integers or floats; None if symmetric."""
        if not self.config.asymmetric:
            return None
        rows, per_row = self.shape[0], self.blocks_per_row
        if self.config.zero == "int":
            return unpack_bits(self.zeros, self.config.bits, rows * per_row).reshape(rows, per_row)
        return self.zeros.reshape(rows, per_row)

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
        for name, tensor in item.tensors().items():
            if name not in expected:
                raise ValueError(f"a {config} matrix stores no {name}")
            want = expected[name]
            got = tensor.numel() * tensor.element_size() * 8
            packed = name == "codes" or (name == "scales" and config.quantized_scales)
            if packed or (name == "zeros" and config.zero == "int"):
                ok = tensor.dtype == torch.uint8 and got == math.ceil(want / 8) * 8
            else:
                dtype = {"scales2": config.second_level, "zeros": config.zero}.get(name, config.scale_dtype)
                ok = tensor.dtype == TORCH_DTYPES[dtype] and got == want
            if not ok:
                raise ValueError(
                    f"stored {name} of a {shape[0]}x{shape[1]} {config} matrix has "
                    f"{got} bits ({tensor.dtype}), expected {want}"
                )
        if config.quantized_scales != (item.scales2 is not None):
            raise ValueError(f"{config} {'needs' if config.quantized_scales else 'has no'} scales2")
        if config.asymmetric and item.zeros is None:
            raise ValueError(f"{config} needs zeros")
        return item

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QuantizedTensor:
        moved = {k: v.to(device) for k, v in self.tensors().items()}
        return QuantizedTensor(
            self.config, self.shape, moved["codes"], moved["scales"], moved.get("scales2"), moved.get("zeros")
        )
