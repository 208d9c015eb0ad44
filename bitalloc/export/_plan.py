"""The one place the export package imports from planning (a one-line change if it moves)."""

from ..planning.budget import achieved_bits
from ..planning.plan_file import Plan, most_common
from ..planning.targets import Shape, TargetFormat

__all__ = ["Plan", "Shape", "TargetFormat", "achieved_bits", "most_common"]
