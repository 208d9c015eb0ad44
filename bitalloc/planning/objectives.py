"""Which profile column each objective minimizes: a live view of the objective registry
(`bitalloc.profiling.objectives`), so a registered objective is planned and validated too."""

from __future__ import annotations

from ..profiling.objectives import OBJECTIVE_COLUMNS

__all__ = ["OBJECTIVE_COLUMNS"]
