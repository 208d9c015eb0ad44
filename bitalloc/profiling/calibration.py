"""Input statistics of the data-aware objectives, computed block by block and never stored.

What matters for a quantized layer is its output error ‖(W − Ŵ)Xᵀ‖ over calibration inputs
X. The output objective weights each decomposition by the full second moment
H = XᵀX/n (in × in) of the Linear's input; the activation objective by its diagonal
h = diag(H) + 0.01·mean (damped so that dead channels cannot blow the weights up).
Linears that read the same tensor (q/k/v, gate/up) share one H.

The parts live in one module each; this module gathers their public names:

- `bitalloc.profiling.objectives`: the objectives (what each needs, records and how it
  weighs LoftQ), resolving a profile's objective, a plan's statistics again;
- `bitalloc.profiling.calibrator`: calibration runs (tokens, records, `Calibrator`);
- `bitalloc.profiling.collect`: the hooks that collect h or H block by block;
- `bitalloc.profiling.given`: h given directly, and its digest.
"""

from __future__ import annotations

from .calibrator import (
    Calibration,
    Calibrator,
    calibrate,
    calibration_spec,
    calibrator_for,
    ids_digest,
    recalibrator,
    token_windows,
)
from .collect import (
    DAMPING,
    BlockStepper,
    collect_column_weights,
    collect_statistics,
    is_expert,
    unrouted_level,
    warn_unrouted,
)
from .given import CALIBRATION_FORMAT, CALIBRATION_SUFFIX, calibration_path, check_given, given_digest
from .objectives import (
    Statistics,
    get_objective,
    load_input_statistics,
    resolve_objective,
    statistics_for_plan,
    weighting,
)

InputStatistics = Statistics  # the earlier name of a profile's statistics in memory

__all__ = [
    "CALIBRATION_FORMAT",
    "CALIBRATION_SUFFIX",
    "DAMPING",
    "BlockStepper",
    "Calibration",
    "Calibrator",
    "InputStatistics",
    "Statistics",
    "calibrate",
    "calibration_path",
    "calibration_spec",
    "calibrator_for",
    "check_given",
    "collect_column_weights",
    "collect_statistics",
    "get_objective",
    "given_digest",
    "ids_digest",
    "is_expert",
    "load_input_statistics",
    "recalibrator",
    "resolve_objective",
    "statistics_for_plan",
    "token_windows",
    "unrouted_level",
    "warn_unrouted",
    "weighting",
]
