"""The one place the export package imports from the plan file (a one-line change if it moves)."""

from ..planning.plan_file import Plan, most_common

__all__ = ["Plan", "most_common"]
