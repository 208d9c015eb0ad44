"""Which profile column each objective minimizes (the planner reads only implemented ones)."""

from __future__ import annotations

OBJECTIVE_COLUMNS = {"weight": "error", "activation": "weighted_error", "output": "weighted_error"}
