"""bitalloc: choose how to quantize every weight matrix under a bit budget, then build it."""

from .errors import BitallocError
from .quant import QuantConfig, storage_bits

__version__ = "0.1.0"

__all__ = ["BitallocError", "QuantConfig", "storage_bits", "__version__"]
