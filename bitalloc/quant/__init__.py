"""Number formats: format families, codebooks, block-wise quantization, scale storage, bit packing.

A format family (`Format`) is registered once (`register_format`) and owns its piece of the
config grammar, its levels, quantize/dequantize, exact storage and packed parts; everything
else asks it through the config (`format_of`). The built-in families are in `standard`.
"""

from . import ggml, standard  # noqa: F401  (register nf, int and uint, then ggml: llama.cpp's types)
from .blockwise import dequantize_codes, fake_quantize, quantize
from .codebooks import codebook, nearest_code
from .config import GRAMMAR, QuantConfig, grammar, storage_bits
from .formats import PARTS, BlockCodes, Format, format_names, format_of, get_format, register_format
from .packed import QuantizedTensor
from .packing import pack_bits, packed_size, unpack_bits
from .rounding import feedback_factor, gptq_quantize

__all__ = [
    "GRAMMAR",
    "PARTS",
    "BlockCodes",
    "Format",
    "QuantConfig",
    "QuantizedTensor",
    "codebook",
    "dequantize_codes",
    "fake_quantize",
    "feedback_factor",
    "format_names",
    "format_of",
    "get_format",
    "gptq_quantize",
    "grammar",
    "nearest_code",
    "pack_bits",
    "packed_size",
    "quantize",
    "register_format",
    "storage_bits",
    "unpack_bits",
]
