"""Exact multiple-choice knapsack: pick one option per group, total storage within a capacity.

Pure numbers in, option indices out: each group is a list of (storage, error) options with
storage (exact int bits) strictly increasing and error strictly decreasing. An exact
Lagrangian reduction (see `solve`) hands the ILP (CBC or HiGHS) or the dynamic program only
the options that could still beat a greedy solution. Storage is compared in exact integers;
the solvers see scaled costs and their answer is re-checked.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import BitallocError

__all__ = ["SOLVERS", "register_solver", "solve"]

Options = Sequence[tuple[int, float]]  # one group's (storage, error) choices
# An ILP backend: (costs, weights, rhs, start) -> (pick per group, relative gap). It minimizes
# the sum of the picked costs, one option per group, with the picked weights summing to at most
# rhs (costs >= 0, weights in [0, 1], start a feasible pick per group usable as a MIP start),
# and raises unless it proved the optimum. It sees only the restricted problem of `solve`.
Backend = Callable[[list[list[float]], list[list[float]], float, list[int]], tuple[list[int], float]]

# The solvers by name, in registration order: an ILP backend, or None for the exact dynamic
# program over the whole core (no ILP). `register_solver` adds one; the planner, the CLI and
# the plan schema take their names from here.
SOLVERS: dict[str, Backend | None] = {}


def register_solver(name: str, backend: Backend | None) -> None:
    """Make ``name`` a solver of `solve` (and of `bitalloc.plan`); BitallocError if it is taken."""
    if not isinstance(name, str) or not name.isidentifier() or name in SOLVERS:
        raise BitallocError(f"cannot register solver {name!r}: a new identifier is needed")
    if backend is not None and not callable(backend):
        raise BitallocError(f"solver {name!r}: the backend must be callable or None (the exact DP)")
    SOLVERS[name] = backend


def solve(groups: Sequence[Options], capacity: int, solver: str) -> tuple[list[int], float]:
    """Option index per group minimizing the error with storage <= capacity (exact ints).

    Exact core reduction around the ILP: at the LP's budget price λ every solution's error
    is at least the Lagrangian bound plus the reduced costs e + λ·s − min(e + λ·s) of its
    options, so a solution better than z uses only options with reduced cost <= z − bound.
    The ILP is solved on the options below a threshold (a restricted problem, containing
    the greedy incumbent); once its optimum z satisfies z − bound <= threshold, no option
    left out can improve it and z is optimal. Otherwise the threshold grows and it re-solves.
    ``solver="dp"`` instead runs an exact dynamic program over the whole core. The caller
    checks feasibility: the cheapest options must fit. Returns (choice, relative gap).
    """
    if sum(options[-1][0] for options in groups) <= capacity:
        return [len(options) - 1 for options in groups], 0.0
    groups = _in_float_range(groups)
    width = max(len(options) for options in groups)
    storage = np.full((len(groups), width), np.inf)
    error = np.full((len(groups), width), np.inf)
    for index, options in enumerate(groups):
        storage[index, : len(options)] = [option[0] for option in options]
        error[index, : len(options)] = [option[1] for option in options]
    price, bound = _lagrangian(storage, error, capacity)
    reduced = error + price * storage
    reduced -= reduced.min(axis=1, keepdims=True)
    margin = 1e-9 * (abs(bound) + price * capacity)  # floating-point safety: keeps more options
    choice = _greedy(storage, error, price, capacity).tolist()
    best = math.fsum(error[np.arange(len(groups)), choice])
    threshold, gap = (best - bound) / 16, 0.0
    exact_dp = SOLVERS[solver] is None
    while best > 0 and not exact_dp:
        core = reduced <= threshold + margin
        try:
            solution, gap = _solve_core(groups, storage, error, core, choice, capacity, solver, best)
        except _IllPosed:  # numbers the ILP cannot take (or it failed): the exact DP instead
            exact_dp, gap = True, 0.0
            break
        value = math.fsum(error[np.arange(len(groups)), solution])
        if value < best:
            choice, best = solution, value
        if best - bound <= threshold:
            break  # every option that could beat `best` was in the restricted problem
        threshold = min(best - bound, 4 * threshold)
        if not math.isfinite(threshold):
            exact_dp, gap = True, 0.0
            break
    if exact_dp and best > 0:
        core = reduced <= best - bound + margin
        solution = _solve_dp(groups, error, core, choice, capacity, price, best + margin)
        if math.fsum(error[np.arange(len(groups)), solution]) <= best:
            choice = solution
    _top_up(groups, choice, capacity)
    return choice, gap


class _IllPosed(Exception):
    """The ILP backend cannot solve this restricted problem reliably (scaling or failure)."""


def _in_float_range(groups: Sequence[Options]) -> Sequence[Options]:
    """The groups with errors scaled by a power of two (exact: same order, same optimum) when
    they are so large that price · storage could overflow, or so small that the solvers' unit
    would vanish. Errors of real profiles are far inside both bounds and left as they are."""
    top = max(error for options in groups for _, error in options)
    if top <= 0:
        return groups
    exponent = math.frexp(top)[1]
    storage = int(sum(options[-1][0] for options in groups))
    highest = 1000 - storage.bit_length()  # keeps error, price (~2·error) and price·storage finite
    if exponent > highest:
        shift = highest - exponent
    elif exponent < -500:
        shift = -exponent  # the largest error to [0.5, 1)
    else:
        return groups
    return [[(size, math.ldexp(error, shift)) for size, error in options] for options in groups]


def _solve_core(groups, storage, error, core, incumbent, capacity, solver, scale):
    """The ILP restricted to ``core`` options (plus the incumbent's); exact-storage checked."""
    core = core.copy()
    core[np.arange(len(groups)), incumbent] = True
    counts = core.sum(axis=1)
    solution = list(incumbent)
    for g in np.flatnonzero(counts == 1):
        solution[g] = int(np.flatnonzero(core[g])[0])
    free = [(g, np.flatnonzero(core[g]).tolist()) for g in np.flatnonzero(counts > 1)]
    slack = capacity - sum(groups[g][solution[g]][0] for g in np.flatnonzero(counts == 1))
    slack -= sum(groups[g][options[0]][0] for g, options in free)
    free = [(g, [i for i in opts if storage[g, i] - storage[g, opts[0]] <= slack]) for g, opts in free]
    if not free or slack <= 0:
        return incumbent, 0.0
    unit = scale * 1e-7  # solver tolerances (~1e-5 absolute) become ~1e-12 of the objective
    if not unit >= sys.float_info.min:  # a vanishing unit: errors of ~1e-300 and below
        raise _IllPosed("errors too small for the ILP's tolerances")
    costs = [[(error[g, i] - error[g, options[-1]]) / unit for i in options] for g, options in free]
    if not all(0 <= cost <= 1e20 for row in costs for cost in row):  # also NaN
        raise _IllPosed("costs too far apart for the ILP's tolerances")
    weights = [[(storage[g, i] - storage[g, options[0]]) / slack for i in options] for g, options in free]
    start = [options.index(incumbent[g]) for g, options in free]  # a MIP start for CBC
    rhs = 1.0
    for _attempt in range(4):
        try:
            picks, gap = SOLVERS[solver](costs, weights, rhs, start)
        except ImportError:
            raise
        except Exception as exc:  # CBC or HiGHS failed (e.g. no proven optimum): the exact DP
            raise _IllPosed(str(exc)) from exc
        for (g, options), pick in zip(free, picks, strict=True):
            solution[g] = options[pick]
        used = sum(group[i][0] for group, i in zip(groups, solution, strict=True))
        if used <= capacity:
            return solution, gap
        rhs -= (used - capacity) / slack + 1e-9  # a feasibility tolerance let it overshoot
    raise _IllPosed(f"{solver}: solution exceeds the budget after 4 tries (numerics)")


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
    room = capacity - sum(groups[g][incumbent[g]][0] for g in fixed)
    limit -= math.fsum(error[g, incumbent[g]] for g in fixed)
    lagrangian = [min(e + price * s for s, e in groups[g]) for g in free]
    rest = math.fsum(lagrangian)
    storage, total, steps = np.zeros(1, dtype=np.int64), np.zeros(1), []
    for g, minimum in zip(free, lagrangian, strict=True):
        rest -= minimum
        options = np.flatnonzero(core[g])
        sizes = np.array([groups[g][i][0] for i in options], dtype=np.int64)
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


def _top_up(groups: Sequence[Options], choice: list[int], capacity: int) -> None:
    """Give each group, in order, its most accurate option that still fits (exact storage)."""
    used = sum(options[i][0] for options, i in zip(groups, choice, strict=True))
    changed = True
    while changed:
        changed = False
        for index, options in enumerate(groups):
            current = choice[index]
            room = capacity - used + options[current][0]
            better = [i for i in range(current + 1, len(options)) if options[i][0] <= room]
            if better:
                used += options[better[-1]][0] - options[current][0]
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
    # disp=False is HiGHS's own output switch (output_flag); the process's file descriptors are
    # left alone, so what other threads print meanwhile still arrives. mip_abs_gap is passed to
    # HiGHS verbatim, with a warning.
    with warnings.catch_warnings():
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


register_solver("cbc", _solve_cbc)
register_solver("highs", _solve_highs)
register_solver("dp", None)
