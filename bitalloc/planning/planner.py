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

import itertools
import math
import numbers
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from ..errors import BitallocError
from ..names import compile_patterns, natural_key
from ..profiling.objectives import OBJECTIVE_COLUMNS  # objective -> the column it minimizes
from ..profiling.table import REQUIRED_COLUMNS, read_profile
from ..quant import QuantConfig
from .mckp import SOLVERS, solve
from .plan_file import Plan, _shown, most_common

__all__ = ["Plan", "feasible_range", "parse_sweep", "plan", "sweep"]

LORA_BITS = 16  # LoRA factors are counted at 16 bits when the budget includes them
MAX_SWEEP = 1000  # budgets in one sweep
MAX_EXACT_INT = 2**53  # integer columns are read through float64: exact up to here
MAX_TOTAL_BITS = 2**62  # the exact solvers sum storage in int64


@dataclass
class _Row:
    """One profiled (matrix, config) pair."""

    storage_bits: int
    error: float
    objective_error: float  # what the solver minimizes: coefficient x weighted (or plain) error
    bits: int
    rank: int
    iters: int
    weighted_error: float | None = None  # the profile's objective column, before the coefficient
    coefficient: float | None = None  # the matrix's layer weight, when the profile has them


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
    layer_weights: bool = True,
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
        _check_budget(budget)
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
    if not isinstance(objective, str) or objective not in OBJECTIVE_COLUMNS:
        raise BitallocError(
            f"unknown objective {objective!r} in the profile: expected weight, activation or output"
        )
    if not isinstance(attrs.get("calibration") or {}, dict):
        raise BitallocError(f"the profile's calibration record is not a dict: {_shown(attrs['calibration'])}")
    needed = (*REQUIRED_COLUMNS, OBJECTIVE_COLUMNS[objective])
    missing = [column for column in dict.fromkeys(needed) if column not in profile_table.columns]
    if missing:
        raise BitallocError(f"not a profile table: missing column(s) {', '.join(missing)}")
    duplicated = [c for c in dict.fromkeys(profile_table.columns[profile_table.columns.duplicated()])]
    if duplicated:
        raise BitallocError(f"not a profile table: duplicate column(s) {', '.join(map(str, duplicated))}")
    if len(profile_table) == 0:
        raise BitallocError("the profile table is empty")

    names = _module_names(profile_table["module"])
    numel = _column(profile_table, "numel", names, integer=True, minimum=1)
    storage = _column(profile_table, "storage_bits", names, integer=True, minimum=1)
    bits = _column(profile_table, "bits", names, integer=True, minimum=1)
    block_size = _column(profile_table, "block_size", names, integer=True, minimum=1)
    rank = _column(profile_table, "rank", names, integer=True, minimum=0)
    iters = _column(profile_table, "iters", names, integer=True, minimum=0)
    error = _column(profile_table, "error", names, integer=False, minimum=0)
    objective_error = _column(profile_table, OBJECTIVE_COLUMNS[objective], names, integer=False, minimum=0)
    configs = profile_table["config"].astype(str).to_numpy()
    canonical = {text: canonical_config(text, "profile table") for text in set(configs)}
    parsed = {config: QuantConfig.parse(config) for config in set(canonical.values())}
    methods = profile_table["method"].to_numpy(dtype=object)
    shapes = profile_table["shape"].to_numpy()

    matrices: dict[str, _Matrix] = {}
    exact_storage: dict[tuple[str, tuple[int, int]], int] = {}  # (config, shape) -> storage_bits
    for i, name in enumerate(names):
        shape = _parse_shape(shapes[i], name)
        if shape[0] * shape[1] != numel[i]:
            raise BitallocError(f"profile row for {name!r}: numel {numel[i]} != shape {shape}")
        matrix = matrices.get(name)
        if matrix is None:
            matrix = matrices[name] = _Matrix(shape, numel[i], {})
        elif matrix.shape != shape:
            raise BitallocError(
                f"profile rows for {name!r} disagree on its shape: {matrix.shape} and {shape}"
            )
        config = canonical[configs[i]]
        if config in matrix.rows:
            raise BitallocError(f"the profile has two rows for {name!r} with config {config!r}")
        exact = exact_storage.get((config, shape))
        if exact is None:
            exact = exact_storage[config, shape] = parsed[config].storage_bits(shape)
        _check_row(
            name,
            config,
            parsed[config],
            shape,
            methods[i],
            bits[i],
            block_size[i],
            (storage[i], exact),
            rank[i],
        )
        matrix.rows[config] = _Row(storage[i], error[i], objective_error[i], bits[i], rank[i], iters[i])
    for column, values in (("error", error), (OBJECTIVE_COLUMNS[objective], objective_error)):
        try:
            total = math.fsum(values)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            raise BitallocError(f"profile column {column!r}: values too large (their sum is not finite)")
    order = sorted(matrices, key=natural_key)
    return {name: matrices[name] for name in order}, objective, attrs


