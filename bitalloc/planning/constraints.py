"""The planning problem: a checked profile after the constraints, ready for any budget.

Keep (16 bits, outside the budget), bit bounds, pins and ties narrow each matrix's
configs; tied matrices become one group that picks one config; dominated choices (at least
the storage and the error of another) are dropped. `Problem` is what the solvers see.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import BitallocError
from ..names import compile_patterns
from ..profiling.table import ProfileMetadata
from ..quant import QuantConfig
from .budget import finite
from .plan_file import _shown
from .profile_reader import Matrix, apply_coefficients, canonical_config, read_table
from .targets import TargetFormat, check_target, refuse

MAX_TOTAL_BITS = 2**62  # the exact solvers sum storage in int64


@dataclass
class Group:
    """Matrices that share one config, and the undominated choices for them.

    ``options`` holds (config, storage, error) summed over the members, storage strictly
    increasing and error strictly decreasing.
    """

    modules: list[str]
    options: list[tuple[str, int, float]]


@dataclass
class Problem:
    """A profile after constraints: what `plan` solves for any number of budgets."""

    matrices: dict[str, Matrix]  # every profiled matrix, natural name order
    groups: list[Group]
    kept: list[str]
    numel: int  # parameters of the quantized matrices: the budget's denominator
    objective: str
    count_lora: bool
    meta: ProfileMetadata  # layer_weights cleared when the plan ignores them
    target: TargetFormat | None = None  # storage counted in this target's format (only its exact configs)


@dataclass(frozen=True)
class Constraints:
    """What `plan` takes besides the budget and solver (see `bitalloc.plan`)."""

    count_lora: bool = False
    tie: Iterable[str] = ()
    min_bits: int | None = None
    max_bits: int | None = None
    pin: dict[str, str] | None = None
    keep: Iterable[str] = ()
    layer_weights: bool = True
    target: TargetFormat | None = None


def prepare_problem(profile_table, **constraints) -> Problem:
    """Read the table, apply keep/pin/bit bounds/ties (keywords of `Constraints`), and drop
    dominated configs."""
    given = Constraints(**constraints)
    read = read_table(profile_table)
    matrices, meta = read.matrices, read.meta
    if given.layer_weights:
        apply_coefficients(matrices, meta)
    else:
        meta.layer_weights = None
    count_lora = bool(given.count_lora) if isinstance(given.count_lora, np.bool_) else given.count_lora
    if not isinstance(count_lora, bool):
        raise BitallocError(f"count_lora must be True or False, got {count_lora!r}")
    names = list(matrices)
    kept: set[str] = set()
    for pattern, regex in _patterns("keep", given.keep):
        kept.update(_matching(pattern, regex, names, "keep"))
    quantized = [name for name in names if name not in kept]
    if not quantized:
        raise BitallocError("keep leaves no matrix to quantize")
    candidates = _within_bits(matrices, quantized, given.min_bits, given.max_bits)
    target = check_target(given.target)
    if target is not None:
        if count_lora:
            raise BitallocError(
                f"a plan in {target.name}'s storage cannot count LoRA factors: "
                f"{target.name} does not store them"
            )
        _in_target(target, matrices, quantized, candidates, given.pin)
    pinned = _pin(given.pin, matrices, kept, candidates)
    if target is not None:
        every = sorted(set().union(*(candidates[name] for name in quantized)))
        why = target.plan_why_not([QuantConfig.parse(config) for config in every])
        if why is not None:
            raise BitallocError(
                f"the candidate configs for {target.name} are not stored exactly together ({why}): "
                "pin them (--pin) or profile --configs of one kind"
            )
    for name in quantized:
        if not candidates[name]:
            why = f"pinned to {pinned[name]!r}" if name in pinned else "profiled configs"
            raise BitallocError(
                f"no config left for {name!r}: {why} outside bits [{given.min_bits}, {given.max_bits}]"
            )
    groups = _groups(_tie_components(given.tie, names, quantized), matrices, candidates, count_lora)
    numel = sum(matrices[name].numel for name in quantized)
    if sum(group.options[-1][1] for group in groups) >= MAX_TOTAL_BITS:
        raise BitallocError("the profiled matrices are too large to plan: over 2**62 bits in all")
    kept_names = [n for n in names if n in kept]
    return Problem(matrices, groups, kept_names, numel, read.objective, count_lora, meta, target)


def _in_target(
    target: TargetFormat, matrices: dict[str, Matrix], quantized: list[str], candidates: dict, pin
) -> None:
    """Narrow each matrix's candidates to the configs ``target`` stores exactly on its shape and count
    them in the target's storage; BitallocError for a pinned config it does not store, or a matrix
    left with none."""
    for pattern, config in (pin or {}).items() if isinstance(pin, dict) else ():
        if isinstance(config, str):
            why = target.why_not(QuantConfig.parse(canonical_config(config, f"pin {pattern!r}")))
            if why is not None:
                raise refuse(target, config, why)
    for name in quantized:
        matrix = matrices[name]
        reasons = {}
        for config in sorted(candidates[name]):
            reasons[config] = target.why_not(QuantConfig.parse(config), matrix.shape)
            if reasons[config] is None:
                storage = target.storage_bits(QuantConfig.parse(config), matrix.shape)
                matrix.rows[config] = dataclasses.replace(matrix.rows[config], storage_bits=storage)
        candidates[name] = {config for config, why in reasons.items() if why is None}
        if not candidates[name] and reasons:
            config, why = next(iter(reasons.items()))
            raise BitallocError(
                f"no profiled config of {name!r} (shape {matrix.shape[0]}x{matrix.shape[1]}) is stored "
                f"exactly by {target.name}: {config} ({why}) and {len(reasons) - 1} more; profile it with "
                f"--target {target.name}, which takes {target.description}"
            )


def _within_bits(matrices: dict[str, Matrix], quantized: list[str], min_bits, max_bits) -> dict[str, set]:
    """Each quantized matrix's configs with bits in [min_bits, max_bits]."""
    for label, bound in (("min_bits", min_bits), ("max_bits", max_bits)):
        if bound is not None and (
            isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not finite(bound)
        ):
            raise BitallocError(f"{label} must be a number of bits, got {_shown(bound)}")
    low = -math.inf if min_bits is None else min_bits
    high = math.inf if max_bits is None else max_bits
    if low > high:
        raise BitallocError(f"min_bits {min_bits} is above max_bits {max_bits}")
    return {
        name: {c for c, row in matrices[name].rows.items() if low <= row.bits <= high} for name in quantized
    }


def _pin(pin, matrices: dict[str, Matrix], kept: set[str], candidates: dict[str, set]) -> dict[str, str]:
    """Narrow ``candidates`` to the pinned configs; the pinned config of each matched matrix."""
    pinned: dict[str, str] = {}
    if pin is not None and not isinstance(pin, dict):
        raise BitallocError(f"pin must be a dict {{regex: config}}, got {type(pin).__name__}")
    names = list(matrices)
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
    return pinned


def _groups(components, matrices: dict[str, Matrix], candidates: dict[str, set], count_lora: bool) -> list:
    """One Group per tie component: the configs all its members allow, summed, undominated."""
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
        groups.append(Group(members, _undominated(options)))
    return groups


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
