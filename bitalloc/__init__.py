"""bitalloc: choose how to quantize every weight matrix under a bit budget, then build it.

Public names (DESIGN.md): ``QuantConfig``, ``storage_bits``, ``loftq``, ``LoftQResult``,
``profile``, ``plan``, ``Plan``, ``apply``, ``load_quantized``, ``open_source``.
Heavy modules (pandas, PuLP, transformers) load on first use, not on import.
"""

from importlib import import_module

from .errors import BitallocError
from .quant import QuantConfig, storage_bits

__version__ = "0.1.0"

_LAZY = {
    "loftq": "decomposition",
    "loftq_batch": "decomposition",
    "LoftQResult": "decomposition",
    "profile": "profiler",
    "read_profile": "profiler",
    "plan": "planner",
    "sweep": "planner",
    "Plan": "plan_format",
    "apply": "artifacts",
    "load_quantized": "nn",
    "open_source": "sources",
}

__all__ = ["BitallocError", "QuantConfig", "storage_bits", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")