def _apply_coefficients(matrices: dict[str, _Matrix], attrs: dict) -> None:
    """Multiply each matrix's objective errors by its layer coefficient, if the profile has them."""
    record = attrs.get("layer_weights")
    if not record:
        return
    coefficients = record.get("coefficients") if isinstance(record, dict) else None
    if not isinstance(coefficients, dict):
        raise BitallocError("the profile's layer_weights record has no coefficients")
    for name, matrix in matrices.items():
        value = coefficients.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not _finite(value) or value < 0:
            raise BitallocError(
                f"the profile's layer coefficient for {name!r} is missing or bad: {_shown(value)}"
            )
        for row in matrix.rows.values():
            row.weighted_error, row.coefficient = row.objective_error, float(value)
            row.objective_error = float(value) * row.objective_error


def _module_names(column: pd.Series) -> list[str]:
    """The ``module`` column as non-empty strings (BitallocError naming the first bad one)."""
    names = column.to_numpy(dtype=object)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise BitallocError(
                f"profile column 'module' has a bad value {name!r} (row {i}): expected a name"
            )
    return [str(name) for name in names]


def _check_row(name, config, quant: QuantConfig, shape, method, bits, block_size, storage, rank) -> None:
    """The row's derived columns must be what its config implies (the config is the authority);
    ``storage`` is (the row's storage_bits, the config's exact storage on ``shape``)."""
    where = f"profile row for {name!r} with config {config!r}"
    for column, value, expected in (
        ("method", method, quant.method),
        ("bits", bits, quant.bits),
        ("block_size", block_size, quant.block_size),
    ):
        if not isinstance(value, type(expected)) or value != expected:
            raise BitallocError(f"{where}: {column} {_shown(value)} disagrees with the config ({expected!r})")
    storage, exact = storage
    if storage != exact:
        raise BitallocError(
            f"{where}: storage_bits {storage} is not the exact storage of the config on shape "
            f"{list(shape)} ({exact})"
        )
    if rank > min(shape):
        raise BitallocError(f"{where}: rank {rank} exceeds the matrix size {list(shape)}")


def _column(table: pd.DataFrame, column: str, names, *, integer: bool, minimum: float) -> list:
    try:
        values = pd.to_numeric(table[column]).to_numpy(dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise BitallocError(f"profile column {column!r} is not numeric") from None
    if values.shape != (len(table),):
        raise BitallocError(f"profile column {column!r} is not numeric")
    bad = ~np.isfinite(values) | (values < minimum)
    if integer:
        bad |= (values != np.round(values)) | (values > MAX_EXACT_INT)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = float(values[i])
        expected = f"an integer >= {minimum}" if integer else f"a finite number >= {minimum}"
        if integer and math.isfinite(value) and value > MAX_EXACT_INT:
            expected = "an integer up to 2**53"
        raise BitallocError(
            f"profile column {column!r} has a bad value {value!r} (module {_shown(names[i])}): "
            f"expected {expected}"
        )
    return [int(v) for v in values] if integer else values.tolist()


def _parse_shape(shape, name: str) -> tuple[int, int]:
    """[out, in] as a list, tuple or array, or the string "OUTxIN" (also "[out, in]")."""
    try:
        if isinstance(shape, str):
            parts = re.fullmatch(r"\s*[\[(]?\s*([0-9]+)\s*(?:x|×|,)\s*([0-9]+)\s*[\])]?\s*", shape)
            dims = tuple(int(part) for part in parts.groups())
        else:
            dims = tuple(int(part) for part in shape)
            if any(isinstance(part, bool) or part != dim for part, dim in zip(shape, dims, strict=True)):
                dims = ()  # 128.5, True: not a dimension
    except (AttributeError, TypeError, ValueError, OverflowError):
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise BitallocError(f"profile row for {name!r}: bad shape {_shown(str(shape))}, expected [out, in]")
    return dims


def canonical_config(text: str, where: str) -> str:
    try:
        return str(QuantConfig.parse(text))
    except BitallocError as exc:
        message = str(exc) if repr(text) in str(exc) else f"config {text!r}: {exc}"
        raise BitallocError(f"{where}: {message}") from None


# ---- constraints -----------------------------------------------------------------------------
def _patterns(kind: str, regexes) -> list[tuple[str, re.Pattern[str]]]:
    """compile_patterns, after checking that ``regexes`` is None, a string or strings."""
    if regexes is not None and not isinstance(regexes, str):
        try:
            regexes = list(regexes)
        except TypeError:
            regexes = [regexes]
        for regex in regexes:
            if not isinstance(regex, str):
                raise BitallocError(f"invalid {kind} regex {_shown(regex)}: expected a string")
    return compile_patterns(kind, regexes)


def _matching(pattern: str, regex: re.Pattern, names: Sequence[str], what: str) -> list[str]:
    matched = [name for name in names if regex.search(name)]
    if not matched:
        raise BitallocError(f"{what} regex {pattern!r} matches no matrix in the profile")
    return matched


def prepare_problem(
    profile_table,
    *,
    count_lora=False,
    tie=(),
    min_bits=None,
    max_bits=None,
    pin=None,
    keep=(),
    layer_weights=True,
) -> Problem:
    """Read the table, apply keep/pin/bit bounds/ties, and drop dominated configs."""
    matrices, objective, attrs = _read_table(profile_table)
    if layer_weights:
        _apply_coefficients(matrices, attrs)
    else:
        attrs.pop("layer_weights", None)
    if isinstance(count_lora, np.bool_):
        count_lora = bool(count_lora)
    if not isinstance(count_lora, bool):
        raise BitallocError(f"count_lora must be True or False, got {count_lora!r}")
    names = list(matrices)
    kept: set[str] = set()
    for pattern, regex in _patterns("keep", keep):
        kept.update(_matching(pattern, regex, names, "keep"))
    quantized = [name for name in names if name not in kept]
    if not quantized:
        raise BitallocError("keep leaves no matrix to quantize")

    for label, bound in (("min_bits", min_bits), ("max_bits", max_bits)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not _finite(bound)
        ):
            raise BitallocError(f"{label} must be a number of bits, got {_shown(bound)}")
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
    for pattern, regex in _patterns("pin", list(pin or {})):
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
    if sum(group.options[-1][1] for group in groups) >= MAX_TOTAL_BITS:
        raise BitallocError("the profiled matrices are too large to plan: over 2**62 bits in all")
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

    for pattern, regex in _patterns("tie", tie):
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
    value = _check_budget(budget)
    return max(math.floor(Fraction(value) * numel), math.floor(Fraction(repr(value)) * numel))


def _check_budget(budget) -> float:
    """The budget as a float; BitallocError unless it is a finite positive number (no bool)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BitallocError(f"budget must be a number of bits per parameter, got {_shown(budget)}")
    value = float(budget) if _finite(budget) else math.inf
    if not math.isfinite(value) or value <= 0:
        raise BitallocError(f"budget must be a positive number of bits per parameter, got {_shown(budget)}")
    return value


def _finite(value: numbers.Real) -> bool:
    """math.isfinite, False for a number beyond the float range instead of OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_solver(solver) -> None:
    if not isinstance(solver, str) or solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVERS)}")


