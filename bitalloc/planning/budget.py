"""Budget arithmetic, exact: bits/param budgets to integer capacities and back.

The solvers work on integer storage bits; a budget is a float the user typed. These
functions turn one into the other without rounding a feasible budget into an infeasible
one, and print achieved budgets that never exceed the target.
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction

from ..errors import BitallocError
from .plan_file import _shown

LORA_BITS = 16  # LoRA factors are counted at 16 bits when the budget includes them


def capacity_bits(budget: float, numel: int) -> int:
    """Largest total storage in bits allowed by ``budget`` bits/param over ``numel`` params.

    Exact: the budget is read both as its binary value and as the decimal it prints as,
    whichever allows more, so a budget printed by `feasible_range` or a plan is achievable.
    """
    value = check_budget(budget)
    return max(math.floor(Fraction(value) * numel), math.floor(Fraction(repr(value)) * numel))


def check_budget(budget) -> float:
    """The budget as a float; BitallocError unless it is a finite positive number (no bool)."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise BitallocError(f"budget must be a number of bits per parameter, got {_shown(budget)}")
    value = float(budget) if finite(budget) else math.inf
    if not math.isfinite(value) or value <= 0:
        raise BitallocError(f"budget must be a positive number of bits per parameter, got {_shown(budget)}")
    return value


def finite(value: numbers.Real) -> bool:
    """math.isfinite, False for a number beyond the float range instead of OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def at_least(value: Fraction) -> float:
    """The smallest float >= ``value``."""
    result = float(value)
    return math.nextafter(result, math.inf) if Fraction(result) < value else result


def achieved_bits(ratio: Fraction, budget: float) -> float:
    """``ratio`` (storage per parameter, within ``budget``) to 6 decimals, never printed above
    the budget: rounded to nearest, or down where rounding up would pass the budget."""
    achieved = float(round(ratio, 6))
    if achieved > budget:
        achieved = float(Fraction(math.floor(ratio * 10**6), 10**6))
    return achieved
