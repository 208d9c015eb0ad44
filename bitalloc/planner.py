"""Bit allocation: one quantization config per matrix under an average bit budget.

A multiple-choice knapsack solved as an integer program (LQ-LoRA's ILP; HAWQ-V3's ties):
binary x[g, c] picks config c for group g (one matrix, or matrices tied to share a config),
exactly one per group, sum(storage_bits * x) <= budget * sum(numel), minimizing the summed
error. Dominated configs are dropped first, and an exact Lagrangian reduction (see `_solve`)
hands the solver only the configs that could still beat a greedy solution. Storage is
compared in exact integers; the solvers see scaled costs and their answer is re-checked.
The plan file format lives in `plan_format`.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import pandas as pd

from .errors import BitallocError
from .plan_format import Plan
from .quant import QuantConfig

__all__ = [
    "Baseline",
    "Plan",
    "feasible_range",
    "first_k_layers_baseline",
    "parse_sweep",
    "plan",
    "summarize",
    "sweep",
    "uniform_baselines",
]

OBJECTIVE_COLUMNS = {"weight": "error", "activation": "weighted_error", "fisher": "weighted_error"}
REQUIRED_COLUMNS = tuple(
    "module shape numel config method bits block_size bits_per_param storage_bits error "
    "rel_error qlora_error rank iters".split()
)
SOLVERS = ("cbc", "highs", "dp")
LORA_BITS = 16  # LoRA factors are counted at 16 bits when the budget includes them
KIND_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down")  # summary columns


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
    name: str
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
class _Problem:
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
    ``activation`` or ``fisher``. Constraints (regexes are searched in module names):

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
    problem = _prepare(
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
    problem = _prepare(profile_table, **constraints)
    return [_solve_plan(problem, budget, solver, source) for budget in budgets]


def feasible_range(profile_table: pd.DataFrame, **constraints) -> tuple[float, float]:
    """(lowest, highest) achievable average bits/param under the constraints (as in `plan`).

    Both are rounded up to the next float, so ``plan(table, budget=lo)`` is feasible and
    ``plan(table, budget=hi)`` gives every matrix its most accurate config.
    """
    return _feasible_range(_prepare(profile_table, **constraints))


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


@dataclass(frozen=True)
class Baseline:
    """A simple allocation to compare a plan with (error in the plan's objective)."""

    name: str
    error: float
    achieved_bits: float
    storage_bits: int  # exact total, LoRA included when counted
    assignments: dict[str, str]


def uniform_baselines(
    profile_table: pd.DataFrame,
    budget: float,
    *,
    count_lora: bool = False,
    keep: Iterable[str] = (),
) -> list[Baseline]:
    """Every config that, applied to all quantized matrices, fits the budget; best first."""
    problem = _prepare(profile_table, count_lora=count_lora, keep=keep)
    capacity = _capacity(budget, problem.numel)
    names = _quantized(problem)
    common = set.intersection(*(set(problem.matrices[name].rows) for name in names))
    baselines = [_baseline(problem, config, dict.fromkeys(names, config)) for config in common]
    baselines = [b for b in baselines if b.storage_bits <= capacity]
    return sorted(baselines, key=lambda b: (b.error, b.name))


def first_k_layers_baseline(
    profile_table: pd.DataFrame,
    budget: float,
    *,
    high: str = "nf4-b64-s8b256",
    low: str = "nf2-b64-s8b256",
    count_lora: bool = False,
    keep: Iterable[str] = (),
) -> Baseline | None:
    """LoftQ's mix: the first k layers at ``high``, the rest at ``low``, largest k that fits.

    Matrices outside numbered layers get ``low``. None when even k = 0 does not fit.
    """
    problem = _prepare(profile_table, count_lora=count_lora, keep=keep)
    capacity = _capacity(budget, problem.numel)
    high, low = _canonical_config(high, "high"), _canonical_config(low, "low")
    names = _quantized(problem)
    for config in (high, low):
        for name in names:
            if config not in problem.matrices[name].rows:
                raise BitallocError(f"config {config!r} is not in the profile for {name!r}")
    layers = sorted({_layer_index(name) for name in names} - {None})
    for k in range(len(layers), -1, -1):
        first = set(layers[:k])
        assignments = {n: high if _layer_index(n) in first else low for n in names}
        baseline = _baseline(problem, f"first {k} layers {high}, rest {low}", assignments)
        if baseline.storage_bits <= capacity:
            return baseline
    return None


def summarize(plan: Plan, profile_table: pd.DataFrame) -> str:
    """A human summary: bits, error vs the best uniform config, config counts, per-layer map."""
    budget = plan.budget
    lora = "LoRA counted" if budget["includes_lora"] else "LoRA not counted"
    lines = [
        f"target {budget['target_bits']:g} bits/param, achieved {budget['achieved_bits']:g} "
        f"({lora}); objective {plan.objective}; {plan.solver['name']} {plan.solver['status']}",
        f"{len(plan.modules)} matrices quantized, {len(plan.kept)} kept in 16 bits",
    ]
    keep = [f"^{re.escape(name)}$" for name in plan.kept]
    uniform = uniform_baselines(
        profile_table, budget["target_bits"], count_lora=budget["includes_lora"], keep=keep
    )
    line = f"total error {plan.total_error:.6g}"
    if uniform:
        best = uniform[0]
        ratio = f"{best.error / plan.total_error:.2f}x" if plan.total_error > 0 else "n/a"
        line += (
            f"; best uniform config within {budget['target_bits']:g} bits: {best.name} "
            f"({best.achieved_bits:g} bits/param), error {best.error:.6g} = {ratio} "
            "the plan's"
        )
    else:
        line += f"; no uniform config fits {budget['target_bits']:g} bits/param"
    lines.append(line)
    lines.append("matrices per config:")
    counts = Counter(plan.assignments.values())
    width = max(map(len, counts))
    for config, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        lines.append(f"  {config:<{width}}  {count}")
    lines.append("per layer (bits/block):")
    lines.extend(_layer_table(plan))
    return "\n".join(lines)


# ---- reading the profile -------------------------------------------------------------------
def _read_table(profile_table: pd.DataFrame) -> tuple[dict[str, _Matrix], str, dict]:
    if not isinstance(profile_table, pd.DataFrame):
        raise BitallocError(
            f"not a profile table: expected a pandas DataFrame, got {type(profile_table).__name__}"
        )
    attrs = dict(profile_table.attrs)
    objective = attrs.get("objective") or "weight"
    if objective not in OBJECTIVE_COLUMNS:
        raise BitallocError(
            f"unknown objective {objective!r} in the profile: expected weight, activation or fisher"
        )
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
    canonical = {text: _canonical_config(text, "profile table") for text in set(configs)}
    shapes = profile_table["shape"].to_numpy()

    matrices: dict[str, _Matrix] = {}
    for i, name in enumerate(names):
        matrix = matrices.get(name)
        if matrix is None:
            shape = _parse_shape(shapes[i], name)
            if shape[0] * shape[1] != numel[i]:
                raise BitallocError(f"profile row for {name!r}: numel {numel[i]} != shape {shape}")
            matrix = matrices[name] = _Matrix(name, shape, numel[i], {})
        config = canonical[configs[i]]
        if config in matrix.rows:
            raise BitallocError(f"the profile has two rows for {name!r} with config {config!r}")
        matrix.rows[config] = _Row(storage[i], error[i], objective_error[i], bits[i], rank[i], iters[i])
    ordered = {name: matrices[name] for name in sorted(matrices, key=_natural_key)}
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


def _canonical_config(text: str, where: str) -> str:
    try:
        return str(QuantConfig.parse(text))
    except ValueError as exc:
        message = str(exc) if repr(text) in str(exc) else f"config {text!r}: {exc}"
        raise BitallocError(f"{where}: {message}") from None


def _natural_key(name: str) -> tuple:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name))