def _feasible_range(problem: Problem) -> tuple[float, float]:
    def at_least(value: Fraction) -> float:
        result = float(value)
        return math.nextafter(result, math.inf) if Fraction(result) < value else result

    lowest = sum(group.options[0][1] for group in problem.groups)
    highest = sum(group.options[-1][1] for group in problem.groups)
    return at_least(Fraction(lowest, problem.numel)), at_least(Fraction(highest, problem.numel))


def _solve_plan(problem: Problem, budget: float, solver: str, source: str | None) -> Plan:
    _check_solver(solver)
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
            entry["weighted_error"] = row.objective_error if row.coefficient is None else row.weighted_error
        if row.coefficient is not None:
            entry["coefficient"] = row.coefficient
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
            "achieved_bits": _achieved_bits(Fraction(storage, problem.numel), budget),
            "includes_lora": problem.count_lora,
        },
        objective=problem.objective,
        calibration=_calibration_record(problem),
        layer_weights=_layer_weights_record(problem),
        solver={
            "name": solver,
            "status": "optimal",
            "objective": math.fsum(errors),
            "gap": round(gap, 9),
        },
        defaults={"rank": most_common(ranks), "iters": most_common(iters)},
        kept=list(problem.kept),
        modules=modules,
    )


def _achieved_bits(ratio: Fraction, budget: float) -> float:
    """``ratio`` (storage per parameter, within ``budget``) to 6 decimals, never printed above
    the budget: rounded to nearest, or down where rounding up would pass the budget."""
    achieved = float(round(ratio, 6))
    if achieved > budget:
        achieved = float(Fraction(math.floor(ratio * 10**6), 10**6))
    return achieved


def _layer_weights_record(problem: Problem) -> dict | None:
    """How the plan's coefficients were measured (the coefficients go in each module entry)."""
    record = problem.attrs.get("layer_weights")
    if not record:
        return None
    return {key: value for key, value in sorted(record.items()) if key not in ("coefficients", "points")}


def _calibration_record(problem: Problem) -> dict | None:
    """What a data-aware plan keeps of the profile's calibration: what its statistics are
    computed from again (a user text's path is kept; earlier profiles' side-file path is not)."""
    record = problem.attrs.get("calibration")
    if problem.objective == "weight" or not record:
        return None
    return {key: value for key, value in sorted(record.items()) if key != "path"}
