"""bitalloc: choose how to quantize every weight matrix under a bit budget, then build it.

Public names (docs/architecture.md): ``QuantConfig``, ``storage_bits``, ``loftq``, ``LoftQResult``,
``profile``, ``ProfileSettings``, ``CalibrationSettings``, ``plan``, ``sweep``, ``Plan``,
``PlanConstraints``, ``plan_files``, ``apply``, ``merge``, ``LoraSettings``, ``load_quantized``,
``load_adapter``,
``open_source``, ``read_profile``, ``evaluate``, ``report`` (and the `bitalloc.export`
package). Heavy modules (pandas, PuLP, transformers) load on first use, not on import.
"""

from importlib import import_module

from .artifacts.hf_quantizer import register_when_imported
from .errors import BitallocError
from .quant import QuantConfig, storage_bits

# transformers loads ``quant_method: "bitalloc"`` folders once bitalloc is imported; the
# registration waits for transformers' own import (it costs seconds), see hf_quantizer.
register_when_imported()

__version__ = "0.1.0"

_LAZY = {
    "loftq": "lora",
    "loftq_batch": "lora",
    "LoftQResult": "lora",
    "open_source": "checkpoints",
    "ProfileSettings": "profiling.settings",
    "CalibrationSettings": "profiling.settings",
    "profile": "profiling.profiler",
    "read_profile": "profiling.table",
    "plan": "planning.planner",
    "sweep": "planning.planner",
    "feasible_range": "planning.planner",
    "Plan": "planning.plan_file",
    "PlanConstraints": "planning.pipeline",
    "plan_files": "planning.pipeline",
    "summarize": "planning.report",
    "apply": "artifacts.writer",
    "merge": "artifacts.merge_stream",
    "LoraSettings": "lora",
    "Factorization": "lora",
    "load_quantized": "artifacts.nn",
    "load_adapter": "artifacts.adapter",
    "QuantLinear": "artifacts.nn",
    "perplexity": "evaluation",
    "evaluate": "evaluation",
    "report": "evaluation",
}

__all__ = ["BitallocError", "QuantConfig", "storage_bits", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")
