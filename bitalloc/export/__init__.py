"""Export a plan to the quantizers people already run: one module per target, each plan -> config.

``export(plan, target, output=None)`` writes a target's file and returns an `ExportResult` with the
notes on what the target cannot express and the bits per parameter it really stores. The ``to_*``
functions return the config itself. No target library is imported here; `to_torchao` imports
torch and torchao when called. Plans for export should come from a no-correction profile
(``bitalloc profile --rank 0``): these tools re-quantize without LoftQ's B.A (docs/export.md).
"""

from ._common import Translation
from ._plan import TargetFormat
from .api import TARGETS, ExportResult, exact_targets, export, register_target, target_format, targets
from .autoround import to_autoround
from .compressed_tensors import to_compressed_tensors
from .gptqmodel import to_gptqmodel
from .hqq import to_hqq
from .llamacpp import to_llamacpp
from .torchao import to_torchao, to_torchao_dict
from .weights import WEIGHTS_TARGETS, export_weights

__all__ = [
    "TARGETS",
    "ExportResult",
    "WEIGHTS_TARGETS",
    "TargetFormat",
    "Translation",
    "exact_targets",
    "export",
    "export_weights",
    "register_target",
    "target_format",
    "targets",
    "to_autoround",
    "to_compressed_tensors",
    "to_gptqmodel",
    "to_hqq",
    "to_llamacpp",
    "to_torchao",
    "to_torchao_dict",
]