# ---- constraints -----------------------------------------------------------------------------
def _patterns(patterns: Iterable[str] | str | None, what: str) -> list[tuple[str, re.Pattern]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append((pattern, re.compile(pattern)))
        except (re.error, TypeError) as exc:
            raise BitallocError(f"bad {what} regex {pattern!r}: {exc}") from None
    return compiled


def _matching(pattern: str, regex: re.Pattern, names: Sequence[str], what: str) -> list[str]:
    matched = [name for name in names if regex.search(name)]
    if not matched:
        raise BitallocError(f"{what} regex {pattern!r} matches no matrix in the profile")
    return matched


def _prepare(
    profile_table, *, count_lora=False, tie=(), min_bits=None, max_bits=None, pin=None, keep=()
) -> _Problem:
    """Read the table, apply keep/pin/bit bounds/ties, and drop dominated configs."""
    matrices, objective, attrs = _read_table(profile_table)
    names = list(matrices)
    kept: set[str] = set()
    for pattern, regex in _patterns(keep, "keep"):
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
    for pattern, regex in _patterns(list(pin or {}), "pin"):
        config = _canonical_config(pin[pattern], f"pin {pattern!r}")
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
    return _Problem(
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

    for pattern, regex in _patterns(tie, "tie"):
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


# ---- budget and solving ------------------------------------------------------------------------
def _capacity(budget: float, numel: int) -> int:
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


def _feasible_range(problem: _Problem) -> tuple[float, float]:
    def at_least(value: Fraction) -> float:
        result = float(value)
        return math.nextafter(result, math.inf) if Fraction(result) < value else result

    lowest = sum(group.options[0][1] for group in problem.groups)
    highest = sum(group.options[-1][1] for group in problem.groups)
    return at_least(Fraction(lowest, problem.numel)), at_least(Fraction(highest, problem.numel))


def _solve_plan(problem: _Problem, budget: float, solver: str, source: str | None) -> Plan:
    if solver not in SOLVERS:
        raise BitallocError(f"unknown solver {solver!r}: expected one of {', '.join(SOLVERS)}")
    capacity = _capacity(budget, problem.numel)
    if sum(group.options[0][1] for group in problem.groups) > capacity:
        lo, hi = _feasible_range(problem)
        raise BitallocError(
            f"budget {float(budget)!r} is infeasible: achievable average bits/param for this "
            f"profile and constraints is {math.ceil(lo * 1e4) / 1e4:g} to {round(hi, 4):g}"
        )
    choice, gap = _solve(problem.groups, capacity, solver)
    return _build_plan(problem, float(budget), choice, solver, gap, source)


def _solve(groups: list[_Group], capacity: int, solver: str) -> tuple[list[int], float]:
    """Option index per group minimizing the error with storage <= capacity (exact ints).

    Exact core reduction around the ILP: at the LP's budget price λ every solution's error
    is at least the Lagrangian bound plus the reduced costs e + λ·s − min(e + λ·s) of its
    options, so a solution better than z uses only options with reduced cost <= z − bound.
    The ILP is solved on the options below a threshold (a restricted problem, containing
    the greedy incumbent); once its optimum z satisfies z − bound <= threshold, no option
    left out can improve it and z is optimal. Otherwise the threshold grows and it re-solves.
    ``solver="dp"`` instead runs an exact dynamic program over the whole core.
    """
    if sum(group.options[-1][1] for group in groups) <= capacity:
        return [len(group.options) - 1 for group in groups], 0.0
    width = max(len(group.options) for group in groups)
    storage = np.full((len(groups), width), np.inf)
    error = np.full((len(groups), width), np.inf)
    for index, group in enumerate(groups):
        storage[index, : len(group.options)] = [option[1] for option in group.options]
        error[index, : len(group.options)] = [option[2] for option in group.options]
    price, bound = _lagrangian(storage, error, capacity)
    reduced = error + price * storage
    reduced -= reduced.min(axis=1, keepdims=True)
    margin = 1e-9 * (abs(bound) + price * capacity)  # floating-point safety: keeps more options
    choice = _greedy(storage, error, price, capacity).tolist()
    best = math.fsum(error[np.arange(len(groups)), choice])
    if solver == "dp" and best > 0:
        core = reduced <= best - bound + margin
        solution = _solve_dp(groups, error, core, choice, capacity, price, best + margin)
        if math.fsum(error[np.arange(len(groups)), solution]) <= best:
            choice = solution
    threshold, gap = (best - bound) / 16, 0.0
    while best > 0 and solver != "dp":
        core = reduced <= threshold + margin
        solution, gap = _solve_core(groups, storage, error, core, choice, capacity, solver, best)
        value = math.fsum(error[np.arange(len(groups)), solution])
        if value < best:
            choice, best = solution, value
        if best - bound <= threshold:
            break  # every option that could beat `best` was in the restricted problem
        threshold = min(best - bound, 4 * threshold)
    _top_up(groups, choice, capacity)
    return choice, gap


def _solve_core(groups, storage, error, core, incumbent, capacity, solver, scale):
    """The ILP restricted to ``core`` options (plus the incumbent's); exact-storage checked."""
    core = core.copy()
    core[np.arange(len(groups)), incumbent] = True
    counts = core.sum(axis=1)
    solution = list(incumbent)
    for g in np.flatnonzero(counts == 1):
        solution[g] = int(np.flatnonzero(core[g])[0])
    free = [(g, np.flatnonzero(core[g]).tolist()) for g in np.flatnonzero(counts > 1)]
    slack = capacity - sum(groups[g].options[solution[g]][1] for g in np.flatnonzero(counts == 1))
    slack -= sum(groups[g].options[options[0]][1] for g, options in free)
    free = [(g, [i for i in opts if storage[g, i] - storage[g, opts[0]] <= slack]) for g, opts in free]
    if not free or slack <= 0:
        return incumbent, 0.0
    unit = scale * 1e-7  # solver tolerances (~1e-5 absolute) become ~1e-12 of the objective
    costs = [[(error[g, i] - error[g, options[-1]]) / unit for i in options] for g, options in free]
    weights = [[(storage[g, i] - storage[g, options[0]]) / slack for i in options] for g, options in free]
    start = [options.index(incumbent[g]) for g, options in free]  # a MIP start for CBC
    rhs = 1.0
    for _attempt in range(4):
        picks, gap = _BACKENDS[solver](costs, weights, rhs, start)
        for (g, options), pick in zip(free, picks, strict=True):
            solution[g] = options[pick]
        used = sum(group.options[i][1] for group, i in zip(groups, solution, strict=True))
        if used <= capacity:
            return solution, gap
        rhs -= (used - capacity) / slack + 1e-9  # a feasibility tolerance let it overshoot
    raise RuntimeError(f"{solver}: solution exceeds the budget after 4 tries (numerics)")


def _solve_dp(groups, error, core, incumbent, capacity, price, limit) -> list[int]:
    """Exact dynamic programming over the core options: the Pareto front of (storage, error).

    Groups are added one at a time; a partial choice is dropped when another has no more
    storage and less error, or when even the Lagrangian bound of the rest, error + λ·(storage
    − capacity) + sum of min(e + λ·s) over the groups left, exceeds the incumbent (``limit``).
    Matrices of one shape share storage values, so the front stays small where branch and
    bound would enumerate near-ties.
    """
    core = core.copy()
    core[np.arange(len(groups)), incumbent] = True
    free = [g for g in range(len(groups)) if core[g].sum() > 1]
    fixed = [g for g in range(len(groups)) if core[g].sum() == 1]
    room = capacity - sum(groups[g].options[incumbent[g]][1] for g in fixed)
    limit -= math.fsum(error[g, incumbent[g]] for g in fixed)
    lagrangian = [min(e + price * s for _, s, e in groups[g].options) for g in free]
    rest = math.fsum(lagrangian)
    storage, total, steps = np.zeros(1, dtype=np.int64), np.zeros(1), []
    for g, minimum in zip(free, lagrangian, strict=True):
        rest -= minimum
        options = np.flatnonzero(core[g])
        sizes = np.array([groups[g].options[i][1] for i in options], dtype=np.int64)
        new_storage = (storage[:, None] + sizes).ravel()
        new_total = (total[:, None] + error[g, options]).ravel()
        keep = (new_storage <= room) & (new_total + price * (new_storage - room) + rest <= limit)
        parent = np.repeat(np.arange(len(storage)), len(options))[keep]
        option = np.tile(options, len(storage))[keep]
        new_storage, new_total = new_storage[keep], new_total[keep]
        order = np.lexsort((new_total, new_storage))
        front = np.ones(len(order), dtype=bool)
        front[1:] = new_total[order][1:] < np.minimum.accumulate(new_total[order])[:-1]
        order = order[front]
        storage, total = new_storage[order], new_total[order]
        steps.append((parent[order], option[order]))
    solution = list(incumbent)
    if len(total) == 0:  # only possible through rounding in the bound: keep the incumbent
        return solution
    state = int(np.argmin(total))
    for g, (parent, option) in zip(reversed(free), reversed(steps), strict=True):
        solution[g] = int(option[state])
        state = int(parent[state])
    return solution


def _lagrangian(storage: np.ndarray, error: np.ndarray, capacity: int) -> tuple[float, float]:
    """The LP's budget price λ (bisection) and the Lagrangian lower bound at that price."""
    rows = np.arange(len(storage))

    def used(price: float) -> float:
        return storage[rows, np.argmin(error + price * storage, axis=1)].sum()

    finite = np.isfinite(storage)
    spans_e = np.where(finite, error[:, :1] - error, 0.0)
    spans_s = np.where(finite, storage - storage[:, :1], 1.0)
    low, high = 0.0, float(np.max(spans_e / np.maximum(spans_s, 1.0))) * 2 + 1.0
    for _ in range(200):
        middle = (low + high) / 2
        if middle in (low, high):
            break
        low, high = (low, middle) if used(middle) <= capacity else (middle, high)
    bound = float((error + high * storage).min(axis=1).sum() - high * capacity)
    return high, bound


def _greedy(storage: np.ndarray, error: np.ndarray, price: float, capacity: int) -> np.ndarray:
    """A feasible start: the Lagrangian choice at ``price``, then the upgrades that fit, best
    error reduction per bit first."""
    rows = np.arange(len(storage))
    choice = np.argmin(error + price * storage, axis=1)
    while True:
        extra = storage - storage[rows, choice][:, None]
        gain = error[rows, choice][:, None] - error
        room = capacity - storage[rows, choice].sum()
        fits = (extra <= room) & (gain > 0)
        if not fits.any():
            return choice
        score = np.where(fits, gain / np.where(fits, extra, 1.0), -np.inf)
        best = np.unravel_index(np.argmax(score), score.shape)
        choice[best[0]] = best[1]


def _top_up(groups: list[_Group], choice: list[int], capacity: int) -> None:
    """Give each group, in order, its most accurate option that still fits (exact storage)."""
    used = sum(group.options[i][1] for group, i in zip(groups, choice, strict=True))
    changed = True
    while changed:
        changed = False
        for index, group in enumerate(groups):
            current = choice[index]
            room = capacity - used + group.options[current][1]
            better = [i for i in range(current + 1, len(group.options)) if group.options[i][1] <= room]
            if better:
                used += group.options[better[-1]][1] - group.options[current][1]
                choice[index] = better[-1]
                changed = True


def _solve_cbc(costs: list[list[float]], weights: list[list[float]], rhs: float, start: list[int]):
    import pulp

    model = pulp.LpProblem("bitalloc", pulp.LpMinimize)
    add_variable = getattr(model, "add_variable", None)  # PuLP >= 3.3; LpVariable before
    if add_variable is None:
        add_variable = lambda name, low, up, cat: pulp.LpVariable(name, low, up, cat)  # noqa: E731
    variables, objective, storage = [], [], []
    for g, (group_costs, group_weights) in enumerate(zip(costs, weights, strict=True)):
        row = [add_variable(f"x_{g}_{i}", 0, 1, cat=pulp.LpBinary) for i in range(len(group_costs))]
        for i, variable in enumerate(row):
            variable.setInitialValue(1 if i == start[g] else 0)
        variables.append(row)
        objective.extend(zip(row, group_costs, strict=True))
        storage.extend(zip(row, group_weights, strict=True))
        model += pulp.LpAffineExpression([(var, 1) for var in row]) == 1, f"one_{g}"
    model.setObjective(pulp.LpAffineExpression(objective))
    model += pulp.LpAffineExpression(storage) <= rhs, "budget"
    with warnings.catch_warnings():  # PuLP 3.3 deprecates its bundled CBC for PuLP 4.0
        warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
        command = getattr(pulp, "PULP_CBC_CMD", None) or pulp.COIN_CMD
        model.solve(command(msg=False, gapRel=0, gapAbs=0, warmStart=True))
    if model.status != pulp.LpStatusOptimal or model.sol_status != pulp.LpSolutionOptimal:
        raise RuntimeError(f"CBC did not prove optimality: {pulp.LpStatus[model.status]}")
    picks = [max(range(len(row)), key=lambda i, row=row: row[i].varValue or 0.0) for row in variables]
    return picks, 0.0  # optimal with gapRel = gapAbs = 0


def _solve_highs(costs: list[list[float]], weights: list[list[float]], rhs: float, start=None):
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    sizes = [len(group) for group in costs]
    n = sum(sizes)
    group_of = np.repeat(np.arange(len(sizes)), sizes)
    one_each = csr_array((np.ones(n), (group_of, np.arange(n))), shape=(len(sizes), n))
    storage = np.concatenate([np.asarray(w, dtype=float) for w in weights])[None, :]
    # mip_abs_gap is passed to HiGHS verbatim, with a warning; some HiGHS builds printf
    # debug lines to fd 1 even with output off, so fd 1 is pointed at /dev/null meanwhile.
    with warnings.catch_warnings(), _stdout_to_devnull():
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        result = milp(
            np.concatenate([np.asarray(c, dtype=float) for c in costs]),
            integrality=np.ones(n),
            bounds=Bounds(0, 1),
            constraints=[LinearConstraint(one_each, 1, 1), LinearConstraint(storage, -np.inf, rhs)],
            options={"disp": False, "mip_rel_gap": 0.0, "mip_abs_gap": 0.0},
        )
    if result.status != 0:
        raise RuntimeError(f"HiGHS did not prove optimality: {result.message}")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    picks = [int(np.argmax(result.x[a:b])) for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return picks, max(0.0, float(result.mip_gap or 0.0))


@contextlib.contextmanager
def _stdout_to_devnull():
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_BACKENDS = {"cbc": _solve_cbc, "highs": _solve_highs}


# ---- results -----------------------------------------------------------------------------------
def _build_plan(
    problem: _Problem, budget: float, choice: list[int], solver: str, gap: float, source: str | None
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
        solver={
            "name": solver,
            "status": "optimal",
            "objective": math.fsum(errors),
            "gap": round(gap, 9),
        },
        defaults={"rank": _most_common(ranks), "iters": _most_common(iters)},
        kept=list(problem.kept),
        modules=modules,
    )


def _most_common(counts: Counter) -> int:
    return min(counts, key=lambda value: (-counts[value], value))


def _quantized(problem: _Problem) -> list[str]:
    return [name for name in problem.matrices if name not in set(problem.kept)]


def _baseline(problem: _Problem, name: str, assignments: dict[str, str]) -> Baseline:
    errors, storage = [], 0
    for module, config in assignments.items():
        matrix = problem.matrices[module]
        errors.append(matrix.rows[config].objective_error)
        storage += matrix.storage(config, problem.count_lora)
    achieved = float(round(Fraction(storage, problem.numel), 6))
    return Baseline(name, math.fsum(errors), achieved, storage, assignments)


def _layer_index(name: str) -> int | None:
    """The first dotted component that is a number (``model.layers.7.mlp.up_proj`` -> 7)."""
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def _layer_table(plan: Plan) -> list[str]:
    """Rows = layer index, columns = short matrix kind (q, k, ..., down), cells = nf2/64."""
    cells = {n: f"{e['method']}{e['bits']}/{e['block_size']}" for n, e in plan.modules.items()}
    cells.update(dict.fromkeys(plan.kept, "16bit"))
    names = sorted(cells, key=_natural_key)
    kinds = {name: name.rsplit(".", 1)[-1].removesuffix("_proj") for name in names}
    if max(Counter((_layer_index(n), kinds[n]) for n in names).values()) > 1:
        kinds = {n: re.split(r"(?:^|\.)\d+\.", n, maxsplit=1)[-1] for n in names}
    columns = list(dict.fromkeys(kinds[name] for name in names))
    columns.sort(key=lambda kind: KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER))
    layers = list(dict.fromkeys(_layer_index(name) for name in names))
    grid = {(_layer_index(name), kinds[name]): cells[name] for name in names}
    rows = [["layer", *columns]]
    rows += [
        ["-" if layer is None else str(layer), *(grid.get((layer, c), "") for c in columns)]
        for layer in layers
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
