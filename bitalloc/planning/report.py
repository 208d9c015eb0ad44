"""Comparing and describing plans: simple baseline allocations and a human summary.

`uniform_baselines` (one config everywhere) and `first_k_layers_baseline` (LoftQ's mix) are
scored in the same objective and budget as `bitalloc.plan`; `summarize` prints a plan against
the best uniform config with a per-layer map of the chosen configs.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction

import pandas as pd

from ..errors import BitallocError
from ..names import natural_key
from ..quant import QuantConfig
from .budget import capacity_bits
from .constraints import Problem, prepare_problem
from .plan_file import Plan
from .profile_reader import canonical_config
from .targets import TargetFormat

__all__ = ["Baseline", "first_k_layers_baseline", "summarize", "uniform_baselines"]

KIND_ORDER = ("q", "k", "v", "o", "qkv", "gate", "up", "gate_up", "down")  # summary columns


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
    target: TargetFormat | None = None,
) -> list[Baseline]:
    """Every config that, applied to all quantized matrices, fits the budget; best first. With a
    ``target``, only configs it stores exactly on every matrix, counted in its storage."""
    problem = prepare_problem(profile_table, count_lora=count_lora, keep=keep, target=target)
    capacity = capacity_bits(budget, problem.numel)
    names = _quantized(problem)
    common = set.intersection(*(set(problem.matrices[name].rows) for name in names))
    if target is not None:
        shapes = {problem.matrices[name].shape for name in names}
        common = {c for c in common if all(target.why_not(QuantConfig.parse(c), s) is None for s in shapes)}
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
    problem = prepare_problem(profile_table, count_lora=count_lora, keep=keep)
    capacity = capacity_bits(budget, problem.numel)
    high, low = canonical_config(high, "high"), canonical_config(low, "low")
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


def summarize(plan: Plan, profile_table: pd.DataFrame, target: TargetFormat | None = None) -> str:
    """A human summary: bits, error vs the best uniform config, config counts, per-layer map.
    A plan made in a target's format is compared in that ``target``'s storage (give it)."""
    budget = plan.budget
    lora = "LoRA counted" if budget["includes_lora"] else "LoRA not counted"
    if plan.target:
        lora += f", in {plan.target['name']}'s storage"
    lines = [
        f"target {budget['target_bits']:g} bits/param, achieved {budget['achieved_bits']:g} "
        f"({lora}); objective {plan.objective}; {plan.solver['name']} {plan.solver['status']}",
        f"{len(plan.modules)} matrices quantized, {len(plan.kept)} kept in 16 bits",
    ]
    keep = [f"^{re.escape(name)}$" for name in plan.kept]
    uniform = uniform_baselines(
        profile_table, budget["target_bits"], count_lora=budget["includes_lora"], keep=keep, target=target
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


def _quantized(problem: Problem) -> list[str]:
    return [name for name in problem.matrices if name not in set(problem.kept)]


def _baseline(problem: Problem, name: str, assignments: dict[str, str]) -> Baseline:
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
    cells = {n: f"{e.method}{e.bits}/{e.block_size}" for n, e in plan.modules.items()}
    cells.update(dict.fromkeys(plan.kept, "16bit"))
    names = sorted(cells, key=natural_key)
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


def config_counts(plan: Plan) -> list[tuple[str, int]]:
    """(config, number of matrices) of a plan, by config name."""
    return sorted(Counter(plan.assignments.values()).items())
