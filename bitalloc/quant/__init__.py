"""Number formats: codebooks, block-wise quantization, scale storage, bit packing."""

from .blockwise import dequantize_codes, fake_quantize, quantize
from .codebooks import codebook, nearest_code
from .config import GRAMMAR, QuantConfig, storage_bits
from .packed import QuantizedTensor
from .packing import pack_bits, packed_size, unpack_bits

__all__ = [
    "GRAMMAR",
    "QuantConfig",
    "QuantizedTensor",
    "codebook",
    "dequantize_codes",
    "fake_quantize",
    "nearest_code",
    "pack_bits",
    "packed_size",
    "quantize",
    "storage_bits",
    "unpack_bits",
]
