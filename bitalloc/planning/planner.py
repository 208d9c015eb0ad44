"""Bit allocation: one quantization config per matrix under an average bit budget.

A multiple-choice knapsack solved as an integer program (LQ-LoRA's ILP; HAWQ-V3's ties):
binary x[g, c] picks config c for group g (one matrix, or matrices tied to share a config),
exactly one per group, sum(storage_bits * x) <= budget * sum(numel), minimizing the summed
error. This module reads and validates the profile table, applies the constraints (ties,
pins, keeps, bit bounds), drops dominated configs and builds the Plan; the exact solving
lives in `mckp`, baselines and the human summary in `report`, the plan file format in
`plan_file`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import BitallocError
from ..names import compile_patterns, natural_key
from ..profiling.table import REQUIRED_COLUMNS, read_profile
from ..quant import QuantConfig
from .mckp import SOLVERS, solve
from .plan_file import Plan, most_common

__all__ = ["Plan", "feasible_range", "parse_sweep", "plan", "sweep"]

OBJECTIVE_COLUMNS = {"weight": "error", "activation": "weighted_error"}
LORA_BITS = 16  # LoRA factors are counted at 16 bits when the budget includes them


@dataclass
class _Row:
    """One profiled (matrix, config) pair."""

    storage_bits: int
    error: float
    objective_error: float
    bits: int
    rank: int
    iters: int


@dataclass
class _Matrix:
    shape: tuple[int, int]
    numel: int
    rows: dict[str, _Row]  # config string -> row

    def storage(self, config: str, count_lora: bool) -> int:
        """Bits the budget counts for this matrix: storage_bits, plus LoRA factors if counted."""
        lora = self.rows[config].rank * (self.shape[0] + self.shape[1]) * LORA_BITS
        return self.rows[config].storage_bits + (lora if count_lora else 0)


@dataclass
class _Group:
    """Matrices that share one config, and the undominated choices for them.

    ``options`` holds (config, storage, error) summed over the members, storage strictly
    increasing and error strictly decreasing.
    """

    modules: list[str]
    options: list[tuple[str, int, float]]


@dataclass
class Problem:
    """A profile after constraints: what `plan` solves for any number of budgets."""

    matrices: dict[str, _Matrix]  # every profiled matrix, natural name order
    groups: list[_Group]
    kept: list[str]
    numel: int  # parameters of the quantized matrices: the budget's denominator
    objective: str
    count_lora: bool
    attrs: dict


# ---- public API ----------------------------------------------------------------------------
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
    """
    problem = prepare_problem(
        profile_table,
        count_lora=count_lora,
        tie=tie,
        min_bits=min_bits,
        max_bits=max_bits,
        pin=pin,
        keep=keep,
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
    budgets = list(budgets)
    if not budgets:
        raise BitallocError("no budgets to sweep")
    problem = prepare_problem(profile_table, **constraints)
    return [_solve_plan(problem, budget, solver, source) for budget in budgets]


def feasible_range(profile_table: pd.DataFrame, **constraints) -> tuple[float, float]:
    """(lowest, highest) achievable average bits/param under the constraints (as in `plan`).

    Both are rounded up to the next float, so ``plan(table, budget=lo)`` is feasible and
    ``plan(table, budget=hi)`` gives every matrix its most accurate config.
    """
    return _feasible_range(prepare_problem(profile_table, **constraints))


def parse_sweep(text: str) -> list[float]:
    """Budgets from "START:STOP:STEP" (STOP included) or "2.5,3,3.5"."""
    text = str(text).strip()
    try:
        values = [float(part) for part in text.split(":" if ":" in text else ",")]
    except ValueError:
        values = []
    if not values or (":" in text and len(values) != 3):
        raise BitallocError(f"bad sweep {text!r}: expected START:STOP:STEP or a,b,c")
    if ":" in text:
        start, stop, step = values
        if not (step > 0 and start <= stop and math.isfinite(stop)):
            raise BitallocError(f"bad sweep {text!r}: need START <= STOP and STEP > 0")
        count = math.floor((stop - start) / step + 1e-9) + 1  # STOP included despite drift
        values = [round(start + i * step, 12) for i in range(count)]
    if not all(math.isfinite(b) and b > 0 for b in values):
        raise BitallocError(f"bad sweep {text!r}: budgets must be positive")
    return values


# ---- reading the profile -------------------------------------------------------------------
def _read_table(profile_table) -> tuple[dict[str, _Matrix], str, dict]:
    if isinstance(profile_table, (str, os.PathLike)):
        profile_table = read_profile(profile_table)
    if not isinstance(profile_table, pd.DataFrame):
        raise BitallocError(
            f"not a profile table: expected a pandas DataFrame, got {type(profile_table).__name__}"
        )
    attrs = dict(profile_table.attrs)
    objective = attrs.get("objective") or "weight"
    if objective not in OBJECTIVE_COLUMNS:
        raise BitallocError(f"unknown objective {objective!r} in the profile: expected weight or activation")
    needed = (*REQUIRED_COLUMNS, OBJECTIVE_COLUMNS[objective])
    missing = [column for column in dict.fromkeys(needed) if column not in profile_table.columns]
    if missing:
        raise BitallocError(f"not a profile table: missing column(s) {', '.join(missing)}")
    if len(profile_table) == 0:
        raise BitallocError("the profile table is empty")

    names = profile_table["module"].astype(str).to_numpy()
    numel = _column(profile_table, "numel", names, integer=True, minimum=1)
    storage = _column(profile_table, "storage_bits", names, integer=True, minimum=1)
    bits = _column(profile_table, "bits", names, integer=True, minimum=1)
    rank = _column(profile_table, "rank", names, integer=True, minimum=0)
    iters = _column(profile_table, "iters", names, integer=True, minimum=0)
    error = _column(profile_table, "error", names, integer=False, minimum=0)
    objective_error = _column(profile_table, OBJECTIVE_COLUMNS[objective], names, integer=False, minimum=0)
    configs = profile_table["config"].astype(str).to_numpy()
    canonical = {text: canonical_config(text, "profile table") for text in set(configs)}
    shapes = profile_table["shape"].to_numpy()

    matrices: dict[str, _Matrix] = {}
    for i, name in enumerate(names):
        matrix = matrices.get(name)
        if matrix is None:
            shape = _parse_shape(shapes[i], name)
            if shape[0] * shape[1] != numel[i]:
                raise BitallocError(f"profile row for {name!r}: numel {numel[i]} != shape {shape}")
            matrix = matrices[name] = _Matrix(shape, numel[i], {})
        config = canonical[configs[i]]
        if config in matrix.rows:
            raise BitallocError(f"the profile has two rows for {name!r} with config {config!r}")
        matrix.rows[config] = _Row(storage[i], error[i], objective_error[i], bits[i], rank[i], iters[i])
    ordered = {name: matrices[name] for name in sorted(matrices, key=natural_key)}
    return ordered, objective, attrs


def _column(table: pd.DataFrame, column: str, names, *, integer: bool, minimum: float) -> list:
    try:
        values = pd.to_numeric(table[column]).to_numpy(dtype=np.float64)
    except (ValueError, TypeError):
        raise BitallocError(f"profile column {column!r} is not numeric") from None
    bad = ~np.isfinite(values) | (values < minimum)
    if integer:
        bad |= values != np.round(values)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise BitallocError(
            f"profile column {column!r} has a bad value {float(values[i])!r} (module {names[i]!r})"
        )
    return [int(v) for v in values] if integer else values.tolist()


def _parse_shape(shape, name: str) -> tuple[int, int]:
    """[out, in] as a list, tuple or array, or the string "OUTxIN" (also "[out, in]")."""
    try:
        if isinstance(shape, str):
            parts = re.fullmatch(r"\s*[\[(]?\s*(\d+)\s*(?:x|×|,)\s*(\d+)\s*[\])]?\s*", shape)
            dims = tuple(int(part) for part in parts.groups())
        else:
            dims = tuple(int(part) for part in shape)
    except (AttributeError, TypeError, ValueError):
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise BitallocError(f"profile row for {name!r}: bad shape {shape!r}, expected [out, in]")
    return dims


def canonical_config(text: str, where: str) -> str:
    try:
        return str(QuantConfig.parse(text))
    except ValueError as exc:
        message = str(exc) if repr(text) in str(exc) else f"config {text!r}: {exc}"
        raise BitallocError(f"{where}: {message}") from None


# ---- constraints -----------------------------------------------------------------------------
def _matching(pattern: str, regex: re.Pattern, names: Sequence[str], what: str) -> list[str]:
    matched = [name for name in names if regex.search(name)]
    if not matched:
        raise BitallocError(f"{what} regex {pattern!r} matches no matrix in the profile")
    return matched


def prepare_problem(
    profile_table, *, count_lora=False, tie=(), min_bits=None, max_bits=None, pin=None, keep=()
) -> Problem:
    """Read the table, apply keep/pin/bit bounds/ties, and drop dominated configs."""
    matrices, objective, attrs = _read_table(profile_table)
    names = list(matrices)
    kept: set[str] = set()
    for pattern, regex in compile_patterns("keep", keep):
        kept.update(_matching(pattern, regex, names, "keep"))
    quantized = [name for name in names if name not in kept]
    if not quantized:
        raise BitallocError("keep leaves no matrix to quantize")

    for label, bound in (("min_bits", min_bits), ("max_bits", max_bits)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound)
        ):
            raise BitallocError(f"{label} must be a number of bits, got {bound!r}")
    low = -math.inf if min_bits is None else min_bits
    high = math.inf if max_bits is None else max_bits
    if low > high:
        raise BitallocError(f"min_bits {min_bits} is above max_bits {max_bits}")
    candidates = {
        name: {c for c, row in matrices[name].rows.items() if low <= row.bits <= high} for name in quantized
    }
    pinned: dict[str, str] = {}
    if pin is not None and not isinstance(pin, dict):
        raise BitallocError(f"pin must be a dict {{regex: config}}, got {type(pin).__name__}")
    for pattern, regex in compile_patterns("pin", list(pin or {})):
        config = canonical_config(pin[pattern], f"pin {pattern!r}")
        for name in _matching(pattern, regex, names, "pin"):
            if name in kept:
                raise BitallocError(f"{name!r} is both kept and pinned to {config!r}")
            if pinned.setdefault(name, config) != config:
                raise BitallocError(f"{name!r} is pinned to both {pinned[name]!r} and {config!r}")
            if config not in matrices[name].rows:
                raise BitallocError(f"pin {pattern!r}: config {config!r} is not in the profile for {name!r}")
            candidates[name] &= {config}
    for name in quantized:
        if not candidates[name]:
            why = f"pinned to {pinned[name]!r}" if name in pinned else "profiled configs"
            raise BitallocError(f"no config left for {name!r}: {why} outside bits [{min_bits}, {max_bits}]")

    components = _tie_components(tie, names, quantized)
    groups = []
    for members in components:
        common = set.intersection(*(candidates[name] for name in members))
        if not common:
            listed = ", ".join(repr(name) for name in members[:3])
            more = f" and {len(members) - 3} more" if len(members) > 3 else ""
            raise BitallocError(f"tied matrices {listed}{more} have no allowed config in common")
        options = []
        for config in common:
            storage = sum(matrices[n].storage(config, count_lora) for n in members)
            error = math.fsum(matrices[n].rows[config].objective_error for n in members)
            options.append((config, storage, error))
        groups.append(_Group(members, _undominated(options)))
    numel = sum(matrices[name].numel for name in quantized)
    return Problem(
        matrices, groups, [n for n in names if n in kept], numel, objective, bool(count_lora), attrs
    )


