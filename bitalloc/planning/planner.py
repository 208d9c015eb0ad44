"""Bit allocation: one quantization config per matrix under an average bit budget.

A multiple-choice knapsack solved as an integer program (LQ-LoRA's ILP; HAWQ-V3's ties):
binary x[g, c] picks config c for group g (one matrix, or matrices tied to share a config),
exactly one per group, sum(storage_bits * x) <= budget * sum(numel), minimizing the summed
error. This module is the public API (`plan`, `sweep`, `feasible_range`) and builds the
Plan from a solved problem. The other concerns have their own modules: reading and
checking the profile table (`profile_reader`), constraints and dominated configs
(`constraints`), exact budget arithmetic (`budget`), the solvers (`mckp`), the entry and
file format (`entry`, `plan_file`), baselines and the human summary (`report`).
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import pandas as pd

from ..errors import BitallocError
from .budget import LORA_BITS, achieved_bits, at_least, capacity_bits, check_budget
from .constraints import Problem, prepare_problem
from .entry import ModuleEntry
from .mckp import SOLVERS, solve
from .objectives import OBJECTIVE_COLUMNS
from .plan_file import Plan, _shown, most_common
from .targets import TargetFormat

__all__ = ["LORA_BITS", "OBJECTIVE_COLUMNS", "Plan", "feasible_range", "parse_sweep", "plan", "sweep"]

MAX_SWEEP = 1000  # budgets in one sweep


# ---- public API ----------------------------------------------------------------------------
# shape: the public API's keyword-only constraints (fields of `constraints.Constraints`)
def plan(
    profile_table: pd.DataFrame,
    budget: float = 2.5,
    *,
    solver: str = "cbc",
    count_lora: bool = False,
    tie: Iterable[str] = (),
    min_bits: int | None = None,
    max_bits: int | None = None,
    pin: dict[str, str] | None = None,
    keep: Iterable[str] = (),
    source: str | None = None,
    layer_weights: bool = True,
    target: TargetFormat | None = None,
) -> Plan:
    """Choose one config per matrix minimizing the total error within ``budget`` bits/param.

    The budget is the average storage_bits per parameter over the quantized matrices
    (``count_lora`` adds r·(out+in)·16 bits of LoRA factors per matrix). The error is the
    profile's ``error``, or ``weighted_error`` when its metadata says the objective is
    ``activation``. Constraints (regexes are searched in module names):

    - ``tie``: matrices matched by one regex are grouped by the tuple of *all* its capture
      groups and share a config. To tie q/k/v within each layer write
      ``r"layers\\.(\\d+)\\.self_attn\\.(?:q|k|v)_proj"`` (one group per layer); with a
      capturing ``(q|k|v)`` every matrix would be alone. No groups: all matches share one.
    - ``min_bits`` / ``max_bits``: bounds on the config's ``bits``.
    - ``pin``: ``{regex: config}`` forces every matched matrix to that config.
    - ``keep``: matched matrices stay in 16 bits, outside the budget on both sides.

    ``solver`` is "cbc" (PuLP's bundled CBC) or "highs" (scipy.optimize.milp), both run to a
    zero gap, or "dp", an exact dynamic program over the same reduced problem (no ILP; much
    faster on hard budgets). Raises BitallocError for bad input and for an infeasible budget
    (with the achievable range).

    A profile measured with layer weights (``attrs["layer_weights"]["coefficients"]``: how
    much a unit of each matrix's output error costs the model, see
    `bitalloc.profiling.sensitivity`) is planned on coefficient x weighted_error; with
    ``layer_weights=False`` the coefficients are ignored.
    """
    problem = prepare_problem(
        profile_table,
        layer_weights=layer_weights,
        count_lora=count_lora,
        tie=tie,
        min_bits=min_bits,
        max_bits=max_bits,
        pin=pin,
        keep=keep,
        target=target,
    )
    return _solve_plan(problem, budget, solver, source)


def sweep(
    profile_table: pd.DataFrame,
    budgets: Iterable[float],
    *,
    solver: str = "cbc",
    source: str | None = None,
    **constraints,
) -> list[Plan]:
    """One plan per budget; the profile is read and constrained once (kwargs as in `plan`)."""
    if isinstance(budgets, str):
        budgets = parse_sweep(budgets)
    try:
        budgets = list(itertools.islice(iter(budgets), MAX_SWEEP + 1))
    except TypeError:
        raise BitallocError(
            f"budgets must be a list of numbers or a sweep like '2:4:0.25', got {type(budgets).__name__}"
        ) from None
    if not budgets:
        raise BitallocError("no budgets to sweep")
    if len(budgets) > MAX_SWEEP:
        raise BitallocError(f"too many budgets to sweep: at most {MAX_SWEEP:,}")
    for budget in budgets:
        check_budget(budget)
    _check_solver(solver)
    problem = prepare_problem(profile_table, **constraints)
    return [_solve_plan(problem, budget, solver, source) for budget in budgets]


def feasible_range(profile_table: pd.DataFrame, **constraints) -> tuple[float, float]:
    """(lowest, highest) achievable average bits/param under the constraints (as in `plan`).

    Both are rounded up to the next float, so ``plan(table, budget=lo)`` is feasible and
    ``plan(table, budget=hi)`` gives every matrix its most accurate config.
    """
    return _feasible_range(prepare_problem(profile_table, **constraints))


def parse_sweep(text: str) -> list[float]:
    """Budgets from "START:STOP:STEP" (STOP included) or "2.5,3,3.5"; at most 1,000."""
    if not isinstance(text, str):
        raise BitallocError(f"bad sweep {text!r}: expected a string START:STOP:STEP or a,b,c")
    text = text.strip()
    shown = _shown(text)
    parts = text.split(":" if ":" in text else ",")
    if len(parts) > MAX_SWEEP:
        raise BitallocError(f"bad sweep {shown}: more than {MAX_SWEEP:,} budgets (at most {MAX_SWEEP:,})")
    try:
        values = [float(part) for part in parts]
    except ValueError:
        values = []
    if not values or (":" in text and len(values) != 3):
        raise BitallocError(f"bad sweep {shown}: expected START:STOP:STEP or a,b,c")
    if ":" in text:
        start, stop, step = values
        if not (all(map(math.isfinite, values)) and step > 0 and start <= stop):
            raise BitallocError(f"bad sweep {shown}: need finite START <= STOP and STEP > 0")
        span = (stop - start) / step
        if not span + 1e-9 < MAX_SWEEP:  # counted before any list is built (inf and NaN too)
            raise BitallocError(
                f"bad sweep {shown}: more than {MAX_SWEEP:,} budgets (at most {MAX_SWEEP:,}); "
                "use a larger STEP"
            )
        count = math.floor(span + 1e-9) + 1  # STOP included despite drift
        values = [round(start + i * step, 12) for i in range(count)]
    if not all(math.isfinite(b) and b > 0 for b in values):
        raise BitallocError(f"bad sweep {shown}: budgets must be positive")
    return values


# ---- solving ----------------------------------------------------------------------------
def _check_solver(solver) -> None:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVERS)}")


def _feasible_range(problem: Problem) -> tuple[float, float]:
    lowest = sum(group.options[0][1] for group in problem.groups)
    highest = sum(group.options[-1][1] for group in problem.groups)
    return at_least(Fraction(lowest, problem.numel)), at_least(Fraction(highest, problem.numel))


def _solve_plan(problem: Problem, budget: float, solver: str, source: str | None) -> Plan:
    _check_solver(solver)
    capacity = capacity_bits(budget, problem.numel)
    if sum(group.options[0][1] for group in problem.groups) > capacity:
        lo, hi = _feasible_range(problem)
        storage = "" if problem.target is None else f" in {problem.target.name}'s storage"
        raise BitallocError(
            f"budget {float(budget)!r} is infeasible: achievable average bits/param for this "
            f"profile and constraints is {math.ceil(lo * 1e4) / 1e4:g} to {round(hi, 4):g}{storage}"
        )
    options = [[(storage, error) for _, storage, error in group.options] for group in problem.groups]
    choice, gap = solve(options, capacity, solver)
    assignment = {
        name: group.options[i][0]
        for group, i in zip(problem.groups, choice, strict=True)
        for name in group.modules
    }
    return _build_plan(problem, assignment, _Solved(float(budget), solver, gap, source))


# ---- building the plan --------------------------------------------------------------------
@dataclass(frozen=True)
class _Solved:
    """What a plan records about its solve besides the assignment."""

    budget: float
    solver: str
    gap: float
    source: str | None


def _entry(problem: Problem, name: str, config: str) -> ModuleEntry:
    """The plan entry of matrix ``name`` at ``config``, with the errors it was chosen on."""
    matrix = problem.matrices[name]
    row = matrix.rows[config]
    weighted = None
    if problem.objective != "weight":
        weighted = row.objective_error if row.coefficient is None else row.weighted_error
    return ModuleEntry.from_config(
        config, matrix.shape, rank=row.rank, error=row.error, weighted_error=weighted,
        coefficient=row.coefficient,
    )  # fmt: skip


def _build_plan(problem: Problem, assignment: dict[str, str], solved: _Solved) -> Plan:
    modules, storage, errors, ranks, iters = {}, 0, [], Counter(), Counter()
    for name in problem.matrices:
        if name not in assignment:
            continue
        config = assignment[name]
        row = problem.matrices[name].rows[config]
        modules[name] = _entry(problem, name, config)
        storage += problem.matrices[name].storage(config, problem.count_lora)
        errors.append(row.objective_error)
        ranks[row.rank] += 1
        iters[row.iters] += 1
    source = solved.source if solved.source is not None else problem.meta.source
    fingerprint = problem.meta.fingerprint
    return Plan(
        model={
            "source": None if source is None else str(source),
            "fingerprint": None if fingerprint is None else str(fingerprint),
        },
        budget={
            "target_bits": solved.budget,
            "achieved_bits": achieved_bits(Fraction(storage, problem.numel), solved.budget),
            "includes_lora": problem.count_lora,
        },
        objective=problem.objective,
        calibration=_calibration_record(problem),
        layer_weights=_layer_weights_record(problem),
        solver={
            "name": solved.solver,
            "status": "optimal",
            "objective": math.fsum(errors),
            "gap": round(solved.gap, 9),
        },
        defaults={"rank": most_common(ranks), "iters": most_common(iters)},
        kept=list(problem.kept),
        modules=modules,
        target=None if problem.target is None else {"name": problem.target.name, "storage_bits": storage},
    )


def _layer_weights_record(problem: Problem) -> dict | None:
    """How the plan's coefficients were measured (the coefficients go in each module entry)."""
    record = problem.meta.layer_weights
    if not record:
        return None
    return {key: value for key, value in sorted(record.items()) if key not in ("coefficients", "points")}


def _calibration_record(problem: Problem) -> dict | None:
    """What a data-aware plan keeps of the profile's calibration: what its statistics are
    computed from again (a user text's path is kept; earlier profiles' side-file path is not)."""
    record = problem.meta.calibration
    if problem.objective == "weight" or not record:
        return None
    return {key: value for key, value in sorted(record.items()) if key != "path"}