def _tie_components(tie, names: list[str], quantized: list[str]) -> list[list[str]]:
    """Quantized matrices grouped so that tied ones share a group (union-find), in name order."""
    parent = {name: name for name in quantized}

    def root(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for pattern, regex in compile_patterns("tie", tie):
        buckets: dict[tuple, list[str]] = {}
        for name in _matching(pattern, regex, names, "tie"):
            if name in parent:  # kept matrices are outside the allocation
                buckets.setdefault(regex.search(name).groups(), []).append(name)
        for members in buckets.values():
            for other in members[1:]:
                parent[root(other)] = root(members[0])
    components: dict[str, list[str]] = {}
    for name in quantized:
        components.setdefault(root(name), []).append(name)
    return list(components.values())


def _undominated(options: list[tuple[str, int, float]]) -> list[tuple[str, int, float]]:
    """Drop options with at least the storage and the error of another (ties: by name)."""
    kept, best_error = [], math.inf
    for option in sorted(options, key=lambda o: (o[1], o[2], o[0])):
        if option[2] < best_error:
            kept.append(option)
            best_error = option[2]
    return kept


# ---- budget and solving ------------------------------------------------------------------
def capacity_bits(budget: float, numel: int) -> int:
    """Largest total storage in bits allowed by ``budget`` bits/param over ``numel`` params.

    Exact: the budget is read both as its binary value and as the decimal it prints as,
    whichever allows more, so a budget printed by `feasible_range` or a plan is achievable.
    """
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BitallocError(f"budget must be a number of bits per parameter, got {budget!r}")
    value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise BitallocError(f"budget must be a positive number of bits per parameter, got {budget}")
    return max(math.floor(Fraction(value) * numel), math.floor(Fraction(repr(value)) * numel))


def _feasible_range(problem: Problem) -> tuple[float, float]:
    def at_least(value: Fraction) -> float:
        result = float(value)
        return math.nextafter(result, math.inf) if Fraction(result) < value else result

    lowest = sum(group.options[0][1] for group in problem.groups)
    highest = sum(group.options[-1][1] for group in problem.groups)
    return at_least(Fraction(lowest, problem.numel)), at_least(Fraction(highest, problem.numel))


def _solve_plan(problem: Problem, budget: float, solver: str, source: str | None) -> Plan:
    if solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    capacity = capacity_bits(budget, problem.numel)
    if sum(group.options[0][1] for group in problem.groups) > capacity:
        lo, hi = _feasible_range(problem)
        raise BitallocError(
            f"budget {float(budget)!r} is infeasible: achievable average bits/param for this "
            f"profile and constraints is {math.ceil(lo * 1e4) / 1e4:g} to {round(hi, 4):g}"
        )
    options = [[(storage, error) for _, storage, error in group.options] for group in problem.groups]
    choice, gap = solve(options, capacity, solver)
    return _build_plan(problem, float(budget), choice, solver, gap, source)


# ---- building the plan --------------------------------------------------------------------
def _build_plan(
    problem: Problem, budget: float, choice: list[int], solver: str, gap: float, source: str | None
) -> Plan:
    assignment = {
        name: group.options[i][0]
        for group, i in zip(problem.groups, choice, strict=True)
        for name in group.modules
    }
    modules, storage, errors, ranks, iters = {}, 0, [], Counter(), Counter()
    for name in problem.matrices:
        if name not in assignment:
            continue
        matrix, config = problem.matrices[name], assignment[name]
        row = matrix.rows[config]
        entry = QuantConfig.parse(config).to_dict()
        entry.update(
            storage_bits=row.storage_bits,
            shape=list(matrix.shape),
            numel=matrix.numel,
            rank=row.rank,
            error=row.error,
        )
        if problem.objective != "weight":
            entry["weighted_error"] = row.objective_error
        modules[name] = entry
        storage += matrix.storage(config, problem.count_lora)
        errors.append(row.objective_error)
        ranks[row.rank] += 1
        iters[row.iters] += 1
    source = source if source is not None else problem.attrs.get("source")
    fingerprint = problem.attrs.get("fingerprint")
    return Plan(
        model={
            "source": None if source is None else str(source),
            "fingerprint": None if fingerprint is None else str(fingerprint),
        },
        budget={
            "target_bits": budget,
            "achieved_bits": float(round(Fraction(storage, problem.numel), 6)),
            "includes_lora": problem.count_lora,
        },
        objective=problem.objective,
        calibration=_calibration_record(problem),
        solver={
            "name": solver,
            "status": "optimal",
            "objective": math.fsum(errors),
            "gap": round(gap, 9),
        },
        defaults={"rank": most_common(ranks), "iters": most_common(iters)},
        kept=list(problem.kept),
        modules=modules,
        calibration_file=_calibration_file(problem),
    )


def _calibration_file(problem: Problem) -> Path | None:
    """Where the profile saved its h (a data-aware profile written to a file), else None."""
    record = problem.attrs.get("calibration") or {}
    if problem.objective == "weight" or not record.get("path"):
        return None
    return Path(record["path"])


def _calibration_record(problem: Problem) -> dict | None:
    """What a data-aware plan keeps of the profile's calibration (no machine-specific path)."""
    record = problem.attrs.get("calibration")
    if problem.objective == "weight" or not record:
        return None
    return {key: value for key, value in sorted(record.items()) if key != "path"}
